"""The HTTP routes over the engine: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics,
the chat page at / (static files from ./static); `serve`."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import kernels
from ..batch.store import NotFound
from ..errors import ContextLengthError, InvalidParameterError
from ..generation.engine import Engine, EngineBusyError, EngineClosedError, Event, Handle
from .batch_routes import BatchService, batch_router
from .metrics import Metrics, RequestCounter
from .requests import Parsed, json_body, parse_chat, parse_completion
from .responses import APIError, ResponseWriter, engine_failure
from .structured import warm_token_table

STATIC = Path(__file__).parent / "static"
# The page loads only its own files and talks only to this server; model text can never run as script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate, so a new version's page is not mixed with old scripts
}


def model_id_for(source: str) -> str:
    """The short name served: a checkpoint folder's name or a .gguf file's stem."""
    path = Path(source)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


class Server:
    """The FastAPI app and what its handlers share: the engine, the tokenizer, the model id."""

    def __init__(self, lm, engine: Engine, model_id: str | None = None, api_key: str | None = None,
                 metrics_key: str | None = None, data_dir=None):  # fmt: skip
        self.lm, self.engine, self.tokenizer = lm, engine, lm.tokenizer
        self.model_id = model_id or model_id_for(lm.source)
        if api_key is not None and not api_key.strip():
            raise InvalidParameterError("the API key is empty: every request would pass; give a key or none")
        self.api_key = api_key
        self.metrics_key = metrics_key  # /metrics asks for this key when given, else for api_key
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.writer = ResponseWriter(self.tokenizer, self.model_id)
        self.batches = BatchService(self, data_dir)  # /v1/files and /v1/batches; state under data_dir
        self.app = self._build_app()
        warm_token_table(lm)  # for response_format and tools

    def close(self) -> None:
        """Stop the Batch API's worker (its batches resume when a server starts on the same data_dir)."""
        self.batches.close()

    # -- running -------------------------------------------------------------------------------

    def submit(self, parsed: Parsed, loop: asyncio.AbstractEventLoop, chat: bool) -> tuple[list[Handle], asyncio.Queue]:
        events: asyncio.Queue = asyncio.Queue()
        # Choice index by request object: known before submitting, as the engine may report at once.
        index = {id(r): i for i, r in enumerate(parsed.requests)}
        observe = self.metrics.observer()

        def sink(handle: Handle, event: Event) -> None:  # on the engine's thread
            observe(index[id(handle.request)], handle, event)
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

    # -- the app -------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="gemmarun", version=_version(), docs_url=None, redoc_url=None)
        server = self

        @app.exception_handler(APIError)
        async def api_error(request, exc: APIError):
            return exc.response()

        @app.exception_handler(NotFound)
        async def not_found(request, exc: NotFound):  # a File or Batch object the store does not hold
            return APIError(404, str(exc), code="not_found").response()

        @app.exception_handler(Exception)
        async def internal_error(request, exc: Exception):  # a fault of ours: still OpenAI's shape (and logged by uvicorn)
            return APIError(500, f"internal error: {type(exc).__name__}: {exc}"[:300], type="server_error").response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

        # A dependency rather than an HTTP middleware: Starlette's BaseHTTPMiddleware wraps the
        # request's receive channel, and a non-streaming handler then never sees the client leave.
        async def require_key(request: HTTPRequest):
            if server.api_key and request.headers.get("authorization", "") != f"Bearer {server.api_key}":
                raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

        v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

        async def require_metrics_key(request: HTTPRequest):
            key = server.metrics_key or server.api_key
            if key and request.headers.get("authorization", "") != f"Bearer {key}":
                raise APIError(401, "Incorrect or missing metrics key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

        @app.get("/metrics", dependencies=[Depends(require_metrics_key)], include_in_schema=False)
        async def metrics():
            body, content_type = server.metrics.render()
            return Response(body, media_type=content_type)

        @app.get("/health")
        async def health():
            if not server.engine.healthy:
                return JSONResponse({"status": "error", "error": str(server.engine.error or "engine stopped")}, 503)
            # kernels_building: the first request waits while these compile (once per machine and version)
            return {"status": "ok", "model": server.model_id, **server.engine.stats(), "kernels_building": kernels.status()["building"]}

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
            body = await json_body(request)  # tokenising happens off the event loop: /health and streams keep moving
            parsed = await asyncio.to_thread(parse_completion, body, server.tokenizer, server.model_id, server.engine.context)
            return await server.respond(request, parsed, chat=False)

        @v1.post("/chat/completions")
        async def chat_completions(request: HTTPRequest):
            body = await json_body(request)
            parsed = await asyncio.to_thread(parse_chat, body, server.tokenizer, server.model_id, server.engine.context)
            return await server.respond(request, parsed, chat=True)

        # The chat page: open like /health (it asks for the API key itself and sends it to /v1).
        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

        v1.include_router(batch_router(server.batches))
        app.include_router(v1)
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        app.add_middleware(RequestCounter, metrics=self.metrics)
        return app

    def model_card(self) -> dict:
        """OpenAI's model object plus what the chat page needs: tokens per row, and whether the
        checkpoint ships a chat template (instruction-tuned models do; pretrained ones often not)."""
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "gemmarun",
                "context_length": self.engine.context,
                "chat_template": bool(getattr(self.tokenizer, "chat_template", None))}  # fmt: skip

    async def respond(self, request: HTTPRequest, parsed: Parsed, chat: bool):
        loop = asyncio.get_running_loop()
        handles, events = self.submit(parsed, loop, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if parsed.stream:
            body = self.writer.stream(parsed, handles, events, rid, chat)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finals = await self._collect(request, handles, events)
        finally:
            for h in handles:  # a no-op for finished ones; frees the rows of a client that left
                h.cancel()
        if finals is None:  # the client disconnected; nobody reads an answer
            return JSONResponse({}, status_code=499)
        return JSONResponse(self.writer.full_response(parsed, handles, finals, rid, chat))

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
                raise engine_failure(event.error)
            per_choice[i].append(event)
            remaining -= event.last
        return per_choice


def _version() -> str:
    from .. import __version__

    return __version__


SERVE_CONTEXT = 8192  # default tokens per row: the KV cache holds max_batch of them
SERVE_PREFIX_CACHE_MB = 1024  # default prefix-cache memory: a few long conversations of the 2B (README)


def serve(lm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
          max_waiting: int = 64, model_id: str | None = None, context: int | None = None,
          log_level: str = "info", prefix_cache_mb: float = SERVE_PREFIX_CACHE_MB,
          metrics_key: str | None = None, data_dir=None, shutdown_timeout: float = 15.0) -> None:  # fmt: skip
    """Run the server until interrupted. `context` defaults to the model's, capped at 8192; the Batch
    API keeps its files and batches under `data_dir` (a temporary folder if None). On SIGTERM or
    Ctrl-C, running requests get `shutdown_timeout` seconds to finish, then end with an error event."""
    from .shutdown import run

    if not (isinstance(shutdown_timeout, (int, float)) and 0 <= shutdown_timeout <= 3600):
        raise InvalidParameterError(f"shutdown_timeout must be from 0 to 3600 seconds, got {shutdown_timeout!r}")

    context = context or min(lm.context, SERVE_CONTEXT)
    with Engine(lm, max_batch=max_batch, max_waiting=max_waiting, context=context, prefix_cache_mb=prefix_cache_mb) as engine:
        server = Server(lm, engine, model_id, api_key, metrics_key, data_dir)
        try:
            run(server.app, engine, host, port, shutdown_timeout, log_level)
        finally:
            server.close()
