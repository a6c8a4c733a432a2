"""Sampling, stop handling, streaming, the pipeline and the CLI on a small saved checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gemmarun
from gemmarun import InvalidParameterError, SamplingParams
from gemmarun.generation.sampling import greedy_token, probabilities, sample_one


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=5)


@pytest.fixture(scope="module")
def lm(folder):
    return gemmarun.load(folder)


def test_seed_reproducible_and_seeds_differ(lm):
    kw = dict(max_new_tokens=20, temperature=1.0, ignore_eos=True)
    a = lm.generate("Once upon", seed=7, **kw)
    b = lm.generate("Once upon", seed=7, **kw)
    c = lm.generate("Once upon", seed=8, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(lm):
    greedy = lm.generate("Once upon", max_new_tokens=12, ignore_eos=True)
    sampled = lm.generate("Once upon", max_new_tokens=12, temperature=0.9, top_k=1, seed=3, ignore_eos=True)
    assert sampled.token_ids == greedy.token_ids


def test_greedy_token_is_torch_argmax():
    nan, inf = float("nan"), float("inf")
    rows = [[1.0, nan, 3.0, nan], [-inf, -inf, -inf], [2.0, 5.0, 5.0, 1.0], [-0.0, 0.0], [inf, nan], [nan, inf], [3.0, inf, inf]]
    gen = torch.Generator().manual_seed(0)
    rows += [torch.randn(262144, generator=gen).tolist(), torch.randint(0, 4, (1000,), generator=gen).float().tolist()]
    for row in rows:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = torch.tensor(row, dtype=dtype)
            assert greedy_token(x) == int(torch.argmax(x))
    x = torch.randn(3, 50, generator=gen)
    assert greedy_token(x[:, 7]) == int(torch.argmax(x[:, 7]))  # a strided column


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=float(full[0] + full[1] / 2)))
    assert (p[:2] > 0).all() and (p[2:] == 0).all()
    p = probabilities(logits, SamplingParams(temperature=1.0, min_p=float(full[2] / full[0]) + 1e-3))
    assert (p[:2] > 0).all() and (p[2:] == 0).all()


def test_sampling_follows_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    params = SamplingParams(temperature=0.8, top_p=0.95)
    want = probabilities(logits, params)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_one(logits, params, None, [], gen) for _ in range(20000)]), minlength=6)
    freq = counts.double() / counts.sum()
    assert counts[want == 0].sum() == 0  # filtered tokens never drawn
    assert ((freq - want.double()).abs() < 4 * (want.double() * (1 - want.double()) / 20000).sqrt() + 1e-9).all()


def test_top_p_past_the_candidates_looks_further():
    logits = torch.zeros(5000)  # flat: 90% of the mass takes 4500 tokens, past the first 1024 looked at
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.9))
    assert (p > 0).sum().item() == 4500
    logits = torch.zeros(40000)  # past every candidate count: every token, sorted
    assert (probabilities(logits, SamplingParams(temperature=1.0, top_p=0.9)) > 0).sum().item() == 36000
    peaked = torch.cat([torch.full((10,), 10.0), torch.zeros(4990)])  # the cut within the candidates
    assert (probabilities(peaked, SamplingParams(temperature=1.0, top_p=0.9)) > 0).sum().item() == 10


def test_repetition_penalty_changes_output(lm):
    plain = lm.generate("the the the", max_new_tokens=16, ignore_eos=True)
    penalised = lm.generate("the the the", max_new_tokens=16, repetition_penalty=3.0, ignore_eos=True)
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))
    assert penalised.token_ids != plain.token_ids


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_invalid_sampling_values(kw, match):
    with pytest.raises(InvalidParameterError, match=match):
        SamplingParams(**kw)


def test_stop_string_cuts_text(lm):
    full = lm.generate("Once upon", max_new_tokens=30, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = lm.generate("Once upon", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    streamed = "".join(lm.stream("Once upon", max_new_tokens=30, ignore_eos=True, stop=[stop]))
    assert streamed == cut.text


def test_stop_token_id(lm):
    full = lm.generate("Once upon", max_new_tokens=20, ignore_eos=True)
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = lm.generate("Once upon", max_new_tokens=20, stop_token_ids=[stop_id])
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: first + 1]


def test_stream_concatenates_to_generate(lm):
    out = lm.generate("Hello there", max_new_tokens=25, ignore_eos=True)
    pieces = list(lm.stream("Hello there", max_new_tokens=25, ignore_eos=True))
    assert "".join(pieces) == out.text
    assert out.text == lm.tokenizer.decode(out.token_ids)


def test_pipeline_returns_prompt_plus_continuation(folder, lm):
    pipe = gemmarun.pipeline("text-generation", model=str(folder))
    out = pipe("Hello there", max_new_tokens=10)
    expected = lm.generate("Hello there", max_new_tokens=10)
    assert out == [{"generated_text": "Hello there" + expected.text}]
    with pytest.raises(InvalidParameterError):
        gemmarun.pipeline("summarization", model=lm)


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gemmarun.cli", *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_cli_generate_streams_same_text(folder, lm):
    expected = lm.generate("Hello there", max_new_tokens=15).text
    r = _cli("generate", "--model", str(folder), "--prompt", "Hello there", "-n", "15")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    r = _cli("generate", "--model", str(folder), "-n", "15", stdin="Hello there")
    assert r.returncode == 0 and r.stdout == expected + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/dir", "--prompt", "x"], "no model at"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
    ],
)
def test_cli_errors_are_one_line(folder, args, message):
    r = _cli("generate", *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_prompt_too_long(folder):
    r = _cli("generate", "--model", str(folder), "--context", "8", "--prompt", "word " * 50)
    assert r.returncode != 0 and "context holds 8" in r.stderr and "Traceback" not in r.stderr
