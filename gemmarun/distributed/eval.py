"""`gemmarun eval --ray`: a task's scoring sharded over Ray actors, each holding its own model, with
results bit-identical to one process running as many torch threads as each actor (the kernels split
long reductions across threads, so a different count rounds the last bits differently).

The driver keeps the model too (tokenising, and the task's own settings come from it) and cuts
the work only where the cut changes no computation: log-likelihood requests between context groups
where the single-process scorer would start a new prefix cache anyway (scorer.prefix_plan), every
shard with the whole run's cache size; greedy generation at whole batches of the length-sorted
prompts, so every batch is the one the single process would decode.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..evaluate.scorer import LogLikelihood, Progress, Scorer, prefix_plan
from . import import_ray, init_ray


class ScorerActor:
    def __init__(self, load_kwargs: dict, threads: int):
        import torch

        from ..lm import load

        torch.set_num_threads(threads)
        self.scorer = Scorer(load(**load_kwargs))

    def loglikelihood_ids(self, pairs, size: int) -> list[LogLikelihood]:
        return self.scorer.loglikelihood_ids(pairs, size=size)

    def generate(self, prompts: list[str], stop: list[str], max_new_tokens: int) -> list[str]:
        return self.scorer.generate(prompts, stop, max_new_tokens)


def _balanced(cuts: list[int], weights: list[int], parts: int) -> list[int]:
    """Up to `parts - 1` of the allowed cut points (indices into weights), each nearest its share of the total."""
    prefix = list(itertools.accumulate(weights, initial=0))
    chosen: list[int] = []
    for k in range(1, parts):
        later = [c for c in cuts if c > (chosen[-1] if chosen else 0)]
        if later:
            chosen.append(min(later, key=lambda c: abs(prefix[c] - prefix[-1] * k / parts)))
    return chosen


class ShardedScorer(Scorer):
    """A Scorer whose log-likelihoods and generations are computed by `actors` (Ray actor handles)."""

    def __init__(self, lm, actors: list, **kw):
        super().__init__(lm, **kw)
        self.actors = actors
        self.shard_sizes: list[int] = []  # requests sent to each actor by the last call

    def loglikelihood_ids(self, pairs, progress: Progress | None = None, size: int | None = None) -> list[LogLikelihood]:
        ray = import_ray()
        fitted = self.fit(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(fitted):
            groups.setdefault(tuple(ctx), []).append(i)
        order = sorted(groups)
        plan = prefix_plan(order, self.min_shared)
        # A cut before group g changes nothing if g starts a prefix of its own and g - 1 made none
        # (a prefix made at g - 1 was sized by its common prefix with g).
        cuts = [g for g in range(1, len(order)) if plan[g][0] and not (plan[g - 1][0] and plan[g - 1][1])]
        bounds = [0, *_balanced(cuts, [len(groups[c]) for c in order], len(self.actors)), len(order)]
        size = size or max(len(c) + len(k) for c, k in fitted)
        shards = [[i for ctx in order[a:b] for i in groups[ctx]] for a, b in zip(bounds, bounds[1:])]
        self.shard_sizes = [len(rows) for rows in shards]
        futures = [actor.loglikelihood_ids.remote([fitted[i] for i in rows], size) for actor, rows in zip(self.actors, shards)]
        out: list[LogLikelihood | None] = [None] * len(fitted)
        for rows, future in zip(shards, futures):
            for i, ll in zip(rows, ray.get(future)):
                out[i] = ll
            if progress:
                progress(len(rows))
        return out  # type: ignore[return-value]

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int, progress: Progress | None = None) -> list[str]:
        ray = import_ray()
        lengths = [len(self.tokenizer.encode(p)) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # the single process's order (stable)
        batches = -(-len(order) // self.batch_size)
        per = -(-batches // len(self.actors)) * self.batch_size  # whole batches per shard
        shards = [order[s : s + per] for s in range(0, len(order), per)]
        futures = [
            actor.generate.remote([prompts[i] for i in rows], list(stop), max_new_tokens) for actor, rows in zip(self.actors, shards)
        ]
        out = [""] * len(prompts)
        for rows, future in zip(shards, futures):
            for i, text in zip(rows, ray.get(future)):
                out[i] = text
            if progress:
                progress(len(rows))
        return out


def ray_scorer(lm, load_kwargs: dict, workers: int = 2, threads: int = 1, address: str | None = None) -> ShardedScorer:
    """A ShardedScorer over `workers` actors of `threads` CPUs each, on the cluster at `address` (or a local one)."""
    from ..errors import GemmarunError

    if workers < 1:
        raise GemmarunError(f"--workers must be >= 1, got {workers}")
    ray = import_ray()
    init_ray(address)
    actor = ray.remote(num_cpus=threads)(ScorerActor)
    return ShardedScorer(lm, [actor.remote(load_kwargs, threads) for _ in range(workers)])
