"""The continuous-batching engine against LanguageModel.generate run alone, on a tiny saved checkpoint."""

from __future__ import annotations

import threading

import pytest
import torch

import gemmarun
from gemmarun import SamplingParams
from gemmarun.generation.engine import Engine, EngineBusyError, EngineClosedError, Request


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma2", seed=11))


WAIT = 120  # seconds: every wait on the engine's thread is bounded, so a hang fails instead of stalling the suite

PROMPTS = ["Hello there", "Once upon a time the model", "the", "Water is very long little " * 6, "def add(a, b):", "café"]


def _mixed(lm):
    """(prompt ids, params) of requests that differ in length, stop rules and sampling."""
    cases = []
    for i, p in enumerate(PROMPTS):
        cases.append((lm.tokenizer.encode(p), SamplingParams(max_new_tokens=4 + 5 * i, ignore_eos=True)))
    cases.append((lm.tokenizer.encode("the the the"), SamplingParams(max_new_tokens=20, repetition_penalty=2.0)))
    cases.append((lm.tokenizer.encode("Once upon"), SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=4)))
    cases.append((lm.tokenizer.encode("Hello"), SamplingParams(max_new_tokens=25, frequency_penalty=1.0, presence_penalty=0.5)))
    return cases


def test_batched_results_equal_each_request_run_alone(lm):
    cases = _mixed(lm)
    alone = [lm.generate(ids, params) for ids, params in cases]
    # 3 rows for 9 requests: requests queue, join as rows free up and decode at different positions;
    # short prompts are prefilled together, long ones in several chunks.
    with Engine(lm, max_batch=3, max_waiting=16, prefill_chunk=16) as engine:
        handles = [engine.submit(Request(ids, params)) for ids, params in cases]
        results = [h.result(WAIT) for h in handles]
        assert engine.steps < sum(r.completion_tokens for r in results)  # rows really shared steps
    for a, b in zip(alone, results):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert (b.prompt_tokens, b.completion_tokens) == (a.prompt_tokens, a.completion_tokens)


def test_batch_job_api_and_stop_strings(lm):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    full = lm.generate("Once upon", params)
    stop = full.text[4:7]
    cut = SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,))
    with Engine(lm, max_batch=2) as engine:
        results = engine.generate(["Once upon", "Hello there", "Once upon"], params)
        stopped = engine.generate(["Once upon"], cut)[0]
    assert results[0].token_ids == results[2].token_ids == full.token_ids
    assert results[1].token_ids == lm.generate("Hello there", params).token_ids
    assert stopped.text == lm.generate("Once upon", cut).text == full.text[: full.text.find(stop)]
    assert stopped.finish_reason == "stop"


