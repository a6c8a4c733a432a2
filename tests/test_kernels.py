"""The float32 C++ kernels against float64 computations of the same formulas (or searches)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemmarun.kernels import geglu_kernel, int4_search_kernel, rms_norm_kernel
from gemmarun.quant import int4_search

pytestmark = pytest.mark.skipif(geglu_kernel() is None, reason="no AVX2 kernels on this machine: the torch path runs")


def test_geglu_matches_float64():
    g = torch.cat([torch.randn(50001, generator=torch.Generator().manual_seed(0)) * 4, torch.linspace(-90, 90, 9001)])
    u = torch.randn(g.shape, generator=torch.Generator().manual_seed(1))
    ref = F.gelu(g.double(), approximate="tanh") * u.double()
    got = geglu_kernel()(g, u).double()
    assert ((got - ref).abs() / (ref.abs() + 1e-3 * u.double().abs())).max().item() < 1e-5
    edge = torch.tensor([1e30, -1e30, 0.0, float("inf"), float("-inf")])
    assert torch.equal(geglu_kernel()(edge, torch.ones(5))[:4], torch.tensor([1e30, -0.0, 0.0, float("inf")]))


def test_rms_norm_with_residual():
    x = torch.randn(3, 5, 72, generator=torch.Generator().manual_seed(2))  # 72: a tail past the 8-lane blocks
    w = torch.randn(72, generator=torch.Generator().manual_seed(3))
    r = torch.randn(3, 5, 72, generator=torch.Generator().manual_seed(4))
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.double())
    assert (rms_norm_kernel()(x, w, 1e-6).double() - ref).abs().max().item() < 1e-5
    assert (rms_norm_kernel()(x, w, 1e-6, r).double() - (ref + r.double())).abs().max().item() < 1e-5


def test_int4_search_matches_float64_and_beats_min_max():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(24, 128, generator=gen) * torch.rand(24, 1, generator=gen)
    w[3, 5] = 9.0  # an outlier: the search may clip it where the importance is low
    w[4, 32:64] = 0.25  # a constant group: exact at scale 0
    imp = torch.rand(128, generator=gen) ** 4

    def error(scales, mins, wt):  # each group rounded to its nearest levels, weighted as the search weights it
        s, m = scales.double().repeat_interleave(32, 1), mins.double().repeat_interleave(32, 1)
        levels = torch.where(s > 0, torch.round((w.double() - m) / torch.where(s > 0, s, 1)).clamp(0, 15), 0)
        return (wt * (s * levels + m - w.double()) ** 2).view(24, 4, 32).sum(-1)

    for importance in (None, imp):
        scales, mins = int4_search_kernel()(w, importance, 32)
        assert scales.shape == mins.shape == (24, 4)
        assert scales[4, 1] == 0 and mins[4, 1] == 0.25
        x = w.double().view(24, 4, 32)
        wt = ((x.pow(2).mean(-1, keepdim=True) + x.pow(2)).sqrt() * (1 if importance is None else importance.double().view(4, 32))).view(24, 128)
        got = error(scales, mins, wt)
        ref = error(*int4_search(w.double(), None if importance is None else importance.double(), 32), wt)
        lo = x.amin(-1)
        minmax = error((x.amax(-1) - lo) / 15, lo, wt)
        assert (got <= minmax * (1 + 1e-4) + 1e-12).all()
        assert got.sum().item() == pytest.approx(ref.sum().item(), rel=1e-4)
        assert got.sum() < 0.9 * minmax.sum()  # the search pays: measured 0.75-0.8 of min/max here
