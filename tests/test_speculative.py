"""Speculative decoding (generation/speculative.py, drafts.py): greedy output identical to decoding
without it (n-gram and draft-model sources, past the sliding window, stop strings, a batch), the
sampled acceptance rule against the target's distribution (chi-square), the cache after rejections
against one that never saw them, the verify forward's logits against single steps, the controller."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import gemmarun
from gemmarun.errors import InvalidParameterError
from gemmarun.generation import core
from gemmarun.generation.drafts import Draft, NgramIndex
from gemmarun.generation.sampling import SamplingParams, probabilities
from gemmarun.generation.sequence import SequenceState
from gemmarun.generation.speculative import (
    REVIVE,
    TIE_MARGIN,
    WARMUP,
    Controller,
    SpecRow,
    SpeculativeConfig,
    Speculator,
    accept,
    decode_round,
    ring_extra,
)
from gemmarun.model.cache import KVCache


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def lm(request, checkpoint):
    return gemmarun.load(checkpoint(request.param, seed=3))


@pytest.fixture(scope="module")
def draft_lm(checkpoint):
    """A smaller model of the same tiny vocabulary (two layers, another seed)."""
    return gemmarun.load(checkpoint("gemma2", seed=4, num_hidden_layers=2))


def _ids(n: int, seed: int, vocab: int = 600) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _grounded(seed: int = 1) -> list[int]:
    """A prompt that repeats itself, so n-gram drafts hit (and the output, 60 tokens, crosses the window of 16)."""
    ids = _ids(24, seed)
    return [2] + ids + ids[:10] + ids


GREEDY = SamplingParams(max_new_tokens=60, ignore_eos=True)


def test_ngram_index_proposes_the_latest_continuation():
    index = NgramIndex(longest=3)
    ids = [5, 6, 7, 8, 5, 6, 9, 1, 5, 6]
    assert index.propose(ids, 2) == [9, 1]  # "5 6" last occurred before "9 1", not before "7 8"
    assert index.propose(ids + [9], 3) == [1, 5, 6]  # the longest match: "5 6 9"
    assert index.propose([1, 2, 3], 4) == []  # nothing recurs
    assert NgramIndex().propose([4, 4], 3) == [4, 4, 4]  # a loop goes on past the history's end


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_ngram_greedy_is_identical_across_the_window(checkpoint, quantize):
    for kind in ("gemma2", "gemma3"):
        lm = gemmarun.load(checkpoint(kind, seed=3), quantize=quantize)
        plain = lm.generate(_grounded(), GREEDY)
        for config in (SpeculativeConfig("ngram", 4), SpeculativeConfig("ngram", 8, adaptive=False)):
            spec = lm.speculator(config)
            fast = lm.generate(_grounded(), GREEDY, speculate=config)
            assert fast.token_ids == plain.token_ids and fast.text == plain.text, (kind, config)
            assert spec.totals["accepted"] > 10 and spec.totals["rounds"] < len(plain.token_ids)  # it really speculated
            assert len(_grounded()) + len(plain.token_ids) > 4 * lm.config.sliding_window


def test_draft_model_greedy_is_identical(lm, draft_lm):
    target = gemmarun.load(lm.source, draft=draft_lm, speculate="model", draft_tokens=4)
    prompt = _ids(20, 5)
    plain = target.generate(prompt, GREEDY, speculate="off")
    fast = target.generate(prompt, GREEDY)
    assert fast.token_ids == plain.token_ids
    assert target.speculator().totals["drafted"] > 0
    # the target as its own draft: every draft is accepted, so rounds really emit k + 1 tokens
    itself = gemmarun.load(lm.source, draft=lm, draft_tokens=4)
    assert itself.generate(prompt, GREEDY, speculate=SpeculativeConfig("model", 4, adaptive=False)).token_ids == plain.token_ids
    totals = itself.speculator(SpeculativeConfig("model", 4, adaptive=False)).totals
    assert totals["accepted"] >= 0.9 * totals["drafted"] and totals["tokens"] >= 3 * totals["rounds"]


def test_sampled_draft_model_is_reproducible(lm, draft_lm):
    target = gemmarun.load(lm.source, draft=draft_lm, draft_tokens=3)
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    a, b = (target.generate(_ids(12, 2), params) for _ in range(2))
    assert a.token_ids == b.token_ids and target.speculator().totals["drafted"] > 0


def test_stop_strings_and_a_batch_are_identical(lm):
    plain = lm.generate(_grounded(), GREEDY)
    stop = plain.text[len(plain.text) // 2 :][:3]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True, stop=(stop,))
    cut_plain = lm.generate(_grounded(), params)
    cut_fast = lm.generate(_grounded(), params, speculate="ngram")
    assert cut_fast.text == cut_plain.text and cut_fast.token_ids == cut_plain.token_ids and cut_fast.finish_reason == "stop"
    assert "".join(lm.stream(_grounded(), params, speculate="ngram")) == cut_plain.text
    # rows of different lengths and limits: per-row drafts in one verify forward
    prompts = [_grounded(1), _ids(7, 9), _grounded(2)[:30]]
    batch = SamplingParams(max_new_tokens=40, ignore_eos=True)
    assert [r.token_ids for r in lm.generate(prompts, batch, speculate="ngram")] == [r.token_ids for r in lm.generate(prompts, batch)]


def test_penalties_are_identical(lm):
    params = SamplingParams(max_new_tokens=40, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    assert lm.generate(_grounded(), params, speculate="ngram").token_ids == lm.generate(_grounded(), params).token_ids


class _Fixed:
    """A draft source that always proposes the same (wrong) tokens: rounds that reject."""

    name = "fixed"

    def __init__(self, tokens):
        self.tokens = tokens

    def new_row(self, context):
        return None

    def propose(self, row, ids, k, params, gen):
        return Draft(self.tokens[:k])


def _row(lm, prompt, params, spec, pending, pos):
    seq = lm.generator.new_sequence(prompt, params)
    seq.ids.append(pending)
    return SpecRow(0, seq, torch.tensor(prompt), pending, pos, spec.new_row(lm.context, params))


def test_cache_after_rejections_equals_a_cache_that_never_saw_them(lm):
    model, prompt = lm.model, _ids(30, 3)  # past the window: the rings have wrapped
    config = SpeculativeConfig("ngram", 5, adaptive=False)
    spec = Speculator(config)
    spec.drafter = _Fixed(_ids(5, 8))
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, 64, ring_extra=ring_extra(config))
        first = int(core.prefill(model, cache, [prompt])[0].argmax())
        row = _row(lm, prompt, GREEDY, spec, first, len(prompt))
        for _ in range(4):  # four rounds of five drafts, nearly all rejected
            decode_round(model, cache, [row], spec, lambda r, t, lg: r.seq.add(t))
        assert spec.totals["drafted"] == 20 and spec.totals["accepted"] < 20
        kept = prompt + row.seq.ids[:-1]  # every token but the pending one is in the cache
        assert row.pos == len(kept) and row.pending == row.seq.ids[-1]
        clean = KVCache.for_model(model, 1, 64, ring_extra=ring_extra(config))
        core.prefill(model, clean, [prompt])
        core.forward(model, clean, [kept[len(prompt) :]], [len(prompt)], last=False)
        # What any later query can see: every global slot, and sliding slots still inside the window
        # (a rolled-back ring slot is empty where the clean ring still holds a key long out of it).
        oldest = row.pos - lm.config.sliding_window
        for kind in ("global", "sliding"):
            seen = [torch.where(c.pos[kind] > (oldest if kind == "sliding" else -1), c.pos[kind], -1) for c in (cache, clean)]
            assert torch.equal(*seen), kind
        assert cache.filled == clean.filled == len(kept)
        for i in range(lm.config.num_hidden_layers):
            kind = "sliding" if lm.config.is_sliding(i) else "global"
            held = clean.pos[kind][0] > (oldest if kind == "sliding" else -1)  # (S + 1,) slots a later query may read
            for a, b in ((cache.k[i], clean.k[i]), (cache.v[i], clean.v[i])):
                # the same keys and values, up to the verify forward's rounding (its rows differ in number)
                torch.testing.assert_close(a[:, :, held], b[:, :, held], rtol=0, atol=2e-5)
        after = [core.decode(model, c, [row.pending], [row.pos])[0] for c in (cache, clean)]
        torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_verify_logits_are_within_the_tie_margin_of_single_steps(checkpoint, quantize):
    """What the greedy tie guard relies on: a verify forward's logits differ from single steps' by
    far less than TIE_MARGIN (dense float32 and the packed kernels' multi-row tiles)."""
    lm = gemmarun.load(checkpoint("gemma3", seed=3), quantize=quantize)
    model, ids = lm.model, _ids(40, 4)
    with torch.inference_mode():
        a = KVCache.for_model(model, 1, 64, ring_extra=9)
        core.prefill(model, a, [ids[:30]])
        single = torch.stack([core.decode(model, a, [ids[30 + j]], [30 + j])[0] for j in range(9)])
        b = KVCache.for_model(model, 1, 64, ring_extra=9)
        core.prefill(model, b, [ids[:30]])
        verify = core.forward(model, b, [ids[30:39]], [30], last=False)[0]
    gap = float((single - verify).abs().max())
    assert gap < TIE_MARGIN / 4, gap


def test_an_undecided_greedy_choice_goes_to_a_plain_step(lm):
    """A near tie in a verify forward stops the round before it; the next round is a plain step."""
    spec = Speculator(SpeculativeConfig("ngram", 3))
    row = _row(lm, [2, 5, 6], GREEDY, spec, 7, 3)
    logits = torch.zeros(3, 600)
    logits[0, 9] = 5.0  # decided: the draft 9 is kept
    logits[1, 11] = logits[1, 12] = 1.0  # a tie after it
    taken = []
    accepted, undecided = accept(logits, Draft([9, 11]), row, exact=False, take=lambda r, t, lg: taken.append(t))
    assert (accepted, undecided, taken) == (1, True, [9])
    taken.clear()
    accepted, undecided = accept(logits[1:2], Draft([]), row, exact=True, take=lambda r, t, lg: taken.append(t))
    assert (accepted, undecided, taken) == (0, False, [11])  # a plain step's logits always decide


def _seq(params: SamplingParams, tok) -> SequenceState:
    return SequenceState([2], params, 10**9, frozenset(), tok.stream_decoder(), params.make_generator())


@pytest.mark.parametrize("source", ["ngram", "model"])
def test_sampled_acceptance_follows_the_target_distribution(tok, source):
    """The first token a round emits, over many rounds, against the target's filtered distribution."""
    v = 6
    target = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.0])
    draft_logits = torch.tensor([0.0, 1.5, 0.5, -0.5, 1.0, 0.2])  # a draft that disagrees with the target
    params = SamplingParams(temperature=0.8, top_k=5, seed=11)
    p = probabilities(target, params)
    q = probabilities(draft_logits, params)
    seq = _seq(params, tok)
    row = SpecRow(0, seq, torch.tensor([2]), 2, 1, None)
    picks = torch.zeros(v)
    n = 6000
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(3)).tolist()
    first: list[int] = []
    for i in range(n):
        x = 3 if source == "ngram" else drafts[i]  # n-gram: one fixed proposal (q a point mass)
        d = Draft([x], None if source == "ngram" else [q])
        first.clear()
        accept(torch.stack([target, target]), d, row, exact=False, take=lambda r, t, lg: first.append(t))
        picks[first[0]] += 1
    keep = p > 0
    _, pvalue = chisquare(picks[keep].numpy(), (p[keep] * n).numpy())
    assert pvalue > 1e-3, (picks / n, p)
    assert picks[~keep].sum() == 0  # a token top-k removed is never emitted
    # and the check is not vacuous: the drafts themselves (and n-gram's fixed proposal) are far from p
    assert 0.5 * float((picks / n - p).abs().sum()) < 0.03
    proposed = torch.bincount(torch.tensor(drafts), minlength=v) / n if source == "model" else torch.eye(v)[3]
    assert 0.5 * float((proposed - p).abs().sum()) > 0.3