def test_prefill_is_interleaved_with_decoding(lm):
    """A long prompt read in chunks must not stall a stream that is already running."""
    order = []
    lock = threading.Lock()
    started = threading.Event()

    def sink(handle, event):
        with lock:
            order.append(handle.id)
        started.set()

    long_prompt = lm.tokenizer.encode("Water is very long little " * 12)
    assert len(long_prompt) > 40
    with Engine(lm, max_batch=2, prefill_chunk=4) as engine:
        running = engine.submit(Request(lm.tokenizer.encode("Hi"), SamplingParams(max_new_tokens=120, ignore_eos=True)), sink)
        assert started.wait(timeout=WAIT)  # the running stream's first token
        with lock:
            mark = len(order)
        late = engine.submit(Request(long_prompt, SamplingParams(max_new_tokens=3, ignore_eos=True)), sink)
        assert engine.wait_idle(timeout=WAIT)
    between = order[mark : order.index(late.id)].count(running.id)
    chunks = -(-len(long_prompt) // 4)
    assert between >= chunks - 1  # one decode step of the running stream per prefill chunk


def test_cancel_frees_the_row_at_once_and_queue_is_bounded(lm):
    long = SamplingParams(max_new_tokens=400, ignore_eos=True)
    with Engine(lm, max_batch=1, max_waiting=1) as engine:
        first = engine.submit(Request(lm.tokenizer.encode("Hello"), long))
        events = first.events(WAIT)
        next(events)  # running: it holds the only row
        second = engine.submit(Request(lm.tokenizer.encode("Once upon"), SamplingParams(max_new_tokens=5)))
        with pytest.raises(EngineBusyError, match="busy"):
            engine.submit(Request(lm.tokenizer.encode("the"), long))
        with pytest.raises(EngineBusyError, match="capacity"):
            engine.submit_all([Request([2], long)] * 3, block=True)
        first.cancel()
        last = list(events)[-1]
        assert last.finish_reason == "cancelled" and last.result.completion_tokens < 400
        assert second.result(WAIT).token_ids == lm.generate("Once upon", max_new_tokens=5).token_ids
        assert engine.wait_idle(timeout=WAIT) and engine.healthy


def test_every_request_answered_exactly_once(lm):
    """Many submitters, some cancelling: each handle gets one last event, no row stays taken."""
    lasts: dict[int, int] = {}
    lock = threading.Lock()

    def sink(handle, event):
        if event.last:
            with lock:
                lasts[handle.id] = lasts.get(handle.id, 0) + 1

    handles = []
    with Engine(lm, max_batch=4, max_waiting=64) as engine:

        def client(k):
            for j in range(4):
                h = engine.submit(
                    Request(lm.tokenizer.encode(PROMPTS[(k + j) % 6]), SamplingParams(max_new_tokens=3 + 5 * j, ignore_eos=True)),
                    sink,
                    block=True,
                )
                handles.append(h)
                if (k + j) % 3 == 0:
                    h.cancel()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert engine.wait_idle(timeout=WAIT)
        assert engine.stats()["running"] == 0
    assert len(handles) == 24 and all(lasts.get(h.id) == 1 for h in handles)


def test_logprobs_are_the_models_own_scores(lm):
    prompt = lm.tokenizer.encode("Once upon a time")
    with Engine(lm, max_batch=2) as engine:
        other = engine.submit(Request(lm.tokenizer.encode("the"), SamplingParams(max_new_tokens=30, ignore_eos=True)))
        h = engine.submit(Request(prompt, SamplingParams(max_new_tokens=12, temperature=0.8, seed=2, ignore_eos=True),
                                  logprobs=3, prompt_logprobs=True))  # fmt: skip
        events = list(h.events(WAIT))
        other.result(WAIT)
    ids = events[-1].result.token_ids
    reference = torch.log_softmax(lm.logits(prompt + ids), dim=-1)  # (T, V), soft-capped float32
    got = [e.logprob for e in events]
    for k, lp in enumerate(got):
        row = reference[len(prompt) - 1 + k]
        assert lp.token_id == ids[k]
        assert lp.logprob == pytest.approx(float(row[ids[k]]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    scored = events[0].prompt_logprobs
    assert scored[0] is None and len(scored) == len(prompt)
    for k in range(1, len(prompt)):
        assert scored[k].logprob == pytest.approx(float(reference[k - 1, prompt[k]]), abs=1e-4)


def test_n_choices_get_distinct_seeded_streams(lm):
    params = SamplingParams(max_new_tokens=15, temperature=1.0, seed=9, ignore_eos=True)
    prompt = lm.tokenizer.encode("Once upon")
    with Engine(lm, max_batch=4) as engine:
        a = [h.result(WAIT).token_ids for h in engine.submit_all([Request(prompt, params, seed_offset=j) for j in range(3)])]
        b = [h.result(WAIT).token_ids for h in engine.submit_all([Request(prompt, params, seed_offset=j) for j in range(3)])]
    assert a == b and len({tuple(x) for x in a}) == 3
    assert a[0] == lm.generate(prompt, params).token_ids  # choice 0 uses the seed itself


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(lm, monkeypatch):
    with Engine(lm, max_batch=2) as engine:
        real = engine.model.forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.model, "forward", flaky)
        with pytest.raises(RuntimeError, match="boom"):
            engine.submit(Request(lm.tokenizer.encode("Hello"), SamplingParams(max_new_tokens=3))).result(WAIT)
        monkeypatch.setattr(engine.model, "forward", real)
        ok = engine.submit(Request(lm.tokenizer.encode("Hello"), SamplingParams(max_new_tokens=3))).result(WAIT)
        assert ok.token_ids == lm.generate("Hello", max_new_tokens=3).token_ids
        assert engine.healthy


def test_closing_answers_what_is_left(lm):
    engine = Engine(lm, max_batch=1).start()
    running = engine.submit(Request([2, 5], SamplingParams(max_new_tokens=400, ignore_eos=True)))
    waiting = engine.submit(Request([2, 6], SamplingParams(max_new_tokens=4)))
    engine.close()
    for h in (running, waiting):
        last = list(h.events(WAIT))[-1]
        assert last.last
    assert not engine.healthy


def test_the_thread_starts_with_start_not_init(lm):
    engine = Engine(lm, max_batch=1)
    assert not engine.healthy  # no thread yet
    with pytest.raises(EngineClosedError, match="not running"):
        engine.submit(Request([2, 5], SamplingParams(max_new_tokens=2)))
    engine.start()
    try:
        assert engine.healthy
        out = engine.submit(Request([2, 5], SamplingParams(max_new_tokens=2, ignore_eos=True))).result(WAIT)
        assert out.token_ids == lm.generate([2, 5], max_new_tokens=2, ignore_eos=True).token_ids
        assert engine.wait_idle(timeout=WAIT)
    finally:
        engine.close()
    assert not engine.healthy
    with pytest.raises(EngineClosedError):
        engine.start()
