"""Hugging Face checkpoint folders: config.json + model.safetensors (or shards with an index)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, memory-mapped: nothing is read until the tensor is used."""
    for path in files:
        _check_size(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-download it") from None


def _check_size(path: Path) -> None:
    """Catch a truncated download before torch maps past the end of the file."""
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


def read_metadata(path: Path) -> dict[str, str]:
    _check_size(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-download it") from None
