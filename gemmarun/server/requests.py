"""OpenAI request bodies -> engine requests, checked field by field.

Bodies are parsed by hand rather than by pydantic models so that every mistake gets OpenAI's
error shape, the right status and a message naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..chat import render_prompt
from ..chat.tools import ToolChoice, render_history
from ..errors import InvalidParameterError
from ..generation.engine import Request
from ..generation.sampling import SamplingParams
from .limits import check_text_fits, note_ignored, read_body
from .responses import APIError
from .structured import chat_tools, request_constraint

if TYPE_CHECKING:
    from fastapi import Request as HTTPRequest

MAX_N = 16  # choices per request; each takes a row of the batch
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
MAX_STOP = 16  # stop strings per request


_KINDS = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
}


def _get(body: dict, name: str, kind: str, default=None):
    """body[name] checked against a JSON type; absent or null gives the default."""
    value = body.get(name)
    if value is None:
        return default
    if not _KINDS[kind](value):
        shown = json.dumps(value)
        raise APIError(400, f"'{name}' must be {'an' if kind[0] in 'io' else 'a'} {kind}, got {shown[:60]}", param=name)
    return value


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise APIError(400, f"'{name}' {message}", param=name)


@dataclass
class Parsed:
    """One API request turned into engine requests and response options."""

    prompts: list[list[int]]
    prompt_texts: list[str]  # for echo
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None = no logprobs
    echo: bool = False
    requests: list[Request] = field(default_factory=list)
    tools: ToolChoice | None = None  # the functions a chat reply may call


def _common(body: dict, default_max_tokens: int, tools: ToolChoice | None = None) -> tuple[SamplingParams, int, bool, bool]:
    """Sampling parameters, n, stream and include_usage, shared by both endpoints."""
    max_tokens = _get(body, "max_completion_tokens", "integer")  # chat's newer name
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", "integer", default_max_tokens)
    _check(max_tokens >= 1, "max_tokens", f"must be at least 1, got {max_tokens}")
    temperature = _get(body, "temperature", "number", 1.0)  # OpenAI's default: sampling
    _check(0 <= temperature <= 2, "temperature", f"must be between 0 and 2, got {temperature}")
    top_k = _get(body, "top_k", "integer", 0)
    _check(top_k >= -1, "top_k", f"must be -1 or 0 (off) or positive, got {top_k}")
    n = _get(body, "n", "integer", 1)
    _check(1 <= n <= MAX_N, "n", f"must be between 1 and {MAX_N}, got {n}")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    _check(isinstance(stop, list) and all(isinstance(s, str) and s for s in stop), "stop", "must be a non-empty string or a list of them")
    _check(len(stop) <= MAX_STOP, "stop", f"may hold at most {MAX_STOP} strings")
    stop_ids = body.get("stop_token_ids") or []
    _check(isinstance(stop_ids, list) and all(_KINDS["integer"](i) for i in stop_ids), "stop_token_ids", "must be a list of token ids")
    stream = _get(body, "stream", "boolean", False)
    options = _get(body, "stream_options", "object", {})
    include_usage = _get(options, "include_usage", "boolean", False)
    constraint = request_constraint(body, tools)
    for name in ("logit_bias", "functions", "suffix"):
        _check(not body.get(name), name, "is not supported by gemmarun")
    best_of = _get(body, "best_of", "integer", n)
    _check(best_of == n, "best_of", "other than n is not supported by gemmarun")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=float(temperature),
            top_k=max(top_k, 0),
            top_p=float(_get(body, "top_p", "number", 1.0)),
            min_p=float(_get(body, "min_p", "number", 0.0)),
            repetition_penalty=float(_get(body, "repetition_penalty", "number", 1.0)),
            presence_penalty=float(_get(body, "presence_penalty", "number", 0.0)),
            frequency_penalty=float(_get(body, "frequency_penalty", "number", 0.0)),
            seed=_get(body, "seed", "integer"),
            stop=tuple(stop),
            stop_token_ids=tuple(stop_ids),
            ignore_eos=_get(body, "ignore_eos", "boolean", False),
            constraint=constraint,
        )
    except InvalidParameterError as e:
        field_name = str(e).split()[0]
        raise APIError(400, str(e), param=field_name) from None
    return params, n, stream, include_usage


def _token_prompt(value, vocab: int, name: str = "prompt") -> list[int]:
    _check(all(_KINDS["integer"](i) and 0 <= i < vocab for i in value), name, f"token ids must be in 0..{vocab - 1}")
    _check(len(value) > 0, name, "must not be empty")
    return list(value)


def check_model(body: dict, model_id: str) -> None:
    """A request naming a model must name the one served (OpenAI answers 404 otherwise)."""
    model = _get(body, "model", "string")
    if model is not None and model != model_id:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_id}'", param="model", code="model_not_found")


def parse_completion(body: dict, tokenizer, model_id: str, context: int | None = None) -> Parsed:
    """A /v1/completions body: prompts as text, token ids or lists of either; a text that cannot fit
    `context` is refused from its length, before it is tokenised."""
    check_model(body, model_id)
    _check(not body.get("tools"), "tools", "apply to /v1/chat/completions only")
    note_ignored(body, chat=False, vocab_size=tokenizer.vocab_size)
    params, n, stream, include_usage = _common(body, default_max_tokens=16)  # OpenAI's default
    prompt = body.get("prompt")
    vocab = tokenizer.vocab_size
    for text in [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []:
        if isinstance(text, str):
            check_text_fits(text, tokenizer, context, "prompt")
    if isinstance(prompt, str):
        prompts, texts = [tokenizer.encode(prompt)], [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts, texts = [tokenizer.encode(p) for p in prompt], list(prompt)
    elif isinstance(prompt, list) and prompt and all(_KINDS["integer"](i) for i in prompt):
        prompts = [_token_prompt(prompt, vocab)]
        texts = [tokenizer.decode(prompts[0])]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [_token_prompt(p, vocab) for p in prompt]
        texts = [tokenizer.decode(p) for p in prompts]
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", param="prompt")
    _check(len(prompts) * n <= MAX_N, "n", f"times the number of prompts must be at most {MAX_N}")
    logprobs = _get(body, "logprobs", "integer")
    _check(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs", f"must be between 0 and {MAX_LOGPROBS}")
    echo = _get(body, "echo", "boolean", False)
    parsed = Parsed(prompts, texts, params, n, stream, include_usage, logprobs, echo)
    parsed.requests = [
        Request(p, params, logprobs, prompt_logprobs=echo and logprobs is not None, seed_offset=j) for p in prompts for j in range(n)
    ]
    return parsed


def parse_chat(body: dict, tokenizer, model_id: str, context: int) -> Parsed:
    """A /v1/chat/completions body, its messages rendered as Gemma turns; max_tokens defaults to
    `context`, the engine's tokens per row."""
    check_model(body, model_id)
    note_ignored(body, chat=True, vocab_size=tokenizer.vocab_size)
    tools = chat_tools(body)
    params, n, stream, include_usage = _common(body, default_max_tokens=context, tools=tools)
    messages = body.get("messages")
    _check(isinstance(messages, list) and len(messages) > 0, "messages", "must be a non-empty list of messages")
    try:
        # message text stays text (it cannot forge turns), the tool results and calls included
        rendered = render_prompt(tokenizer, render_history(messages, tools))
    except InvalidParameterError as e:
        raise APIError(400, str(e), param="messages") from None
    check_text_fits(rendered.text, tokenizer, context, "messages")
    want = _get(body, "logprobs", "boolean", False)
    top = _get(body, "top_logprobs", "integer")
    _check(top is None or 0 <= top <= MAX_LOGPROBS, "top_logprobs", f"must be between 0 and {MAX_LOGPROBS}")
    _check(top is None or want, "top_logprobs", "needs 'logprobs': true")
    logprobs = (top or 0) if want else None
    prompt = rendered.encode(tokenizer)
    parsed = Parsed([prompt], [rendered.text], params, n, stream, include_usage, logprobs, tools=tools)
    parsed.requests = [Request(prompt, params, logprobs, seed_offset=j) for j in range(n)]
    return parsed


async def json_body(request: HTTPRequest) -> dict:
    raw = await read_body(request)
    try:
        body = json.loads(raw)
    except RecursionError:  # JSON nested thousands of levels deep
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:  # a lone surrogate (\ud800) parses but can be neither tokenised nor echoed back as UTF-8
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, "the request body contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text", code="invalid_json"
        ) from None
    return body
