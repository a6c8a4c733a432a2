"""The engine's prefix cache: resumed prompts answer exactly what a full prefill answers, past the
sliding window of 16, on both layer patterns; slack, branch snapshots, eviction, the statistics."""

from __future__ import annotations

import pytest
import torch

import gemmarun
from gemmarun import SamplingParams
from gemmarun.chat import render_messages
from gemmarun.errors import InvalidParameterError
from gemmarun.generation import core
from gemmarun.generation.engine import Engine, Request
from gemmarun.generation.prefix_cache import MIN_TOKENS, Match, PrefixCache
from gemmarun.model.cache import KVCache

WAIT = 120  # seconds: a hang fails instead of stalling the suite
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SYSTEM = "You answer in long sentences about water, rivers and the little models that live in them. " * 2


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def lm(request, checkpoint):
    return gemmarun.load(checkpoint(request.param, seed=31))


def _run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY):
    return engine.submit(Request(prompt, params)).result(WAIT)


def _chat(lm, engine: Engine, turns: list[str], params: SamplingParams = GREEDY) -> list:
    """A conversation resent whole each turn, as chat clients do; each turn's result."""
    messages, results = [{"role": "system", "content": SYSTEM}], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        r = _run(engine, lm.tokenizer.encode(render_messages(lm.tokenizer, messages)), params)
        messages.append({"role": "assistant", "content": r.text})
        results.append(r)
    return results


def test_three_turn_chat_reuses_the_cache_and_answers_exactly(lm):
    turns = ["Tell me about rivers", "And the sea?", "Thank you, once more please"]
    with Engine(lm, max_batch=2) as off:
        expected = _chat(lm, off, turns)
        assert "prefix_cache" not in off.stats()
    with Engine(lm, max_batch=2, prefix_cache_mb=8) as on:
        got = _chat(lm, on, turns)
        stats = on.stats()["prefix_cache"]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.text for r in got] == [r.text for r in expected]
    # turns 2 and 3 resume from the turn before, at least its whole prompt (the template trims the
    # reply, so the rings kept at the prompt's end serve): far past the window of 16 and the ring of 32
    assert stats["hits"] == 2 and stats["misses"] == 1
    assert stats["tokens_reused"] >= expected[0].prompt_tokens + expected[1].prompt_tokens > 4 * 32
    assert stats["entries"] >= 3 and 0 < stats["bytes"] <= stats["limit_bytes"] == 8 * 2**20


def test_resume_short_of_the_snapshot_end_uses_the_ring_slack(lm):
    base = lm.tokenizer.encode(SYSTEM * 2)
    assert len(base) > 40  # wraps the ring of 16 + 16 slots
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with Engine(lm, max_batch=1, prefix_cache_mb=8) as engine:
        first = _run(engine, base, params)
        held = base + first.token_ids[:-1]  # what the row fed: the last sampled token never was
        # diverge 10 positions before the cached end (a re-tokenised reply), within the 16 slack
        prompt = held[:-10] + lm.tokenizer.encode("and then", add_bos=False)
        got = _run(engine, prompt, GREEDY)
        stats = engine.stats()["prefix_cache"]
    assert stats["hits"] == 1 and stats["tokens_reused"] == len(held) - 10
    assert got.token_ids == lm.generate(prompt, GREEDY).token_ids


def test_branch_snapshot_serves_a_third_prompt_with_a_shared_prefix(lm):
    shared = lm.tokenizer.encode(SYSTEM * 2)
    a = shared + lm.tokenizer.encode("first question about rivers " * 4, add_bos=False)
    b = shared + lm.tokenizer.encode("second, other question", add_bos=False)
    c = shared + lm.tokenizer.encode("third one", add_bos=False)
    with Engine(lm, max_batch=1, prefix_cache_mb=8) as engine:
        results = [_run(engine, p) for p in (a, b, c)]
        stats = engine.stats()["prefix_cache"]
    # b shares `shared` with a's snapshot, too far before its end to resume: a miss that stores a
    # snapshot at the branch point, which c resumes from
    assert (stats["misses"], stats["hits"]) == (2, 1)
    assert stats["tokens_reused"] >= len(shared)
    assert stats["snapshots_stored"] == 4  # a, the branch point, b, c
    for p, r in zip((a, b, c), results):
        assert r.token_ids == lm.generate(p, GREEDY).token_ids


