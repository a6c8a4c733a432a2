"""The torch.compile decoding path: static-cache plans, compiled greedy decoding, and its errors."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import gemmarun
from gemmarun import InvalidParameterError
from gemmarun.generation.generator import static_context
from gemmarun.kernels import decode_stack_class
from gemmarun.model.cache import KVCache


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=11)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_static_cache_decodes_like_the_sized_one(checkpoint, kind):
    # Past the sliding window (16), with a padded batch row, in eager mode: the masks over whole
    # buffers must select the same keys as the trimmed ones.
    lm = gemmarun.load(checkpoint(kind, seed=3))
    model, cfg = lm.model, lm.config
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.vocab_size, (2, 40), generator=gen)
    lengths = [40, 25]
    caches = [KVCache(cfg, 2, 64, model.dtype), KVCache(cfg, 2, 256, model.dtype, static=True)]
    outs = [[], []]
    with torch.inference_mode():
        for cache, out in zip(caches, outs):
            pos = torch.tensor([[0, 1, 2, 3]] * 2)
            model(tokens[:, :4], pos, cache)
            for t in range(4, 40):
                p = torch.tensor([[t if t < n else -1] for n in lengths])
                out.append(model(tokens[:, t : t + 1], p, cache, select=torch.zeros(2, dtype=torch.long)))
    for a, b in zip(*outs):
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-4)  # padding steps included: they write nothing


def test_static_context_buckets():
    assert static_context(20, 8192) == 256
    assert static_context(257, 8192) == 512
    assert static_context(512, 8192) == 512
    assert static_context(3000, 2048) == 2048


def test_compiled_greedy_equals_eager_past_the_window(folder):
    eager = gemmarun.load(folder)
    compiled = gemmarun.load(folder, compile=True)
    kw = dict(max_new_tokens=40, ignore_eos=True)  # 40 > the sliding window of 16
    a = eager.generate("Once upon a time", **kw)
    b = compiled.generate("Once upon a time", **kw)
    assert compiled.generator._compiled not in (None, False)  # it did compile
    assert b.token_ids == a.token_ids
    # a second request of another length reuses the bucket of 256
    assert compiled.generate("Hello", **kw).token_ids == eager.generate("Hello", **kw).token_ids


def test_failed_compile_falls_back_to_eager(folder, monkeypatch):
    def broken(model, **kw):
        def step(*a, **k):
            raise RuntimeError("no C++ compiler for inductor")

        return step

    monkeypatch.setattr(torch, "compile", broken)
    lm = gemmarun.load(folder, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lm.generate("Once upon", max_new_tokens=8, ignore_eos=True)
    assert any("torch.compile failed (RuntimeError: no C++ compiler" in str(w.message) for w in caught)
    assert out.token_ids == gemmarun.load(folder).generate("Once upon", max_new_tokens=8, ignore_eos=True).token_ids


@pytest.mark.skipif(decode_stack_class() is None, reason="no AVX2 kernels: quantised models decode through PyTorch")
def test_compile_refuses_kernel_models(folder):
    with pytest.raises(InvalidParameterError, match="quantize='none'"):
        gemmarun.load(folder, quantize="int8", compile=True)
    r = subprocess.run([sys.executable, "-m", "gemmarun.cli", "generate", "--model", str(folder), "--quantize", "int8",
                        "--compile", "-p", "Hi"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "--quantize none" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
