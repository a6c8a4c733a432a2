"""Structured output under speculative decoding: a constrained row drafts nothing and picks its
token under its grammar's mask, so its output equals decoding without speculation (greedy and
seeded), in the Generator, the engine (beside rows that do speculate) and chat sessions."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from structured_cases import SCHEMA

import gemmarun
from gemmarun import Constraint, SamplingParams
from gemmarun.chat import ChatSession
from gemmarun.generation.engine import Engine, Request
from gemmarun.generation.speculative import SpeculativeConfig

WAIT = 120  # seconds: every wait on the engine's thread is bounded


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma3", seed=3))


def _grounded(seed: int) -> list[int]:
    ids = torch.randint(3, 600, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [2] + ids + ids[:8] + ids  # repeats, so the n-gram source drafts for the free rows


CASES = [
    SamplingParams(max_new_tokens=120, constraint=Constraint.json_schema(SCHEMA)),
    SamplingParams(max_new_tokens=120, temperature=1.0, seed=5, constraint=Constraint.json_schema(SCHEMA)),
    SamplingParams(max_new_tokens=30, ignore_eos=True, constraint=Constraint.regex("[a-z ]{5,40}")),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_generate_constrained_equals_without_speculation(lm, i):
    prompt = _grounded(i)
    plain = lm.generate(prompt, CASES[i], speculate="off")
    spec = lm.generate(prompt, CASES[i], speculate="ngram")
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    if CASES[i].constraint.kind == "json_schema" and plain.finish_reason == "stop":
        jsonschema.validate(json.loads(plain.text), SCHEMA)


def test_engine_constrained_rows_beside_speculating_rows(lm):
    free = SamplingParams(max_new_tokens=40, ignore_eos=True)
    cases = [(_grounded(10), free), (_grounded(11), CASES[0]), (_grounded(12), free), (_grounded(13), CASES[1])]
    plain = [lm.generate(ids, params, speculate="off") for ids, params in cases]
    with Engine(lm, max_batch=4, max_waiting=8, speculate=SpeculativeConfig("ngram", 4, adaptive=False)) as engine:
        handles = [engine.submit(Request(ids, params)) for ids, params in cases]
        results = [h.result(WAIT) for h in handles]
        assert engine.speculator.totals["accepted"] > 0  # the free rows did speculate
    assert [r.token_ids for r in results] == [p.token_ids for p in plain]


def test_chat_session_constrained_reply_equals_without_speculation(folder_lm_pair):
    plain_lm, spec_lm = folder_lm_pair
    params = CASES[0]
    replies = []
    for model in (plain_lm, spec_lm):
        chat = ChatSession(model, params=params)
        replies.append("".join(chat.send("Describe a person as JSON.")))
    assert replies[0] == replies[1]


@pytest.fixture(scope="module")
def folder_lm_pair(checkpoint):
    folder = checkpoint("gemma3", seed=3)
    return gemmarun.load(folder, speculate="off"), gemmarun.load(folder, speculate="ngram")
