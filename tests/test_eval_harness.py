"""The lm-evaluation-harness adapter and perplexity, against gemmarun's own scorer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import gemmarun
from gemmarun.evaluate import Request, Scorer, evaluate
from gemmarun.evaluate.harness import GemmarunLM
from gemmarun.evaluate.perplexity import perplexity, window_count

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TEXT = "The model reads the text. " * 3 + "Then it writes a small test of the window and the stream. " * 4


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma3", seed=12))


@dataclass
class Instance:  # the part of lm-eval's Instance that models read
    args: tuple


def test_adapter_loglikelihoods_equal_the_scorer(lm):
    adapter = GemmarunLM(model=lm)
    pairs = [("Question: the model\nAnswer:", " token"), ("Question: the model\nAnswer:", " fast text"), ("", "gemma")]
    got = adapter.loglikelihood([Instance(p) for p in pairs])
    want = Scorer(lm).loglikelihood([Request(*p) for p in pairs])
    assert got == [(w.logprob, w.greedy) for w in want]


def test_scorer_on_gemma3_matches_full_sequence_logits(lm):
    # Gemma 3's layers mix sliding (window 16 here) and global attention: cached prefixes must agree
    scorer = Scorer(lm, chunk=5, min_shared=4)
    context = TEXT + "Question: the model?\nAnswer:"
    reqs = [Request(context, " yes it reads"), Request(context, " no"), Request(TEXT, " Then")]
    for r, ll in zip(reqs, scorer.loglikelihood(reqs)):
        ctx, cont = scorer.encode_pair(r.context, r.continuation)
        logp = torch.log_softmax(lm.logits(ctx + cont).double(), -1)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert ll.logprob == pytest.approx(want, abs=1e-3)


def test_adapter_rolling_and_generation(lm):
    adapter = GemmarunLM(model=lm)
    [rolling] = adapter.loglikelihood_rolling([Instance((TEXT,))])
    ids = lm.tokenizer.encode(TEXT)  # BOS first
    logp = torch.log_softmax(lm.logits(ids).double(), -1)
    assert rolling == pytest.approx(sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)), abs=1e-3)
    prompts = ["The model", "Then it writes"]
    got = adapter.generate_until([Instance((p, {"until": ["."], "max_gen_toks": 12})) for p in prompts])
    want = [r.text for r in lm.generate(prompts, max_new_tokens=12, stop=["."])]
    assert got == want
    with pytest.raises(ValueError, match="greedily"):
        adapter.generate_until([Instance(("x", {"do_sample": True, "temperature": 1.0}))])


def test_perplexity_sliding_window(lm):
    ids = lm.tokenizer.encode(TEXT, add_bos=False)
    full = perplexity(lm, TEXT, window=len(ids) + 1, stride=8)
    logp = torch.log_softmax(lm.logits([lm.tokenizer.bos_id] + ids).double(), -1)
    nll = -sum(float(logp[i, t]) for i, t in enumerate(ids)) / len(ids)
    assert full.windows == 1 and full.tokens == len(ids)
    assert full.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    # windows of 24 (BOS + 23 tokens) moving 10 at a time: each token scored once, by hand here
    slid = perplexity(lm, TEXT, window=24, stride=10)
    total, scored, begin = 0.0, 0, 0
    while scored < len(ids):
        begin = min(begin, len(ids) - 23)
        window = [lm.tokenizer.bos_id] + ids[begin : begin + 23]
        logp = torch.log_softmax(lm.logits(window).double(), -1)
        for j in range(scored - begin, len(window) - 1):
            total -= float(logp[j, window[j + 1]])
        scored, begin = begin + len(window) - 1, begin + 10
    assert slid.windows == window_count(len(ids), 24, 10)
    assert slid.nll == pytest.approx(total / len(ids), rel=1e-4)
    assert slid.perplexity > 1 and slid.bits_per_byte > 0


def test_cli_perplexity(lm, tmp_path, capsys):
    from gemmarun.cli import main

    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    assert main(["perplexity", "--model", lm.source, str(f), "--window", "32", "--stride", "16", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert main(["perplexity", "--model", lm.source, str(tmp_path / "missing.txt")]) != 0


def test_lm_eval_runs_a_local_task_on_gemmarun(lm, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = FIXTURES / "piqa" / "validation.jsonl"
    (tmp_path / "tiny_piqa.yaml").write_text(
        "task: gemmarun_tiny_piqa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "validation_split: validation\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\n'
        'doc_to_choice: "{{[sol1, sol2]}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    out = lm_eval.simple_evaluate(
        model=GemmarunLM(model=lm), tasks=["gemmarun_tiny_piqa"], task_manager=TaskManager(include_path=str(tmp_path)),
        num_fewshot=0, log_samples=True,
    )  # fmt: skip
    samples = out["samples"]["gemmarun_tiny_piqa"]
    scorer = Scorer(lm)
    pairs = [tuple(a) for s in samples for a in s["arguments"]]
    got = [resp[0][0] for s in samples for resp in s["resps"]]
    assert len(got) == 6  # three items, two options each
    # the same requests through gemmarun's scorer: the same numbers (float32 batching aside)
    assert got == pytest.approx([ll.logprob for ll in scorer.loglikelihood([Request(*p) for p in pairs])], abs=1e-4)
    ours = evaluate(lm, "piqa", shots=0, data=data, progress=False).metrics
    got = out["results"]["gemmarun_tiny_piqa"]
    assert got["acc,none"] == pytest.approx(ours["acc"]) and got["acc_norm,none"] == pytest.approx(ours["acc_norm"])
