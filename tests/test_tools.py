"""chat/tools.py without a model: reading calls out of a streamed reply, the history rendered back
into Gemma turns, and the tool grammar's verdict on text and calls."""

from __future__ import annotations

import json

import llguidance
import pytest

from gemmarun import InvalidParameterError
from gemmarun.chat import render_messages
from gemmarun.chat.tools import CallReader, constraint, parse_tools, render_history
from gemmarun.generation.constraints import token_table

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "noop"}}]  # fmt: skip


def _read(text: str, step: int) -> tuple[str, list[dict], list[dict]]:
    reader, content, deltas = CallReader(), "", []
    for i in range(0, len(text), step):
        piece, d = reader.feed(text[i : i + step])
        content += piece
        deltas += d
    return content, deltas, reader.finished_calls()


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_calls_read_from_any_split_of_the_text(step):
    args = [{"city": 'Pa"}ri{s', "n": [1, {"a": "]"}]}, {}]
    text = json.dumps([{"name": "get_weather", "parameters": args[0]}, {"name": "noop", "parameters": args[1]}])
    content, deltas, calls = _read(text, step)
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather", "noop"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == args
    # the deltas, assembled as a client does, give the same calls: a head first, then fragments
    built: list[dict] = []
    for d in deltas:
        if "id" in d:
            assert d["index"] == len(built) and d["type"] == "function" and d["function"]["arguments"] == ""
            built.append({"name": d["function"]["name"], "arguments": ""})
        else:
            built[d["index"]]["arguments"] += d["function"]["arguments"]
    assert [(b["name"], b["arguments"]) for b in built] == [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    assert len({c["id"] for c in calls}) == 2


def test_plain_text_and_an_unfinished_call():
    assert _read("  Hello {there}", 3)[0] == "  Hello {there}"
    content, deltas, calls = _read('{"name": "get_weather", "parameters": {"city": "Par', 4)
    assert content == "" and calls == [] and deltas[0]["function"]["name"] == "get_weather"


def test_history_rendered_into_gemma_turns(tok):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": "call_2"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
    ]
    prompt = render_messages(tok, render_history(messages, parse_tools(TOOLS, "auto", None)))
    one = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert prompt.startswith("<bos><start_of_turn>user\nYou have access to functions.")
    assert '"name": "get_weather"' in prompt and "Be brief.\n\nWeather in Paris and Rome?<end_of_turn>" in prompt
    assert f"<start_of_turn>model\n[{one}, {one}]<end_of_turn>" in prompt
    assert prompt.endswith("<start_of_turn>user\n```tool_output\nsunny\n```\n\n```tool_output\nrain\n```<end_of_turn>\n"
                           "<start_of_turn>model\n")  # fmt: skip
    assert "You have access" not in render_messages(tok, render_history(messages, None))


def _accepts(tok, c, text: str) -> bool:
    m = llguidance.LLMatcher(token_table(tok, tok.vocab_size), c.grammar, log_level=0)
    return m.try_consume_tokens(tok.encode(text, add_bos=False)) == len(tok.encode(text, add_bos=False)) and m.is_accepting()


def test_tool_grammars(tok):
    call = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    calls = f'[{call}, {{"name": "noop", "parameters": {{}}}}]'
    auto, required = (constraint(parse_tools(TOOLS, choice, None)) for choice in ("auto", "required"))
    single = constraint(parse_tools(TOOLS, "required", False))
    named = constraint(parse_tools(TOOLS, {"type": "function", "function": {"name": "noop"}}, None))
    for c in (auto, required, single, named):
        c.check()
    assert _accepts(tok, auto, "It is sunny.") and _accepts(tok, auto, call) and _accepts(tok, auto, calls)
    assert not _accepts(tok, auto, '{"name": "get_weather"}') and not _accepts(tok, required, "It is sunny.")
    assert _accepts(tok, required, calls) and _accepts(tok, single, call) and not _accepts(tok, single, calls)
    assert not _accepts(tok, named, call) and _accepts(tok, named, '{"name": "noop", "parameters": {}}')
    assert not _accepts(tok, required, '{"name": "get_weather", "parameters": {"town": "Rome"}}')  # city is required


@pytest.mark.parametrize(
    "tools, choice, parallel, words",
    [
        ([], None, None, "non-empty list"),
        ([{"type": "function", "function": {"name": "x y"}}], None, None, "letters, digits"),
        (TOOLS, "sometimes", None, "'auto', 'none', 'required'"),
        (TOOLS, {"type": "function", "function": {"name": "other"}}, None, "not among the tools"),
        (TOOLS, None, "yes", "parallel_tool_calls must be a boolean"),
        (None, "required", None, "needs 'tools'"),
    ],
)
def test_bad_tools(tools, choice, parallel, words):
    with pytest.raises(InvalidParameterError, match=words):
        parse_tools(tools, choice, parallel)
