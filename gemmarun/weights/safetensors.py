"""Hugging Face checkpoint folders: config.json + model.safetensors (or shards with an index)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
Empty = Callable[..., torch.Tensor]  # (shape, dtype=) -> an uninitialised tensor, as torch.empty


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when it has one."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-download the checkpoint") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"{folder} lacks shard(s) {', '.join(missing)} named in {INDEX}")
        return [folder / f for f in files]
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{folder} has no model.safetensors or {INDEX}; gemmarun loads safetensors checkpoints or .gguf files")


def iter_tensors(files: list[Path], empty_for: Callable[[str], Empty | None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, memory-mapped: nothing is read until the tensor is used.

    A tensor whose name empty_for gives an allocator (shape, dtype) -> tensor is read from the file
    into the tensor it makes instead (a loader's huge-page arena), so no page of the mapping is
    touched for it: copied out of the mapping, a 2B int8 load held 5.3 GB resident, mapping and copy.
    """
    for path in files:
        start, header = _header(path)
        try:
            with safe_open(str(path), framework="pt") as f, open(path, "rb", buffering=0) as raw:
                for name in f.keys():
                    empty = empty_for(name) if empty_for else None
                    entry = header[name]  # safe_open read the same table, and checked it
                    if empty is None or entry["dtype"] not in DTYPES:
                        yield name, f.get_tensor(name)
                    else:
                        yield name, _read(raw, path, name, start, entry, empty)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-download it") from None


# One read() at a time: 1 GiB into untouched huge pages read in 2.0 s at once, 0.33 s in 32 MiB
# pieces (AMD EPYC, THP defrag `madvise`); and one read() returns at most ~2 GiB on Linux.
READ = 32 << 20

# safetensors' dtype names of the tensors a reader may read into its own memory (the packed fields)
DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}  # fmt: skip


def _read(raw, path: Path, name: str, start: int, entry: dict, empty: Empty) -> torch.Tensor:
    """One tensor read from the file into empty(shape, dtype=); safe_open checked its entry already."""
    t = empty(tuple(entry["shape"]), dtype=DTYPES[entry["dtype"]])
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    raw.seek(start + entry["data_offsets"][0])
    at = 0
    while at < len(view):
        got = raw.readinto(view[at : at + READ])
        if not got:  # the file shrank since _header looked
            raise CheckpointError(f"{path} ended inside tensor {name}; re-download it")
        at += got
    return t


def _header(path: Path) -> tuple[int, dict]:
    """(where the tensor data starts, the header), checked: a truncated download is caught before torch
    maps past the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes); re-download it")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or corrupt (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path} has a corrupt header; re-download it") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # not {name: {dtype, shape, data_offsets}}
        raise CheckpointError(f"{path} has a corrupt header (not a safetensors tensor table); re-download it") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}; re-download it")
    return 8 + n, header


def read_metadata(path: Path) -> dict[str, str]:
    _header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-download it") from None
