"""Tool calls for a model without tool tokens: the tools rendered into the prompt in the JSON style
Google documents for Gemma function calling, the reply constrained by a grammar so that a call is
valid JSON matching the function's parameter schema, and the reply read back as OpenAI tool calls.

A call is written as Google's prompt asks, `{"name": function name, "parameters": {...}}`; several
calls (parallel_tool_calls) as a JSON list of them. tool_choice "auto" allows plain text or a call
(text may not start with white space, "{" or "["), "required" a call to any tool, a named function a call to that
one, "none" no call. The conversation goes back into the prompt in Gemma's turns: an assistant
message's tool_calls as the call JSON it wrote, a `tool` message as a user turn holding a
```tool_output block (the wrapping Google's Gemma 3 examples use), consecutive turns merged.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import InvalidParameterError
from ..generation.constraints import _JSON_OPTIONS, Constraint

PREAMBLE = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n'
    "You SHOULD NOT include any other text in the response if you call a function\n"
)
PARALLEL = "To call several functions at once, put the calls in a JSON list: [call1, call2].\n"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto", "required" or "none"
    tools: tuple[Tool, ...]  # those the prompt shows (the reply may call one named function only)
    parallel: bool = True
    named: str | None = None  # tool_choice's function

    @property
    def calls(self) -> bool:
        """Whether the reply may call a tool ("none" shows the tools and calls none)."""
        return self.mode != "none"


def parse_tools(tools, tool_choice, parallel) -> ToolChoice | None:
    """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, checked; None without tools.
    Raises InvalidParameterError naming the field."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise InvalidParameterError("tool_choice needs 'tools'")
        return None
    if not isinstance(tools, list) or not tools:
        raise InvalidParameterError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    parsed = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _NAME.fullmatch(f["name"]):
            raise InvalidParameterError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}} with a name of "
                                        "letters, digits, '_' or '-' (at most 64)")  # fmt: skip
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidParameterError(f"tools[{i}].function.parameters must be a JSON schema object")
        Constraint.json_schema(params).check()  # the library's reason for a bad schema
        parsed.append(Tool(f["name"], str(f.get("description") or ""), params))
    if len({t.name for t in parsed}) != len(parsed):
        raise InvalidParameterError("tools has two functions of the same name")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidParameterError("parallel_tool_calls must be a boolean")
    parallel = True if parallel is None else parallel
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("auto", "required", "none"):
        return ToolChoice(choice, tuple(parsed), parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise InvalidParameterError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
    if name not in {t.name for t in parsed}:
        raise InvalidParameterError(f"tool_choice names {name!r}, which is not among the tools")
    return ToolChoice("required", tuple(parsed), parallel, named=name)


def preamble(choice: ToolChoice) -> str:
    """The instructions and function definitions that open the conversation."""
    defs = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in choice.tools]
    return PREAMBLE + (PARALLEL if choice.parallel else "") + json.dumps(defs, indent=2)


def constraint(choice: ToolChoice) -> Constraint:
    """The grammar of the reply: one call (or a list of them), or, for auto, plain text instead."""
    call = {
        "anyOf": [
            {"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.parameters},
             "required": ["name", "parameters"], "additionalProperties": False}
            for t in choice.tools
            if choice.named in (None, t.name)
        ]
    }  # fmt: skip
    schema = {"anyOf": [call, {"type": "array", "items": call, "minItems": 1}]} if choice.parallel else call
    if choice.mode == "required":
        return Constraint.json_schema(schema)
    schema["x-guidance"] = _JSON_OPTIONS  # a %json block in Lark takes no defaults from the JSON path
    return Constraint.lark(f"start: TEXT | call\ncall: %json {json.dumps(schema)}\nTEXT: /[^\\s{{\\[][\\s\\S]*/")


