"""Benchmarks answered by greedy generation: open QA, reading comprehension, math, BIG-Bench Hard."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameterError
from . import metrics
from .data import DataNotFoundError, read_records
from .task import GenerationTask, Loaded


@dataclass
class TriviaQA(GenerationTask):
    stop: tuple[str, ...] = ("\n", ".", ",")

    def prompt(self, d):
        return f"Question: {d['question'].rstrip().rstrip('?')}?\nAnswer:"

    def target(self, d):
        return " " + d["answer"]["value"]

    def score(self, d, completion):
        answer = d["answer"]
        aliases = list(answer.get("aliases") or []) + list(answer.get("normalized_aliases") or []) + [answer["value"]]
        return {"exact_match": metrics.triviaqa_match(completion.strip(), aliases)}


@dataclass
class NaturalQuestions(GenerationTask):
    stop: tuple[str, ...] = ("\n", ".", ",")

    def prompt(self, d):
        return f"Q: {d['question'].rstrip().rstrip('?')}?\nA:"

    def target(self, d):
        return " " + d["answer"][0]

    def score(self, d, completion):
        return {"exact_match": metrics.exact_match(completion.strip(), list(d["answer"]))}


@dataclass
class GSM8K(GenerationTask):
    """maj@1 with greedy decoding: one sample, so the majority is that sample."""

    stop: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
    max_new_tokens: int = 256

    def prompt(self, d):
        return f"Question: {d['question']}\nAnswer:"

    def target(self, d):
        return " " + d["answer"]

    def score(self, d, completion):
        gold = metrics.gsm8k_target(d["answer"])
        return {
            "exact_match": float(metrics.gsm8k_extract(completion, strict=True) == gold),
            "exact_match_flexible": float(metrics.gsm8k_extract(completion, strict=False) == gold),
        }


@dataclass
class MATH(GenerationTask):
    """Minerva's format: 'Problem:/Solution:' and 'Final Answer: The final answer is X. I hope it is correct.'"""

    stop: tuple[str, ...] = ("Problem:",)
    max_new_tokens: int = 512

    def group(self, d):
        return None

    def prompt(self, d):
        return f"Problem:\n{d['problem']}\n\nSolution:"

    def target(self, d):
        answer = metrics.last_boxed(d["solution"])
        return f" {d['solution']}\nFinal Answer: The final answer is {answer}. I hope it is correct."

    def score(self, d, completion):
        gold = metrics.last_boxed(d["solution"])
        predicted = metrics.math_extract(completion)
        ok = gold is not None and predicted is not None and predicted == metrics.math_normalize(gold)
        return {"exact_match": float(ok)}


@dataclass
class DROP(GenerationTask):
    stop: tuple[str, ...] = ("\n", ".")

    def prepare(self, r):
        spans = _drop_answers(r)
        return {**r, "gold_answers": spans} if spans else None

    def prompt(self, d):
        return f"{d['passage']} {d['question']}"

    def target(self, d):
        return " " + ", ".join(d["gold_answers"][0])

    def score(self, d, completion):
        # The best over the gold answers, as DROP's scorer takes the best over validated answers.
        results = [metrics.drop_metrics([completion.strip()], gold) for gold in d["gold_answers"]]
        return {"exact_match": max(r[0] for r in results), "f1": max(r[1] for r in results)}


def _drop_answers(r: dict) -> list[list[str]]:
    """Gold answers as bags of spans, from the HF layout (answers_spans) or DROP's own (answer)."""
    if "answers_spans" in r:
        spans = [s for s in dict.fromkeys(r["answers_spans"]["spans"]) if s]
        # The HF copy flattens the spans of one multi-span answer and repeated annotations into
        # one list; score against the whole bag and each span alone, keeping the best.
        return ([spans] + [[s] for s in spans]) if len(spans) > 1 else [spans] if spans else []
    answers = [r["answer"]] + list(r.get("validated_answers") or [])
    out = []
    for a in answers:
        if a.get("number"):
            out.append([str(a["number"])])
        elif a.get("spans"):
            out.append(list(a["spans"]))
        elif any((a.get("date") or {}).values()):
            date = a["date"]
            out.append([" ".join(str(date.get(k, "")) for k in ("day", "month", "year")).strip()])
    return out


BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)  # fmt: skip


@dataclass
class BBH(GenerationTask):
    """BIG-Bench Hard with its authors' 3-shot chain-of-thought prompts (cot-prompts/<task>.txt)."""

    stop: tuple[str, ...] = ("\n\nQ:", "\n\n\n")
    max_new_tokens: int = 256

    def group(self, d):
        return d["subtask"]

    def prefix(self, d, shots):
        return d["cot_prompt"] + "\n\n"

    def prompt(self, d):
        return f"Q: {d['input']}\nA: Let's think step by step."

    def score(self, d, completion):
        m = re.search(r"the answer is (.*)", completion)
        answer = m.group(1).strip().rstrip(".").strip() if m else ""
        return {"exact_match": float(answer == d["target"].strip())}

    def load(self, data=None, shots=None, limit=None, seed=1234) -> Loaded:
        if shots not in (None, 3):
            raise InvalidParameterError("bbh uses its authors' fixed 3-shot chain-of-thought prompts; --shots must be 3")
        if data is None or not Path(data).is_dir():
            raise DataNotFoundError(
                "bbh needs --data FOLDER with BIG-Bench Hard's release: bbh/<task>.json and "
                "cot-prompts/<task>.txt (from the BIG-Bench-Hard repository)"
            )
        root = Path(data)
        docs, counts = [], {}
        for name in BBH_TASKS:
            task_file = next(
                (p for p in (root / "bbh" / f"{name}.json", root / f"{name}.json", root / f"{name}.jsonl") if p.is_file()), None
            )
            cot_file = next((p for p in (root / "cot-prompts" / f"{name}.txt", root / f"{name}.txt") if p.is_file()), None)
            if task_file is None:
                continue
            if cot_file is None:
                raise DataNotFoundError(f"{task_file}: no chain-of-thought prompt cot-prompts/{name}.txt beside it")
            text = cot_file.read_text(encoding="utf-8")
            cot = text.split("-----\n", 1)[1] if "-----\n" in text else text  # drop the canary header
            for r in read_records(task_file):
                if limit is None or counts.get(name, 0) < limit:
                    counts[name] = counts.get(name, 0) + 1
                    docs.append({**r, "subtask": name, "cot_prompt": cot.strip()})
        if not docs:
            raise DataNotFoundError(f"{root}: no BIG-Bench Hard task files (bbh/<task>.json)")
        return Loaded(docs, {name: [] for name in counts}, "test", "cot-prompts (3-shot)", str(root))
