"""Quantisation schemes: weights -> Packed (int8 per channel, int6 and int4 in groups), and which
matrix gets which."""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError
from ..kernels import int4_search_kernel
from .format import Packed, pack_nibbles, pack_q6


def quantize_int8(w: torch.Tensor) -> Packed:
    """Symmetric int8, one float32 scale per output channel."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(w / torch.where(scale == 0, 1.0, scale)).clamp_(-127, 127).to(torch.int8)
    return Packed(q=q, scales=scale.contiguous(), mins=None, group=w.shape[1], zero=0.0, bits=8)


def quantize_int6(w: torch.Tensor, group: int = 32) -> Packed:
    """Symmetric 6-bit in groups of 32, a float16 scale each (6.5 bits a weight): int4's tied
    embedding / LM head, where on the 270M it matched int8 per channel (perplexity 20.40 vs 20.44
    on 8000 characters) and 4 bits cost +4 points."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // group, dtype=torch.float16)
    for r in range(0, n, 4096):  # float32 copies of a 256k-row embedding would take gigabytes
        rows = slice(r, r + 4096)
        g = w[rows].float().reshape(-1, k // group, group)
        scale[rows] = (g.abs().amax(-1) / 31).half()
        s = scale[rows].float().unsqueeze(-1)
        q[rows] = torch.round(g / torch.where(s == 0, 1.0, s)).clamp_(-32, 31).view(-1, k)
    return Packed(q=pack_q6(q), scales=scale, mins=None, group=group, zero=0.0, bits=6)


def quantize_int4(w: torch.Tensor, group: int = 32, importance: torch.Tensor | None = None) -> Packed:
    """Asymmetric int4 in groups (scale and min in float16, as ggml's Q4_1): 4 + 32 / group bits a weight.

    Each group's scale and min come from a search minimising the weighted rounding error (see
    kernels/quantize.cpp); `importance` (K,), the mean squared input of each column over calibration
    text, weights the error by what the inputs carry.
    """
    n, k = w.shape
    if group % 32 or k % group:
        raise InvalidParameterError(f"int4 group size must be a multiple of 32 dividing {k}; got {group}")
    w = w.float().contiguous()
    importance = None if importance is None else importance.float().contiguous()
    search = int4_search_kernel() or int4_search
    scale, lo = search(w, importance, group)
    scale, mins = scale.half(), lo.half()
    s = scale.float().unsqueeze(-1)
    # Round against the float16 scale and min that will be stored, not the exact ones.
    g = w.view(n, k // group, group)
    q = torch.round((g - mins.float().unsqueeze(-1)) / torch.where(s == 0, 1.0, s)).clamp_(0, 15)
    return Packed(q=pack_nibbles(q.view(n, k)), scales=scale, mins=mins, group=group, zero=0.0, bits=4)


def int4_search(w: torch.Tensor, importance: torch.Tensor | None, group: int, rows: int = 4096):
    """The search of kernels/quantize.cpp in torch, in w's dtype: (scales, mins) (N, K // group).
    The portable path (~20x slower than the kernel on 2 threads) and the kernel's reference in the tests."""
    n, k = w.shape
    scales, mins = [], []
    for r in range(0, n, rows):
        x = w[r : r + rows].reshape(-1, group)  # (G, group)
        wt = (x.pow(2).mean(-1, keepdim=True) + x.pow(2)).sqrt()
        if importance is not None:
            wt = wt * importance.to(w.dtype).view(-1, group).repeat(x.shape[0] * group // k, 1)
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        span = torch.where(hi > lo, hi - lo, 1)  # a constant group keeps scale 0 and its value as min
        best_s, best_m = torch.where(hi > lo, span / 15, 0), lo

        def error(s, m, levels):
            return (wt * (s * levels + m - x).pow(2)).sum(-1, keepdim=True)  # noqa: B023 (used within this iteration)

        best_e = error(best_s, best_m, torch.round((x - lo) / span * 15))
        sw, sx = wt.sum(-1, keepdim=True), (wt * x).sum(-1, keepdim=True)
        for i in range(21):  # kSteps + 1 candidates of (14 + 0.1 i) / (max - min)
            levels = torch.round((x - lo) * ((14 + 0.1 * i) / span)).clamp(0, 15)
            wl = wt * levels
            sl, sl2, sxl = wl.sum(-1, keepdim=True), (wl * levels).sum(-1, keepdim=True), (wl * x).sum(-1, keepdim=True)
            det = sw * sl2 - sl * sl
            ok = det > 0
            det = torch.where(ok, det, 1)
            s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
            e = error(s, m, levels)
            better = ok & (s > 0) & (e < best_e) & (hi > lo)
            best_s, best_m, best_e = torch.where(better, s, best_s), torch.where(better, m, best_m), torch.where(better, e, best_e)
        scales.append(best_s.view(-1, k // group))
        mins.append(best_m.view(-1, k // group))
    return torch.cat(scales), torch.cat(mins)


SCHEMES = ("int8", "int4")


def quantize_weight(w: torch.Tensor, scheme: str, group: int = 32, importance: torch.Tensor | None = None) -> Packed:
    if scheme == "int8":
        return quantize_int8(w)
    if scheme == "int4":
        return quantize_int4(w, group, importance)
    if scheme == "int6":  # int4's embedding only, not offered on its own
        return quantize_int6(w)
    raise InvalidParameterError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")


def scheme_for(name: str, scheme: str) -> str:
    """The scheme a matrix gets when the model is quantised to `scheme`. The tied embedding is also
    the LM head: at 4 bits it cost the 270M a third of its perplexity (+4 points with the search), so
    int4 keeps it at 6 bits, as llama-quantize's 4-bit files keep it at Q6_K."""
    if name == "model.embed_tokens.weight" and scheme == "int4":
        return "int6"
    return scheme


def is_quantizable(name: str) -> bool:
    """Every matrix: the attention and MLP projections and the tied embedding / LM head."""
    return name.endswith("_proj.weight") or name == "model.embed_tokens.weight"
