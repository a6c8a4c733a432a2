"""Dequantisation: GGUF blocks (and float tensors) -> torch tensors of any float dtype.

Block layouts from ggml-common.h. Each decoder takes `b`, (n_blocks, type_size) uint8, and writes
(n_blocks, block_size) float32 into `o`, with the same float32 operations as gguf-py's numpy
reference (integers are exact; one rounding per multiply or add), so results match it bit for bit.
The integer codes stay 8-bit until the one mixed-dtype multiply that writes `o`. QK_K = 256.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ...errors import CheckpointError


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:  # the fp16 field at (even) byte `at` of each block -> (nb, 1)
    return b.view(torch.float16)[:, at // 2 : at // 2 + 1].float()


def _planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) bytes -> (..., 8 // bits, n): each byte's `bits`-wide fields, lowest first.
    (Scalar shifts of a contiguous copy: several times faster in torch than one broadcast shift.)"""
    q, mask = q.contiguous(), (1 << bits) - 1
    return torch.stack([(q >> s) & mask if s else q & mask for s in range(0, 8, bits)], dim=-2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:  # (nb, n) -> (nb, 2n): all low nibbles, then all high nibbles
    return _planes(q, 4).reshape(q.shape[0], -1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:  # (nb, 4) little-endian uint32 -> (nb, 32) bits, bit j first
    # Bit j of the uint32 is bit j % 8 of byte j // 8; numpy unpacks bytes without int32 temporaries.
    return torch.from_numpy(np.unpackbits(qh.contiguous().numpy(), axis=-1, bitorder="little"))


def _q4_0(b, o):  # d, 16 bytes of 4-bit q: x = d * (q - 8)
    torch.mul(_f16(b, 0), _nibbles(b[:, 2:]).view(torch.int8) - 8, out=o)


def _q4_1(b, o):  # d, m, 16 bytes of 4-bit q: x = d * q + m
    torch.mul(_f16(b, 0), _nibbles(b[:, 4:]), out=o).add_(_f16(b, 2))


def _q5_0(b, o):  # d, 32 high bits, 16 bytes of low nibbles: x = d * (q - 16)
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    torch.mul(_f16(b, 0), q.view(torch.int8) - 16, out=o)


def _q5_1(b, o):  # d, m, 32 high bits, 16 bytes of low nibbles: x = d * q + m
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    torch.mul(_f16(b, 0), q, out=o).add_(_f16(b, 2))


def _q8_0(b, o):  # d, 32 int8: x = q * d
    torch.mul(b[:, 2:].view(torch.int8), _f16(b, 0), out=o)


def _q2_k(b, o):  # scales[16] (low nibble scale, high nibble min), qs[64] (2-bit), d, dmin
    nb = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F)).view(nb, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4)).view(nb, 16, 1)
    q = _planes(b[:, 16:80].reshape(nb, 2, 32), 2).reshape(nb, 16, 16)
    torch.mul(dl, q, out=o.view(nb, 16, 16)).sub_(ml)


def _q3_k(b, o):  # hmask[32], qs[64] (2-bit), scales[12] (16 x 6-bit, offset 32), d
    nb = b.shape[0]
    lo = _planes(b[:, 96:104], 4).reshape(nb, 16)
    hi = _planes(b[:, 104:108], 2).reshape(nb, 16)
    dl = (_f16(b, 108) * ((lo | (hi << 4)).view(torch.int8) - 32)).view(nb, 16, 1)
    ql = _planes(b[:, 32:96].reshape(nb, 2, 32), 2).reshape(nb, 16, 16)
    qh = _planes(b[:, :32], 1).reshape(nb, 16, 16)
    q = ql.view(torch.int8) - ((qh ^ 1) << 2).view(torch.int8)  # a clear hmask bit subtracts 4
    torch.mul(dl, q, out=o.view(nb, 16, 16))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    s = s.reshape(s.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(b, o):  # d, dmin, scales[12], qs[128]: 8 sub-blocks of 32, x = d*sc*q - dmin*m
    nb = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(nb, 8, 1)
    dm = (_f16(b, 2) * mn).view(nb, 8, 1)
    q = _planes(b[:, 16:].reshape(nb, 4, 32), 4).reshape(nb, 8, 32)
    torch.mul(d, q, out=o.view(nb, 8, 32)).sub_(dm)


def _q5_k(b, o):  # d, dmin, scales[12], qh[32], qs[128]
    nb = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(nb, 8, 1)
    dm = (_f16(b, 2) * mn).view(nb, 8, 1)
    ql = _planes(b[:, 48:].reshape(nb, 4, 32), 4).reshape(nb, 8, 32)
    qh = _planes(b[:, 16:48], 1)
    torch.mul(d, ql | (qh << 4), out=o.view(nb, 8, 32)).sub_(dm)


def _q6_k(b, o):  # ql[128], qh[64], scales[16] (int8), d: x = d * sc * (q - 32)
    nb = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).view(nb, 16, 1)
    ql = _planes(b[:, :128].reshape(nb, 2, 64), 4).reshape(nb, 8, 32)
    qh = _planes(b[:, 128:192].reshape(nb, 2, 32), 2).reshape(nb, 8, 32)
    q = (ql | (qh << 4)).view(torch.int8) - 32
    torch.mul(d, q.reshape(nb, 16, 16), out=o.view(nb, 16, 16))