def render_history(messages: list, choice: ToolChoice | None) -> list:
    """OpenAI messages with tools -> plain user/assistant/system messages for Gemma's turns."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)  # the turn checks report it
            continue
        role, content = m.get("role"), m.get("content")
        if role == "tool":
            role, content = "user", f"```tool_output\n{_text(content, i)}\n```"
        elif role == "assistant" and m.get("tool_calls"):
            calls = [_call_json(c, i) for c in m["tool_calls"]]
            written = calls[0] if len(calls) == 1 else "[" + ", ".join(calls) + "]"
            content = (_text(content, i) + "\n" if content else "") + written
        if out and isinstance(out[-1], dict) and out[-1]["role"] == role and role in ("user", "assistant"):
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + _text(content, i)}
        else:
            out.append({"role": role, "content": content})
    if choice is not None:
        if out and isinstance(out[0], dict) and out[0].get("role") == "system":
            out[0] = {"role": "system", "content": preamble(choice) + "\n\n" + _text(out[0]["content"], 0)}
        else:
            out.insert(0, {"role": "system", "content": preamble(choice)})
    return out


def _text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidParameterError(f"message {i}: 'content' must be a string or a list of text parts")


def _call_json(call, i: int) -> str:
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise InvalidParameterError(f"message {i}: each tool_calls entry needs function.name and function.arguments")
    try:
        args = json.loads(f.get("arguments") or "{}")
    except ValueError:
        raise InvalidParameterError(f"message {i}: tool call arguments must be JSON text") from None
    return json.dumps({"name": f["name"], "parameters": args})


class CallReader:
    """Reads a reply as it streams: plain text, or calls whose name and argument text come out as
    soon as they are written. feed() returns (content text, OpenAI tool_calls deltas)."""

    # a call's head, up to the parameters object's opening brace
    _HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*(?=\{)')

    def __init__(self):
        self.text = ""
        self.calling: bool | None = None  # undecided until the first character that is not a space
        self.calls: list[dict] = []  # {"id", "type", "function": {"name", "arguments"}}, complete or not
        self.complete = 0  # calls whose closing brace has been read
        self._depth, self._string, self._escape = 0, False, False
        self._base = 0  # depth of a call's opening brace: 0, or 1 inside a list
        self._start: int | None = None  # where the current call's text starts, until its head is read
        self._args: int | None = None  # where its arguments start
        self._end: int | None = None  # where they end, once the parameters object has closed
        self._emitted = 0  # argument characters handed out

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        if self.calling is None:
            head = (self.text + piece).lstrip()
            if not head:
                self.text += piece
                return "", []
            self.calling = head[0] in "{["
            if not self.calling:
                piece, self.text = self.text + piece, ""
        if not self.calling:
            self.text += piece
            return piece, []
        deltas: list[dict] = []
        for c in piece:
            self.text += c
            self._step(c, len(self.text) - 1, deltas)
        self._flush(deltas)
        return "", deltas

    def _step(self, c: str, at: int, deltas: list) -> None:
        if self._string:
            self._escape, self._string = (False, True) if self._escape else (c == "\\", c != '"')
        elif c == '"':
            self._string = True
        elif c in "{[":
            if self._depth == 0 and c == "[":
                self._base = 1
            elif self._depth == self._base and c == "{":  # a new call
                self._flush(deltas)
                self._start, self._args, self._end, self._emitted = at, None, None, 0
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._args is not None and self._end is None and self._depth == self._base + 1:
                self._end = at + 1  # the parameters object closed
            elif self._depth == self._base and self._args is not None:
                self.complete += 1
        if self._start is not None and (m := self._HEAD.match(self.text, self._start)):
            self._start, self._args = None, m.end()
            name = json.loads(m.group(1))
            self.calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": ""}})
            deltas.append({"index": len(self.calls) - 1, **json.loads(json.dumps(self.calls[-1]))})

    def _flush(self, deltas: list) -> None:
        """The current call's argument text written since the last flush, as one delta."""
        if self._args is None:
            return
        upto = self._end if self._end is not None else len(self.text)
        fragment = self.text[self._args + self._emitted : upto]
        if fragment:
            self._emitted += len(fragment)
            self.calls[-1]["function"]["arguments"] += fragment
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})

    def finished_calls(self) -> list[dict]:
        """The calls read through their closing brace."""
        return self.calls[: self.complete]
