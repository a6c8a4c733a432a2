"""Log-likelihood scoring and greedy generation for benchmarks, on the model's own forward.

Every number comes from `Gemma.forward` (soft-caps included, the same path generation uses) on
token ids that start with BOS. Requests that share a context are scored together, and contexts
that share a prefix (the few-shot block of a task, the passage of a question) reuse one KV cache
for that prefix: the prefix runs once, its cache is copied per item, and the lm-head is computed
only at the positions that are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..generation import core
from ..generation.sampling import SamplingParams
from ..model.cache import KVCache


@dataclass(frozen=True)
class Request:
    """Score `continuation` given `context` (BOS is added in front of the context)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token was the argmax
    tokens: int  # continuation length in tokens


@dataclass
class _State:
    """A batch-1 KV cache holding `ids` at positions 0..len-1, and the logits after the last one."""

    ids: list[int]
    cache: KVCache
    last: torch.Tensor | None  # (V,) float32


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


Progress = Callable[[int], None]  # called with the number of items just finished


def prefix_plan(order: Sequence[Sequence[int]], min_shared: int) -> list[tuple[bool, int]]:
    """For each context of `order` (sorted), (new, shared): whether its scoring starts a new prefix
    cache there, of `shared` tokens (0: none), or extends the current one. Decided from the tokens
    alone, so a sharded run (gemmarun/distributed/eval.py) can cut only where it changes nothing."""
    plan, current = [], None
    for g, ctx in enumerate(order):
        if current is None or len(current) >= len(ctx) or list(ctx[: len(current)]) != current:
            shared = _common_prefix(ctx, order[g + 1]) if g + 1 < len(order) else 0
            shared = min(shared, len(ctx) - 1)
            current = list(ctx[:shared]) if shared >= min_shared else None
            plan.append((True, shared if current is not None else 0))
        else:
            plan.append((False, len(current)))
    return plan


