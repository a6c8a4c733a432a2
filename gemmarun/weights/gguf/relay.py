"""GGUF blocks re-laid, without loss, into gemmarun's packed format (see quant/format.py) at load.

Every value keeps exactly the codes, scales and mins of its block; only the layout changes:
Q8_0, Q4_0, Q4_1 keep their size; Q5_0/Q5_1/Q5_K/Q6_K codes widen to int8 (the 6-bit layout
would be smaller, but on the 270M's 640-wide matrices its unpacking cost more than the bytes
saved: decode 45 -> 41 tok/s, prefill 240 -> 180); K-quants keep float32 sub-block scales.
Types without a mapping here (Q2_K, Q3_K, floats) are decoded densely.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ...quant import Packed, is_quantizable, pack_nibbles
from .dequant import _bits32, _f16, _k_scales, _nibbles, _planes
from .reader import GGUFTensor


def _blocks(t: GGUFTensor) -> torch.Tensor:
    _, size = GGML_QUANT_SIZES[QT(t.ggml_type)]
    raw = t.data if t.data.data_ptr() % 4 == 0 else t.data.clone()  # fp16 fields are read in place
    return raw.view(-1, size)


def _into(x: torch.Tensor, empty) -> torch.Tensor:
    """x contiguous, copied into a tensor from `empty` (a loader's arena: quant/hugepages.py) when given."""
    return x.contiguous() if empty is None else empty(x.shape, dtype=x.dtype).copy_(x)


def _half(b: torch.Tensor, at: int, n: int, empty) -> torch.Tensor:  # fp16 field -> (N, blocks) float16
    return _into(b.view(torch.float16)[:, at // 2], empty).view(n, -1)


def repack(t: GGUFTensor, empty=None) -> Packed | None:
    """t's blocks re-laid, each field written once into a tensor from `empty(shape, dtype=...)` when
    given (else where the relay computes it: no copy more than before arenas); None for a type
    without a mapping."""
    qt = QT(t.ggml_type)
    n, k = t.shape
    b = _blocks(t) if qt in _REPACKERS else None
    return _REPACKERS[qt](b, n, k, empty) if b is not None else None


def _q8_0(b, n, k, empty):
    q = _into(b[:, 2:].view(torch.int8), empty).view(n, k)
    return Packed(q=q, scales=_half(b, 0, n, empty), mins=None, group=32, zero=0.0, bits=8)


def _q4_0(b, n, k, empty):  # already 16 bytes per 32 values in our nibble order
    return Packed(q=_into(b[:, 2:], empty).view(n, k // 2), scales=_half(b, 0, n, empty), mins=None, group=32, zero=8.0, bits=4)


def _q4_1(b, n, k, empty):
    q = _into(b[:, 4:], empty).view(n, k // 2)
    return Packed(q=q, scales=_half(b, 0, n, empty), mins=_half(b, 2, n, empty), group=32, zero=0.0, bits=4)


def _q5_0(b, n, k, empty):
    q = (_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).view(torch.int8) - 16
    return Packed(q=_into(q.reshape(n, k), empty), scales=_half(b, 0, n, empty), mins=None, group=32, zero=0.0, bits=8)


def _q5_1(b, n, k, empty):
    q = (_nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)).view(torch.int8)
    return Packed(q=_into(q.reshape(n, k), empty), scales=_half(b, 0, n, empty), mins=_half(b, 2, n, empty), group=32, zero=0.0, bits=8)


def _q4_k(b, n, k, empty):  # 8 sub-blocks of 32: x = (d * sc) * q - (dmin * m)
    nb = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    scales = (_f16(b, 0) * sc).reshape(n, -1)
    mins = -(_f16(b, 2) * mn).reshape(n, -1)
    q = _planes(b[:, 16:].reshape(nb, 4, 32), 4).reshape(n, k)
    return Packed(q=_into(pack_nibbles(q), empty), scales=_into(scales, empty), mins=_into(mins, empty), group=32, zero=0.0, bits=4)


def _q5_k(b, n, k, empty):
    nb = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    ql = _planes(b[:, 48:].reshape(nb, 4, 32), 4).reshape(nb, 8, 32)
    qh = _planes(b[:, 16:48], 1)
    q = (ql | (qh << 4)).view(torch.int8).reshape(n, k)
    scales, mins = (_f16(b, 0) * sc).reshape(n, -1), -(_f16(b, 2) * mn).reshape(n, -1)
    return Packed(q=_into(q, empty), scales=_into(scales, empty), mins=_into(mins, empty), group=32, zero=0.0, bits=8)


def _q6_k(b, n, k, empty):  # 16 sub-blocks of 16: x = (d * sc) * (q - 32)
    nb = b.shape[0]
    scales = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).reshape(n, -1)
    ql = _planes(b[:, :128].reshape(nb, 2, 64), 4).reshape(nb, 8, 32)
    qh = _planes(b[:, 128:192].reshape(nb, 2, 32), 2).reshape(nb, 8, 32)
    q = ((ql | (qh << 4)).view(torch.int8) - 32).reshape(n, k)
    return Packed(q=_into(q, empty), scales=_into(scales, empty), mins=None, group=16, zero=0.0, bits=8)


_REPACKERS = {QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1,
              QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k}  # fmt: skip


def packer(name: str, t: GGUFTensor, empty=None) -> Packed | None:
    """load_gguf's hook: keep matrices packed (in tensors from `empty`, see repack), decode everything else."""
    return repack(t, empty) if is_quantizable(name) and len(t.shape) == 2 else None
