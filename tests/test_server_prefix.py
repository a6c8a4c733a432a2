"""The prefix cache through the live server and the official `openai` client: every answer equals
what a server with the cache off answers, and /health shows the reuse."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

import gemmarun
from gemmarun.generation.engine import Engine
from gemmarun.server import Server

from background_server import BackgroundServer

MODEL = "tiny"
WAIT = 120  # seconds per request: generous, the machine is shared
SYSTEM = "You are a careful assistant. You answer in long sentences about water, rivers and the sea. " * 2
GREEDY = dict(temperature=0, max_tokens=20, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma2", seed=41))


def _serve(lm, **engine_kw):
    """(client, health url, engine) of a live server over a new engine; the caller closes both."""
    engine = Engine(lm, max_batch=2, **engine_kw).start()
    server = BackgroundServer(Server(lm, engine, model_id=MODEL).app).__enter__()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)
    return client, server, engine


@pytest.fixture(scope="module")
def off(lm):
    client, server, engine = _serve(lm)
    yield client
    server.__exit__()
    engine.close()


@pytest.fixture()
def on(lm):
    client, server, engine = _serve(lm, prefix_cache_mb=8)
    yield client, lambda: httpx.get(server.url + "/health", timeout=WAIT).json()["prefix_cache"]
    server.__exit__()
    engine.close()


def _conversation(client, user_turns: list[str], stream_last: bool = False) -> list[str]:
    messages, replies = [{"role": "system", "content": SYSTEM}], []
    for i, text in enumerate(user_turns):
        messages.append({"role": "user", "content": text})
        if stream_last and i == len(user_turns) - 1:
            chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY)
            reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            reply = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY).choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_three_turn_conversation_reuses_the_cache_and_answers_as_without(on, off):
    client, stats = on
    turns = ["Tell me about rivers", "And about the sea?", "Thank you. Once more, shorter."]
    assert _conversation(client, turns, stream_last=True) == _conversation(off, turns, stream_last=True)
    s = stats()
    assert (s["hits"], s["misses"]) == (2, 1)  # the second and third requests resumed
    first_prompt = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM},
                                                                         {"role": "user", "content": turns[0]}],
                                                  **GREEDY).usage.prompt_tokens  # fmt: skip
    assert s["tokens_reused"] >= 2 * first_prompt > 4 * 16  # far past the sliding window of 16


def test_completion_prefix_past_the_window(on, off):
    client, stats = on
    prompt = "Water runs down the long river to the little sea, and the model reads every word. " * 3
    follow = prompt + " Then the tide came in."
    got = [client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in (prompt, follow)]
    want = [off.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in (prompt, follow)]
    assert got == want
    n = off.completions.create(model=MODEL, prompt=prompt, **GREEDY).usage.prompt_tokens
    assert n > 2 * 32  # the ring of 16 + 16 slots wrapped twice over
    assert stats()["hits"] == 1 and stats()["tokens_reused"] >= n - 4  # the joint may tokenise differently


def test_eviction_under_a_small_limit(lm, off):
    client, server, engine = _serve(lm, prefix_cache_mb=0.15)
    try:
        prompts = [f"{i}: " + SYSTEM for i in range(4)]
        got = [client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts]
        s = httpx.get(server.url + "/health", timeout=WAIT).json()["prefix_cache"]
    finally:
        server.__exit__()
        engine.close()
    assert got == [off.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text for p in prompts]
    assert s["evictions"] >= 1 and 0 < s["bytes"] <= s["limit_bytes"] == int(0.15 * 2**20)
    assert s["entries"] == s["snapshots_stored"] - s["evictions"]


def test_two_concurrent_conversations_sharing_a_system_prompt(on, off):
    client, stats = on
    scripts = [["Tell me about rivers", "Why are they long?", "And wide?"], ["What is the sea?", "Is it salty?", "Why?"]]
    replies: dict[int, list[str]] = {}

    def run(i: int) -> None:
        replies[i] = _conversation(client, scripts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5 * WAIT)
    assert [replies.get(i) for i in range(2)] == [_conversation(off, s) for s in scripts]
    s = stats()
    assert s["hits"] >= 4  # every later turn resumed from its own conversation's snapshot
    # a third conversation misses but snapshots the shared system prompt where it branches; a
    # fourth resumes from that
    before = s["tokens_reused"]
    third, fourth = _conversation(client, ["Hello"]), _conversation(client, ["Good morning"])
    assert [third, fourth] == [_conversation(off, ["Hello"]), _conversation(off, ["Good morning"])]
    system_tokens = off.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SYSTEM}],
                                                **GREEDY).usage.prompt_tokens  # fmt: skip
    assert stats()["tokens_reused"] - before >= system_tokens - 8  # the turn markers around it may differ
