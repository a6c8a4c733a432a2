"""Speculative decoding through every caller: the engine (and the server over it), chat sessions and
the CLI give what they give without it; bad settings are one-line errors."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest
import torch

import gemmarun
from gemmarun import SamplingParams
from gemmarun.chat import ChatSession
from gemmarun.generation.engine import Engine, Request
from gemmarun.generation.speculative import SpeculativeConfig
from gemmarun.server import Server

from background_server import BackgroundServer

WAIT = 120  # seconds: every wait on the engine's thread is bounded
# Fixed k: whether adaptive speculation pays on a tiny model is a matter of timing, and these tests
# must speculate to prove anything (tests/test_speculative.py tests the controller).
NGRAM = SpeculativeConfig("ngram", 4, adaptive=False)


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma3", seed=3)


@pytest.fixture(scope="module")
def lm(folder):
    return gemmarun.load(folder)


def _grounded(seed: int) -> list[int]:
    ids = torch.randint(3, 600, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [2] + ids + ids[:8] + ids


def test_engine_rows_speculate_and_match_plain_decoding(lm):
    cases = [
        (_grounded(1), SamplingParams(max_new_tokens=40, ignore_eos=True)),
        (_grounded(2)[:25], SamplingParams(max_new_tokens=12, ignore_eos=True)),
        (_grounded(3), SamplingParams(max_new_tokens=30, repetition_penalty=1.2)),
        (_grounded(4), SamplingParams(max_new_tokens=35, temperature=0.9, seed=4, ignore_eos=True)),  # sampled: runs, in range
    ]
    plain = [lm.generate(ids, params) for ids, params in cases]
    with Engine(lm, max_batch=3, max_waiting=8, speculate=NGRAM) as engine:
        handles = [engine.submit(Request(ids, params, logprobs=2)) for ids, params in cases]
        events = [list(h.events(WAIT)) for h in handles]
        assert engine.speculator.totals["accepted"] > 10
        assert engine.steps < sum(len(e) for e in events)  # rounds emitted several tokens
    for (_, params), want, evs in zip(cases, plain, events):
        got = evs[-1].result
        assert len(got.token_ids) == len(want.token_ids) and got.finish_reason == want.finish_reason
        assert [e.token_id for e in evs] == got.token_ids
        if params.greedy:
            assert got.token_ids == want.token_ids and got.text == want.text
        # each token's logprob comes from the target's logits that chose it
        for e in evs:
            assert e.logprob.token_id == e.token_id and e.logprob.logprob <= 0 and len(e.logprob.top) == 2


def test_server_completions_with_speculation(lm):
    prompt = lm.tokenizer.decode(_grounded(5)[1:])
    want = lm.generate(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
    with Engine(lm, max_batch=2, speculate=NGRAM) as engine, BackgroundServer(Server(lm, engine).app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=30, temperature=0, stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
        assert engine.speculator.totals["drafted"] > 0
    assert out.choices[0].text == streamed == want.text


def test_chat_session_replies_match_and_the_cache_follows(folder, lm):
    fast = gemmarun.load(folder, speculate="ngram", draft_tokens=4)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain_session, fast_session = ChatSession(lm, params=params), ChatSession(fast, params=params)
    for text in ("say it again say it again say it again", "and once more: again again again"):
        assert "".join(fast_session.send(text)) == "".join(plain_session.send(text))
        assert fast_session.ids == plain_session.ids  # the cache holds the same tokens...
        assert fast_session.cache.filled == len(fast_session.ids)  # ...and nothing past them
    assert fast_session.speculator.totals["rounds"] > 0
    # a reply cut by a stop string: the next turn starts again from the text, as without speculation
    cut = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(plain_session.last_result.text[3:5],))
    a, b = ChatSession(lm, params=cut), ChatSession(fast, params=cut)
    assert "".join(b.send("again again")) == "".join(a.send("again again"))
    assert "".join(b.send("more")) == "".join(a.send("more"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gemmarun.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_with_speculation(folder):
    prompt = "Water is very long little Water is very long little Water is"
    base = ["generate", prompt, "-m", str(folder), "-n", "24", "--ignore-eos"]
    plain = _cli(*base)
    fast = _cli(*base, "--speculate", "ngram", "--draft-tokens", "4")
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    drafted = _cli(*base, "--draft-model", str(folder))  # the target as its own draft
    assert drafted.returncode == 0 and drafted.stdout == plain.stdout, drafted.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--speculate", "ngram", "--draft-tokens", "0"], "draft_tokens must be an integer from 1 to 32"),
        (["--speculate", "model"], "needs a draft model"),
        (["--speculate", "ngram", "--compile", "--quantize", "none"], "choose one"),
    ],
)
def test_cli_bad_speculation_is_one_line(folder, args, message):
    r = _cli("generate", "hello", "-m", str(folder), *args)
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
