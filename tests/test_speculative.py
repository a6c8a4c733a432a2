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
    PROBE,
    RETRY,
    SAMPLES,
    TIE_MARGIN,
    Controller,
    Costs,
    SpecRow,
    SpeculativeConfig,
    Speculator,
    accept,
    decode_round,
    ring_extra,
)
from gemmarun.model.backend import DENSE_FUSED_MAX_POSITIONS
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
# Fixed k: whether adaptive speculation pays on a tiny model is a matter of timing, and these tests
# must speculate to prove anything (the controller has tests of its own).
NGRAM = SpeculativeConfig("ngram", 4, adaptive=False)
MODEL = SpeculativeConfig("model", 4, adaptive=False)


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
        for config in (SpeculativeConfig("ngram", 4), NGRAM, SpeculativeConfig("ngram", 8, adaptive=False)):
            spec = lm.speculator(config)
            fast = lm.generate(_grounded(), GREEDY, speculate=config)
            assert fast.token_ids == plain.token_ids and fast.text == plain.text, (kind, config)
            if not config.adaptive:  # it really speculated
                assert spec.totals["accepted"] > 10 and spec.totals["rounds"] < len(plain.token_ids)
            assert len(_grounded()) + len(plain.token_ids) > 4 * lm.config.sliding_window


def test_draft_model_greedy_is_identical(lm, draft_lm):
    target = gemmarun.load(lm.source, draft=draft_lm, speculate="model", draft_tokens=4)
    prompt = _ids(20, 5)
    plain = target.generate(prompt, GREEDY, speculate="off")
    assert target.generate(prompt, GREEDY).token_ids == plain.token_ids  # adaptive
    assert target.generate(prompt, GREEDY, speculate=MODEL).token_ids == plain.token_ids
    assert target.speculator(MODEL).totals["drafted"] > 0
    # the target as its own draft: every draft is accepted, so rounds really emit k + 1 tokens
    itself = gemmarun.load(lm.source, draft=lm, draft_tokens=4)
    assert itself.generate(prompt, GREEDY, speculate=SpeculativeConfig("model", 4, adaptive=False)).token_ids == plain.token_ids
    totals = itself.speculator(SpeculativeConfig("model", 4, adaptive=False)).totals
    assert totals["accepted"] >= 0.9 * totals["drafted"] and totals["tokens"] >= 3 * totals["rounds"]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_seeded_sampling_is_identical(checkpoint, draft_lm, quantize):
    """On the fused decode stack a verify forward has a single step's bits, and the acceptance rule
    picks each token as a plain step would: a seeded sampled row emits the same tokens with or
    without speculation, both sources, across the window, with penalties and top-p."""
    target = gemmarun.load(checkpoint("gemma2", seed=3), quantize=quantize, draft=draft_lm)
    params = SamplingParams(max_new_tokens=60, temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=7, ignore_eos=True)
    for prompt in (_grounded(), _ids(12, 2)):
        plain = target.generate(prompt, params, speculate="off")
        for config in (NGRAM, MODEL):
            assert target.generate(prompt, params, speculate=config).token_ids == plain.token_ids, config
    assert target.speculator(NGRAM).totals["accepted"] > 0 and target.speculator(MODEL).totals["accepted"] > 0


