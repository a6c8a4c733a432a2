"""OpenAI batch-format lines: reading them, and running them through an engine into output lines.

An input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body"}`; its output line is OpenAI's `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`. A body the endpoint refuses is a response with its 4xx status and OpenAI's error
body, exactly what the server would answer; a line that names no endpoint gemmarun serves has
`response: null` and an `error`. The same code serves `gemmarun batch`, its Ray Data workers and the
server's Batch API.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ContextLengthError, GemmarunError, InvalidParameterError
from ..generation.engine import Engine, EngineBusyError, EngineClosedError, Event, Handle
from ..server.requests import Parsed, parse_chat, parse_completion
from ..server.responses import APIError, ResponseWriter, engine_failure

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class BatchInputError(GemmarunError, ValueError):
    """An input file that is not OpenAI batch-format JSON lines."""


class _Unserved(Exception):
    """A line for a method or url gemmarun does not serve: answered with `error`, not a response."""


@dataclass(frozen=True)
class Line:
    custom_id: str
    method: str
    url: str
    body: object  # a JSON object when well formed; anything else is answered as a 400 line


def parse_line(text: str, number: int) -> Line:
    """One input line (1-based `number` for messages); only what makes a line unanswerable raises."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise BatchInputError(f"line {number}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise BatchInputError(f"line {number}: must be a JSON object with custom_id, method, url and body")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchInputError(f"line {number}: 'custom_id' must be a non-empty string")
    return Line(custom_id, str(obj.get("method", "")), str(obj.get("url", "")), obj.get("body"))


