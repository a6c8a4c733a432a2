"""Chat template, ChatSession (KV cache kept across turns, trimming) and the `gemmarun chat` REPL."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import gemmarun
from gemmarun import ContextLengthError, InvalidParameterError, SamplingParams
from gemmarun.chat import ChatSession, render_messages, run_repl
from gemmarun.lm import LanguageModel
from gemmarun.tokenizer import Tokenizer

# Gemma 2's own chat template (tokenizer_config.json): it refuses a system role, so gemmarun folds
# the system text into the first user turn before rendering.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

TALK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! "},
    {"role": "user", "content": "What is the model?"},
]


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=31)


@pytest.fixture(scope="module")
def lm(folder):
    return gemmarun.load(folder)


def test_gemma_turn_format(lm):
    text = render_messages(lm.tokenizer, TALK)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n"
        "<start_of_turn>model\nHi!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is the model?<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = lm.tokenizer.encode(text)
    assert ids.count(lm.tokenizer.bos_id) == 1 and ids[0] == lm.tokenizer.bos_id
    assert lm.tokenizer.token_to_id("<end_of_turn>") in lm.tokenizer.stop_ids
    with pytest.raises(InvalidParameterError, match="alternate"):
        render_messages(lm.tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_checkpoint_template_is_used_when_shipped(folder, tmp_path, lm):
    (tmp_path / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<bos>", "chat_template": ' + __import__("json").dumps(GEMMA2_TEMPLATE) + "}"
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == GEMMA2_TEMPLATE
    # Gemma 2's template gives our format, system role included (folded before rendering).
    assert render_messages(tok, TALK) == render_messages(lm.tokenizer, TALK)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    assert render_messages(tok, TALK[1:2]) == "<bos>[user]Hello there"


def test_session_feeds_only_the_new_turn_and_matches_a_fresh_run(lm):
    params = SamplingParams(max_new_tokens=12)
    fed = []
    session = ChatSession(lm, system="Be brief.", params=params)
    real_feed = session._feed
    session._feed = lambda tokens: (fed.append(len(tokens)), real_feed(tokens))[1]
    first = "".join(session.send("Hello there"))
    cached = list(session.ids)
    fed.clear()
    second = "".join(session.send("What is the model?"))
    prompt = session.last_prompt
    assert prompt[: len(cached)] == cached  # the first turn's tokens stayed in the cache
    delta = prompt[len(cached) :]
    assert fed[0] == len(delta)  # ... and only the new ones were fed
    assert lm.tokenizer.decode(delta, skip_special_tokens=False).endswith(
        "<start_of_turn>user\nWhat is the model?<end_of_turn>\n<start_of_turn>model\n"
    )
    # The reply is what a fresh run over the same tokens gives.
    fresh = lm.generate(prompt, params)
    assert session.last_result.token_ids == fresh.token_ids and second == fresh.text
    assert [m["role"] for m in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1]["content"] == first
    session.reset()
    assert session.ids == [] and session.turns == []
    again = "".join(session.send("Hello there"))
    assert again == first


def test_session_trims_oldest_turns_when_the_context_fills(lm):
    small = LanguageModel(lm.model, lm.tokenizer, lm.config, lm.source, context=120)
    notices = []
    session = ChatSession(small, params=SamplingParams(max_new_tokens=10, ignore_eos=True), notify=notices.append)
    for k in range(8):
        "".join(session.send(f"Message {k}: the model is a small test of the window"))
        assert len(session.ids) <= 120
    assert notices and "dropped the oldest" in notices[0]
    assert session.turns[0]["content"] != "Message 0: the model is a small test of the window"
    assert session.turns[-2]["content"].startswith("Message 7")
    with pytest.raises(ContextLengthError, match="context of 120"):
        "".join(session.send("word " * 200))


def test_repl_commands_with_piped_input(lm):
    params = SamplingParams(max_new_tokens=8)
    expected_one = "".join(ChatSession(lm, system="Be brief.", params=params).send("Hello"))
    expected_two = "".join(ChatSession(lm, system="Be brief.", params=params).send("Hi there"))
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO("Hello\n/reset\n\nHi there\n/quit\nnever read\n")
    assert run_repl(lm, ChatSession(lm, system="Be brief.", params=params), stdin, out, err) == 0
    assert out.getvalue() == expected_one + "\n" + expected_two + "\n"
    assert "[conversation reset]" in err.getvalue()


def test_cli_chat_subcommand(folder, lm):
    params = SamplingParams(max_new_tokens=6)
    session = ChatSession(lm, system="Be brief.", params=params)
    expected = "".join(session.send("Hello")) + "\n" + "".join(session.send("And then?")) + "\n"
    r = subprocess.run(
        [sys.executable, "-m", "gemmarun.cli", "chat", "--model", str(folder), "--system", "Be brief.", "-n", "6"],
        input="Hello\nAnd then?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