def test_stop_strings_and_a_batch_are_identical(lm):
    plain = lm.generate(_grounded(), GREEDY)
    stop = plain.text[len(plain.text) // 2 :][:3]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True, stop=(stop,))
    cut_plain = lm.generate(_grounded(), params)
    cut_fast = lm.generate(_grounded(), params, speculate=NGRAM)
    assert cut_fast.text == cut_plain.text and cut_fast.token_ids == cut_plain.token_ids and cut_fast.finish_reason == "stop"
    assert "".join(lm.stream(_grounded(), params, speculate=NGRAM)) == cut_plain.text
    # rows of different lengths and limits: per-row drafts in one verify forward
    prompts = [_grounded(1), _ids(7, 9), _grounded(2)[:30]]
    batch = SamplingParams(max_new_tokens=40, ignore_eos=True)
    assert [r.token_ids for r in lm.generate(prompts, batch, speculate=NGRAM)] == [r.token_ids for r in lm.generate(prompts, batch)]


def test_penalties_are_identical(lm):
    params = SamplingParams(max_new_tokens=40, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    assert lm.generate(_grounded(), params, speculate=NGRAM).token_ids == lm.generate(_grounded(), params).token_ids


class _Fixed:
    """A draft source that always proposes the same (wrong) tokens: rounds that reject."""

    name = "fixed"

    def __init__(self, tokens):
        self.tokens = tokens

    def new_row(self, context):
        return None

    def propose(self, row, ids, k):
        return Draft(self.tokens[:k])


def _row(lm, prompt, params, spec, pending, pos):
    seq = lm.generator.new_sequence(prompt, params)
    seq.ids.append(pending)
    return SpecRow(0, seq, torch.tensor(prompt), pending, pos, spec.new_row(lm.context))


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
def test_verify_logits_against_single_steps(checkpoint, quantize):
    """With the kernels, packed and dense weights run the fused stack, whose verify forward has
    exactly a single step's logits (so no greedy choice is left undecided there)."""
    lm = gemmarun.load(checkpoint("gemma3", seed=3), quantize=quantize)
    model, ids = lm.model, _ids(40, 4)
    with torch.inference_mode():
        a = KVCache.for_model(model, 1, 64, ring_extra=9)
        core.prefill(model, a, [ids[:30]])
        single = torch.stack([core.decode(model, a, [ids[30 + j]], [30 + j])[0] for j in range(9)])
        b = KVCache.for_model(model, 1, 64, ring_extra=9)
        core.prefill(model, b, [ids[:30]])
        verify = core.forward(model, b, [ids[30:39]], [30], last=False)[0]
    assert model.fuses(9, b) == bool(model.decode_stack())
    if model.fuses(9, b):
        assert torch.equal(single, verify)
    else:
        assert float((single - verify).abs().max()) < TIE_MARGIN / 4


def test_a_long_dense_verify_runs_the_layers_within_the_tie_margin(checkpoint):
    """Past DENSE_FUSED_MAX_POSITIONS a dense model's forward runs its layers as modules (PyTorch's
    GEMM), whose logits differ from single steps' in the last bits, far less than the TIE_MARGIN
    the undecided rule guards."""
    lm = gemmarun.load(checkpoint("gemma3", seed=3))
    model, ids, t = lm.model, _ids(50, 4), DENSE_FUSED_MAX_POSITIONS + 1
    with torch.inference_mode():
        a = KVCache.for_model(model, 1, 64, ring_extra=t)
        core.prefill(model, a, [ids[:30]])
        single = torch.stack([core.decode(model, a, [ids[30 + j]], [30 + j])[0] for j in range(t)])
        b = KVCache.for_model(model, 1, 64, ring_extra=t)
        core.prefill(model, b, [ids[:30]])
        verify = core.forward(model, b, [ids[30 : 30 + t]], [30], last=False)[0]
    assert not model.fuses(t, b) and model.fuses(t - 1, b) == bool(model.decode_stack())
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


def test_sampled_acceptance_follows_the_target_distribution(tok):
    """The first token a round emits, over many rounds with drafts drawn from a distribution far from
    the target's, against the target's filtered distribution; and the draft is kept exactly when it
    is the target's own pick, so keeping happens with probability p(draft) (the standard rule for a
    point-mass draft)."""
    v = 6
    target = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.0])
    draft_logits = torch.tensor([0.0, 1.5, 0.5, -0.5, 1.0, 0.2])  # a draft that disagrees with the target
    params = SamplingParams(temperature=0.8, top_k=5, seed=11)
    p = probabilities(target, params)
    q = probabilities(draft_logits, params)
    seq = _seq(params, tok)
    row = SpecRow(0, seq, torch.tensor([2]), 2, 1, None)
    picks, kept, offered = torch.zeros(v), torch.zeros(v), torch.zeros(v)
    n = 6000
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(3)).tolist()
    first: list[int] = []
    for x in drafts:
        first.clear()
        accepted, _ = accept(torch.stack([target, target]), Draft([x]), row, exact=True, take=lambda r, t, lg: first.append(t))
        picks[first[0]] += 1
        offered[x] += 1
        kept[x] += accepted
        assert accepted == (first[0] == x)
    keep = p > 0
    _, pvalue = chisquare(picks[keep].numpy(), (p[keep] * n).numpy())
    assert pvalue > 1e-3, (picks / n, p)
    assert picks[~keep].sum() == 0  # a token top-k removed is never emitted
    # and the check is not vacuous: the drafts themselves are far from p
    assert 0.5 * float((torch.bincount(torch.tensor(drafts), minlength=v) / n - p).abs().sum()) > 0.3
    often = offered > 300  # drafts offered often enough to estimate their keep rate
    assert torch.allclose(kept[often] / offered[often], p[often], atol=0.06), (kept / offered, p)


