"""The float32 C++ kernels against float64 computations of the same formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemmarun.kernels import geglu_kernel, rms_norm_kernel

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
