"""Speculative decoding: a draft source proposes up to k tokens per row, the target checks them in
one forward of k + 1 positions, the KV cache forgets what it rejected.

One decoding round (`decode_round`), shared by the Generator and the engine's runner:
1. each row's controller picks k (0: a plain step) and its source drafts (drafts.py);
2. one forward through the generation core over every row's [pending token] + drafts, each from
   its own position (rows without drafts ride along with one token; a round where no row drafted is
   exactly a plain decoding step, the C++ decode stack included);
3. per row, the acceptance rule walks the drafts: at each position the target picks its token exactly
   as a plain decoding step would (sample_one on the same logits, with the row's penalties, mask and
   generator, one draw a token), and a draft is kept while it equals that pick; the pick at the
   first mismatch, or after the last draft, is emitted too. Drafts are point masses (n-gram
   continuations, a draft model's argmax), and for a point mass q = [x] this is the standard
   speculative-sampling rule: x is kept with probability min(1, p(x) / q(x)) = p(x), and a rejection
   emits a draw from the residual max(p - q, 0), normalised, which is p without x. Drawing the pick
   first couples the rule to plain sampling, so a seeded row emits the tokens it emits without
   speculation, whatever k the controller chose;
4. the cache is truncated to the accepted positions (KVCache.truncate; sliding rings are kept
   DRAFT_RING_EXTRA slots longer, so a rejected write never overwrote a key still in the window).

Numerics: on the C++ decode stack (packed weights, float32 activations on the CPU) a forward of
several positions per row gives each position the bits of a single step (kernels/src/qdot.h,
attention.cpp: a row's sums never depend on the batch), so verification is exact by construction
(`Gemma.fuses`). Elsewhere (dense weights, PyTorch's ops, another device) the verify logits differ
from a single step's in the last bits (measured: 1e-5 on dense float32, tests/test_speculative.py
bounds them), so that no greedy choice can flip on that difference, a greedy position whose top two
logits are closer than TIE_MARGIN is left undecided there: the round stops and the next round is a
plain step for every row, whose choice is the decoding path's own.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import InvalidParameterError
from . import core
from .drafts import Draft, ModelDrafter, NgramDrafter
from .sampling import choice_logits, sample_one
from .sequence import SequenceState

METHODS = ("ngram", "model", "off")
# Drafts per round at most: n-gram copies of a given text run long (README, speculative decoding).
DEFAULT_DRAFT_TOKENS = 8
# Verify logits off the fused stack are within 1e-5 of a single step's (dense float32, the largest gap
# measured); a greedy choice closer than that margin goes to a single decoding step instead.
TIE_MARGIN = 1e-2
DECAY = 0.8  # weight of the past in the timing and acceptance averages (recent rounds count most)
# Before any round of several positions was timed, a further position is assumed to cost this share
# of a one-position step, so that speculation gets tried; the measured figure replaces it.
EXTRA_PRIOR = 0.25
SAMPLES = 8  # rounds of each kind the costs are the least of
PROBE = 32  # speculative rounds between plain ones that time a step again (a 32nd of rounds at plain speed)
GAIN_MARGIN = 1.05  # speculation must beat plain steps by this factor, so timing noise does not flip it
RETRY = 64  # plain tokens before a draft model that did not pay is tried again (it has no free shadow proposal)


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
class Costs:
    """What a round costs on this machine, measured: the seconds of a forward of one position per
    row (`step`), and what each further position adds (`extra`, drafting included), each the least
    of the last SAMPLES rounds timed. The least, because other work on the machine only ever slows a
    round down, and one slow round must not switch speculation off for good (a row that does not
    speculate times no more verify rounds); the first round of each kind is not counted (it builds
    kernels and buffers). Every PROBE rounds of several positions, one plain round refreshes `step`
    (a row that keeps speculating would time no plain round again). Shared by the rows of a
    Speculator."""

    steps: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    extras: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    seen: set = field(default_factory=set)  # the kinds whose first round was left out
    since_step: int = 0  # rounds of several positions since the last plain one

    @property
    def step(self) -> float:
        return min(self.steps, default=0.0)

    @property
    def extra(self) -> float | None:
        return min(self.extras, default=None)

    def due(self) -> bool:
        """Whether the next round should be a plain one, to time a step again."""
        return self.since_step >= PROBE

    def record(self, positions: int, seconds: float) -> None:
        self.since_step = 0 if positions == 1 else self.since_step + 1
        kind = "step" if positions == 1 else "extra"
        if kind not in self.seen:
            self.seen.add(kind)
        elif positions == 1:
            self.steps.append(seconds)
        elif self.steps:
            self.extras.append(max(0.0, seconds - self.step) / (positions - 1))


@dataclass
class Controller:
    """One row's k: the one that maximises the expected tokens per second, from the row's measured
    acceptance and the machine's measured costs; 0 (a plain step) when no k beats plain steps.

    Drafts are kept one after another while each matches, each with probability a (the row's
    acceptance: drafts kept against rounds that rejected one, decayed), so k drafts give
    1 + a + ... + a^k tokens for step + k * extra seconds. An n-gram row that does not draft still
    checks its one-token proposal against what it emitted, so its acceptance follows the text and
    speculation comes back when the output starts copying; a draft model is retried after RETRY
    plain tokens. The clock never changes what a row emits (the acceptance rule picks each token as a
    plain step would), only how fast."""

    k_max: int
    adaptive: bool = True
    kept: float = 1.0  # decayed drafts kept (a prior of one kept and one rejected: a = 1/2)
    rejected: float = 1.0  # decayed rounds that rejected a draft
    idle: int = 0  # plain tokens since a draft model last drafted
    drafting: bool = True  # the last want() was > 0
    drafted: int = 0
    accepted: int = 0
    switched_off: int = 0  # times want() went from drafting to plain

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def want(self, costs: Costs) -> int:
        if not self.adaptive:
            return self.k_max
        if not costs.step:
            return 0  # one plain round first: the baseline every k is judged against
        extra = costs.extra if costs.extra is not None else EXTRA_PRIOR * costs.step
        a, best, best_rate = self.acceptance, 0, GAIN_MARGIN / costs.step
        tokens = 1.0
        for k in range(1, self.k_max + 1):
            tokens += a**k
            rate = tokens / (costs.step + k * extra)
            if rate > best_rate:
                best, best_rate = k, rate
        self.switched_off += self.drafting and best == 0
        self.drafting = best > 0
        return best

    def record(self, drafted: int, accepted: int) -> None:
        """A round's outcome for this row (drafted 0: a plain round)."""
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            self.idle = 0
            self._observe(accepted, accepted < drafted)

    def shadow(self, hit: bool | None) -> None:
        """A plain round: hit is whether the n-gram source's one-token proposal was what the row
        emitted (None: no proposal, or a draft model, which is retried after RETRY tokens)."""
        if hit is not None:
            self._observe(int(hit), not hit)
            return
        self.idle += 1
        if self.idle >= RETRY:
            self.idle, self.kept, self.rejected = 0, 1.0, 1.0

    def _observe(self, kept: int, rejected: bool) -> None:
        self.kept = DECAY * self.kept + kept
        self.rejected = DECAY * self.rejected + rejected


