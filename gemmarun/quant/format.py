"""The packed form of a quantised matrix (Packed), its bit layouts, and dequantisation.

One storage format serves our own quantisation and GGUF blocks kept packed:
    w[n, k] = scale[n, g] * (q[n, k] - zero) + min[n, g],  g = k // group
q8: int8 q (N, K). q4: 4-bit q packed 16 bytes per 32 values, value j in the low nibble of byte j
and value j + 16 in its high nibble (ggml's Q4_0 order). q6: signed 6-bit q (-32..31), 24 bytes per
32 values: the low four bits of q + 32 as q4, then their top two bits in a 64-bit word. Scales/mins
float16 or float32 (N, K // group).

The q6 word has two orders. In memory, the kernels' (see HIGH_BITS): AVX2's lane order, in which
isa/avx2.h takes all 32 values' bits from the word's 8 bytes widened to 16-bit fields with
immediate shifts; the generic, NEON and AVX-512 layers look every value's bits up in a 32-entry
table (isa/common.h), at the same cost for any order, so every variant shares this one. On disk
(checkpoint format version 2, quant/checkpoint.py), the canonical order that no ISA defines: value
v's two bits at bits 2v and 2v + 1 of the little-endian word (byte v // 4). Loading turns the
canonical order into the kernels' (q6_from_canonical), saving back (q6_to_canonical). Version 1
files hold an earlier kernels' order (V1_HIGH_BITS, for AVX2 variable shifts): q6_from_v1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed:
    """One quantised weight matrix in the format above."""

    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    group: int
    zero: float
    bits: int  # 8, 6 or 4

    @property
    def in_features(self) -> int:
        return self.q.shape[1] * 8 // self.bits

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.mins) if t is not None)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K // 2) bytes in the split-nibble order."""
    n, k = q.shape
    blocks = q.to(torch.uint8).view(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    n, half = b.shape
    blocks = b.view(n, half // 16, 16)
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def _high_bit_positions() -> torch.Tensor:
    """Bit of a q6 block's 64-bit word holding value v's top two bits, for v in 0..31: value
    v = 16 lane + 2 i + r at bit 8 i + 2 lane + 4 r (isa/common.h's high_bit). The AVX2 kernel
    widens values to int16 fields, field i of each 128-bit lane holding values 2 i + 16 lane (first
    register) and 2 i + 1 + 16 lane (second): byte i of the word holds all four of field i's bits."""
    v = torch.arange(32)
    return 8 * ((v >> 1) & 7) + 2 * (v >> 4) + 4 * (v & 1)


def _v1_high_bit_positions() -> torch.Tensor:
    """The order version 1 files hold: each 16-bit field of the word with one 64-bit quarter's bits
    at bit 4 + 2 Q for quarter Q of the first register, 12, 14, 0, 2 for the second."""
    slots = ((4, 6, 8, 10), (12, 14, 0, 2))
    pos = torch.empty(32, dtype=torch.int64)
    for r in range(2):
        for quarter in range(4):
            for i in range(4):
                j = 4 * (quarter % 2) + i  # the 16-bit word within its 128-bit lane
                pos[2 * j + 16 * (quarter // 2) + r] = 16 * i + slots[r][quarter]
    return pos


HIGH_BITS = _high_bit_positions()
V1_HIGH_BITS = _v1_high_bit_positions()


def pack_q6(q: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """(N, K) values -32..31 -> (N, K // 32 * 24) bytes in the kernels' q6 layout, `rows` at a time
    (a 256k-row embedding's temporaries would take gigabytes at once)."""
    n, k = q.shape
    out = torch.empty(n, k // 32 * 24, dtype=torch.uint8)
    for r in range(0, n, rows):
        u = ((q[r : r + rows].to(torch.int8).view(torch.uint8) & 63) ^ 32).view(-1, k // 32, 32)  # q + 32: bit 5 flipped
        m = u.shape[0]
        low = pack_nibbles((u & 15).view(m, k)).view(m, k // 32, 16)
        out[r : r + m] = torch.cat([low, _kernel_word(u >> 4)], dim=-1).view(m, k // 32 * 24)
    return out


def _kernel_word(top: torch.Tensor) -> torch.Tensor:
    """(m, blocks, 32) top bits (0..3) -> (m, blocks, 8) bytes of the kernels' word."""
    m, nb, _ = top.shape
    # HIGH_BITS by slices, not a gather (3x faster at load): value v = 16 lane + 2 i + r has its
    # bits in byte i, at bit 2 lane + 4 r.
    t = top.view(m, nb, 2, 8, 2)  # (lane, i, r)
    return t[:, :, 0, :, 0] | (t[:, :, 1, :, 0] << 2) | (t[:, :, 0, :, 1] << 4) | (t[:, :, 1, :, 1] << 6)


_TWO_BITS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)  # the four values' shifts in a canonical byte


def _rewrite_words(b: torch.Tensor, rewrite, rows: int) -> torch.Tensor:
    """q6 bytes with each block's 8-byte word (m, nb, 8) replaced by rewrite(word), `rows` at a time."""
    out = b.clone()
    for r in range(0, b.shape[0], rows):
        word = out[r : r + rows].view(-1, b.shape[1] // 24, 24)[:, :, 16:]
        word.copy_(rewrite(word))
    return out


def _gathered_tops(word: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(m, nb, 8) word bytes -> (m, nb, 32) top bits, value v's at bit positions[v] of the word."""
    return (word[:, :, positions // 8] >> (positions % 8).to(torch.uint8)) & 3


def q6_from_canonical(b: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """q6 bytes (N, K // 32 * 24) in the canonical (stored) order -> the kernels' order, `rows` at a time."""
    # value 4 byte + j at bits 2 j of its byte
    return _rewrite_words(b, lambda word: _kernel_word(((word.unsqueeze(-1) >> _TWO_BITS) & 3).flatten(2)), rows)


def q6_from_v1(b: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """q6 bytes in version 1 files' order (V1_HIGH_BITS) -> the kernels' order."""
    return _rewrite_words(b, lambda word: _kernel_word(_gathered_tops(word, V1_HIGH_BITS)), rows)


def q6_to_canonical(b: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """q6 bytes in the kernels' order -> the canonical order (what a checkpoint stores)."""

    def canonical(word: torch.Tensor) -> torch.Tensor:
        top = _gathered_tops(word, HIGH_BITS)  # (m, nb, 32)
        return (top.view(*top.shape[:2], 8, 4) << _TWO_BITS).sum(-1, dtype=torch.uint8)

    return _rewrite_words(b, canonical, rows)


def unpack_q6(b: torch.Tensor) -> torch.Tensor:
    """(N, K // 32 * 24) bytes in the kernels' order -> (N, K) int8 values -32..31."""
    n = b.shape[0]
    blocks = b.reshape(n, -1, 24)
    nb = blocks.shape[1]
    low = unpack_nibbles(blocks[:, :, :16].reshape(n, nb * 16)).view(n, nb, 32)
    high = _gathered_tops(blocks[:, :, 16:], HIGH_BITS.to(b.device))  # (n, nb, 32)
    return ((low | (high << 4)).view(torch.int8) - 32).view(n, nb * 32)


def dequantize(p: Packed, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """float32 weights (n, K) of the selected output rows."""
    # index_select for row ids: a tensor index goes through advanced indexing, ~3x the time for the
    # few rows of a decoding step's embedding lookup
    pick = (lambda t: t.index_select(0, rows)) if isinstance(rows, torch.Tensor) else (lambda t: t[rows])
    q = pick(p.q)
    q = (unpack_nibbles(q) if p.bits == 4 else unpack_q6(q) if p.bits == 6 else q).float()
    n, k = q.shape
    q = q.view(n, k // p.group, p.group)
    if p.zero:
        q = q - p.zero
    w = q * pick(p.scales).float().unsqueeze(-1)
    if p.mins is not None:
        w = w + pick(p.mins).float().unsqueeze(-1)
    return w.view(n, k)


def kernel_fits(p: Packed) -> bool:
    """The kernel works in blocks of 32 inputs, each under one scale (or two, for plain 8- or 6-bit groups of 16)."""
    if p.in_features % 32:
        return False
    return p.group % 32 == 0 or (p.group == 16 and p.bits != 4 and p.mins is None and not p.zero)
