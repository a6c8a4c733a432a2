"""The PyTorch GEMM paths a prefill chunk can take instead of the C++ kernel (quant/prefill.py
chooses which, by measurement): weight tiles dequantised to float32 or bfloat16 for F.linear, or
activations rounded to int8 per row for torch._int_mm on int8 weights. Each runs here and only here.

Rounding of each path, against the float64 product of x and the dequantised weights W:
  torch-fp32  float32 weights and activations: float32 summation error only.
  torch-bf16  x rounded to bfloat16 (8 significant bits: relative error u = 2^-8 at most), W too,
              except int8 per-channel codes (|q| <= 127, exact in bfloat16, the channel scale applied
              to the float32 result); the product is rounded to bfloat16 once more (PyTorch's CPU
              bf16 GEMM accumulates in float32 but returns bf16). Bound: (2u + u^2) |x| @ |W|.T +
              u |x @ W.T| (the weight term drops out for int8 per-channel).
  torch-int8  x rounded per row to int8 with scale s_x = max |x_row| / 127 (at most s_x / 2 off
              per value), an exact int32 sum, then one float32 multiply by both scales.
              Bound: s_x / 2 * sum_k |W[n, k]|, plus float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import Packed, dequantize

TORCH_PATHS = ("torch-fp32", "torch-bf16", "torch-int8")
DENSE_TILE = 4096  # output rows dequantised at a time: bounds the scratch memory
BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, round to nearest)


def int8_per_channel(p: Packed) -> bool:
    """Plain int8 codes with one scale per output row (the int8 scheme): what torch._int_mm can take,
    and what a bfloat16 tile holds exactly."""
    return p.bits == 8 and p.group == p.in_features and p.mins is None and not p.zero


def run(path: str, x: torch.Tensor, p: Packed) -> torch.Tensor:
    """x (M, K) float32 contiguous @ W.T by one of TORCH_PATHS -> (M, N) float32."""
    if path == "torch-int8":
        return int8_rows(x, p)
    return tiles(x, p, torch.bfloat16 if path == "torch-bf16" else torch.float32)


def tiles(x: torch.Tensor, p: Packed, dtype: torch.dtype) -> torch.Tensor:
    """x @ W.T through tiles of DENSE_TILE output rows dequantised to `dtype`, x rounded to it once."""
    n = p.q.shape[0]
    xs = x if dtype == torch.float32 else x.to(dtype)
    codes = int8_per_channel(p)  # the codes are the tile, the channel scale multiplies the result
    out = torch.empty(x.shape[0], n, device=x.device)
    for r in range(0, n, DENSE_TILE):
        rows = slice(r, r + DENSE_TILE)
        if codes:
            out[:, rows] = F.linear(xs, p.q[rows].to(dtype)).float() * p.scales[rows].float().view(1, -1)
        else:
            out[:, rows] = F.linear(xs, dequantize(p, rows).to(dtype))
    return out


def int8_rows(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """x @ W.T for int8 per-channel W: x rounded to int8 per row, torch._int_mm's exact int32 sums
    (|sum| <= 127 * 127 * K fits int32 up to K = 133 000), then both scales."""
    sx = x.abs().amax(dim=1, keepdim=True) / 127  # (M, 1)
    xq = torch.round(x / torch.where(sx == 0, 1.0, sx)).clamp_(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, p.q.t())  # (M, K) @ (K, N), the weights' transpose as a view
    return acc.float() * sx * p.scales.float().view(1, -1)


def run_dense(path: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for bfloat16 x and dense bfloat16 w, in bfloat16: bf16's own GEMM (torch-bf16, exact
    weights) or float32 tiles (torch-fp32)."""
    return upcast_linear(x, w) if path == "torch-fp32" else F.linear(x, w)


UPCAST_TILE = 1024  # output rows widened at a time: 36 MB of float32 scratch for 9216 inputs


def upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for bf16 x and w via float32 tiles, rounded back to bf16 (float32 accumulation, as
    the bf16 kernels do)."""
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    for r in range(0, w.shape[0], UPCAST_TILE):
        out[..., r : r + UPCAST_TILE] = F.linear(x32, w[r : r + UPCAST_TILE].float())
    return out