@dataclass
class RowState:
    source: object  # the draft source's state for this row (NgramIndex or DraftRow)
    ctl: Controller


class Speculator:
    """A draft source with its settings; new_row() gives each decoding row its own state."""

    def __init__(self, config: SpeculativeConfig, draft_model=None):
        if config.method == "model" and draft_model is None:
            raise InvalidParameterError("speculate='model' needs a draft model: load(..., draft=PATH) or --draft-model PATH")
        self.config = config
        self.drafter = NgramDrafter(config.ngram) if config.method == "ngram" else ModelDrafter(draft_model, config.draft_tokens)
        self.force_plain = False  # the next round is a plain step (a greedy choice was left undecided)
        self.costs = Costs()
        self.totals = {"rounds": 0, "drafted": 0, "accepted": 0, "tokens": 0, "switched_off": 0}
        self.k_chosen: dict[int, int] = {}  # how often each k was drafted

    def new_row(self, context: int) -> RowState:
        c = self.config
        return RowState(self.drafter.new_row(context), Controller(c.draft_tokens, c.adaptive))


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


def undecided(logits: torch.Tensor, r: SpecRow) -> bool:
    """Whether a greedy row's choice at logits (V,) from a verify forward off the fused stack is too
    close to call: its top two (masked, penalised) logits within TIE_MARGIN."""
    seq = r.seq
    top = torch.topk(choice_logits(logits, seq.params, r.prompt_t, seq.ids, seq.grammar), 2).values
    return float(top[0] - top[1]) < TIE_MARGIN


