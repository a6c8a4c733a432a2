"""response_format and tool calls on the server, through the official `openai` client: a random tiny
model writes garbage, so only the grammar makes the replies parse and validate (jsonschema)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from structured_cases import SCHEMA

import gemmarun
from gemmarun.chat import render_messages
from gemmarun.chat.tools import parse_tools, render_history
from gemmarun.generation.engine import Engine
from gemmarun.server import Server

from background_server import BackgroundServer

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,10}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]}]


@pytest.fixture(scope="module")
def lm(checkpoint):
    # the tools' definitions take ~700 tiny-vocabulary tokens: more than the default 512 positions
    return gemmarun.load(checkpoint("gemma2", seed=11, max_position_embeddings=4096))


@pytest.fixture(scope="module")
def server(lm):
    with Engine(lm, max_batch=4) as engine, BackgroundServer(Server(lm, engine, model_id="tiny").app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def _chat(client, **kw):
    kw = {"temperature": 1.0, "max_tokens": 200, **kw}
    return client.chat.completions.create(model="tiny", messages=ASK, **kw)


def _streamed(client, **kw) -> tuple[str, list[dict], str]:
    """(content, tool calls assembled from their deltas, finish_reason) of a streamed chat reply."""
    content, calls, finish = "", [], None
    for chunk in _chat(client, stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.id is not None:  # a call's first delta: index, id, type and name
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                calls[d.index]["arguments"] += d.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("seed", [0, 5])
def test_json_schema_chat_plain_and_streamed(client, seed):
    r = _chat(client, seed=seed, response_format=_schema_format(SCHEMA))
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    content, calls, finish = _streamed(client, seed=seed, response_format=_schema_format(SCHEMA))
    assert content == r.choices[0].message.content and not calls and finish == "stop"


def test_json_schema_and_object_on_completions(client):
    fmt = {"response_format": _schema_format(SCHEMA)}  # not among the client's completions arguments
    r = client.completions.create(model="tiny", prompt="A person:", max_tokens=200, temperature=1.0, seed=2, extra_body=fmt)
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    stream = client.completions.create(model="tiny", prompt="A person:", max_tokens=200, temperature=1.0, seed=2, extra_body=fmt,
                                       stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    r = client.completions.create(model="tiny", prompt="x", max_tokens=100, temperature=1.0, seed=3, n=2,
                                  extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    assert all(isinstance(json.loads(c.text), dict) for c in r.choices)


def test_json_object_chat(client):
    """Any object: keys and strings are unbounded, so a random model may write one until the limit
    (a prefix of JSON, finish_reason length); every reply that ended is an object."""
    ended = 0
    for seed in range(4):
        r = _chat(client, seed=seed, response_format={"type": "json_object"}, max_tokens=120).choices[0]
        if r.finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(r.message.content), dict)
        else:
            assert r.finish_reason == "length" and r.message.content.startswith("{")
    assert ended


def test_regex_and_grammar_extensions(client):
    r = _chat(client, seed=1, response_format={"type": "regex", "regex": r"[0-9]{3}-[a-z]{1,8}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{1,8}", r.choices[0].message.content)
    lark = 'start: ("yes" | "no") " because " /[a-z ]{1,20}/'
    r = _chat(client, seed=2, response_format={"type": "grammar", "grammar": lark})
    assert re.fullmatch(r"(yes|no) because [a-z ]{1,20}", r.choices[0].message.content)
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
    r = client.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=1.0, seed=4,
                                  extra_body={"response_format": {"type": "grammar", "grammar": gbnf, "syntax": "gbnf"}})  # fmt: skip
    assert re.fullmatch(r"(yes|no) [0-9]{1,2}", r.choices[0].text)


@pytest.mark.parametrize(
    "fmt, words",
    [
        (_schema_format({"type": "objectx"}), "invalid JSON schema: Invalid type: objectx"),
        (_schema_format({"type": "integer", "minimum": 5, "maximum": 1}), "invalid JSON schema"),
        ({"type": "regex", "regex": "a(b"}, "unclosed group"),
        ({"type": "grammar", "grammar": "start: foo"}, 'unknown name: "foo"'),
        ({"type": "grammar", "grammar": "root ::= nothing", "syntax": "gbnf"}, "Rule 'nothing' not found"),
        ({"type": "xml"}, "one of text, json_object"),
    ],
)
def test_bad_format_is_a_400_with_the_library_reason(client, fmt, words):
    for call in (lambda: _chat(client, response_format=fmt),
                 lambda: client.completions.create(model="tiny", prompt="x", extra_body={"response_format": fmt})):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == "response_format" and words in e.value.message


def _check_calls(calls: list[dict], names=SCHEMAS) -> None:
    assert calls
    for c in calls:
        assert c["name"] in names and re.fullmatch(r"call_[0-9a-f]{24}", c["id"])
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_tool_call_then_tool_result_then_answer(client, lm):
    r = _chat(client, seed=0, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _check_calls([{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}])
    history = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": '{"forecast": "sunny, 21 C"}'}]},
    ]
    final = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=20, seed=1)
    assert isinstance(final.choices[0].message.content, str) and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens > r.usage.prompt_tokens + r.usage.completion_tokens  # the tools, the call, its result
    prompt = render_messages(lm.tokenizer, render_history(history, parse_tools(TOOLS, "none", None)))
    call_text = json.dumps({"name": call.function.name, "parameters": json.loads(call.function.arguments)})
    assert f"<start_of_turn>model\n{call_text}<end_of_turn>" in prompt
    assert '<start_of_turn>user\n```tool_output\n{"forecast": "sunny, 21 C"}\n```<end_of_turn>\n<start_of_turn>model\n' in prompt
    assert prompt.startswith("<bos><start_of_turn>user\nYou have access to functions.")


def test_tool_call_streamed_equals_plain(client):
    for kw in (dict(tool_choice="required"), dict(tool_choice={"type": "function", "function": {"name": "get_time"}})):
        plain = _chat(client, seed=3, tools=TOOLS, **kw).choices[0]
        content, calls, finish = _streamed(client, seed=3, tools=TOOLS, **kw)
        assert content == "" and finish == "tool_calls" == plain.finish_reason
        _check_calls(calls)
        assert [(c["name"], c["arguments"]) for c in calls] == [(t.function.name, t.function.arguments) for t in plain.message.tool_calls]
        if "function" in kw["tool_choice"]:
            assert {c["name"] for c in calls} == {"get_time"}


def test_parallel_calls_and_auto(client):
    for seed in range(3):
        r = _chat(client, seed=seed, tools=TOOLS, tool_choice="required", parallel_tool_calls=True)
        calls = r.choices[0].message.tool_calls
        _check_calls([{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in calls])
        assert len({c.id for c in calls}) == len(calls)
    for seed in range(3):  # auto: a call or plain text, never a broken call
        r = _chat(client, seed=seed, tools=TOOLS, max_tokens=60).choices[0]
        if r.message.tool_calls:
            assert r.finish_reason == "tool_calls"
            _check_calls([{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in r.message.tool_calls])
        else:
            assert not r.message.content.lstrip().startswith(("{", "["))


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "letters, digits"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'auto', 'none', 'required'"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]}, "tools", "Invalid type"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools", "same name"),
    ],
)  # fmt: skip
def test_bad_tools_are_400(server, body, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_tools_on_completions_are_400(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "tools": TOOLS}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