def test_eviction_keeps_the_memory_bound(lm):
    prompts = [lm.tokenizer.encode(f"{i} {SYSTEM}") for i in range(4)]
    short = SamplingParams(max_new_tokens=4, ignore_eos=True)  # a snapshot ends 3 tokens past its prompt
    with Engine(lm, max_batch=1, prefix_cache_mb=8) as probe:
        _run(probe, prompts[0], short)
        one = probe.stats()["prefix_cache"]["bytes"]  # one snapshot's size
    limit_mb = 2.5 * one / 2**20  # room for two snapshots
    with Engine(lm, max_batch=1, prefix_cache_mb=limit_mb) as engine:
        for p in prompts:
            _run(engine, p, short)
        stats = engine.stats()["prefix_cache"]
        assert stats["entries"] == 2 and stats["evictions"] == 2 and stats["bytes"] <= stats["limit_bytes"]
        # the oldest is gone (a miss); the newest survived and answers exactly
        first = _run(engine, prompts[0] + [5, 6], short)
        last = _run(engine, prompts[3] + [5, 6], short)
        stats = engine.stats()["prefix_cache"]
        assert (stats["misses"], stats["hits"]) == (5, 1)
    assert first.token_ids == lm.generate(prompts[0] + [5, 6], short).token_ids
    assert last.token_ids == lm.generate(prompts[3] + [5, 6], short).token_ids


def test_concurrent_rows_and_sampling_are_unchanged(lm):
    """Rows resume, prefill and decode beside each other; seeded sampling draws the same tokens."""
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    prefix = lm.tokenizer.encode(SYSTEM)
    cases = [(prefix + lm.tokenizer.encode(f"question {i}", add_bos=False), GREEDY if i % 2 else sampled) for i in range(6)]
    with Engine(lm, max_batch=3, prefill_chunk=16, prefix_cache_mb=8) as engine:
        _run(engine, prefix + [7])  # a snapshot every case shares the prefix of
        handles = [engine.submit(Request(p, params)) for p, params in cases]
        results = [h.result(WAIT) for h in handles]
        assert engine.stats()["prefix_cache"]["hits"] >= 1
    for (p, params), r in zip(cases, results):
        assert r.token_ids == lm.generate(p, params).token_ids


def test_scored_prompts_bypass_the_cache(lm):
    prompt = lm.tokenizer.encode(SYSTEM)
    with Engine(lm, max_batch=1, prefix_cache_mb=8) as engine:
        _run(engine, prompt)
        h = engine.submit(Request(prompt + [9], GREEDY, logprobs=0, prompt_logprobs=True))
        events = list(h.events(WAIT))
        assert engine.stats()["prefix_cache"]["hits"] == 0
    assert len(events[0].prompt_logprobs) == len(prompt) + 1  # every prompt position was scored


def test_short_matches_and_bad_limits(lm):
    with pytest.raises(InvalidParameterError, match="prefix_cache_mb"):
        Engine(lm, prefix_cache_mb=-1)
    cache = KVCache.for_model(lm.model, 1, 64, ring_extra=16)
    prefix = PrefixCache(cache, 2**20)
    prefix.store(0, list(range(1, MIN_TOKENS)))  # too short to keep
    assert prefix.stats()["entries"] == 0
    assert prefix.resumable(30, 3) and not prefix.resumable(60, 40) and prefix.resumable(60, 44)
    assert not prefix.resumable(60, 61)
    prefix.store(0, list(range(40)))
    assert prefix.stats()["entries"] == 1
    tiny = PrefixCache(cache, 1)  # a snapshot larger than the limit is not kept
    tiny.store(0, list(range(40)))
    assert (tiny.stats()["entries"], tiny.stats()["bytes"], tiny.stats()["evictions"]) == (0, 0, 0)


def test_resuming_past_the_slack_would_be_wrong(lm):
    """Why resumable() refuses: rings that dropped more than ring_extra positions lost part of the
    window before the resume point, and the continuation's logits go wrong."""
    ids = lm.tokenizer.encode(SYSTEM * 2)[:60]
    cache = KVCache.for_model(lm.model, 2, 128, ring_extra=16)  # rings of 16 + 16 slots
    prefix = PrefixCache(cache, 2**24)
    with torch.inference_mode():
        fresh = core.prefill(lm.model, KVCache.for_model(lm.model, 1, 128), [ids])
        core.prefill(lm.model, cache.rows(0, 1), [ids])
        prefix.store(0, ids)
        [snap] = prefix.entries.values()
        for m, exact in ((44, True), (50, True), (30, False)):
            assert prefix.resumable(60, m) == exact
            cache.reset(torch.tensor([1]))
            prefix.restore(Match(snap, snap.rings[-1], m, 0), 1)
            got = core.prefill(lm.model, cache.rows(1, 2), [ids[m:]], [m])
            assert torch.allclose(got, fresh, atol=1e-4) == exact, m
