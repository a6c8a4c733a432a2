"""The float32 C++ kernels against float64 computations of the same formulas (or searches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemmarun import kernels
from gemmarun.errors import ConfigError
from gemmarun.kernels import attention_kernel, dense_linear_kernel, geglu_kernel, int4_search_kernel, rms_norm_kernel
from gemmarun.model.gemma import apply_rope
from gemmarun.quant import int4_search

pytestmark = pytest.mark.skipif(geglu_kernel() is None, reason="no C++ kernels on this machine: the torch path runs")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [16, 100, 640, 2304])  # 100: a tail past the 16-value blocks
def test_dense_linear_matches_float64_and_gives_a_row_its_bits_in_any_batch(dtype, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=g).to(dtype)  # 37 rows: a tile of 4 and single rows at each thread's end
    x = torch.randn(2, 7, k, generator=g).to(dtype)
    got = dense_linear_kernel()(x, w)
    assert got.dtype == dtype and got.shape == (2, 7, 37)
    xd, wd = x.double(), w.double()
    ref, mag = xd @ wd.T, xd.abs() @ wd.abs().T
    # float32 sums (relative error ~1e-7 a term), then one rounding of the result to x's dtype
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    assert ((got.double() - ref).abs() <= 1e-6 * mag + rounding * ref.abs() + 1e-30).all()
    rows = x.reshape(14, k)
    alone = torch.stack([dense_linear_kernel()(rows[i : i + 1], w)[0] for i in range(14)])
    assert torch.equal(alone, got.reshape(14, 37))


def test_dense_linear_refuses_what_it_cannot_take():
    kernel = dense_linear_kernel()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel(torch.randn(1, 8), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="share K"):
        kernel(torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(torch.randn(1, 8), torch.randn(8, 4).T)


def _attention_float64(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap):
    """The same step in float64 torch ops: rope, cache write, scores over slots [0, E), soft-cap, mask, softmax."""
    kc, vc = kc.double().clone(), vc.double().clone()
    for r in range(q.shape[0]):
        kc[r, :, slots[r]] = apply_rope(k[r].double(), cos[r].double(), sin[r].double())
        vc[r, :, slots[r]] = v[r].double()
    return _attend_float64(q, kc, vc, mask, cos, sin, scale, softcap), kc, vc


def _attend_float64(q, kc, vc, mask, cos, sin, scale, softcap):
    """Attention of the roped queries over cache slots [0, E) as they are, in float64."""
    b, h, d = q.shape
    hkv, e = kc.shape[1], mask.shape[1]
    qr = apply_rope(q.double(), cos.double().view(b, 1, d), sin.double().view(b, 1, d))  # (B, H, D)
    keys = kc[:, :, :e].double().repeat_interleave(h // hkv, dim=1)  # (B, H, E, D)
    values = vc[:, :, :e].double().repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", qr, keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no visible key gives zeros
    return torch.einsum("bhs,bhsd->bhd", probs, values).reshape(b, h * d)


@pytest.mark.parametrize("heads, kv_heads, keys", [(4, 1, 161), (8, 4, 30), (4, 2, 1500), (2, 2, 5)])
def test_decode_attention_matches_float64(heads, kv_heads, keys):
    # Rows: one seeing every key, one a scattered subset (a ring after wrapping), one padding row that
    # sees nothing; spans of keys are split across tasks and merged, so long and short E both count.
    gen = torch.Generator().manual_seed(heads * 100 + keys)
    b, d, s = 3, 64, keys + 9
    q, k, v = (torch.randn(b, n, d, generator=gen) for n in (heads, kv_heads, kv_heads))
    kc, vc = torch.randn(b, kv_heads, s, d, generator=gen), torch.randn(b, kv_heads, s, d, generator=gen)
    slots = torch.tensor([keys - 1, keys // 2, s - 1])
    mask = torch.ones(b, keys, dtype=torch.bool)
    mask[1] = torch.rand(keys, generator=gen) < 0.3
    mask[1, keys // 2] = True
    mask[2] = False
    angles = torch.rand(b, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    for softcap in (0.0, 50.0):
        kc1, vc1 = kc.clone(), vc.clone()
        got = attention_kernel()(q, k, v, kc1, vc1, slots, mask, cos, sin, 0.125, softcap)
        ref, kref, vref = _attention_float64(q, k, v, kc, vc, slots, mask, cos, sin, 0.125, softcap)
        assert (got.double() - ref).abs().max().item() < 1e-5
        assert (kc1.double() - kref).abs().max().item() < 1e-6 and torch.equal(vc1.double(), vref)


@pytest.mark.parametrize("dtype, ulp", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
def test_decode_attention_with_a_half_precision_cache(dtype, ulp):
    # The step's key and value are rounded once as they are written; every read widens what the
    # cache holds, so the output must equal float64 attention over the cache's own contents.
    gen = torch.Generator().manual_seed(11)
    b, h, hkv, d, keys = 2, 8, 4, 72, 300  # 72: a tail past the 8-lane blocks
    q, k, v = (torch.randn(b, n, d, generator=gen) for n in (h, hkv, hkv))
    kc, vc = (torch.randn(b, hkv, keys + 1, d, generator=gen).to(dtype) for _ in range(2))
    slots = torch.tensor([keys - 1, 17])
    mask = torch.rand(b, keys, generator=gen) < 0.7
    mask[torch.arange(b), slots] = True
    angles = torch.rand(b, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    kc1, vc1 = kc.clone(), vc.clone()
    got = attention_kernel()(q, k, v, kc1, vc1, slots, mask, cos, sin, 0.125, 30.0)
    _, kref, _ = _attention_float64(q, k, v, kc, vc, slots, mask, cos, sin, 0.125, 30.0)
    for r in range(b):
        written = kc1[r, :, slots[r]].double()
        assert ((written - kref[r, :, slots[r]]).abs() <= ulp * kref[r, :, slots[r]].abs() + 1e-6).all()
        assert torch.equal(vc1[r, :, slots[r]], v[r].to(dtype))
        untouched = torch.ones(keys + 1, dtype=torch.bool)
        untouched[slots[r]] = False
        assert torch.equal(kc1[r, :, untouched], kc[r, :, untouched])
    ref = _attend_float64(q, kc1, vc1, mask, cos, sin, 0.125, 30.0)
    assert (got.double() - ref).abs().max().item() < 1e-5


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
        wt = ((x.pow(2).mean(-1, keepdim=True) + x.pow(2)).sqrt() * (1 if importance is None else importance.double().view(4, 32))).view(
            24, 128
        )
        got = error(scales, mins, wt)
        ref = error(*int4_search(w.double(), None if importance is None else importance.double(), 32), wt)
        lo = x.amin(-1)
        minmax = error((x.amax(-1) - lo) / 15, lo, wt)
        assert (got <= minmax * (1 + 1e-4) + 1e-12).all()
        assert got.sum().item() == pytest.approx(ref.sum().item(), rel=1e-4)
        assert got.sum() < 0.9 * minmax.sum()  # the search pays: measured 0.75-0.8 of min/max here


def test_variant_choice_and_its_errors(monkeypatch):
    # The best variant the CPU runs by default; GEMMARUN_KERNELS forces one; a name that is unknown
    # or that this CPU cannot run is a one-line ConfigError, not a silent fallback.
    assert kernels.available()[-1] == "generic" and set(kernels.available()) <= set(kernels.VARIANTS)
    monkeypatch.delenv("GEMMARUN_KERNELS", raising=False)
    monkeypatch.delenv("GEMMARUN_NO_KERNELS", raising=False)
    assert kernels.chosen() == kernels.available()[0]
    monkeypatch.setenv("GEMMARUN_KERNELS", " Generic ")
    assert kernels.chosen() == "generic"
    monkeypatch.setenv("GEMMARUN_KERNELS", "sse9")
    with pytest.raises(ConfigError, match="not a kernel variant"):
        kernels.chosen()
    missing = [v for v in kernels.VARIANTS if v not in kernels.available()]
    if missing:
        monkeypatch.setenv("GEMMARUN_KERNELS", missing[0])
        with pytest.raises(ConfigError, match="cannot run"):
            kernels.chosen()
    monkeypatch.setenv("GEMMARUN_NO_KERNELS", "1")
    assert kernels.chosen() is None
    assert kernels.variant() in kernels.available()  # the variant this process loaded names itself


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load(tmp_path):
    """torch's build lock is a plain file: a build killed midway leaves it, and torch then waits on it
    forever. The kernels hold an flock while building, under which such a file is known stale."""
    import os
    import shutil
    import subprocess
    import sys

    from gemmarun import kernels

    name = kernels.chosen()
    if name is None or kernels.module(name) is None:
        pytest.skip("no kernels here")
    built = kernels._build_dir(name)
    copy = tmp_path / "kernels" / built.name
    shutil.copytree(built, copy)  # the built extension, so the load below need not compile
    (copy / "build.flock").unlink(missing_ok=True)
    (copy / "lock").write_text("")  # what a killed build leaves behind
    env = {**os.environ, "GEMMARUN_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "from gemmarun import kernels; print(kernels.variant())"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == name
    assert not (copy / "lock").exists()


def test_bench_header_names_the_cpu_and_the_kernel_variant():
    from gemmarun.kernels import cpu_model
    from gemmarun.tools.host import describe

    line = describe({"gemmarun"})
    assert cpu_model() and cpu_model() in line
    assert f"gemmarun kernels: {kernels.variant() or 'none'}" in line
    assert "prefill: int8 " in line  # which GEMM runs prefill chunks
    assert "llama.cpp" not in line  # only when llama.cpp is measured


def test_a_load_waiting_for_another_build_says_so(tmp_path):
    import fcntl
    import os
    import select
    import shutil
    import subprocess
    import sys
    import time

    name = kernels.chosen()
    if name is None or kernels.module(name) is None:
        pytest.skip("no kernels here")
    copy = tmp_path / "kernels" / kernels._build_dir(name).name
    shutil.copytree(kernels._build_dir(name), copy)
    with open(copy / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process building
        env = {**os.environ, "GEMMARUN_CACHE": str(tmp_path)}
        proc = subprocess.Popen([sys.executable, "-c", "from gemmarun import kernels; print(kernels.variant())"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        err, deadline = "", time.monotonic() + 300
        while "waiting for another process" not in err and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                err += proc.stderr.readline()
        assert "waiting for another process to finish building the kernels" in err
        assert proc.poll() is None  # and it waits while the other build holds the lock
        fcntl.flock(held, fcntl.LOCK_UN)
    out, rest = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.strip() == name, err + rest
