"""Multiple-choice benchmarks scored by log-likelihood.

Prompts follow lm-evaluation-harness's templates for the same datasets (the model cards do not
publish theirs), so scores are comparable with that harness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .data import DataNotFoundError, Dataset, find_split, read_records
from .task import ChoiceTask, Loaded

LETTERS = "ABCDEFGHIJ"


@dataclass
class PIQA(ChoiceTask):
    def prepare(self, r):
        return r if int(r["label"]) >= 0 else None  # the test split has no labels (-1)

    def context(self, d):
        return f"Question: {d['goal']}\nAnswer:"

    def choices(self, d):
        return [" " + d["sol1"], " " + d["sol2"]]

    def gold(self, d):
        return int(d["label"])


@dataclass
class SIQA(ChoiceTask):
    def prepare(self, r):
        return r if str(r.get("label", "")).strip() else None

    def context(self, d):
        return f"Q: {d['context']} {d['question']}\nA:"

    def choices(self, d):
        return [" " + d["answerA"], " " + d["answerB"], " " + d["answerC"]]

    def gold(self, d):
        return int(d["label"]) - 1  # labels are "1", "2", "3"


@dataclass
class BoolQ(ChoiceTask):
    norm: bool = False  # " no" and " yes": normalising by length means nothing here

    def context(self, d):
        return f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"

    def choices(self, d):
        return [" no", " yes"]

    def gold(self, d):
        # google/boolq has `answer` (bool); the SuperGLUE copy has `label` (0/1)
        value = d["answer"] if "answer" in d else d["label"]
        return int(value in (True, 1, "True", "true", "1"))


@dataclass
class ARC(ChoiceTask):
    def context(self, d):
        return f"Question: {d['question']}\nAnswer:"

    def choices(self, d):
        return [" " + t for t in d["choices"]["text"]]

    def gold(self, d):
        return list(d["choices"]["label"]).index(d["answerKey"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # WikiHow titles are marked inline
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass
class HellaSwag(ChoiceTask):
    def prepare(self, r):
        return r if str(r.get("label", "")).strip() else None  # the test split has no labels

    def context(self, d):
        return _hellaswag_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())

    def choices(self, d):
        return [" " + _hellaswag_clean(e) for e in d["endings"]]

    def gold(self, d):
        return int(d["label"])


@dataclass
class WinoGrande(ChoiceTask):
    """Partial scoring (Trinh & Le, 2018): each option fills the blank, and the model scores the
    rest of the sentence after it; the option under which that rest is likelier wins."""

    norm: bool = False

    def prepare(self, r):
        return r if str(r.get("answer", "")).strip() else None

    def requests(self, d):
        cut = d["sentence"].index("_")
        rest = " " + d["sentence"][cut + 1 :].strip()
        return [(d["sentence"][:cut] + d["option1"], rest), (d["sentence"][:cut] + d["option2"], rest)]

    def gold(self, d):
        return int(d["answer"]) - 1


@dataclass
class MMLU(ChoiceTask):
    norm: bool = False

    def group(self, d):
        return d["subject"]

    def header(self, d):
        return f"The following are multiple choice questions (with answers) about {d['subject'].replace('_', ' ')}.\n\n"

    def context(self, d):
        options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(d["choices"]))
        return f"{d['question'].strip()}{options}\nAnswer:"

    def choices(self, d):
        return [" " + LETTERS[i] for i in range(len(d["choices"]))]

    def gold(self, d):
        a = d["answer"]
        return LETTERS.index(a) if isinstance(a, str) and a in LETTERS else int(a)


AGIEVAL_ENGLISH = (
    "aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage", "sat-math",
)  # fmt: skip


@dataclass
class AGIEval(ChoiceTask):
    """AGIEval's English multiple-choice subsets. Records in the layout of AGIEval's own release
    (passage, question, options, label) or of its Hugging Face copies hails/agieval-* (query,
    choices, gold); few-shot examples are held out of each subset (only a test split ships)."""

    def prepare(self, r):
        if "query" in r:
            return r
        letters = LETTERS[: len(r["options"])]
        if str(r.get("label", "")).strip() not in letters:
            return None  # a cloze item (no options to score)
        passage = f"{r['passage']} " if r.get("passage") else ""
        query = f"Q: {passage}{r['question']} Answer Choices: {' '.join(r['options'])}\nA: Among A through {letters[-1]}, the answer is"
        return {**r, "query": query, "choices": r["options"], "gold": [letters.index(r["label"].strip())]}

    def group(self, d):
        return d.get("subset")

    def context(self, d):
        return d["query"]

    def choices(self, d):
        return [" " + c for c in d["choices"]]

    def gold(self, d):
        g = d["gold"]
        return int(g[0] if isinstance(g, list) else g)

    def load(self, data=None, shots=None, limit=None, seed=1234) -> Loaded:
        # One file per subset (AGIEval's data/v1/<subset>.jsonl) or one HF dataset per subset.
        records, sources = [], []
        for subset in AGIEVAL_ENGLISH:
            if data is not None:
                path = Path(data)
                files = [path] if path.is_file() else [p for p in (path / f"{subset}.jsonl", path / subset) if p.exists()]
                found = [(r, str(f)) for f in files[:1] for r in read_records(f)]
                if path.is_file():
                    subset = path.stem
            else:
                split = find_split(Dataset((f"hails/agieval-{subset}",)), ("test",))
                found = [(r, split.source) for r in split.records] if split else []
            records += [{**r, "subset": subset} for r, _ in found]
            sources += sorted({s for _, s in found})
            if data is not None and Path(data).is_file():
                break
        if not records:
            where = f"in {data}" if data is not None else "in the Hugging Face caches"
            raise DataNotFoundError(
                f"no agieval data found {where}; give --data FOLDER holding AGIEval's English subsets as "
                f"<subset>.jsonl ({', '.join(AGIEVAL_ENGLISH)}) from AGIEval's data/v1 release, or the "
                "Hugging Face datasets hails/agieval-<subset>"
            )
        k = self.shots if shots is None else shots
        docs = [d for d in (self.prepare(dict(r)) for r in records) if d is not None]
        return self.select(docs, None, "test", ", ".join(sources), k, limit, seed)