def accept(logits: torch.Tensor, draft: Draft, r: SpecRow, exact: bool, take: Take) -> tuple[int, bool]:
    """Walk one row's drafts against the target's logits (n + 1, V), handing every emitted token to
    take; (drafts accepted, whether the round stopped at an undecided greedy choice). exact: the
    logits have a single step's bits (a plain step, or the fused stack), so no choice is left
    undecided."""
    seq = r.seq
    accepted = 0
    for j in range(len(draft.tokens) + 1):
        raw = logits[j]  # the model's own logits: what take() reports logprobs from
        if not exact and seq.params.greedy and undecided(raw, r):
            return accepted, True
        # the plain step's pick: penalties, the grammar's mask, the filters and one draw of the row's generator
        tok = sample_one(raw, seq.params, r.prompt_t, seq.ids, seq.generator, seq.grammar)
        take(r, tok, raw)
        ok = j < len(draft.tokens) and tok == draft.tokens[j]
        accepted += ok
        if not ok or seq.finish_reason is not None:
            break
    return accepted, False


def decode_round(model, cache, rows: list[SpecRow], spec: Speculator, take: Take) -> None:
    """One round over the decoding rows (each at its own cache row and position): drafts, one
    verify forward, acceptance, rollback. Rows that finish are left as they are."""
    start = time.perf_counter()
    plain = spec.force_plain or spec.costs.due()
    spec.force_plain = False
    drafts, shadows = [], []
    for r in rows:
        ctl, seq = r.state.ctl, r.seq
        # the drafts and the free token after them stay within the length limit and the cache; a
        # structured-output row drafts nothing: its grammar's mask is known one token at a time
        off = ctl.switched_off
        k = 0 if plain or seq.grammar is not None else min(ctl.want(spec.costs), seq.max_new - len(seq.ids) - 1, cache.context - 1 - r.pos)
        spec.totals["switched_off"] += ctl.switched_off - off
        history = seq.prompt + seq.ids
        d = spec.drafter.propose(r.state.source, history, k) if k > 0 else Draft([])
        drafts.append(d)
        # a plain n-gram row still checks what it would have proposed, so its acceptance follows the text
        shadow = not d.tokens and not plain and isinstance(spec.drafter, NgramDrafter) and seq.grammar is None
        shadows.append(spec.drafter.propose(r.state.source, history, 1).tokens if shadow else None)
    hi = cache.batch_size  # rows not in the round idle as padding
    tokens: list[list[int]] = [[] for _ in range(hi)]
    starts = [0] * hi
    for r, d in zip(rows, drafts):
        tokens[r.row], starts[r.row] = [r.pending] + d.tokens, r.pos
    logits = core.forward(model, cache, tokens, starts, last=False).cpu()  # (hi, T, V)
    exact = logits.shape[1] == 1 or model.fuses(logits.shape[1], cache)
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
    spec.costs.record(logits.shape[1], time.perf_counter() - start)
    for r, d, (accepted, emitted), shadow in zip(rows, drafts, outcome, shadows):
        ctl = r.state.ctl
        if d.tokens:
            ctl.record(len(d.tokens), accepted)
        elif not plain and emitted and r.seq.grammar is None:
            if shadow is None:  # a draft model's row: counts towards its retry
                ctl.shadow(None)
            elif shadow:
                ctl.shadow(r.seq.ids[-emitted] == shadow[0])
        t = spec.totals
        t["drafted"] += len(d.tokens)
        t["accepted"] += accepted
        t["tokens"] += emitted
        if d.tokens:
            spec.k_chosen[len(d.tokens)] = spec.k_chosen.get(len(d.tokens), 0) + 1
    spec.totals["rounds"] += 1
