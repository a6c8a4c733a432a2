"""Structured output through llguidance (generation/constraints.py) on the Python API: every decoder
(Generator, Engine, ChatSession) keeps a random model's garbage inside the grammar, the stop ids are
allowed exactly when the grammar accepts, the logits' width may differ from the tokenizer's, and a
constrained row leaves the other rows of an engine batch as they were."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch
from structured_cases import SCHEMA

import gemmarun
from gemmarun import Constraint, InvalidParameterError, SamplingParams
from gemmarun.chat import ChatSession
from gemmarun.generation.constraints import GrammarState
from gemmarun.generation.engine import Engine, Request


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma2", seed=11))


def _sampled(constraint: Constraint, seed: int, n: int = 160) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed, constraint=constraint)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(lm, seed):
    r = lm.generate("Tell me about a person", _sampled(Constraint.json_schema(SCHEMA), seed))
    assert r.finish_reason == "stop", r.text
    jsonschema.validate(json.loads(r.text), SCHEMA)
    assert r.token_ids[-1] not in lm.tokenizer.stop_ids  # the grammar ended it: no end-of-turn needed


def test_unconstrained_garbage_does_not_validate(lm):
    """The property the tests above rely on: without the constraint the model writes no JSON."""
    r = lm.generate("Tell me about a person", SamplingParams(max_new_tokens=60, temperature=1.0, seed=0))
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_json_object_regex_and_lark(lm):
    r = lm.generate("x", _sampled(Constraint.json_object(), 3))
    assert isinstance(json.loads(r.text), dict)
    r = lm.generate("x", _sampled(Constraint.regex(r"[0-9]{3}-[a-z]{1,8}"), 1))
    assert re.fullmatch(r"[0-9]{3}-[a-z]{1,8}", r.text), r.text
    lark = 'start: answer " because " REASON\nanswer: "yes" | "no"\nREASON: /[a-z ]{1,20}/'
    r = lm.generate("x", _sampled(Constraint.lark(lark), 2))
    assert re.fullmatch(r"(yes|no) because [a-z ]{1,20}", r.text), r.text


def test_stream_yields_the_same_constrained_text(lm):
    params = _sampled(Constraint.json_schema(SCHEMA), 1)
    assert "".join(lm.stream("Tell me about a person", params)) == lm.generate("Tell me about a person", params).text


def test_greedy_choice_kept_when_the_grammar_allows_it(lm):
    """The mask forbids, never reorders: a regex that spells the unconstrained greedy text exactly
    gives the same tokens, and the grammar's end replaces the token limit."""
    plain = lm.generate("the model", SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert not set(plain.token_ids) & lm.tokenizer._special_ids
    constrained = lm.generate("the model", SamplingParams(max_new_tokens=40, constraint=Constraint.regex(re.escape(plain.text))))
    assert constrained.token_ids == plain.token_ids and constrained.finish_reason == "stop"


def test_stop_ids_allowed_exactly_when_the_grammar_accepts(lm):
    tok = lm.tokenizer
    stops = sorted(tok.stop_ids)
    state = GrammarState(Constraint.regex("ab(c)?"), tok, lm.config.vocab_size, tok.stop_ids)
    seen = []
    for piece in ("a", "b"):
        allowed = state.allowed()
        assert not allowed[stops].any()  # "", "a": not accepted yet
        token = tok.encode(piece, add_bos=False)[0]
        assert allowed[token]
        seen.append(state.advance(token))
    allowed = state.allowed()  # "ab": accepted, and "c" may still follow
    assert allowed[stops].all() and allowed[tok.encode("c", add_bos=False)[0]]
    spelled_c = {i for i, b in enumerate(tok.token_bytes()) if b == b"c"}  # the piece and its byte fallback
    assert set(torch.nonzero(allowed).flatten().tolist()) == set(stops) | spelled_c and seen == [False, False]
    assert state.advance(tok.encode("c", add_bos=False)[0])  # "abc": nothing more, the sequence ends


def test_logits_wider_or_narrower_than_the_tokenizer(checkpoint, lm):
    tok = lm.tokenizer
    wide = gemmarun.load(checkpoint("gemma2", seed=11, vocab_size=640))  # padded embedding rows
    assert wide.config.vocab_size == 640 > tok.vocab_size == 600
    state = GrammarState(Constraint.json_object(), tok, 640, tok.stop_ids)
    allowed = state.allowed()
    assert allowed.shape == (640,) and not allowed[600:].any()
    r = wide.generate("x", _sampled(Constraint.json_object(), 3))
    assert isinstance(json.loads(r.text), dict) and max(r.token_ids) < 600
    narrow = GrammarState(Constraint.json_object(), tok, 500, tok.stop_ids)  # ids past the logits are dropped
    assert narrow.allowed().shape == (500,)


def test_mask_before_penalties_and_filters(lm):
    """top_k=1 after the mask picks the best allowed token; before it, it would keep a forbidden one."""
    tok = lm.tokenizer
    digits = Constraint.regex("[0-9]")
    r = lm.generate("x", SamplingParams(max_new_tokens=4, temperature=1.0, top_k=1, repetition_penalty=2.0, seed=0,
                                        constraint=digits))  # fmt: skip
    assert re.fullmatch("[0-9]", r.text)
    logits = lm.logits(tok.encode("x"))[-1]
    allowed = GrammarState(digits, tok, lm.config.vocab_size, tok.stop_ids).allowed()
    assert r.token_ids[0] == int(torch.where(allowed, logits, -torch.inf).argmax())


def test_engine_constrained_row_leaves_the_others_unchanged(lm):
    prompts = [lm.tokenizer.encode(p) for p in ("Hello there", "Tell me about a person", "the model runs")]
    free = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    with Engine(lm, max_batch=4) as engine:
        alone = [engine.submit(Request(p, free)).result() for p in (prompts[0], prompts[2])]
        handles = [engine.submit(Request(prompts[0], free)),
                   engine.submit(Request(prompts[1], _sampled(Constraint.json_schema(SCHEMA), 0))),
                   engine.submit(Request(prompts[2], free))]  # fmt: skip
        together = [h.result(timeout=300) for h in handles]
    assert [together[0].token_ids, together[2].token_ids] == [a.token_ids for a in alone]
    jsonschema.validate(json.loads(together[1].text), SCHEMA)
    # the same request through Generator and Engine: one mask, one sampler, the same tokens
    assert together[1].token_ids == lm.generate(prompts[1], _sampled(Constraint.json_schema(SCHEMA), 0)).token_ids


def test_chat_session_constrained_turns(lm):
    session = ChatSession(lm, params=_sampled(Constraint.json_schema(SCHEMA), 4))
    for message in ("Describe someone", "And another one"):
        reply = "".join(session.send(message))
        jsonschema.validate(json.loads(reply), SCHEMA)


@pytest.mark.parametrize(
    "constraint, words",
    [
        (lambda: Constraint.json_schema({"type": "objectx"}), "invalid JSON schema: Invalid type: objectx"),
        (lambda: Constraint.json_schema({"type": "string", "minLength": 5, "maxLength": 2}), "invalid JSON schema"),
        (lambda: Constraint.json_schema("[1, 2]"), "must be a JSON object"),
        (lambda: Constraint.regex("a(b"), "unclosed group"),
        (lambda: Constraint.lark("start: foo"), 'unknown name: "foo"'),
        (lambda: Constraint("xml", "<a/>"), "constraint kind must be one of"),
    ],
)
def test_bad_grammar_is_a_one_line_error_with_the_library_reason(constraint, words):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(constraint=constraint())
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cli_generate_and_chat_constrained(lm, tmp_path, capsys):
    from gemmarun.cli import main

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["--model", lm.source, "-t", "1", "--seed", "0", "-n", "160"]
    assert main(["generate", "Tell me about a person", "--json-schema", str(schema), *base]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= ("yes" | "no") " " [0-9]')
    assert main(["generate", "x", "--grammar", str(grammar), *base]) == 0
    assert re.fullmatch(r"(yes|no) [0-9]\n", capsys.readouterr().out)
    chat = [sys.executable, "-m", "gemmarun.cli", "chat", "--regex", "[a-c]{2}", *base]
    r = subprocess.run(chat, input="first\nsecond\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[a-c]{2}\n[a-c]{2}\n", r.stdout)


@pytest.mark.parametrize(
    "flags, words",
    [(["--regex", "a(b"], "unclosed group"), (["--json-schema", "/nonexistent.json"], "cannot read"),
     (["--grammar", "/dev/null"], "non-empty")],
)  # fmt: skip
def test_cli_bad_constraint_is_one_line(lm, capsys, flags, words):
    from gemmarun.cli import main

    code = main(["generate", "x", "--model", lm.source, *flags])
    err = capsys.readouterr().err
    assert code != 0 and words in err and err.strip().count("\n") <= 1


def test_token_bytes_spell_the_text(tok, tiny_spm):
    """What llguidance needs of the table: the bytes of an encoding's ids, joined, are the text;
    special ids are marked, never text. SentencePiece and the same vocabulary through GGUF fields."""
    from test_tokenizer_gguf import _gguf_fields_from_spm

    from gemmarun.tokenizer import Tokenizer

    from tokenizer_cases import HARD

    for t in (tok, Tokenizer.from_gguf_fields(_gguf_fields_from_spm(tiny_spm))):
        table = t.token_bytes()
        assert len(table) == t.vocab_size
        for text in HARD:
            ids = t.encode(text, add_bos=False)
            if not set(ids) & t._special_ids:
                assert b"".join(table[i] for i in ids) == text.encode("utf-8"), text
        assert all(table[i].startswith(b"\xff") for i in t._special_ids)
        assert table[t.token_to_id("<end_of_turn>")] == b"\xff<end_of_turn>"
