"""GGUF files read: the header and memory-mapped tensors (read_gguf), and a Gemma state dict (load_gguf).

`load_gguf(path)` is the entry point: (config, HF-named state dict, metadata). Norm weights come back in
Hugging Face form (`w`, used as `1 + w`): llama.cpp's converter bakes the `+1` into the file and we undo it.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ...errors import CheckpointError, ModelNotFoundError
from ...model.config import GemmaConfig
from .config import config_from_gguf
from .dequant import _decode_into, resolve_type
from .names import expected_shapes, gguf_name, hf_name, is_norm

_MAGIC = b"GGUF"

# GGUF metadata value types (gguf-py GGUFValueType): scalar struct formats and numpy array dtypes.
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPE = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # llama.cpp name, e.g. "blk.0.attn_q.weight"
    ggml_type: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order: ggml's ne reversed, so a linear weight is (out, in)
    data: torch.Tensor  # uint8 bytes, memory-mapped from the file
    offset: int | None = None  # where `data` starts in the file

    @property
    def type_name(self) -> str:
        return QT(self.ggml_type).name


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict  # plain Python values; float32 scalars as their shortest decimal (1e-06, not 9.99...e-07)
    tensors: dict[str, GGUFTensor]  # in file order
    buf: mmap.mmap | None = None  # the map the tensors' bytes live in

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def drop_pages(self, t: GGUFTensor) -> None:
        """Give a tensor's pages back to the OS once it is decoded or repacked: read pages of the map
        otherwise count in RSS until it closes, a second copy of the weights at the peak (the 270M's
        load: peak 835 -> 664 MB). Touching them again re-reads the file; the map is never written."""
        if self.buf is None or t.offset is None or not t.data.numel() or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.offset - t.offset % mmap.PAGESIZE
        self.buf.madvise(mmap.MADV_DONTNEED, start, t.offset + t.data.numel() - start)


class _Cursor:
    """Sequential little-endian reads from the mapped file; reading past the end is a truncated file."""

    def __init__(self, buf: mmap.mmap, path: Path, pos: int):
        self.buf, self.path, self.pos, self.size = buf, path, pos, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(f"{self.path} is truncated: its header ends early; re-download the file")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def _strings(self, n: int) -> list[str]:
        """An array of n strings (a vocabulary: 262144 of them) in one tight loop."""
        buf, pos, end, out = self.buf, self.pos, self.size, []
        for _ in range(n):
            if pos + 8 > end:
                break
            k = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8 + k
            if pos > end:
                break
            out.append(buf[pos - k : pos].decode("utf-8", errors="replace"))
        else:
            self.pos = pos
            return out
        raise CheckpointError(f"{self.path} is truncated: its header ends early; re-download the file")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _ARRAY_DTYPE:  # numeric arrays (token scores, types) in one read
                dt = np.dtype(_ARRAY_DTYPE[etype])
                return np.frombuffer(self.buf, dt, n, self.take(n * dt.itemsize)).tolist()
            if etype == _STRING:
                return self._strings(n)
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise CheckpointError(f"{self.path} has a metadata value of unknown type {vtype}; the file is corrupt")
        v = self.unpack(_SCALAR[vtype])
        return float(str(np.float32(v))) if vtype == _FLOAT32 else v


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header; tensor bytes stay memory-mapped (nothing is copied)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic at its start); give a .gguf file from llama.cpp")
        # A private copy-on-write map: writable (so torch shares it without a warning), never written back.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(buf, path, 4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path} is GGUF version {version}; gemmarun reads little-endian GGUF v2 and v3")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 4:
            raise CheckpointError(f"{path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        ne = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{path} has general.alignment {align!r}, not a power of two; the file is corrupt")
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, ne, ggml_type, offset in infos:
        nbytes = _nbytes(path, name, ne, ggml_type)
        if offset % align:  # llama.cpp writes every tensor at a multiple of it; a moved one reads shifted bytes
            raise CheckpointError(
                f"{path}: tensor {name} starts at offset {offset}, not a multiple of the file's alignment {align}; the file is corrupt"
            )
        start = data_start + offset
        if start + nbytes > cur.size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} needs bytes up to {start + nbytes} but the file has {cur.size}; re-download it"
            )
        if name in tensors:
            raise CheckpointError(f"{path} holds tensor {name} twice; the file is corrupt")
        data = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = GGUFTensor(name, ggml_type, tuple(reversed(ne)), data, start)
    return GGUFFile(path, version, metadata, tensors, buf)


def _nbytes(path: Path, name: str, ne: list[int], ggml_type: int) -> int:
    try:
        block, size = GGML_QUANT_SIZES[QT(ggml_type)]
    except (ValueError, KeyError):
        raise CheckpointError(
            f"{path}: tensor {name} has unknown ggml type id {ggml_type}; the file is corrupt or newer than gguf-py"
        ) from None
    if ne and ne[0] % block:
        raise CheckpointError(f"{path}: tensor {name} has rows of {ne[0]} values, not a multiple of its {block}-value blocks")
    return math.prod(ne) // block * size


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, packer=None) -> tuple[GemmaConfig, dict[str, torch.Tensor], dict]:
    """(config, Hugging Face-named state dict in `dtype`, metadata) from a gemma2/gemma3 GGUF file.
    Tensors are decoded one at a time straight into their outputs, so peak memory stays near the result.
    `packer(name, tensor)` may return a packed form to keep instead of decoding (None: decode)."""
    f = read_gguf(path)
    embed = f.tensors.get("token_embd.weight")
    config = config_from_gguf(f.metadata, vocab_size=embed.shape[0] if embed is not None else None)
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > config.vocab_size:
        raise CheckpointError(f"{f.path}: the tokenizer has {len(tokens)} tokens but the embedding only {config.vocab_size} rows")
    shapes = expected_shapes(config)
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    state = {}
    head = f.tensors.get("output.weight")
    # a stored copy of the tied embedding (same type, same bytes) is dropped
    tied_copy = head is not None and embed is not None and head.ggml_type == embed.ggml_type and torch.equal(head.data, embed.data)
    for t in f.tensors.values():
        name = hf_name(t.name)
        if tied_copy and t.name == "output.weight":
            continue
        if name not in shapes:
            raise CheckpointError(f"{f.path}: unexpected tensor {t.name} for a {config.num_hidden_layers}-layer {f.architecture} model")
        if t.shape != shapes[name]:
            raise CheckpointError(f"{f.path}: tensor {t.name} has shape {t.shape}; this model's config needs {shapes[name]}")
        qt = resolve_type(t.ggml_type, f"{f.path}: tensor {t.name}")
        if is_norm(name):  # stored as 1 + w (convert_hf_to_gguf); undo it in float32
            w = torch.empty(t.shape, dtype=torch.float32)
            _decode_into(t.data, qt, w.view(-1))
            state[name] = (w - 1).to(dtype)
        elif packer is not None and (packed := packer(name, t)) is not None:
            state[name] = packed
        else:
            state[name] = torch.empty(t.shape, dtype=dtype)
            _decode_into(t.data, qt, state[name].view(-1))
        f.drop_pages(t)
    missing = [gguf_name(n) for n in shapes if n not in state and n != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{f.path} lacks {len(missing)} tensor(s) this config needs, e.g. {', '.join(missing[:3])}")
    if "lm_head.weight" in state:
        config = config.replace(tie_word_embeddings=False)
    return config, state, f.metadata
