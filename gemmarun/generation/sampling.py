"""SamplingParams and sample(): turning one row of logits into one token id."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidParameterError
from .constraints import Constraint

# Below this, temperature decodes greedily: float32 logits divided by a smaller one overflow to inf
# (1e-38 did), and softmax of inf is NaN, which samples noise from the end of the vocabulary.
MIN_TEMPERATURE = 1e-5
# repetition_penalty divides or multiplies logits; outside these bounds the result overflows float32
# or flattens every seen token to 0 (1e-320 passed validation and sampled noise).
PENALTY_RANGE = (1e-3, 1e3)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL-style: divides positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI-style, subtracted once per seen token
    frequency_penalty: float = 0.0  # OpenAI-style, subtracted per occurrence
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings, cut from the text
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # on top of the model's eos ids
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)
    constraint: Constraint | None = None  # a JSON schema, JSON object, regex or Lark grammar the output matches

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise InvalidParameterError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p < 1:
            bad(f"min_p must be in [0, 1), got {self.min_p!r}")
        lo, hi = PENALTY_RANGE
        if not _finite(self.repetition_penalty) or not lo <= self.repetition_penalty <= hi:
            bad(f"repetition_penalty must be in [{lo:g}, {hi:g}] (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not -2 <= v <= 2:
                bad(f"{name} must be in [-2, 2], got {v!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            bad(f"seed must be a 64-bit integer (from -2**63 to 2**64 - 1), got one of {self.seed.bit_length()} bits")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                bad(f"constraint must be a Constraint (Constraint.json_schema(...), ...), got {type(self.constraint).__name__}")
            self.constraint.check()

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def make_generator(self, offset: int = 0) -> torch.Generator | None:
        if self.seed is None:
            return None
        # the n choices of one request draw from seed + i, wrapped into manual_seed's 64 bits
        return torch.Generator().manual_seed((self.seed + offset) % 2**64)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """logits (V,) float32. repetition_penalty looks at prompt and output (as transformers does);
    presence/frequency penalties at the output only (as OpenAI does)."""
    if params.repetition_penalty != 1.0:
        ids = torch.cat([prompt, seen]).unique()
        picked = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seen.numel():
        ids, counts = seen.unique(return_counts=True)
        logits = logits.clone()
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
    return logits


# top-p first looks among the most likely this many tokens: over Gemma 3's 262k-token vocabulary a
# full sort plus torch.multinomial cost 37-38 ms a sampled token (2 threads), more than a 270M
# decoding step; candidates plus an inverse-CDF draw 1.7-2.5 ms (benchmarks/sampling.py).
# A flat distribution (a base model sampled at temperature 1) puts the cut further out: 16k
# candidates cost 5 ms where the full sort costs 34.
TOP_P_CANDIDATES = (1024, 16384)


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The filtered sampling distribution after temperature, top-k, top-p and min-p, as
    (probabilities (n,), their token ids (n,)), or (probabilities (V,), None) over every id."""
    logits = logits / params.temperature
    ids = None
    if params.top_k and params.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, params.top_k)  # sorted, most likely first
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        if ids is None:
            n = probs.shape[-1]
            probs_all = probs
            for k in TOP_P_CANDIDATES:
                probs, ids = torch.topk(probs_all, min(n, k))
                if k >= n or probs.sum() >= params.top_p:
                    break
            else:  # the cut lies further out still: every token, sorted
                probs, ids = torch.sort(probs_all, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[..., 0] = False  # explicitly: a top_p below float32's range (1e-46) rounds to 0 and would drop it
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum(), ids


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Filtered sampling distribution (V,) after temperature, top-k, top-p and min-p."""
    probs, ids = candidates(logits, params)
    return probs if ids is None else torch.zeros_like(logits).scatter_(-1, ids, probs)


def choice_logits(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, seen, grammar=None) -> torch.Tensor:
    """The logits (V,) a token is chosen from: the grammar's mask first, then the penalties."""
    if grammar is not None:
        logits = grammar.mask(logits)
    if params.has_penalties:
        logits = apply_penalties(logits, params, prompt, torch.as_tensor(seen, dtype=torch.long))
    return logits


def greedy_token(logits: torch.Tensor) -> int:
    """The index of the largest of one row of logits (V,), the first on a tie or NaN, as torch.argmax.
    A float32 row on the CPU goes through numpy: torch.argmax took 660 us over the 262k vocabulary
    (3% of a 270M decoding step) where numpy's takes 63 (AMD EPYC, family 23)."""
    if logits.device.type == "cpu" and logits.dim() == 1 and logits.dtype in (torch.float32, torch.float64):
        return int(np.argmax(logits.detach().numpy()))
    return int(torch.argmax(logits))


def sample_one(logits: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, seen, gen: torch.Generator | None,
               grammar=None) -> int:  # fmt: skip
    """One token id from one row of float32 logits (V,); `seen` lists the ids generated so far;
    `grammar` (the sequence's GrammarState) forbids what the constraint does not allow, first."""
    logits = choice_logits(logits, params, prompt, seen, grammar)
    if params.greedy:
        return greedy_token(logits)
    probs, ids = candidates(logits, params)
    # Inverse CDF with one uniform draw: the same distribution as torch.multinomial at a fraction of
    # its cost. float64 sums, so the last token's share is not lost to rounding.
    cdf = probs.double().cumsum(-1)
    u = torch.rand((), dtype=torch.float64, generator=gen) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= cdf.shape[-1]:  # u rounded up to the total: the last token with any mass
        i = int(torch.nonzero(probs).max())
    return i if ids is None else int(ids[i])
