"""A float16 / bfloat16 KV cache (cache_dtype): rounded once as keys and values are written, read
back widened, on every attention path; decoding stays within rounding of the float32 cache's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gemmarun
import gemmarun.model.gemma
from gemmarun import ConfigError
from gemmarun.chat import ChatSession
from gemmarun.generation import Engine
from gemmarun.kernels import attention_kernel
from gemmarun.model.cache import KVCache

# Largest logit difference allowed against the float32 cache, over the largest logit: a key or
# value rounded to float16's 11 or bfloat16's 8 significant bits (unit roundoff 2^-11, 2^-8) moved
# the tiny models' logits by at most 0.0022 and 0.0096 of it through their 4 and 6 layers.
TOLERANCE = {torch.float16: 2**-7, torch.bfloat16: 2**-5}


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def folder(request, checkpoint):
    return checkpoint(request.param, seed=5)


def _logits(lm, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, str]:
    """Logits of ids through a cache of the model's cache_dtype: the first `prompt` tokens prefilled
    in chunks of 8 (across the window of 16), the rest one decoding step each."""
    model = lm.model
    cache = KVCache.for_model(model, 1, ids.numel())
    out = []
    with torch.inference_mode():
        for s in range(0, prompt, 8):
            e = min(s + 8, prompt)
            out.append(model(ids[None, s:e], torch.arange(s, e)[None], cache)[0])
        for t in range(prompt, ids.numel()):
            out.append(model(ids[None, t : t + 1], torch.tensor([[t]]), cache, select=torch.zeros(1, dtype=torch.long)))
    return torch.cat(out), str(cache.k[0].dtype)


@pytest.mark.parametrize("path", ["torch ops", "attention kernel", "decode stack", "dense decode stack"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cache_decodes_within_rounding(folder, monkeypatch, path, dtype):
    if path != "torch ops" and attention_kernel() is None:
        pytest.skip("no AVX2 kernels on this machine")
    if path == "torch ops":
        monkeypatch.setattr(gemmarun.model.gemma, "attention_kernel", lambda: None)
    quantize = "int8" if path == "decode stack" else None
    ref = gemmarun.load(folder, quantize=quantize)
    lm = gemmarun.load(folder, quantize=quantize, cache_dtype=dtype)
    if "stack" not in path:
        lm.model._stack = False  # the layers as modules
    assert bool(lm.model.decode_stack()) == ("stack" in path)
    ids = torch.randint(3, lm.config.vocab_size, (52,), generator=torch.Generator().manual_seed(1))
    want, want_dtype = _logits(ref, ids, 28)  # 28 + 24 tokens: well past the window of 16
    got, got_dtype = _logits(lm, ids, 28)
    assert (want_dtype, got_dtype) == ("torch.float32", str(dtype))
    diff = (got - want).abs().max().item() / want.abs().max().item()
    assert 0 < diff < TOLERANCE[dtype]  # rounded (not float32 after all), and only by the rounding


def test_every_cache_takes_the_dtype(folder):
    lm = gemmarun.load(folder, cache_dtype="float16")
    assert ChatSession(lm).cache.k[0].dtype == torch.float16
    engine = Engine(lm, max_batch=2)
    try:
        assert engine.cache.v[-1].dtype == torch.float16
    finally:
        engine.close()
    long = lm.logits(list(range(3, 43)), chunk=16)  # scoring through a cache, chunk by chunk
    exact = gemmarun.load(folder).logits(list(range(3, 43)), chunk=16)
    assert 0 < (long - exact).abs().max().item() < TOLERANCE[torch.float16] * exact.abs().max().item()
    assert gemmarun.load(folder, cache_dtype="auto").model.cache_dtype == torch.float32


def test_bad_cache_dtype(folder):
    with pytest.raises(ConfigError, match="unsupported cache_dtype 'int8'"):
        gemmarun.load(folder, cache_dtype="int8")
    r = subprocess.run([sys.executable, "-m", "gemmarun.cli", "generate", "--model", str(folder), "--cache-dtype", "int8", "x"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "invalid choice: 'int8'" in r.stderr and "Traceback" not in r.stderr


def test_bench_rows_take_the_cache_dtype(tmp_path):
    from gemmarun.tools.bench import specs_for

    specs = specs_for(None, None, {"gemmarun", "llama.cpp"}, 64, 16, tmp_path, cache_dtype="float16")
    assert [(e, s.get("cache_dtype")) for e, s in specs] == [("gemmarun", "float16"), ("llama.cpp", None)]
    assert all("cache_dtype" not in s for _, s in specs_for(None, None, {"gemmarun"}, 64, 16, tmp_path, cache_dtype="auto"))
