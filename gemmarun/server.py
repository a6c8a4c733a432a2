"""OpenAI-compatible HTTP API over the engine: /v1/models, /v1/completions, /v1/chat/completions, /health.

Bodies are parsed by hand rather than by pydantic models so that every mistake gets OpenAI's
error shape, the right status and a message naming the field.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import render_messages
from .errors import ContextLengthError, InvalidParameterError
from .generation.engine import Engine, EngineBusyError, EngineClosedError, Event, Handle, Request, TokenLogprob
from .generation.sampling import SamplingParams

MAX_N = 16  # choices per request; each takes a row of the batch
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
MAX_STOP = 16  # stop strings per request


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_id_for(source: str) -> str:
    """The short name served: a checkpoint folder's name or a .gguf file's stem."""
    path = Path(source)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


# -- request parsing ---------------------------------------------------------------------------

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


def _common(body: dict, default_max_tokens: int) -> tuple[SamplingParams, int, bool, bool]:
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
    _check(isinstance(stop, list) and all(isinstance(s, str) and s for s in stop), "stop",
           "must be a non-empty string or a list of them")  # fmt: skip
    _check(len(stop) <= MAX_STOP, "stop", f"may hold at most {MAX_STOP} strings")
    stop_ids = body.get("stop_token_ids") or []
    _check(isinstance(stop_ids, list) and all(_KINDS["integer"](i) for i in stop_ids), "stop_token_ids",
           "must be a list of token ids")  # fmt: skip
    stream = _get(body, "stream", "boolean", False)
    options = _get(body, "stream_options", "object", {})
    include_usage = _get(options, "include_usage", "boolean", False)
    fmt = _get(body, "response_format", "object", {"type": "text"})
    _check(fmt.get("type") == "text", "response_format",
           "type json_object/json_schema is not supported by gemmarun yet; use 'text'")  # fmt: skip
    for name in ("logit_bias", "tools", "functions", "suffix"):
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
        )
    except InvalidParameterError as e:
        field_name = str(e).split()[0]
        raise APIError(400, str(e), param=field_name) from None
    return params, n, stream, include_usage


def _token_prompt(value, vocab: int, name: str = "prompt") -> list[int]:
    _check(all(_KINDS["integer"](i) and 0 <= i < vocab for i in value), name, f"token ids must be in 0..{vocab - 1}")
    _check(len(value) > 0, name, "must not be empty")
    return list(value)


class Server:
    """The FastAPI app and what its handlers share: the engine, the tokenizer, the model id."""

    def __init__(self, lm, engine: Engine, model_id: str | None = None, api_key: str | None = None):
        self.lm, self.engine, self.tokenizer = lm, engine, lm.tokenizer
        self.model_id = model_id or model_id_for(lm.source)
        self.api_key = api_key
        self.created = int(time.time())
        self.app = self._build_app()

    # -- parsing -------------------------------------------------------------------------------

    def _check_model(self, body: dict) -> None:
        model = _get(body, "model", "string")
        if model is not None and model != self.model_id:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")  # fmt: skip

    def parse_completion(self, body: dict) -> Parsed:
        self._check_model(body)
        params, n, stream, include_usage = _common(body, default_max_tokens=16)  # OpenAI's default
        prompt = body.get("prompt")
        vocab = self.tokenizer.vocab_size
        if isinstance(prompt, str):
            prompts, texts = [self.tokenizer.encode(prompt)], [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts, texts = [self.tokenizer.encode(p) for p in prompt], list(prompt)
        elif isinstance(prompt, list) and prompt and all(_KINDS["integer"](i) for i in prompt):
            prompts = [_token_prompt(prompt, vocab)]
            texts = [self.tokenizer.decode(prompts[0])]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = [_token_prompt(p, vocab) for p in prompt]
            texts = [self.tokenizer.decode(p) for p in prompts]
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "such lists", param="prompt")  # fmt: skip
        _check(len(prompts) * n <= MAX_N, "n", f"times the number of prompts must be at most {MAX_N}")
        logprobs = _get(body, "logprobs", "integer")
        _check(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        echo = _get(body, "echo", "boolean", False)
        parsed = Parsed(prompts, texts, params, n, stream, include_usage, logprobs, echo)
        parsed.requests = [
            Request(p, params, logprobs, prompt_logprobs=echo and logprobs is not None, seed_offset=j)
            for p in prompts for j in range(n)
        ]  # fmt: skip
        return parsed

    def parse_chat(self, body: dict) -> Parsed:
        self._check_model(body)
        params, n, stream, include_usage = _common(body, default_max_tokens=self.engine.context)
        messages = body.get("messages")
        _check(isinstance(messages, list) and len(messages) > 0, "messages", "must be a non-empty list of messages")
        try:
            text = render_messages(self.tokenizer, messages)
        except InvalidParameterError as e:
            raise APIError(400, str(e), param="messages") from None
        want = _get(body, "logprobs", "boolean", False)
        top = _get(body, "top_logprobs", "integer")
        _check(top is None or 0 <= top <= MAX_LOGPROBS, "top_logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        _check(top is None or want, "top_logprobs", "needs 'logprobs': true")
        logprobs = (top or 0) if want else None
        prompt = self.tokenizer.encode(text)
        parsed = Parsed([prompt], [text], params, n, stream, include_usage, logprobs)
        parsed.requests = [Request(prompt, params, logprobs, seed_offset=j) for j in range(n)]
        return parsed

    # -- running -------------------------------------------------------------------------------

    def submit(self, parsed: Parsed, loop: asyncio.AbstractEventLoop, chat: bool) -> tuple[list[Handle], asyncio.Queue]:
        events: asyncio.Queue = asyncio.Queue()
        # Choice index by request object: known before submitting, as the engine may report at once.
        index = {id(r): i for i, r in enumerate(parsed.requests)}

        def sink(handle: Handle, event: Event) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (index[id(handle.request)], handle, event))

        try:
            handles = self.engine.submit_all(parsed.requests, sink)
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded") from None
        except InvalidParameterError as e:
            raise APIError(400, str(e)) from None
        except EngineBusyError as e:
            raise APIError(503, str(e), type="server_error", code="server_overloaded", headers={"Retry-After": "1"}) from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="server_shutting_down") from None
        return handles, events

    # -- logprob formats -----------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_bytes(self, token_id: int) -> list[int]:
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", self.tokenizer.id_to_piece(token_id))
        return [int(byte.group(1), 16)] if byte else list(self._token_text(token_id).encode("utf-8"))

    def completion_logprobs(self, items: list[TokenLogprob], offset: int, first_token: int | None = None) -> tuple[dict, int]:
        """OpenAI's legacy completions shape. With echo, `first_token` is the prompt's first token,
        which has nothing before it to be scored against (its logprob is null, as in OpenAI's)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        rows = ([(first_token, None, None)] if first_token is not None else []) + [
            (t.token_id, t.logprob, {self._token_text(i): lp for i, lp in t.top} if t.top else None) for t in items
        ]
        for token_id, logprob, top in rows:
            out["tokens"].append(self._token_text(token_id))
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            # Offsets index the returned text, where special tokens (<bos>, <end_of_turn>) do not show.
            offset += len(self.tokenizer.decode([token_id]))
        return out, offset

    def _echo_logprobs(self, parsed: Parsed, i: int, first: Event, lps: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """Completion logprobs of choice i's first event: the scored prompt first when echoing."""
        if not parsed.echo:
            return self.completion_logprobs(lps, offset)
        prompt_items = [t for t in (first.prompt_logprobs or []) if t is not None]
        return self.completion_logprobs(prompt_items + lps, offset, first_token=parsed.prompts[i // parsed.n][0])

    def chat_logprobs(self, items: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self._token_text(token_id), "logprob": logprob, "bytes": self._token_bytes(token_id)}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in items]}  # fmt: skip

    # -- the app -------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="gemmarun", version=_version(), docs_url=None, redoc_url=None)
        server = self

        @app.exception_handler(APIError)
        async def api_error(request, exc: APIError):
            return exc.response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

        # A dependency rather than an HTTP middleware: Starlette's BaseHTTPMiddleware wraps the
        # request's receive channel, and a non-streaming handler then never sees the client leave.
        async def require_key(request: HTTPRequest):
            if server.api_key and request.headers.get("authorization", "") != f"Bearer {server.api_key}":
                raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")  # fmt: skip

        v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

        @app.get("/health")
        async def health():
            if not server.engine.healthy:
                return JSONResponse({"status": "error", "error": str(server.engine.error or "engine stopped")}, 503)
            return {"status": "ok", "model": server.model_id, **server.engine.stats()}

        @v1.get("/models")
        async def models():
            return {"object": "list", "data": [server.model_card()]}

        @v1.get("/models/{model_id:path}")
        async def model(model_id: str):
            if model_id != server.model_id:
                raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
            return server.model_card()

        @v1.post("/completions")
        async def completions(request: HTTPRequest):
            parsed = server.parse_completion(await _json_body(request))
            return await server.respond(request, parsed, chat=False)

        @v1.post("/chat/completions")
        async def chat_completions(request: HTTPRequest):
            parsed = server.parse_chat(await _json_body(request))
            return await server.respond(request, parsed, chat=True)

        app.include_router(v1)
        return app

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "gemmarun",
                "context_length": self.engine.context}  # fmt: skip

    async def respond(self, request: HTTPRequest, parsed: Parsed, chat: bool):
        loop = asyncio.get_running_loop()
        handles, events = self.submit(parsed, loop, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if parsed.stream:
            body = self._stream(request, parsed, handles, events, rid, chat)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            finals = await self._collect(request, handles, events)
        finally:
            for h in handles:  # a no-op for finished ones; frees the rows of a client that left
                h.cancel()
        if finals is None:  # the client disconnected; nobody reads an answer
            return JSONResponse({}, status_code=499)
        return JSONResponse(self._full_response(parsed, handles, finals, rid, chat))

    async def _collect(self, request: HTTPRequest, handles: list[Handle], events: asyncio.Queue):
        """Every choice's events; None if the client went away first."""
        per_choice: dict[int, list[Event]] = {i: [] for i in range(len(handles))}
        remaining = len(handles)
        loop = asyncio.get_running_loop()
        check_at = loop.time() + 0.25
        while remaining:
            try:
                item = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                item = None
            if loop.time() >= check_at:  # events may never pause, so look on a clock
                if await request.is_disconnected():
                    return None
                check_at = loop.time() + 0.25
            if item is None:
                continue
            i, _, event = item
            if event.error is not None:
                raise _engine_failure(event.error)
            per_choice[i].append(event)
            remaining -= event.last
        return per_choice

    def _full_response(self, parsed: Parsed, handles: list[Handle], finals: dict[int, list[Event]], rid: str,
                       chat: bool) -> dict:  # fmt: skip
        choices, completion_tokens = [], 0
        for i, evs in finals.items():
            result = evs[-1].result
            completion_tokens += result.completion_tokens
            lps = [lp for e in evs for lp in self._visible_logprobs(e, handles[i])]
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": result.text},
                          "logprobs": self.chat_logprobs(lps) if parsed.logprobs is not None else None,
                          "finish_reason": result.finish_reason}  # fmt: skip
            else:
                prompt_text = parsed.prompt_texts[i // parsed.n]
                text = (prompt_text if parsed.echo else "") + result.text
                logprobs = self._echo_logprobs(parsed, i, evs[0], lps, 0)[0] if parsed.logprobs is not None else None
                choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason}
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in parsed.prompts)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},  # fmt: skip
        }

    @staticmethod
    def _visible_logprobs(event: Event, handle: Handle) -> list[TokenLogprob]:
        """The event's token logprob, unless it is the final stop token, which shows no text."""
        lp = event.logprob
        if lp is None or (event.finish_reason == "stop" and lp.token_id in handle.seq.stop_ids):
            return []
        return [lp]

    async def _stream(self, request, parsed: Parsed, handles: list[Handle], events: asyncio.Queue, rid: str, chat: bool):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        offsets = [0] * len(handles)
        started = [False] * len(handles)
        try:
            for i in range(len(handles)):
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])  # fmt: skip
            remaining, completion_tokens = len(handles), 0
            while remaining:
                i, handle, event = await events.get()
                if event.error is not None:
                    yield f"data: {json.dumps(_engine_failure(event.error).body())}\n\n"
                    return
                remaining -= event.last
                if event.finish_reason == "cancelled":
                    continue
                lps = self._visible_logprobs(event, handle)
                first, started[i] = not started[i], True
                text = event.text
                if first and parsed.echo:
                    text = parsed.prompt_texts[i // parsed.n] + text
                if not text and not lps and not event.last:
                    continue
                finish = event.result.finish_reason if event.result is not None else None
                if event.last:
                    completion_tokens += event.result.completion_tokens
                if chat:
                    delta = {"content": text} if text else {}
                    logprobs = self.chat_logprobs(lps) if parsed.logprobs is not None else None
                    yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
                else:
                    logprobs = None
                    if parsed.logprobs is not None:
                        if first:
                            logprobs, offsets[i] = self._echo_logprobs(parsed, i, event, lps, 0)
                        else:
                            logprobs, offsets[i] = self.completion_logprobs(lps, offsets[i])
                    yield chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}])
            if parsed.include_usage:
                prompt_tokens = sum(len(p) for p in parsed.prompts)
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens})  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:
            # Also reached when the client disconnects mid-stream: free the rows at once.
            for h in handles:
                h.cancel()


def _engine_failure(error: Exception) -> APIError:
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), type="server_error", code="server_shutting_down")
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


async def _json_body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _version() -> str:
    from . import __version__

    return __version__


SERVE_CONTEXT = 8192  # default tokens per row: the KV cache holds max_batch of them


def serve(lm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
          max_waiting: int = 64, model_id: str | None = None, context: int | None = None,
          log_level: str = "info") -> None:  # fmt: skip
    """Run the server until interrupted. `context` defaults to the model's, capped at 8192."""
    import uvicorn

    with Engine(lm, max_batch=max_batch, max_waiting=max_waiting, context=context or min(lm.context, SERVE_CONTEXT)) as engine:
        server = Server(lm, engine, model_id, api_key)
        uvicorn.run(server.app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """uvicorn in a thread on a socket bound up front (port 0 picks a free one), for tests,
    notebooks and the load script: `with BackgroundServer(app) as s: ... s.url ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
