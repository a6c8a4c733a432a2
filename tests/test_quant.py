"""Weight-only quantisation: kernels against dequantise-then-matmul, GGUF blocks kept packed,
save/load round trips, and generation with quantised weights."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

import gemmarun
from gemmarun.kernels import int4_search_kernel, qlinear_kernel
from gemmarun.model.cache import KVCache
from gemmarun.quant import (
    KERNEL_MAX_ROWS,
    Packed,
    QuantLinear,
    dequantize,
    hugepages,
    linears,
    matmul,
    pack_nibbles,
    pack_q6,
    prefill,
    quantize_int4,
    quantize_int6,
    quantize_int8,
    unpack_nibbles,
    unpack_q6,
)
from gemmarun.quant.calibrate import importance
from gemmarun.quant.hugepages import Arena
from gemmarun.tools.bench import _current_layout, _llama_quantize
from gemmarun.weights.gguf import GGUFTensor
from gemmarun.weights.gguf.relay import repack


@pytest.fixture(autouse=True)
def _gemmarun_paths(monkeypatch):
    """These tests hold the kernel and gemmarun's float32 tiles to their bounds on any machine; the
    PyTorch paths a CPU may choose for prefill, and the choice, are test_prefill.py's."""
    monkeypatch.setenv("GEMMARUN_PREFILL", "kernel")  # subprocesses (the CLI) inherit it
    prefill.reset()
    yield
    monkeypatch.delenv("GEMMARUN_PREFILL", raising=False)
    prefill.reset()


def _reference(x, p):
    return x.double() @ dequantize(p).double().T


