"""Speculative decoding: a draft source proposes up to k tokens per row, the target checks them in
one forward of k + 1 positions, the KV cache forgets what it rejected.

One decoding round (`decode_round`), shared by the Generator and the engine's runner:
1. each row's controller picks k (0: a plain step) and its source drafts (drafts.py);
2. one forward through the generation core over every row's [pending token] + drafts, each from
   its own position (rows without drafts ride along with one token; a round where no row drafted is
   exactly a plain decoding step, the C++ decode stack included);
3. per row, the acceptance rule walks the drafts: greedy keeps a draft while it is the target's
   argmax; sampling keeps draft x with probability min(1, p(x) / q(x)) and on rejection draws from
   the residual max(p - q, 0) normalised (the standard rule, so the output follows the target's
   distribution); after the last draft the target's own next token comes free;
4. the cache is truncated to the accepted positions (KVCache.truncate; sliding rings are kept
   DRAFT_RING_EXTRA slots longer, so a rejected write never overwrote a key still in the window).

Numerics: the verify forward runs several positions per row, and the kernels' multi-row tiles and
the PyTorch attention add in another order than a single step's decode stack, so its logits differ
from a single step's in the last bits (measured: 1e-5 on dense float32, 1e-3 on packed int8/int4
tiny models, tests/test_speculative.py bounds them). So that no greedy choice can flip on that
difference, a greedy position whose top two logits are closer than TIE_MARGIN is left undecided:
the round stops there and the next round is a plain step for every row, whose choice is the
decoding path's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InvalidParameterError
from . import core
from .drafts import Draft, ModelDrafter, NgramDrafter
from .sampling import SamplingParams, apply_penalties, probabilities, sample_one
from .sequence import SequenceState

METHODS = ("ngram", "model", "off")
# Drafts per round at most. The 270M's packed verify forward of 9 positions costs about 1.6 single
# steps on the EPYC, and n-gram copies of a given text run long (README, speculative decoding).
DEFAULT_DRAFT_TOKENS = 8
# Verify logits are within 1e-3 of a single step's on packed weights (the largest gap measured);
# a greedy choice closer than ten times that goes to a single decoding step instead.
TIE_MARGIN = 1e-2
WARMUP = 4  # speculative rounds before the controller judges whether speculation pays
# Speculation is switched off when its time per token exceeds plain steps' by this factor: a shared
# machine's timings move by 20-30% from minute to minute, and one slow round must not switch off a
# row whose drafts are being kept.
OFF_MARGIN = 1.15
DECAY = 0.8  # weight of the past in the controller's time and acceptance averages (recent rounds count most)
REVIVE = 2  # consecutive n-gram proposals that would have hit, while off, to switch back on
RETRY = 64  # plain tokens before a draft model that did not pay is tried again
# A seeded sampled row must not depend on timing (its draws follow the rounds' k), so its controller
# judges rounds by a cost model instead of a clock: a plain step costs 1, a verify forward 1 plus
# this much a draft (the 270M's packed forward of 9 positions is about 1.6 steps on the EPYC),
# plus the draft model's own steps at its share of the target's parameters.
VERIFY_COST = 0.08


def ring_extra(config: SpeculativeConfig) -> int:
    """Spare sliding-ring slots a cache needs: a round drops at most draft_tokens positions, plus
    one re-fed token after an undecided greedy choice."""
    return 0 if config.method == "off" else config.draft_tokens + 1


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "off"  # "ngram" (prompt lookup), "model" (a draft model), "off"
    draft_tokens: int = DEFAULT_DRAFT_TOKENS  # k at most
    ngram: int = 3  # the longest suffix the n-gram source matches (down to 1)
    adaptive: bool = True  # k from measured acceptance, off when it does not pay; False: always k

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidParameterError(f"speculate must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.draft_tokens, int) or not 1 <= self.draft_tokens <= 32:
            raise InvalidParameterError(f"draft_tokens must be an integer from 1 to 32, got {self.draft_tokens!r}")
        if not isinstance(self.ngram, int) or not 1 <= self.ngram <= 8:
            raise InvalidParameterError(f"ngram must be an integer from 1 to 8, got {self.ngram!r}")

    @property
    def on(self) -> bool:
        return self.method != "off"


@dataclass
class Controller:
    """One row's k and on/off switch, from what its rounds measured: acceptance sets k (a round
    that kept every draft doubles it, one that rejected sets it to the drafts kept + 1), and the
    time per token of speculative rounds against plain ones switches speculation off. Times are
    of whole rounds (a batch's rows share them), averaged with DECAY."""

    k_max: int
    adaptive: bool = True
    timed: bool = True  # False: the cost model (seeded sampling), so the same seed gives the same text
    draft_cost: float = 0.0  # a draft token's cost in plain steps, for the cost model
    k: int = 2
    on: bool = True
    spec: list[float] = field(default_factory=lambda: [0.0, 0.0])  # decayed seconds, tokens of speculative rounds
    plain: list[float] = field(default_factory=lambda: [0.0, 0.0])  # the same for plain rounds (a forward of one position)
    rounds: int = 0  # speculative rounds since switched on
    idle: int = 0  # while off: n-gram hits in a row, or plain tokens (draft model)
    drafted: int = 0
    accepted: int = 0
    switched_off: int = 0

    def want(self) -> int:
        if not self.adaptive:
            return self.k_max
        if not self.on:
            return 0
        if self.timed and self.plain[1] == 0:
            return 0  # one plain round first: the baseline the speculative rounds are judged against
        return min(self.k, self.k_max)

    def record(self, drafted: int, accepted: int, emitted: int, seconds: float, plain_forward: bool) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if not self.timed:
            seconds, plain_forward = 1 + (VERIFY_COST + self.draft_cost) * drafted, True
            self.plain = [1.0, 1.0]
        if drafted == 0:
            if plain_forward and emitted:
                self.plain = [self.plain[0] * DECAY + seconds, self.plain[1] * DECAY + emitted]
            return
        self.spec = [self.spec[0] * DECAY + seconds, self.spec[1] * DECAY + emitted]
        self.rounds += 1
        self.k = min(self.k_max, 2 * self.k) if accepted == drafted else max(1, accepted + 1)
        if self.adaptive and self.rounds >= WARMUP and self.plain[1] and self.spec[1]:
            if self.spec[0] / self.spec[1] > OFF_MARGIN * self.plain[0] / self.plain[1]:
                self.on, self.idle, self.switched_off = False, 0, self.switched_off + 1

    def while_off(self, hit: bool | None) -> None:
        """A plain round while off: hit is whether the n-gram proposal would have been right (None
        for a draft model, which is retried after RETRY tokens)."""
        self.idle = (self.idle + 1 if hit else 0) if hit is not None else self.idle + 1
        if self.idle >= (REVIVE if hit is not None else RETRY):
            self.on, self.k, self.rounds, self.spec = True, 1, 0, [0.0, 0.0]


def _params(model) -> int:
    """Elements of weights and buffers (packed codes included): what a step reads, roughly."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


@dataclass
class RowState:
    source: object  # the draft source's state for this row (NgramIndex or DraftRow)
    ctl: Controller


class Speculator:
    """A draft source with its settings; new_row() gives each decoding row its own state."""

    def __init__(self, config: SpeculativeConfig, draft_model=None, target=None):
        if config.method == "model" and draft_model is None:
            raise InvalidParameterError("speculate='model' needs a draft model: load(..., draft=PATH) or --draft-model PATH")
        self.config = config
        self.drafter = NgramDrafter(config.ngram) if config.method == "ngram" else ModelDrafter(draft_model, config.draft_tokens)
        # a draft token costs about the draft model's share of the target's weights in plain steps
        self.draft_cost = _params(draft_model) / _params(target) if draft_model is not None and target is not None else 0.0
        self.force_plain = False  # the next round is a plain step (a greedy choice was left undecided)
        self.totals = {"rounds": 0, "drafted": 0, "accepted": 0, "tokens": 0, "switched_off": 0}
        self.k_chosen: dict[int, int] = {}  # how often each k was drafted

    def new_row(self, context: int, params: SamplingParams) -> RowState:
        c = self.config
        timed = params.greedy or params.seed is None
        ctl = Controller(c.draft_tokens, c.adaptive, timed, self.draft_cost, k=min(2, c.draft_tokens))
        return RowState(self.drafter.new_row(context), ctl)


@dataclass
class SpecRow:
    """What a round needs of one decoding row; pending and pos are advanced by the round."""

    row: int  # batch row of the cache
    seq: SequenceState
    prompt_t: torch.Tensor
    pending: int  # the last token, not yet in the cache
    pos: int  # the position pending is written at
    state: RowState


# take(row, token, logits): the caller adds one accepted token (seq.add, its event, its logprob
# from the target's logits (V,) that chose it).
Take = Callable[[SpecRow, int, torch.Tensor], None]


def _draw(probs: torch.Tensor, gen) -> int:
    """One draw by inverse CDF over float64 sums, as sampling.sample_one does."""
    cdf = probs.double().cumsum(-1)
    i = int(torch.searchsorted(cdf, torch.rand((), dtype=torch.float64, generator=gen) * cdf[-1], right=True))
    return i if i < cdf.shape[-1] else int(torch.nonzero(probs).max())


def accept(logits: torch.Tensor, draft: Draft, r: SpecRow, exact: bool, take: Take) -> tuple[int, bool]:
    """Walk one row's drafts against the target's logits (n + 1, V) and hand every kept token to
    take; (drafts accepted, whether the round stopped at an undecided greedy choice). exact: the
    logits came from a plain step, so no choice is left undecided."""
    seq, params, gen = r.seq, r.seq.params, r.seq.generator
    accepted = 0
    for j in range(len(draft.tokens) + 1):
        raw = logits[j]  # the model's own logits: what take() reports logprobs from
        # A constrained row drafts nothing (decode_round), so its one token is chosen here, under its mask.
        allowed = raw if seq.grammar is None else seq.grammar.mask(raw)
        has = j < len(draft.tokens)
        if params.greedy:
            lg = apply_penalties(allowed, params, r.prompt_t, torch.tensor(seq.ids, dtype=torch.long)) if params.has_penalties else allowed
            if not exact:
                top = torch.topk(lg, 2).values
                if float(top[0] - top[1]) < TIE_MARGIN:
                    return accepted, True
            tok = int(torch.argmax(lg))
            ok = has and tok == draft.tokens[j]
        elif has:
            lg = apply_penalties(raw, params, r.prompt_t, torch.tensor(seq.ids, dtype=torch.long)) if params.has_penalties else raw
            p = probabilities(lg, params)
            x = draft.tokens[j]
            q = torch.zeros_like(p).index_fill_(0, torch.tensor([x]), 1.0) if draft.q is None else draft.q[j]
            u = float(torch.rand((), dtype=torch.float64, generator=gen))
            ok = u * float(q[x]) < float(p[x])  # u < p(x) / q(x)
            if ok:
                tok = x
            else:
                residual = (p - q).clamp_min(0)
                tok = _draw(residual if float(residual.sum()) > 0 else p, gen)
        else:  # after the last draft: the target's own next token
            tok = sample_one(raw, params, r.prompt_t, seq.ids, gen, seq.grammar)
            ok = False
        take(r, tok, raw)
        accepted += ok
        if not ok or seq.finish_reason is not None:
            break
    return accepted, False


def decode_round(model, cache, rows: list[SpecRow], spec: Speculator, take: Take) -> None:
    """One round over the decoding rows (each at its own cache row and position): drafts, one
    verify forward, acceptance, rollback. Rows that finish are left as they are."""
    start = time.perf_counter()
    plain = spec.force_plain
    spec.force_plain = False
    drafts, shadows = [], []
    for r in rows:
        ctl, seq = r.state.ctl, r.seq
        # the drafts and the free token after them stay within the length limit and the cache; a
        # structured-output row drafts nothing: its grammar's mask is known one token at a time
        k = 0 if plain or seq.grammar is not None else min(ctl.want(), seq.max_new - len(seq.ids) - 1, cache.context - 1 - r.pos)
        history = seq.prompt + seq.ids
        d = spec.drafter.propose(r.state.source, history, k, seq.params, seq.generator) if k > 0 else Draft([])
        drafts.append(d)
        off_ngram = not ctl.on and isinstance(spec.drafter, NgramDrafter)
        shadows.append(spec.drafter.propose(r.state.source, history, 1, seq.params, None).tokens if off_ngram else None)
    hi = cache.batch_size  # rows not in the round idle as padding
    tokens: list[list[int]] = [[] for _ in range(hi)]
    starts = [0] * hi
    for r, d in zip(rows, drafts):
        tokens[r.row], starts[r.row] = [r.pending] + d.tokens, r.pos
    logits = core.forward(model, cache, tokens, starts, last=False).cpu()  # (hi, T, V)
    exact = logits.shape[1] == 1
    outcome = []
    for r, d in zip(rows, drafts):
        before = len(r.seq.ids)
        accepted, undecided = accept(logits[r.row, : len(d.tokens) + 1], d, r, exact, take)
        outcome.append((accepted, len(r.seq.ids) - before))
        if r.seq.finish_reason is not None:
            continue
        if undecided:  # re-feed the last kept token: the next (plain) round decides what follows it
            keep, pending = r.pos + accepted, d.tokens[accepted - 1] if accepted else r.pending
            spec.force_plain = True
        else:
            keep, pending = r.pos + 1 + accepted, r.seq.ids[-1]
        if keep < r.pos + 1 + len(d.tokens):
            cache.truncate(keep, torch.tensor([r.row]))
        r.pos, r.pending = keep, pending
    seconds = time.perf_counter() - start
    for r, d, (accepted, emitted), shadow in zip(rows, drafts, outcome, shadows):
        ctl = r.state.ctl
        was_on = ctl.on
        ctl.record(len(d.tokens), accepted, emitted, seconds, exact)
        if not was_on and not plain:
            ctl.while_off(None if shadow is None else bool(shadow) and emitted > 0 and r.seq.ids[-emitted] == shadow[0])
        t = spec.totals
        t["drafted"] += len(d.tokens)
        t["accepted"] += accepted
        t["tokens"] += emitted
        t["switched_off"] += was_on and not ctl.on
        if d.tokens:
            spec.k_chosen[len(d.tokens)] = spec.k_chosen.get(len(d.tokens), 0) + 1
    spec.totals["rounds"] += 1
