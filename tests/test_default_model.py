"""The real default model (Gemma 3 270M Q4_K_M GGUF) against transformers' recorded outputs.

The recording comes from tests/fixtures/make_gemma3_270m_reference.py (re-run it to check it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemmarun

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "gemma3_270m_reference.json").read_text())
# Measured: with the blocks decoded to float32 our logits differ from transformers' (same
# dequantised weights) by at most 1.7e-5 on these prompts; 1e-3 leaves room for BLAS summation
# order on other CPUs. Blocks kept packed run the kernel on int16-rounded activations: at most
# 2.1e-3 measured, and all 10 greedy continuations still identical.
LOGIT_TOL = {"decoded": 1e-3, "packed": 1e-2}
TIE_TOL = 1e-2  # where greedy paths part, the two candidates must be this close (a near tie, within the packed error)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return gemmarun.load()


def test_default_model_is_the_real_gemma3_270m(lm):
    c = lm.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.vocab_size) == ("gemma3_text", 640, 18, 262144)
    assert lm.source.endswith(REFERENCE["model"])


@pytest.fixture(scope="module")
def decoded():
    return gemmarun.load(quantize="none")


@pytest.mark.parametrize("mode", ["packed", "decoded"])
@pytest.mark.parametrize("row", REFERENCE["rows"], ids=lambda r: r["prompt"][:24])
def test_prompt_tokens_and_last_logits(request, mode, row):
    lm = request.getfixturevalue("lm" if mode == "packed" else "decoded")
    assert lm.tokenizer.encode(row["prompt"]) == row["prompt_ids"]
    last = lm.logits(row["prompt_ids"])[-1]
    got = last[row["last_top_ids"]]
    assert (got - torch.tensor(row["last_top_logits"])).abs().max().item() < LOGIT_TOL[mode]
    assert abs(torch.logsumexp(last, -1).item() - row["last_logsumexp"]) < LOGIT_TOL[mode]


def test_greedy_continuations_match_transformers(lm):
    rows = REFERENCE["rows"]
    outs = lm.generate([r["prompt_ids"] for r in rows], max_new_tokens=REFERENCE["new_tokens"], ignore_eos=True)
    exact = 0
    for row, out in zip(rows, outs):
        if out.token_ids == row["greedy"]:
            exact += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(out.token_ids, row["greedy"])) if a != b)
        logits = lm.logits(row["prompt_ids"] + row["greedy"][:i])[-1]
        ours, theirs = out.token_ids[i], row["greedy"][i]
        assert abs(logits[ours].item() - logits[theirs].item()) < TIE_TOL, (row["prompt"], i)
    assert exact >= len(rows) - 2


def test_cli_generates_real_text_with_no_model_argument(lm):
    r = subprocess.run(
        [sys.executable, "-m", "gemmarun.cli", "generate", "The capital of France is", "-n", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    row = REFERENCE["rows"][0]
    assert r.stdout == lm.tokenizer.decode(row["greedy"][:8]) + "\n"
