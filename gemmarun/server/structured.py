"""Structured output and tools in request bodies: `response_format` on both endpoints, `tools`,
`tool_choice` and `parallel_tool_calls` on chat; each mistake an OpenAI-shaped 400 naming its field,
with the grammar library's reason for a bad schema or grammar.

response_format:
    {"type": "text"}                                   no constraint (the default)
    {"type": "json_object"}                            any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
    {"type": "regex", "regex": "..."}                  gemmarun's extension: a regular expression
    {"type": "grammar", "grammar": "...", "syntax": "lark" | "gbnf"}   gemmarun's extension (lark by default)
"""

from __future__ import annotations

import threading

from ..chat.tools import ToolChoice, parse_tools
from ..chat.tools import constraint as tool_constraint
from ..errors import InvalidParameterError
from ..generation.constraints import Constraint, token_table
from .responses import APIError

FORMATS = ("text", "json_object", "json_schema", "regex", "grammar")


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def response_constraint(fmt) -> Constraint | None:
    """The constraint of a response_format object (None for text), checked by the grammar library."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in FORMATS:
        raise _bad(f"'response_format' must be an object whose 'type' is one of {', '.join(FORMATS)}", "response_format")
    kind = fmt["type"]
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            c = Constraint.json_object()
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise InvalidParameterError("'json_schema' must be an object with a 'name' and a 'schema' object")
            # OpenAI allows the schema to be left out: then any JSON object
            c = Constraint.json_schema(spec["schema"]) if spec.get("schema") else Constraint.json_object()
        elif kind == "regex":
            c = Constraint.regex(_string(fmt, "regex"))
        else:
            syntax = fmt.get("syntax", "lark")
            if syntax not in ("lark", "gbnf"):
                raise InvalidParameterError(f"'syntax' must be 'lark' or 'gbnf', got {str(syntax)[:40]!r}")
            source = _string(fmt, "grammar")
            c = Constraint.lark(source) if syntax == "lark" else Constraint.gbnf(source)
        c.check()
    except InvalidParameterError as e:
        raise _bad(f"response_format: {e}", "response_format") from None
    return c


def _string(fmt: dict, name: str) -> str:
    value = fmt.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParameterError(f"type {fmt['type']!r} needs a non-empty string '{name}'")
    return value


def chat_tools(body: dict) -> ToolChoice | None:
    """The tools of a chat request (None without any), from tools / tool_choice / parallel_tool_calls."""
    try:
        return parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    except InvalidParameterError as e:
        param = "tool_choice" if "tool_choice" in str(e) else "parallel_tool_calls" if "parallel" in str(e) else "tools"
        raise _bad(str(e), param) from None


def request_constraint(body: dict, tools: ToolChoice | None) -> Constraint | None:
    """The one constraint of a request: the tools' grammar, or its response_format's."""
    fmt = response_constraint(body.get("response_format"))
    if tools is None or not tools.calls:
        return fmt
    if fmt is not None:
        raise _bad("'response_format' other than text cannot be combined with tools (unless tool_choice is 'none')", "response_format")
    try:
        c = tool_constraint(tools)
        c.check()
    except InvalidParameterError as e:
        raise _bad(str(e), "tools") from None
    return c


def warm_token_table(lm) -> threading.Thread:
    """Build llguidance's token table on a side thread when the server starts: a few seconds for a
    262k vocabulary, which the first constrained request would otherwise spend on the event loop,
    holding up every stream."""
    thread = threading.Thread(target=token_table, args=(lm.tokenizer, lm.config.vocab_size), name="gemmarun-grammar-table", daemon=True)
    thread.start()
    return thread
