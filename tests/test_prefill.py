"""Prefill chunks on PyTorch's GEMMs (quant/gemm.py) and the measured choice of path (quant/prefill.py):
each forced path against float64 within the bound of its rounding, the choice from timings, their cache."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

import gemmarun
from gemmarun.quant import Packed, QuantLinear, dequantize, linears, matmul, pack_q6, prefill, quantize_int4, quantize_int6, quantize_int8
from gemmarun.quant.gemm import BF16_UNIT, run, run_dense, upcast_linear
from gemmarun.quant.modules import _QuantWeight

from checkpoints import make_reference, save_checkpoint

U = BF16_UNIT


@pytest.fixture
def force(monkeypatch):
    def set_path(value: str) -> None:
        monkeypatch.setenv("GEMMARUN_PREFILL", value)
        prefill.reset()

    yield set_path
    monkeypatch.delenv("GEMMARUN_PREFILL", raising=False)
    prefill.reset()


def _matrices(g):
    w = torch.randn(72, 320, generator=g)
    codes = torch.randint(-32, 32, (72, 320), generator=g, dtype=torch.int8)
    return {
        "int8": quantize_int8(w),
        "int4": quantize_int4(w, 32),
        "int6": quantize_int6(w),
        "q8-grouped": Packed(codes, torch.rand(72, 10, generator=g).half(), None, 32, 0.0, 8),  # GGUF Q8_0's layout
        "q6-mins": Packed(pack_q6(codes), torch.rand(72, 10, generator=g).half(), torch.randn(72, 10, generator=g).half(), 32, -32.0, 6),
    }


def _bound(path: str, x: torch.Tensor, p: Packed) -> torch.Tensor:
    """The most the path may differ from float64's x @ W.T (quant/gemm.py states each)."""
    w = dequantize(p).double().abs()
    xa = x.double().abs()
    summed = 1e-5 * (xa @ w.T) + 1e-6  # float32 summation
    if path == "torch-fp32":
        return summed
    if path == "torch-bf16":
        exact_w = p.bits == 8 and p.group == p.in_features and p.mins is None  # int8 codes are exact in bf16
        ref = (x.double() @ dequantize(p).double().T).abs()
        return ((U if exact_w else 2 * U + U * U) * (xa @ w.T) + U * ref) * 1.001 + summed
    sx = x.double().abs().amax(1, keepdim=True) / 127  # torch-int8: half an int8 step of each row
    return sx / 2 * w.sum(1) + summed


@pytest.mark.parametrize("rows", [16, 41, 600])  # the smallest chunk a torch path takes, an odd one, past the kernel's limit
@pytest.mark.parametrize("path", ["torch-fp32", "torch-bf16", "torch-int8"])
def test_each_forced_path_within_its_rounding(force, path, rows):
    force(path)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 320, generator=g) * torch.rand(rows, 1, generator=g) * 4  # rows of different scales
    for name, p in _matrices(g).items():
        if path == "torch-int8" and name != "int8":
            continue  # torch-int8 takes int8 per-channel matrices only (the others: test_small_chunks_stay_on_the_kernel)
        got = matmul(x, p)
        assert torch.equal(got, run(path, x, p)), name  # the forced path is the one that ran
        err = (got.double() - x.double() @ dequantize(p).double().T).abs()
        assert (err <= _bound(path, x, p)).all(), name
        if path != "torch-fp32":
            assert err.max() > 3 * _bound("torch-fp32", x, p).max(), name  # it rounded: not the float32 path


def test_small_chunks_stay_on_the_kernel(force):
    force("torch-int8")
    from gemmarun.kernels import qlinear_kernel

    p = quantize_int8(torch.randn(40, 64))
    x = torch.randn(15, 64)  # under SMALL_ROWS: decoding and small batches
    if qlinear_kernel() is not None:
        assert torch.equal(matmul(x, p), qlinear_kernel()(x, [p.q], [p.scales], [None], [p.group], [0.0], [8])[0])
    assert prefill.path("q8", 15, True, True) == "kernel" and prefill.path("q8", 16, True, True) == "torch-int8"
    assert prefill.path("q4", 16, True, False) == "kernel"  # torch-int8 does not apply: gemmarun's own path
    assert prefill.path("q8", 16, True, False) == "kernel"  # grouped int8 (GGUF Q8_0): the same
    assert prefill.path("q8", 600, False, False) == "torch-fp32"