_FLOATS = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
_BLOCKS = {
    QT.Q4_0: _q4_0,
    QT.Q4_1: _q4_1,
    QT.Q5_0: _q5_0,
    QT.Q5_1: _q5_1,
    QT.Q8_0: _q8_0,
    QT.Q2_K: _q2_k,
    QT.Q3_K: _q3_k,
    QT.Q4_K: _q4_k,
    QT.Q5_K: _q5_k,
    QT.Q6_K: _q6_k,
}
SUPPORTED_TYPES = tuple(t.name for t in (*_FLOATS, *_BLOCKS))
_CHUNK = 1 << 18  # values decoded per step: bounds the scratch memory to about a MiB


def resolve_type(t: int | str | QT, what: str = "tensor") -> QT:
    """The ggml type named by an id, a name ("Q4_K") or an enum member; unsupported ones raise."""
    try:
        qt = QT[t.upper()] if isinstance(t, str) else QT(int(t))
    except (KeyError, ValueError):
        qt = None
    if qt not in _FLOATS and qt not in _BLOCKS:
        name = qt.name if qt is not None else repr(t)
        raise CheckpointError(
            f"{what} has ggml type {name}, which gemmarun cannot dequantise; supported: {', '.join(SUPPORTED_TYPES)} "
            "(re-quantise the file with llama-quantize to one of them)"
        )
    return qt


def _decode_into(raw: torch.Tensor, qt: QT, out: torch.Tensor) -> None:
    """Decode flat uint8 `raw` into flat `out` (any float dtype), one chunk of blocks at a time."""
    if raw.data_ptr() % 4:  # fp16 fields and float data are read in place: realign a stray slice
        raw = raw.clone()
    if qt in _FLOATS:
        out.copy_(raw.view(_FLOATS[qt]))
        return
    block, size = GGML_QUANT_SIZES[qt]
    blocks, decode, step = raw.view(-1, size), _BLOCKS[qt], max(1, _CHUNK // block)
    scratch = None if out.dtype == torch.float32 else torch.empty(min(step, blocks.shape[0]), block)
    for i in range(0, blocks.shape[0], step):
        b = blocks[i : i + step]
        dst = out[i * block : (i + b.shape[0]) * block].view(-1, block)
        if scratch is None:
            decode(b, dst)
        else:  # decode in float32, then round once into the target dtype
            decode(b, scratch[: b.shape[0]])
            dst.copy_(scratch[: b.shape[0]])


def dequantize(raw: torch.Tensor, ggml_type: int | str | QT, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tensor of `shape` (torch order) decoded from its GGUF bytes `raw` (uint8)."""
    qt = resolve_type(ggml_type)
    shape = tuple(int(s) for s in shape)
    block, size = GGML_QUANT_SIZES[qt]
    if shape and shape[-1] % block:
        raise CheckpointError(f"a {qt.name} tensor's rows must hold a multiple of {block} values; got shape {shape}")
    want = math.prod(shape) // block * size
    if raw.dtype != torch.uint8 or raw.numel() != want:
        raise CheckpointError(f"a {qt.name} tensor of shape {shape} needs {want} uint8 bytes; got {raw.numel()} {raw.dtype}")
    out = torch.empty(shape, dtype=dtype)
    _decode_into(raw.reshape(-1), qt, out.view(-1))
    return out