def test_costs_are_measured_from_timed_rounds():
    costs = Costs()
    costs.record(1, 0.500)  # the first of each kind builds kernels and buffers: not counted
    costs.record(5, 9.000)
    costs.record(5, 0.050)
    assert costs.step == 0 and costs.extra is None  # no baseline yet: a round of several positions says nothing
    costs.record(1, 0.010)
    costs.record(5, 0.030)
    assert costs.step == 0.010 and costs.extra == pytest.approx(0.005)
    costs.record(1, 0.200)  # a slow round (the machine is busy) does not move them
    costs.record(5, 2.000)
    assert costs.step == 0.010 and costs.extra == pytest.approx(0.005)
    for _ in range(SAMPLES):
        costs.record(1, 0.020)  # but a lasting change does
    assert costs.step == 0.020
    for _ in range(PROBE):
        assert not costs.due()
        costs.record(5, 0.030)
    assert costs.due()  # rounds of several positions only: time a plain step again
    costs.record(1, 0.020)
    assert not costs.due()


def _costs(step: float, extra: float) -> Costs:
    c = Costs()
    c.steps.append(step)
    c.extras.append(extra)
    return c


def test_controller_picks_the_fastest_k_and_switches_off_and_back_on():
    cheap = _costs(0.010, 0.001)  # a further position costs a tenth of a step
    ctl = Controller(k_max=8)
    assert ctl.want(Costs()) == 0  # a plain round first, the baseline
    for _ in range(20):
        ctl.record(8, 8)  # every draft kept
    assert ctl.acceptance > 0.95 and ctl.want(cheap) == 8
    # A further position as dear as a step: no k beats plain steps, whatever the acceptance.
    assert ctl.want(_costs(0.010, 0.010)) == 0 and ctl.switched_off == 1
    assert ctl.want(cheap) == 8 and ctl.drafting
    for _ in range(30):
        ctl.record(ctl.want(cheap) or 1, 0)  # every first draft rejected
    assert ctl.acceptance < 0.1 and ctl.want(cheap) == 0 and ctl.switched_off == 2
    for _ in range(3):
        ctl.shadow(hit=True)  # the output starts copying: the n-gram proposals would have hit
    k = ctl.want(cheap)
    assert 0 < k < 8  # back on, with a k for the acceptance seen so far
    for _ in range(10):
        ctl.shadow(hit=True)
    assert ctl.want(cheap) > k
    assert Controller(k_max=5, adaptive=False).want(Costs()) == 5  # fixed k


def test_a_draft_model_that_does_not_pay_is_retried():
    cheap = _costs(0.010, 0.001)
    ctl = Controller(k_max=4)
    for _ in range(10):
        ctl.record(1, 0)
    assert ctl.want(cheap) == 0
    for _ in range(RETRY - 1):
        ctl.shadow(None)
    assert ctl.want(cheap) == 0
    ctl.shadow(None)
    assert ctl.want(cheap) > 0  # the prior again: it gets tried


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