@pytest.mark.parametrize("path", ["kernel", "torch-bf16", "torch-int8"])
def test_linears_take_the_forced_path_layer_by_layer(force, path):
    force(path)
    layers = [QuantLinear(quantize_int8(torch.randn(40, 128))), QuantLinear(quantize_int4(torch.randn(24, 128), 32))]
    x = torch.randn(1, 33, 128)
    for layer, got in zip(layers, linears(x, layers)):
        assert torch.equal(got, layer(x))
        assert torch.equal(got[0], matmul(x[0], layer.packed))


def test_dense_bf16_paths(force, model_pair):
    x, w = torch.randn(3, 20, 96).bfloat16(), torch.randn(130, 96).bfloat16()
    lin = gemmarun.load(model_pair[1], dtype=torch.bfloat16).model.model.layers[0].mlp.up_proj  # the model's Linear
    lin.weight.data = w
    ref = x.double() @ w.double().T
    for path, want in [("torch-bf16", F.linear(x, w)), ("kernel", upcast_linear(x, w)), ("torch-fp32", upcast_linear(x, w))]:
        force(path)
        got = lin(x)
        assert torch.equal(got, want), path
        # bf16 weights are exact in both: x is bf16 already, float32 sums, one rounding of the result
        assert ((got.double() - ref).abs() <= U * ref.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T)).all(), path
    assert torch.equal(run_dense("torch-bf16", x, w), F.linear(x, w))


def test_bad_setting_is_a_one_line_config_error(force):
    force("amx")
    with pytest.raises(gemmarun.ConfigError, match="GEMMARUN_PREFILL='amx' is not a prefill path") as e:
        matmul(torch.randn(20, 64), quantize_int8(torch.randn(8, 64)))
    assert "\n" not in str(e.value)


# --- the tiny models: every forced path's logits against float64 with the same (dequantised) weights


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    ref = make_reference("gemma2", seed=21, initializer_range=0.05)
    return ref, save_checkpoint(ref, tmp_path_factory.mktemp("prefill"))


def _float64_logits(ref, model, ids):
    """transformers' model in float64 with the weights `model` runs (dequantised, or bf16-rounded)."""
    r = copy.deepcopy(ref).double()
    sd = r.state_dict()
    with torch.no_grad():
        for name, m in model.named_modules():
            w = dequantize(m.packed) if isinstance(m, _QuantWeight) else getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and name + ".weight" in sd:
                sd[name + ".weight"].copy_(w.double())
        return r(ids[None]).logits[0]


# Max |logit error| / max |logit| on this model (40 tokens, 4 layers): measured 1e-6 (torch-fp32),
# 2.0 u (torch-bf16: activations and weights rounded to bf16 at every matmul, u = 2^-8) and 5.9 / 254
# (torch-int8: every matmul input off by up to half its row's int8 step, max / 254). Bounds: 2x those.
MODEL_BOUND = {"torch-fp32": 1e-5, "torch-bf16": 4 * U, "torch-int8": 12 / 254}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("path", ["torch-fp32", "torch-bf16", "torch-int8"])
def test_model_logits_on_each_forced_path(force, model_pair, scheme, path):
    ref, folder = model_pair
    lm = gemmarun.load(folder, quantize=scheme)
    ids = torch.randint(3, 600, (40,), generator=torch.Generator().manual_seed(0))  # 40 rows: a prefill chunk
    want = _float64_logits(ref, lm.model, ids)
    force(path)
    err = (lm.logits(ids).double() - want).abs().max().item()
    applies = path != "torch-int8" or scheme == "int8"
    assert err <= (MODEL_BOUND[path] if applies else 1e-3) * want.abs().max().item()
    if applies and path != "torch-fp32":
        assert err > 100 * MODEL_BOUND["torch-fp32"] * want.abs().max().item()  # the rounding path ran


def test_bf16_checkpoint_is_not_widened_when_forced_native(force, model_pair, monkeypatch):
    ref, folder = model_pair
    lm = gemmarun.load(folder, dtype=torch.bfloat16)
    ids = torch.randint(3, 600, (40,), generator=torch.Generator().manual_seed(0))
    want = _float64_logits(ref, lm.model, ids)
    force("torch-bf16")
    widened = []
    monkeypatch.setattr("gemmarun.quant.gemm.upcast_linear", lambda *a: widened.append(1))
    got = lm.logits(ids).double()
    assert not widened  # no float32 copy of any bf16 matrix
    # every activation rounded to bf16 (u = 2^-8) as in the reference's own bf16 run: measured 1.0e-2 / 1.78
    assert (got - want).abs().max().item() <= 4 * U * want.abs().max().item()


# --- the measured choice


def _timings(monkeypatch, tmp_path, known):
    t = prefill.Timings(tmp_path / "prefill.json", "test cpu")
    t.known = dict(known)

    def measured(kind, path, rows, limit=float("inf")):
        raise AssertionError(f"timed {kind} {path} {rows}: it should not be")

    monkeypatch.setattr(prefill, "measure", measured)
    monkeypatch.setattr(prefill, "timings", functools.lru_cache(maxsize=1)(lambda: t))  # reset() clears it
    prefill._choice.cache_clear()
    return t