def _within_rounding(got, x, w):
    """The kernel rounds x to int16 in blocks of 32 (half a step of amax / 32767 at most per value):
    its result may differ from x @ w.T by that rounding times |w|, plus float32 summation error."""
    ref = x.double() @ w.double().T
    m, k = x.shape
    step = x.abs().view(m, k // 32, 32).amax(-1).repeat_interleave(32, -1).double() / 32767
    bound = (step / 2) @ w.abs().double().T + 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-6
    return bool(((got.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 40, 600])  # each kernel tile shape, and the GEMM path past 512
@pytest.mark.parametrize("scheme", ["int8", "int4-32", "int4-128", "int6", "q6-16", "q6-mins"])
def test_quantised_matmul_equals_dequantised(rows, scheme):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 256, generator=g)
    codes = torch.randint(-32, 32, (96, 256), generator=g, dtype=torch.int8)
    if scheme == "int8":
        p = quantize_int8(w)
    elif scheme == "int6":
        p = quantize_int6(w)
    elif scheme == "q6-16":  # Q6_K's layout: a float32 scale per 16 values
        p = Packed(pack_q6(codes), torch.rand(96, 16, generator=g), None, 16, 0.0, 6)
    elif scheme == "q6-mins":  # Q5_1 / Q5_K's: float16 scales and mins, codes offset by a zero
        p = Packed(pack_q6(codes), torch.rand(96, 8, generator=g).half(), torch.randn(96, 8, generator=g).half(), 32, -32.0, 6)
    else:
        p = quantize_int4(w, int(scheme.split("-")[1]))
    x = torch.randn(rows, 256, generator=g)
    got = matmul(x, p)
    assert got.shape == (rows, 96)
    if rows > KERNEL_MAX_ROWS:
        assert (got.double() - _reference(x, p)).abs().max().item() < 1e-3  # dense float32: no activation rounding
        return
    assert _within_rounding(got, x, dequantize(p))
    assert not _within_rounding(got, x, dequantize(p) * 1.01)  # the bound is tight enough to catch a 1% error


def test_quantisation_error_is_small():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    p = quantize_int8(w)  # rounding to the nearest step: at most half a step off
    assert ((dequantize(p) - w).abs() <= p.scales / 2 + 1e-6).all()
    p = quantize_int4(w, 32)
    err = (dequantize(p) - w).view(64, 16, 32)
    # Within the chosen range: half a step, plus the float16 rounding of the stored min; the search
    # may clip a group's extremes when that lowers its total error.
    s, m = p.scales.float().unsqueeze(-1), p.mins.float().unsqueeze(-1)
    g = w.view(64, 16, 32)
    inside = (g >= m) & (g <= m + 15 * s)
    assert inside.float().mean() > 0.95
    assert (err.abs() <= s / 2 * 1.01 + m.abs() * 2**-10)[inside].all()
    lo, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    if int4_search_kernel() is not None:  # without it, int4 rounds between each group's min and max
        assert err.pow(2).mean() < 0.9 * (torch.round((g - lo) / step) * step + lo - g).pow(2).mean()
    assert torch.equal(
        unpack_nibbles(pack_nibbles(torch.arange(64).remainder(16).view(1, 64))), torch.arange(64).remainder(16).view(1, 64).to(torch.uint8)
    )


def test_int6_layout_and_error():
    codes = torch.randint(-32, 32, (5, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = pack_q6(codes)
    assert packed.shape == (5, 72) and torch.equal(unpack_q6(packed), codes)
    assert torch.equal(pack_q6(codes, rows=2), packed)  # packed in row chunks alike
    one = torch.full((1, 32), -32, dtype=torch.int8)
    one[0, 17] = 31  # value 17 = 16 lane + 2 i + r (lane 1, i 0, r 1): byte 0, bit 2 lane + 4 r = 6
    one[0, 6] = 31  # value 6 (lane 0, i 3, r 0): byte 3, bit 0
    assert int.from_bytes(bytes(pack_q6(one)[0, 16:].tolist()), "little") == 3 << 6 | 3 << 24
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    p = quantize_int6(w)
    assert p.bits == 6 and p.q.shape == (64, 384) and p.in_features == 512
    err = (dequantize(p) - w).view(64, 16, 32)
    assert (err.abs() <= p.scales.float().unsqueeze(-1) / 2 * 1.001 + 1e-6).all()  # symmetric: nothing clipped


def test_kernel_is_built_on_avx2():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: the portable path is used")
    assert qlinear_kernel() is not None


def _gguf_blocks(qt: QT, n: int, k: int, seed: int) -> GGUFTensor:
    """Random valid blocks of type qt (finite fp16 scale fields), as a GGUF tensor would hold."""
    block, size = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    f16 = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2],
           QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}[qt]  # fmt: skip
    for at in f16:
        raw[:, at : at + 2] = rng.uniform(0.001, 0.05, size=raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return GGUFTensor(name="blk.0.ffn_up.weight", ggml_type=int(qt), shape=(n, k), data=torch.from_numpy(raw.reshape(-1)))


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_gguf_blocks_stay_packed_and_exact(qt):
    n, k = 48, 512
    t = _gguf_blocks(qt, n, k, seed=int(qt))
    p = repack(t)
    assert isinstance(p, Packed)
    expected = torch.from_numpy(gguf.quants.dequantize(t.data.numpy().reshape(n, -1), qt).astype(np.float32)).reshape(n, k)
    # The re-laid blocks decode to gguf-py's own values...
    assert (dequantize(p) - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
    # ...and the packed matmul equals dequantise-then-matmul.
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    assert _within_rounding(matmul(x, p), x, expected)
    if qt in (QT.Q8_0, QT.Q4_0, QT.Q4_1):  # no larger than the file's own blocks, up to scale width
        assert p.nbytes() <= t.data.numel()
    # Re-laid into a loader's arena: the same fields, every one in it
    arena = Arena(chunk=1 << 20)
    placed = repack(t, arena.empty)
    for field in ("q", "scales", "mins"):
        a, b = getattr(p, field), getattr(placed, field)
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype and b.is_contiguous())
        assert b is None or hugepages._madvise() is None or arena.holds(b)


@pytest.mark.parametrize("rows", [1, 3, 600])
def test_linears_sharing_an_input_equal_each_alone(rows):
    """q/k/v and gate/up go through one kernel call; mixed schemes (as in a Q4_K_M file) included."""
    k = 512
    layers = [QuantLinear(quantize_int8(torch.randn(40, k))), QuantLinear(quantize_int4(torch.randn(24, k), 64)),
              QuantLinear(repack(_gguf_blocks(QT.Q6_K, 16, k, seed=3))),
              QuantLinear(repack(_gguf_blocks(QT.Q4_K, 8, k, seed=4)))]  # fmt: skip
    x = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(rows))
    together = linears(x, layers)
    for layer, got in zip(layers, together):
        assert got.shape == (1, rows, layer.qweight.shape[0])
        assert torch.equal(got, layer(x))  # the same rounded activations, the same sums
        assert _within_rounding(got[0], x[0], dequantize(layer.packed))


@pytest.fixture(scope="module")
def folder(checkpoint):
    # A narrower init than the parity tests: quantisation noise must not flip near-random argmaxes.
    return checkpoint("gemma2", seed=21, initializer_range=0.05)


def test_int8_generation_follows_fp32_greedy(folder):
    fp32 = gemmarun.load(folder).generate("Once upon a time", max_new_tokens=8, ignore_eos=True)
    int8 = gemmarun.load(folder, quantize="int8").generate("Once upon a time", max_new_tokens=8, ignore_eos=True)
    assert int8.token_ids[:4] == fp32.token_ids[:4]


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_decode_stack_equals_layer_by_layer(kind, checkpoint):
    """The C++ loop over the layers of a decoding step against the same layers run as modules:
    past the sliding window, with a padding row beside a live one."""
    model = gemmarun.load(checkpoint(kind, seed=5, initializer_range=0.05), quantize="int8").model
    if not model.decode_stack():
        pytest.skip("no kernels on this machine: decoding runs layer by layer")
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    caches = [KVCache(model.config, 2, 40, torch.float32) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(ids[:, :4], torch.arange(4).expand(2, 4), cache)
        for t in range(4, 40):
            pos = torch.tensor([[t], [t if t < 20 else -1]])  # row 1 becomes padding half way
            fast = model(ids[:, t : t + 1], pos, caches[0], select=torch.zeros(2, dtype=torch.long))
            stack, model._stack = model._stack, False
            slow = model(ids[:, t : t + 1], pos, caches[1], select=torch.zeros(2, dtype=torch.long))
            model._stack = stack
            live = 2 if t < 20 else 1
            assert (fast[:live] - slow[:live]).abs().max().item() < 1e-4, f"step {t}"


def test_int4_logits_close_to_fp32(folder):
    ids = list(range(3, 60))
    ref = torch.log_softmax(gemmarun.load(folder).logits(ids), -1)
    # Mean |delta log p| over the vocabulary: measured 0.007 (int8) and 0.08 (int4) on this model.
    for scheme, bound in [("int8", 0.02), ("int4", 0.15)]:
        got = torch.log_softmax(gemmarun.load(folder, quantize=scheme).logits(ids), -1)
        assert (got - ref).abs().mean().item() < bound, scheme


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_command_round_trip(folder, tmp_path, scheme):
    dst = tmp_path / f"q-{scheme}"
    r = subprocess.run([sys.executable, "-m", "gemmarun.cli", "quantize", str(folder), str(dst), "--scheme", scheme],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # int4 is calibrated by default: on the built-in text, as load(calibration=True) does
    at_load = gemmarun.load(folder, quantize=scheme, calibration=scheme == "int4")
    saved = gemmarun.load(dst)
    assert any(type(m).__name__ == "QuantLinear" for m in saved.model.modules())
    ids = list(range(3, 40))
    assert torch.equal(saved.logits(ids), at_load.logits(ids))
    decoded = gemmarun.load(dst, quantize="none")
    assert (decoded.logits(ids) - at_load.logits(ids)).abs().max().item() < 1e-3
    # the benchmark re-writes a cached copy whose layout is not what quantising gives now
    assert _current_layout(dst, scheme) and not _current_layout(dst, "int8" if scheme == "int4" else "int4")


def test_bad_quantize_values(folder):
    with pytest.raises(gemmarun.ConfigError, match="unknown quantization"):
        gemmarun.load(folder, quantize="int3")
    with pytest.raises(gemmarun.InvalidParameterError, match="group_size"):
        gemmarun.load(folder, quantize="int4", group_size=48)


def test_calibration_importance_is_the_mean_squared_input(folder):
    lm = gemmarun.load(folder, quantize="none")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    got = importance(lm, text, tokens=300)
    assert set(got) == {n for n, _ in lm.model.named_parameters() if n.endswith("_proj.weight")}
    layer = lm.model.model.layers[0]
    ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode(text, add_bos=False)[:300]
    with torch.inference_mode():  # the first layer's q/k/v input: the normed, scaled embedding
        x = lm.model.model.embed_tokens(torch.tensor(ids)) * torch.tensor(lm.config.hidden_size**0.5)
        want = layer.input_layernorm(x).pow(2).mean(0)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.allclose(got[f"model.layers.0.self_attn.{name}.weight"], want, rtol=1e-4, atol=1e-6)
    assert torch.equal(got["model.layers.1.mlp.gate_proj.weight"], got["model.layers.1.mlp.up_proj.weight"])


def test_calibrated_int4_is_close_to_fp32_and_used(folder):
    ids = list(range(3, 60))
    ref = torch.log_softmax(gemmarun.load(folder).logits(ids), -1)
    plain = gemmarun.load(folder, quantize="int4")
    calibrated = gemmarun.load(folder, quantize="int4", calibration="Once upon a time there was a model. " * 30)
    got = torch.log_softmax(calibrated.logits(ids), -1)
    assert (got - ref).abs().mean().item() < 0.15
    a, b = plain.model.model.layers[0].self_attn.q_proj, calibrated.model.model.layers[0].self_attn.q_proj
    assert isinstance(b, QuantLinear) and b.bits == 4 and not torch.equal(a.scales, b.scales)
    assert calibrated.model.model.embed_tokens.bits == 6  # the tied LM head keeps 6 bits
    with pytest.raises(gemmarun.InvalidParameterError, match="calibration applies to quantize='int4'"):
        gemmarun.load(folder, quantize="int8", calibration=True)
    with pytest.raises(gemmarun.InvalidParameterError, match="calibration_tokens"):
        gemmarun.load(folder, quantize="int4", calibration=True, calibration_tokens=0)


def test_quantize_command_calibration_options(folder, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "gemmarun.cli", "quantize", str(folder), *args],
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    text = tmp_path / "calib.txt"
    text.write_text("A short text to calibrate on, twice over. " * 20)
    r = run(str(tmp_path / "own"), "--scheme", "int4", "--calibration", str(text), "--calibration-tokens", "64")
    assert r.returncode == 0 and "calibrated" in r.stdout, r.stderr
    want = gemmarun.load(folder, quantize="int4", calibration=text.read_text(), calibration_tokens=64)
    ids = list(range(3, 40))
    assert torch.equal(gemmarun.load(tmp_path / "own").logits(ids), want.logits(ids))
    r = run(str(tmp_path / "plain"), "--scheme", "int4", "--no-calibration")
    assert r.returncode == 0, r.stderr
    assert torch.equal(gemmarun.load(tmp_path / "plain").logits(ids), gemmarun.load(folder, quantize="int4").logits(ids))
    for args, message in [(("--scheme", "int8", "--calibration", str(text)), "applies to --scheme int4"),
                          (("--scheme", "int4", "--calibration", str(tmp_path / "missing.txt")), "cannot read the calibration text"),
                          (("--scheme", "int4", "--calibration", str(text), "--no-calibration"), "not both")]:  # fmt: skip
        r = run(str(tmp_path / "bad"), *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_benchmark_llama_quantize_failure_skips_the_row(tmp_path):
    # without llama-cpp-python, or when llama.cpp cannot read the source, the row is skipped, logged
    logged = []
    out = tmp_path / "out.gguf"
    assert _llama_quantize(tmp_path / "missing.gguf", out, "LLAMA_FTYPE_MOSTLY_Q4_0", logged.append) is None
    assert not out.exists() and any("skip" in line for line in logged)