class Scorer:
    """Scores (context, continuation) pairs and decodes prompts greedily for one LanguageModel."""

    def __init__(self, lm, chunk: int | None = None, min_shared: int = 16, batch_size: int = 8):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.chunk = chunk or core.prefill_chunk_for(lm.model)  # tokens per forward when filling a cache
        self.min_shared = min_shared  # shortest shared prefix worth caching on its own
        self.batch_size = batch_size  # prompts decoded together

    # -- tokenisation --------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (BOS first) and continuation ids, split the way lm-evaluation-harness does:
        trailing spaces of the context move to the continuation, the pair is encoded whole and the
        continuation is what follows the context's own encoding, so a word is not split in two."""
        n = len(context) - len(context.rstrip(" "))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        # The pair merged across the boundary: fall back to encoding the two parts apart.
        return ctx, self.tokenizer.encode(continuation, add_bos=False)

    # -- log-likelihood ------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Request], progress: Progress | None = None) -> list[LogLikelihood]:
        pairs = [self.encode_pair(r.context, r.continuation) for r in requests]
        return self.loglikelihood_ids(pairs, progress)

    def loglikelihood_ids(self, pairs: Sequence[tuple[list[int], list[int]]], progress: Progress | None = None,
                          size: int | None = None) -> list[LogLikelihood]:  # fmt: skip
        """Like loglikelihood() on token ids; each context must start with BOS. `size`: the cache's
        tokens (default: the longest pair), given by a shard so it computes what the whole would."""
        fitted = self.fit(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(fitted):
            groups.setdefault(tuple(ctx), []).append(i)
        # Lexicographic order puts contexts with long common prefixes next to each other.
        order = sorted(groups)
        size = size or max(len(c) + len(k) for c, k in fitted)
        out: list[LogLikelihood | None] = [None] * len(fitted)
        prefix: _State | None = None
        with torch.inference_mode():
            for g, (new, shared) in enumerate(prefix_plan(order, self.min_shared)):
                ctx = list(order[g])
                if new:
                    prefix = self._extend(None, ctx[:shared], size) if shared else None
                state = self._extend(prefix, ctx, size)
                rows = groups[order[g]]
                for i, ll in zip(rows, self._continuations(state, [fitted[i][1] for i in rows])):
                    out[i] = ll
                if progress:
                    progress(len(rows))
        return out  # type: ignore[return-value]

    def fit(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """Each (context, continuation) cut to the context length: the oldest context tokens go, never BOS."""
        limit = self.lm.context
        fitted = []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise ValueError("each request needs a non-empty context (BOS at least) and continuation")
            if len(cont) >= limit:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the context of {limit}")
            over = len(ctx) + len(cont) - limit
            if over > 0:  # drop the oldest context tokens, never BOS
                ctx = ctx[:1] + ctx[1 + over :]
            fitted.append((list(ctx), list(cont)))
        return fitted

    def _extend(self, base: _State | None, ids: list[int], size: int) -> _State:
        """A new state holding `ids`, which start with base's ids; base is left untouched."""
        if base is None:
            cache, start, last = KVCache.for_model(self.model, 1, size), 0, None
        else:
            cache, start, last = base.cache.repeat(1), len(base.ids), base.last
        if start < len(ids):
            last = core.prefill(self.model, cache, [ids[start:]], [start], self.chunk)[0]
        return _State(list(ids), cache, last)

    def _continuations(self, state: _State, conts: list[list[int]]) -> list[LogLikelihood]:
        """Score each continuation after the state's tokens; all rows share one copy of the cache."""
        rest = None
        if max(len(c) for c in conts) > 1:  # each row feeds c[:-1] after the context; c[0] needs none
            cache = state.cache.repeat(len(conts))
            starts = [len(state.ids)] * len(conts)
            rest = core.forward(self.model, cache, [c[:-1] for c in conts], starts, last=False)  # (B, T, V)
        out = []
        for r, c in enumerate(conts):
            logits = state.last[None]  # the first token is predicted by the context
            if len(c) > 1:
                logits = torch.cat([logits, rest[r, : len(c) - 1]])  # (len(c), V)
            picked, greedy = core.token_logprobs(logits, c)
            out.append(LogLikelihood(float(picked.double().sum()), bool(greedy.all()), len(c)))
        return out

    def token_logprobs(self, ids: list[int], score_from: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (float64) of ids[score_from:] each given all ids before it, and
        whether each was the argmax; computed chunk by chunk through one cache."""
        if not ids or ids[0] != self.tokenizer.bos_id:
            raise ValueError("token_logprobs() needs ids that start with BOS")
        core.check_prompt(len(ids), self.lm.context, self.lm.config.max_position_embeddings, room=0)
        score_from = max(score_from, 1)
        cache = KVCache.for_model(self.model, 1, len(ids))
        logps, greedy = [], []
        with torch.inference_mode():
            for s, logits in core.score(self.model, cache, ids[:-1], 0, self.chunk):  # row j predicts ids[s + j + 1]
                e = s + logits.shape[0]
                keep = max(score_from - 1 - s, 0)  # skip predictions of tokens before score_from
                if keep >= e - s:
                    continue
                lp, top = core.token_logprobs(logits[keep:], ids[s + 1 + keep : e + 1])
                logps.append(lp.double().cpu())
                greedy.append(top.cpu())
        if not logps:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        return torch.cat(logps), torch.cat(greedy)

    def rolling(self, ids: list[int], window: int | None = None, stride: int | None = None, progress: Progress | None = None):
        """(sum of log-probabilities of every token of `ids`, windows run): `ids` is text without
        BOS; windows of up to `window` tokens (BOS, then text) advance by `stride` text tokens and
        each scores only the tokens no earlier window scored."""
        window = min(window or self.lm.context, self.lm.context)
        stride = stride or window - 1
        if window < 2 or not 1 <= stride <= window - 1:
            raise ValueError(f"need window >= 2 and 1 <= stride <= window - 1, got window={window} stride={stride}")
        bos, span = self.tokenizer.bos_id, window - 1
        total, scored, windows, begin = 0.0, 0, 0, 0
        while scored < len(ids):
            begin = max(0, min(begin, len(ids) - span))
            end = min(begin + span, len(ids))
            # ids[scored:end] are new in this window; those before them are context only.
            logp, _ = self.token_logprobs([bos] + ids[begin:end], score_from=1 + scored - begin)
            total += float(logp.sum())
            scored, windows, begin = end, windows + 1, begin + stride
            if progress:
                progress(1)
        return total, windows

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int, progress: Progress | None = None) -> list[str]:
        """Greedy continuations through the Generator, in batches of similar length."""
        keep = self.lm.context - max_new_tokens  # prompt tokens that leave room for the answer
        if keep < 2:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {self.lm.context} tokens")
        # A prompt too long loses its oldest tokens (the first few-shot examples), never BOS.
        ids = [p if len(p) <= keep else p[:1] + p[len(p) - keep + 1 :] for p in (self.tokenizer.encode(x) for x in prompts)]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[str] = [""] * len(ids)
        for s in range(0, len(order), self.batch_size):
            batch = order[s : s + self.batch_size]
            results = self.lm.generator.generate([ids[i] for i in batch], params)
            for i, r in zip(batch, results):
                out[i] = r.text
            if progress:
                progress(len(batch))
        return out