def test_choice_from_timings(force, monkeypatch, tmp_path):
    force("auto")
    ms = 1e-3
    _timings(monkeypatch, tmp_path, {
        "q8 kernel 128": 10 * ms, "q8 kernel 16": 2 * ms,
        "q8 torch-fp32 16": 30 * ms,  # slower at 16 rows than 2x the kernel at 128: never timed at 128
        "q8 torch-bf16 16": 3 * ms, "q8 torch-bf16 128": 4 * ms,
        "q8 torch-int8 16": 19 * ms,  # 2x bf16 tiles' 4 at 128 rows: not timed further
        "q4 kernel 128": 10 * ms, "q4 torch-fp32 16": 25 * ms, "q4 torch-bf16 16": 25 * ms,
        "bf16 torch-bf16 128": 50 * ms, "bf16 torch-bf16 16": 1 * ms, "bf16 torch-fp32 16": 3 * ms, "bf16 torch-fp32 128": 20 * ms,
    })  # fmt: skip
    # bf16 tiles win at 128 rows; 1 ms behind the kernel at 16, 6 ahead at 128: the lines cross at 16 + 112 / 7
    assert prefill.path("q8", 31, True, True) == "kernel" and prefill.path("q8", 32, True, True) == "torch-bf16"
    assert prefill.path("q4", 300, True) == "kernel"
    # dense bf16: native under 16 + 112 * 2 / 32 = 23 rows, float32 tiles from there
    assert prefill.path("bf16", 22, False) == "torch-bf16" and prefill.path("bf16", 23, False) == "torch-fp32"
    from gemmarun.kernels import qlinear_kernel

    if qlinear_kernel() is not None:  # without kernels the candidates differ (and were not given times)
        assert prefill.describe() == "prefill: int8 torch-bf16 from 32 rows, int4 kernel, bf16 torch-fp32 from 23 rows (timed on this CPU)"


def test_a_near_tie_keeps_the_first_path(force, monkeypatch, tmp_path):
    force("auto")
    ms = 1e-3
    near = 10 * ms / prefill.MARGIN
    _timings(monkeypatch, tmp_path, {
        "q8 kernel 128": 10 * ms, "q8 kernel 16": 2 * ms,
        "q8 torch-fp32 16": 2.5 * ms, "q8 torch-fp32 128": near * 1.01,  # faster, but within the margin
        "q8 torch-bf16 16": 25 * ms, "q8 torch-int8 16": 25 * ms,
        "q4 kernel 128": 10 * ms, "q4 kernel 16": 2 * ms,
        "q4 torch-fp32 16": 2.5 * ms, "q4 torch-fp32 128": near * 0.99,  # past it: chosen
        "q4 torch-bf16 16": 25 * ms,
    })  # fmt: skip
    assert prefill.path("q8", 512, True, True) == "kernel"
    assert prefill.path("q4", 512, True) == "torch-fp32"


def test_timings_kept_on_disk_per_machine(force, monkeypatch, tmp_path):
    force("auto")
    monkeypatch.setattr(prefill, "measure", lambda kind, path, rows, limit=float("inf"): {"kernel": 1.0}.get(path, 2.0) * rows)
    t = prefill.Timings(tmp_path / "p.json", "cpu A")
    assert t.seconds("q8", "kernel", 128) == 128.0
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["key"] == "cpu A" and data["seconds"] == {"q8 kernel 128": 128.0}
    monkeypatch.setattr(prefill, "measure", lambda *a, **k: pytest.fail("timed again"))
    assert prefill.Timings(tmp_path / "p.json", "cpu A").seconds("q8", "kernel", 128) == 128.0  # read, not timed
    assert prefill.Timings(tmp_path / "p.json", "cpu B").known == {}  # another machine's times are not used


def test_calibration_runs_here_and_is_reused(force, monkeypatch, tmp_path):
    """A real calibration in a fresh cache folder, then a second process-worth of choices from the file."""
    force("auto")
    monkeypatch.setenv("GEMMARUN_CACHE", str(tmp_path))
    prefill.reset()
    first = prefill.describe()
    assert first.startswith("prefill: int8 ") and first.endswith("(timed on this CPU)")
    files = list((tmp_path / "kernels").glob("prefill-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["seconds"]
    prefill.reset()
    monkeypatch.setattr(prefill, "measure", lambda *a, **k: pytest.fail("timed again"))
    assert prefill.describe() == first
