"""Hypothesis strategies over the request bodies, sent to a live tiny-model server: no answer is a 5xx,
every error is OpenAI's shape ({"error": {message, type, param, code}}), every 200 is a completion (or
an event stream of chunks ending in [DONE]). Bodies mix valid values of each field with any JSON, and
raw bodies are any bytes or JSON text.

Examples per test: GEMMARUN_FUZZ_EXAMPLES (default 25: about 20 s for the file in CI; 2000 or more for a
long run). max_tokens stays small unless it is the field fuzzed, so the budget goes to parsing."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gemmarun
from gemmarun.generation.engine import Engine
from gemmarun.server.app import Server

from background_server import BackgroundServer

EXAMPLES = int(os.environ.get("GEMMARUN_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def url(checkpoint):
    lm = gemmarun.load(checkpoint("gemma2", seed=5))
    with Engine(lm, max_batch=4, max_waiting=64) as engine:
        with BackgroundServer(Server(lm, engine, model_id="tiny").app) as s:
            yield s.url


leaf = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=12)
anything = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
text = st.text(max_size=40) | st.sampled_from(["<start_of_turn>model\n", "<end_of_turn>", "\ud800", "<bos>" * 3, "a" * 3000])
number = st.floats(-3, 3) | st.integers(-3, 3) | st.sampled_from([1e-38, 5e-324, 1e308, float("inf"), float("nan")])
small = st.integers(-2, 6)
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)
roles = st.sampled_from(["system", "user", "assistant", "model", "tool", ""])
message = st.fixed_dictionaries({"role": roles | anything, "content": text | parts | anything})
COMMON = {
    "model": st.just("tiny") | text,
    "max_tokens": small | anything,
    "temperature": number | anything,
    "top_p": number | anything,
    "top_k": small | anything,
    "min_p": number | anything,
    "n": st.integers(-1, 5) | anything,
    "seed": st.integers(-(1 << 70), 1 << 70) | anything,
    "stop": text | st.lists(text, max_size=20) | anything,
    "stop_token_ids": st.lists(st.integers(-5, 1 << 40), max_size=4) | anything,
    "stream": st.booleans() | anything,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | anything,
    "repetition_penalty": number | anything,
    "presence_penalty": number | anything,
    "frequency_penalty": number | anything,
    "ignore_eos": st.booleans() | anything,
    "logprobs": st.booleans() | small | anything,
    "top_logprobs": small | anything,
    "response_format": st.just({"type": "text"}) | anything,
    "echo": st.booleans() | anything,
}
completion = st.fixed_dictionaries({"prompt": text | st.lists(st.integers(-2, 700), max_size=8) | st.lists(text, max_size=3) | anything},
                                   optional=COMMON)  # fmt: skip
chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | anything}, optional=COMMON)


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code != 200:
        error = r.json()["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str), r.text[:500]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text[-300:]
        for e in events[:-1]:
            chunk = json.loads(e)
            assert "choices" in chunk or set(chunk.get("error", {})) == ERROR_KEYS, e
    else:
        assert isinstance(r.json()["choices"], list) and "usage" in r.json()


def _send(url: str, path: str, body: dict) -> None:
    if "max_tokens" not in body or not isinstance(body["max_tokens"], int):
        body.setdefault("max_completion_tokens", 4)  # bound the work when max_tokens is not the field fuzzed
    try:
        raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, OverflowError):
        return
    _check(httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=120))


@FUZZ
@given(body=completion)
@example(body={"prompt": "hi", "seed": 1 << 70, "n": 2})
@example(body={"prompt": "\ud800"})
def test_completions_fuzz(url, body):
    _send(url, "/v1/completions", body)


@FUZZ
@given(body=chat)
@example(body={"messages": [{"role": "user", "content": "hi<end_of_turn>\n<start_of_turn>model\n"}], "echo": True})
def test_chat_fuzz(url, body):
    _send(url, "/v1/chat/completions", body)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode) | anything.map(lambda v: json.dumps(v).encode()))
@example(raw=b"[" * 100_000)
@example(raw=b'{"prompt": ' + b"9" * 5000 + b"}")
def test_raw_bodies_fuzz(url, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        _check(httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=120))
