"""What every benchmark shares: loading its records and few-shot examples, and its scoring kind.

A task turns public records into prompts; three kinds cover the model card's benchmarks:
- ChoiceTask: log-likelihood of each option (accuracy, and accuracy normalised by length);
- GenerationTask: greedy decoding with the task's stop sequences, then answer scoring;
- code tasks (code.py): a GenerationTask whose answers are programs run by execution.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .data import DataNotFoundError, Dataset, Split, find_sibling_split, find_split, where_to_get
from .scorer import Request, Scorer


@dataclass
class Loaded:
    """A task's scored items and the few-shot examples for each."""

    docs: list[dict]
    shots: dict[object, list[dict]]  # group (None, or e.g. an MMLU subject) -> its examples
    split: str
    shot_split: str  # where the examples came from: a split name, or "held-out <split>" or "-"
    source: str


@dataclass
class Task:
    name: str
    title: str  # as the model cards write it
    dataset: Dataset
    eval_splits: tuple[str, ...]  # the first one found is scored
    shot_splits: tuple[str, ...]  # few-shot examples come from the first one found
    shots: int  # the Gemma 2 card's setting
    primary: str  # the metric set beside the card's number
    fewshot_sep: str = "\n\n"
    aliases: tuple[str, ...] = field(default_factory=tuple)

    # -- per-record hooks ------------------------------------------------------------------------

    def prepare(self, record: dict) -> dict | None:
        """A record ready for the prompt functions, or None to skip it (e.g. no label)."""
        return record

    def group(self, doc: dict) -> object:
        """Items of one group share their few-shot examples (MMLU: the subject)."""
        return None

    def example(self, doc: dict) -> str:
        """A solved item, as it appears among the few-shot examples."""
        raise NotImplementedError

    def header(self, doc: dict) -> str:
        """Text before the few-shot examples (MMLU: 'The following are ... about <subject>.')."""
        return ""

    def prefix(self, doc: dict, shots: list[dict]) -> str:
        return self.header(doc) + "".join(self.example(s) + self.fewshot_sep for s in shots)

    def settings(self) -> dict:
        return {}

    def pick_shots(self, members: list[dict], k: int, seed: str) -> list[dict]:
        """A fixed draw; a split of exactly k examples (MMLU's dev) keeps its own order."""
        return list(members) if len(members) == k else random.Random(seed).sample(members, min(k, len(members)))

    # -- loading -------------------------------------------------------------------------------

    def load(self, data=None, shots: int | None = None, limit: int | None = None, seed: int = 1234) -> Loaded:
        k = self.shots if shots is None else shots
        split = find_split(self.dataset, self.eval_splits, data)
        if split is None:
            looked = f"in {data}" if data is not None else "in the Hugging Face caches or the eval packages"
            raise DataNotFoundError(f"no {self.name} data found {looked}; {where_to_get(self.dataset, self.eval_splits)}")
        docs = [d for d in (self._prepare(r, i, split) for i, r in enumerate(split.records, 1)) if d is not None]
        if not docs:
            raise DataNotFoundError(f"{split.source}: no usable {self.name} records in split {split.name!r}")
        pool: Split | None = None
        if k > 0 and self.shot_splits:
            if data is not None and Path(data).is_file():
                pool = find_sibling_split(data, self.shot_splits, self.dataset.subsets)
            else:
                pool = find_split(self.dataset, self.shot_splits, data)
        return self.select(docs, pool, split.name, split.source, k, limit, seed)

    def _prepare(self, record, index: int, split: Split) -> dict | None:
        """prepare() of one record; a record whose fields have the wrong type or are missing is the data's fault."""
        try:
            return self.prepare(dict(record))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise DataNotFoundError(
                f"{split.source}: record {index} of split {split.name!r} is not a {self.name} record ({type(e).__name__}: {e})"
            ) from None

    def select(self, docs: list[dict], pool: Split | None, split: str, source: str, k: int, limit, seed) -> Loaded:
        """Draw k examples per group (from `pool`, else held out of `docs`) and apply `limit`."""
        groups: dict[object, list[dict]] = {}
        for d in docs if pool is None else (self._prepare(r, i, pool) for i, r in enumerate(pool.records, 1)):
            if d is not None:
                groups.setdefault(self.group(d), []).append(d)
        chosen: dict[object, list[dict]] = {}
        for g, members in groups.items():
            chosen[g] = self.pick_shots(members, k, f"{seed}:{g}") if k > 0 else []
        if pool is None and k > 0:
            taken = {id(d) for group in chosen.values() for d in group}
            docs = [d for d in docs if id(d) not in taken]  # examples are never scored
        if limit is not None:
            counts: dict[object, int] = {}
            kept = []
            for d in docs:  # the first `limit` items of each group, in the release's order
                g = self.group(d)
                if counts.get(g, 0) < limit:
                    counts[g] = counts.get(g, 0) + 1
                    kept.append(d)
            docs = kept
        shot_split = pool.name if pool is not None else (f"held-out {split}" if k > 0 else "-")
        return Loaded(docs, chosen, split, shot_split, source)

    def run(self, scorer: Scorer, loaded: Loaded, progress: Callable[[int], None] | None = None) -> dict[str, float]:
        raise NotImplementedError

    def work(self, loaded: Loaded) -> int:
        """How many units the progress bar counts for these items."""
        return len(loaded.docs)