def test_controller_adapts_k_and_switches_off_and_back_on():
    ctl = Controller(k_max=8, k=2)
    assert ctl.want() == 0  # a plain round first, the baseline
    ctl.record(0, 0, 1, 0.010, plain_forward=True)
    assert ctl.want() == 2
    ctl.record(2, 2, 3, 0.012, True)
    assert ctl.k == 4  # all kept: doubled
    ctl.record(4, 1, 2, 0.013, True)
    assert ctl.k == 2 and ctl.on  # one kept: drafts kept + 1
    for _ in range(WARMUP):
        if ctl.on:
            ctl.record(2, 0, 1, 0.030, True)  # 30 ms a token against 10 plain: it does not pay
    assert not ctl.on and ctl.want() == 0 and ctl.switched_off == 1
    for _ in range(REVIVE - 1):
        ctl.while_off(hit=True)
    ctl.while_off(hit=False)
    assert not ctl.on  # hits must come in a row
    for _ in range(REVIVE):
        ctl.while_off(hit=True)
    assert ctl.on and ctl.want() == 1
    # seeded sampling judges by the cost model, never a clock: no plain round needed, same decisions
    seeded = Controller(k_max=8, timed=False, k=2)
    assert seeded.want() == 2
    for _ in range(WARMUP):
        seeded.record(4, 0, 1, 123.0, False)  # one token for 1.32 plain steps of cost (the clock is ignored)
    assert not seeded.on


def test_bad_settings_are_one_line_errors(checkpoint, lm):
    with pytest.raises(InvalidParameterError, match="speculate must be one of"):
        SpeculativeConfig("lookahead")
    with pytest.raises(InvalidParameterError, match="draft_tokens must be"):
        gemmarun.load(lm.source, speculate="ngram", draft_tokens=0)
    with pytest.raises(InvalidParameterError, match="needs a draft model"):
        gemmarun.load(lm.source, speculate="model")
    with pytest.raises(InvalidParameterError, match="does not share the target's tokenizer"):
        gemmarun.load(lm.source, draft=checkpoint("gemma2", seed=4, vocab_size=700))
    with pytest.raises(InvalidParameterError, match="needs a draft model"):
        lm.generate([2, 5], GREEDY, speculate="model")