def parse_lines(text: str, endpoint: str | None = None) -> list[Line]:
    """Every non-blank line; custom_ids unique; with `endpoint`, every url must be it (the Batch API's rule)."""
    lines, seen = [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = parse_line(raw, number)
        if line.custom_id in seen:
            raise BatchInputError(f"line {number}: custom_id {line.custom_id!r} is used twice; each line needs its own")
        if endpoint is not None and line.url != endpoint:
            raise BatchInputError(f"line {number}: url {line.url!r} differs from the batch's endpoint {endpoint!r}")
        seen.add(line.custom_id)
        lines.append(line)
    if not lines:
        raise BatchInputError("the input holds no request lines")
    return lines


def read_lines(path: str | Path) -> list[Line]:
    try:
        return parse_lines(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise BatchInputError(f"cannot read {path}: {e}") from None


def finished_ids(path: Path) -> set[str]:
    """custom_ids already in an output file. A last line cut short (the job was killed mid-write) is
    dropped from the file, so the resumed job rewrites it whole."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    done = set()
    for raw in data[:keep].decode("utf-8").splitlines():
        if raw.strip():
            done.add(json.loads(raw)["custom_id"])
    return done


def _digest(custom_id: str) -> str:
    # Ids derived from the custom_id, so an interrupted and resumed job writes the same lines.
    return hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:32]


def output_line(line: Line, status: int | None, body: dict | None, error: dict | None = None) -> dict:
    digest = _digest(line.custom_id)
    response = None if status is None else {"status_code": status, "request_id": f"req_{digest}", "body": body}
    return {"id": f"batch_req_{digest}", "custom_id": line.custom_id, "response": response, "error": error}


def line_failed(out: dict) -> bool:
    return out["error"] is not None or out["response"]["status_code"] != 200


@dataclass
class _Job:
    """One line in flight: its parsed request, handles and the events of each choice."""

    line: Line
    parsed: Parsed | None = None
    handles: list[Handle] = field(default_factory=list)
    finals: dict[int, list[Event]] = field(default_factory=dict)
    remaining: int = 0
    out: dict | None = None  # set once answered


class LineRunner:
    """Runs lines through an engine, at most `window` engine requests in flight (a server leaves the
    other rows to live traffic), each at `priority`; outputs come back in input order."""

    def __init__(self, engine: Engine, tokenizer, model_id: str, priority: int = 0, window: int | None = None):
        self.engine, self.tokenizer, self.model_id = engine, tokenizer, model_id
        self.writer = ResponseWriter(tokenizer, model_id)
        self.priority = priority
        self.window = max(1, window or engine.max_batch + engine.max_waiting)

    def _parse(self, line: Line) -> tuple[Parsed, bool]:
        if line.method.upper() != "POST" or line.url not in ENDPOINTS:
            raise _Unserved(f"{line.method} {line.url} is not served; use POST and one of {', '.join(ENDPOINTS)}")
        body = line.body
        if not isinstance(body, dict):
            raise APIError(400, "the line's 'body' must be a JSON object", code="invalid_json")
        chat = line.url == "/v1/chat/completions"
        if body.get("stream"):
            raise APIError(400, "'stream' is not available in a batch", param="stream")
        if chat:
            parsed = parse_chat(body, self.tokenizer, self.model_id, self.engine.context)
        else:
            parsed = parse_completion(body, self.tokenizer, self.model_id)
        parsed.requests = [_with_priority(r, self.priority) for r in parsed.requests]
        return parsed, chat

    def run(self, lines: Iterable[Line], emit: Callable[[dict], None], stop: threading.Event | None = None) -> bool:
        """emit(output line) for each line, in input order. Returns False if `stop` was set first: lines
        still running are cancelled and not emitted (a resumed run does them again). An engine that
        shuts down raises EngineClosedError the same way, leaving its lines undone."""
        stop = stop or threading.Event()
        events: queue.Queue = queue.Queue()
        order: deque[_Job] = deque()  # jobs not yet emitted, in input order
        by_handle: dict[int, tuple[_Job, int]] = {}
        in_flight = 0

        def sink(handle: Handle, event: Event) -> None:  # on the engine's thread
            events.put((handle, event))

        def settle(block: bool) -> None:
            nonlocal in_flight
            try:
                handle, event = events.get(timeout=0.1) if block else events.get_nowait()
            except queue.Empty:
                return
            job, i = by_handle[handle.id]
            job.finals[i].append(event)
            if not event.last:
                return
            in_flight -= 1
            job.remaining -= 1
            del by_handle[handle.id]
            if isinstance(event.error, EngineClosedError):  # not the line's fault: it stays undone
                raise event.error
            if event.error is not None and job.out is None:
                err = engine_failure(event.error)
                job.out = output_line(job.line, err.status, err.body())
                for h in job.handles:
                    h.cancel()
            if job.remaining == 0 and job.out is None:
                chat = job.line.url == "/v1/chat/completions"
                rid = ("chatcmpl-" if chat else "cmpl-") + _digest(job.line.custom_id)
                job.out = output_line(job.line, 200, self.writer.full_response(job.parsed, job.handles, job.finals, rid, chat))

        def flush() -> None:
            while order and order[0].out is not None and order[0].remaining == 0:
                emit(order.popleft().out)

        try:
            for line in lines:
                job = _Job(line)
                order.append(job)
                try:
                    job.parsed, chat = self._parse(line)
                    n = len(job.parsed.requests)
                    while in_flight and in_flight + n > self.window and not stop.is_set():
                        settle(block=True)
                        flush()
                    if stop.is_set():
                        return False
                    job.handles = self.engine.submit_all(job.parsed.requests, sink, block=True)
                    job.finals = {i: [] for i in range(n)}
                    job.remaining = n
                    by_handle.update({h.id: (job, i) for i, h in enumerate(job.handles)})
                    in_flight += n
                except APIError as e:
                    job.out = output_line(line, e.status, e.body())
                except (ContextLengthError, InvalidParameterError) as e:
                    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
                    job.out = output_line(line, 400, APIError(400, str(e), code=code).body())
                except EngineBusyError as e:  # more choices than the engine holds at once
                    job.out = output_line(line, 400, APIError(400, str(e), param="n").body())
                except _Unserved as e:
                    job.out = output_line(line, None, None, {"code": "invalid_url", "message": str(e)})
                while not events.empty():
                    settle(block=False)
                flush()
            while order and not stop.is_set():
                settle(block=True)
                flush()
            return not order
        finally:
            for job, _ in list(by_handle.values()):  # stopped or failed: free the rows
                for h in job.handles:
                    h.cancel()


def _with_priority(request, priority: int):
    return request if request.priority == priority else replace(request, priority=priority)