@dataclass
class ChoiceTask(Task):
    """Pick the option with the highest log-likelihood (acc) or per-character log-likelihood (acc_norm)."""

    primary: str = "acc"
    norm: bool = True  # report acc_norm too

    def context(self, doc: dict) -> str:
        raise NotImplementedError

    def choices(self, doc: dict) -> list[str]:
        """Each option as the continuation scored after the context (leading space included)."""
        raise NotImplementedError

    def gold(self, doc: dict) -> int:
        raise NotImplementedError

    def requests(self, doc: dict) -> list[tuple[str, str]]:
        """(context, continuation) per option."""
        return [(self.context(doc), c) for c in self.choices(doc)]

    def example(self, doc: dict) -> str:
        ctx, cont = self.requests(doc)[self.gold(doc)]
        return ctx + cont

    def work(self, loaded: Loaded) -> int:
        return sum(len(self.requests(d)) for d in loaded.docs)  # the scorer reports requests done

    def run(self, scorer, loaded, progress=None):
        reqs, spans = [], []
        for d in loaded.docs:
            prefix = self.prefix(d, loaded.shots.get(self.group(d), []))
            pairs = self.requests(d)
            spans.append((len(reqs), len(pairs)))
            reqs += [Request(prefix + ctx, cont) for ctx, cont in pairs]
        lls = scorer.loglikelihood(reqs, progress)
        acc = acc_norm = 0.0
        for d, (start, n) in zip(loaded.docs, spans):
            scores = [lls[start + i].logprob for i in range(n)]
            conts = [reqs[start + i].continuation for i in range(n)]
            gold = self.gold(d)
            acc += float(_argmax(scores) == gold)
            acc_norm += float(_argmax([s / max(len(c), 1) for s, c in zip(scores, conts)]) == gold)
        n = len(loaded.docs)
        out = {"acc": acc / n}
        if self.norm:
            out["acc_norm"] = acc_norm / n
        return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


@dataclass
class GenerationTask(Task):
    """Greedy decoding up to a stop sequence, then a per-item score averaged over items."""

    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError

    def target(self, doc: dict) -> str:
        """The answer text written after the prompt in a few-shot example."""
        raise NotImplementedError

    def example(self, doc: dict) -> str:
        return self.prompt(doc) + self.target(doc)

    def score(self, doc: dict, completion: str) -> dict[str, float]:
        raise NotImplementedError

    def settings(self) -> dict:
        return {"decoding": "greedy", "stop": list(self.stop), "max_new_tokens": self.max_new_tokens}

    def completions(self, scorer, loaded, progress=None) -> list[str]:
        prompts = [self.prefix(d, loaded.shots.get(self.group(d), [])) + self.prompt(d) for d in loaded.docs]
        return scorer.generate(prompts, self.stop, self.max_new_tokens, progress)

    def run(self, scorer, loaded, progress=None):
        outs = self.completions(scorer, loaded, progress)
        totals: dict[str, float] = {}
        for d, o in zip(loaded.docs, outs):
            for k, v in self.score(d, o).items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / len(loaded.docs) for k, v in totals.items()}
