"""Draft sources for speculative decoding: prompt lookup (n-grams) and a small draft model.

Both propose up to k tokens that continue a row's history (prompt + output); speculative.py checks
them against the target in one forward. Proposals are point masses (a continuation, a draft
model's argmax), greedy and sampled rows alike: the acceptance rule then keeps a draft exactly when
the target's own pick equals it, so a seeded row's output never depends on what was drafted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidParameterError
from ..model.cache import KVCache
from . import core
from .sampling import greedy_token


@dataclass
class Draft:
    tokens: list[int]


class NgramIndex:
    """Prompt lookup for one row: the continuation of the most recent earlier occurrence of the
    history's last n tokens (the longest n from `longest` down to 1 that occurred before).

    Kept incrementally: for every n, the end of the latest occurrence of each n-gram, so a proposal
    costs O(longest) dictionary lookups however long the history. The n-grams ending at the last
    token are filed only after that token's lookup, so a lookup never finds the suffix itself."""

    def __init__(self, longest: int = 3):
        self.longest = longest
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(longest + 1)]
        self.filed = 0  # n-grams ending at positions < filed are indexed

    def _file(self, ids: list[int], upto: int) -> None:
        for end in range(max(self.filed, 1), upto + 1):
            for n in range(1, min(self.longest, end) + 1):
                self.ends[n][tuple(ids[end - n : end])] = end
        self.filed = max(self.filed, upto + 1)

    def propose(self, ids: list[int], k: int) -> list[int]:
        """k tokens after ids (which only grow between calls); [] when no n-gram recurs."""
        self._file(ids, len(ids) - 1)
        for n in range(min(self.longest, len(ids) - 1), 0, -1):
            end = self.ends[n].get(tuple(ids[len(ids) - n :]))
            if end is not None:
                # Past the history's end the lookup repeats itself: a loop of period len - end goes on.
                return [ids[end + i % (len(ids) - end)] for i in range(k)]
        return []


class NgramDrafter:
    """The n-gram source: no second model, one NgramIndex per row."""

    name = "ngram"

    def __init__(self, longest: int = 3):
        self.longest = longest

    def new_row(self, context: int) -> NgramIndex:
        return NgramIndex(self.longest)

    def propose(self, row: NgramIndex, ids: list[int], k: int) -> Draft:
        return Draft(row.propose(ids, k))


@dataclass
class DraftRow:
    """One row's draft-model cache and the tokens it holds (positions 0..len(fed) - 1)."""

    cache: KVCache
    fed: list[int] = field(default_factory=list)
    agreed: int = 0  # a prefix of fed known to equal the row's history (which only grows)


class ModelDrafter:
    """A small model of the target's vocabulary proposes k tokens, one decoding step each, from a
    cache of its own per row, rolled back to the row's accepted history before each proposal."""

    name = "model"

    def __init__(self, model, max_tokens: int):
        self.model = model
        self.max_tokens = max_tokens

    def new_row(self, context: int) -> DraftRow:
        limit = self.model.config.max_position_embeddings
        # A proposal drops at most max_tokens + 1 positions it wrote (the rejected drafts, and a
        # re-fed token after an undecided greedy choice): the ring keeps that many spare slots.
        return DraftRow(KVCache.for_model(self.model, 1, min(context, limit), ring_extra=self.max_tokens + 2))

    def propose(self, row: DraftRow, ids: list[int], k: int) -> Draft:
        if len(ids) + k > row.cache.context:
            k = row.cache.context - len(ids)
        if k <= 0:
            return Draft([])
        c = row.agreed
        while c < min(len(row.fed), len(ids)) and row.fed[c] == ids[c]:
            c += 1
        row.agreed = c
        c = min(c, len(ids) - 1)  # the last token is fed again when the cache holds it: its logits are needed
        row.cache.truncate(c)
        logits = core.prefill(self.model, row.cache, [ids[c:]], [c])[0]
        tokens = []
        # The draft's argmax, for sampled rows too: a point mass the target keeps with probability
        # p(x), as the standard rule would (speculative.py). Penalties are left to the target.
        for j in range(k):
            tok = greedy_token(logits)
            tokens.append(tok)
            if j + 1 < k:
                logits = core.decode(self.model, row.cache, [tok], [len(ids) + j])[0]
        row.fed = list(ids) + tokens[:-1]
        return Draft(tokens)


def check_draft_vocabulary(target_tokenizer, draft_tokenizer, draft_source: str) -> None:
    """A draft model must share the target's tokenizer: the same ids mean the same pieces."""
    a, b = target_tokenizer, draft_tokenizer
    why = None
    if a.vocab_size != b.vocab_size:
        why = f"its vocabulary has {b.vocab_size} tokens, the target's {a.vocab_size}"
    elif (a.bos_id, a.eos_id) != (b.bos_id, b.eos_id):
        why = f"its bos/eos ids are {b.bos_id}/{b.eos_id}, the target's {a.bos_id}/{a.eos_id}"
    else:
        ea, eb = a._engine, b._engine
        diff = next((i for i in range(a.vocab_size) if ea.piece(i) != eb.piece(i)), None)
        if diff is not None:
            why = f"token {diff} is {eb.piece(diff)!r} there and {ea.piece(diff)!r} in the target"
    if why:
        raise InvalidParameterError(f"draft model {draft_source} does not share the target's tokenizer: {why}")
