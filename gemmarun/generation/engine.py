"""Continuous batching: one KV cache of N rows and a scheduler thread that decodes them together.

Requests join and leave between steps. Each loop iteration admits waiting requests into free
rows, runs at most one prefill forward of at most `prefill_chunk` padded tokens (the next chunk
of the oldest new prompt, plus those of other new prompts that fit beside it), so running
streams keep moving while a long prompt is read, then one batched decode forward over every row
that has a token to feed, each row at its own position. A row's text events go to its request's
sink as soon as they are sampled.

The engine serves the HTTP server and batch jobs alike:

    with Engine(gemmarun.load(path), max_batch=8) as engine:
        results = engine.generate(["Hello", "Once upon a time"], SamplingParams(max_new_tokens=32))
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .cache import KVCache
from .errors import GemmarunError, InvalidParameterError
from .generate import GenerationResult, Generator, SequenceState
from .sampling import SamplingParams, sample_one


class EngineBusyError(GemmarunError):
    """The waiting queue is full; the server answers 503 and the client should retry later."""


class EngineClosedError(GemmarunError):
    """The engine was shut down before it could finish the request."""


@dataclass(frozen=True)
class Request:
    prompt: list[int]  # token ids, BOS included
    params: SamplingParams
    logprobs: int | None = None  # report each sampled token's logprob and this many alternatives; None = off
    prompt_logprobs: bool = False  # also score the prompt's tokens (completions with echo + logprobs)
    seed_offset: int = 0  # the n choices of one API request draw from seed, seed + 1, ...


@dataclass
class TokenLogprob:
    """log_softmax of the model's own logits (float32, soft-capped), before penalties and temperature."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class Event:
    text: str  # newly visible text (may be empty while a stop string could still be forming)
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the request's last event
    result: GenerationResult | None = None  # on the last event
    error: Exception | None = None  # the engine failed this request; this is its last event
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event when asked (first is None)

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


Sink = Callable[["Handle", Event], None]


class Handle:
    """One submitted request: cancel() it, or (without a custom sink) iterate its events."""

    _ids = itertools.count()

    def __init__(self, engine: "Engine", request: Request, seq: SequenceState, sink: Sink | None):
        self.id = next(self._ids)
        self.engine = engine
        self.request = request
        self.seq = seq
        self._queue: queue.Queue | None = None
        if sink is None:
            self._queue = queue.Queue()
            sink = lambda handle, event: handle._queue.put(event)  # noqa: E731
        self._sink = sink
        self.cancelled = False
        self.finished = False
        self.sink_error: Exception | None = None  # why the sink refused an event, if it did

    def cancel(self) -> None:
        """Stop generating; a running request's row is freed before the next step."""
        self.engine._cancel(self)

    def events(self) -> Iterator[Event]:
        if self._queue is None:
            raise InvalidParameterError("this handle delivers its events to the sink it was given")
        while True:
            event = self._queue.get()
            yield event
            if event.last:
                return

    def result(self) -> GenerationResult:
        for event in self.events():
            if event.error is not None:
                raise event.error
            if event.last:
                return event.result


@dataclass
class _Row:
    """A request occupying one cache row."""

    handle: Handle
    row: int
    order: int  # admission order: the oldest prefill goes first
    prompt_t: torch.Tensor  # the prompt as a tensor, for the penalties
    prefilled: int = 0  # prompt tokens already in the cache
    pending: int | None = None  # sampled token not yet fed to the model
    pos: int = 0  # position `pending` will be written at
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)


class Engine:
    """Owns one KVCache of `max_batch` rows and the thread that schedules requests onto them."""

    def __init__(self, lm, max_batch: int = 8, max_waiting: int = 64, context: int | None = None,
                 prefill_chunk: int = 512):  # fmt: skip
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidParameterError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise InvalidParameterError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        self.model, self.tokenizer = lm.model, lm.tokenizer
        self.context = min(context or lm.context, lm.context)
        # The same checks and per-request state as LanguageModel.generate, against our context.
        self.sequences = Generator(lm.model, lm.tokenizer, self.context, prefill_chunk)
        self.prefill_chunk = prefill_chunk
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.cache = KVCache.for_model(lm.model, max_batch, self.context)
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._closed = False
        self.steps = 0  # decode forwards run
        self.tokens = 0  # tokens sampled
        self.error: Exception | None = None  # set if the loop itself died
        self._thread = threading.Thread(target=self._loop, name="gemmarun-engine", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------------

    def submit(self, request: Request, sink: Sink | None = None, block: bool = False) -> Handle:
        return self.submit_all([request], sink, block)[0]

    def submit_all(self, requests: Sequence[Request], sink: Sink | None = None, block: bool = False) -> list[Handle]:
        """Queue requests together (all or none). Raises EngineBusyError when the queue is full,
        unless block=True, which waits for room instead. `sink(handle, event)` is called on the
        engine's thread (and must not block); without one, iterate handle.events()."""
        for r in requests:
            if r.logprobs is not None and not 0 <= r.logprobs <= 20:
                raise InvalidParameterError(f"logprobs alternatives must be between 0 and 20, got {r.logprobs}")
        # Checks the prompt against the context; errors reach the caller before anything is queued.
        handles = [Handle(self, r, self.sequences.new_sequence(r.prompt, r.params, r.seed_offset), sink) for r in requests]
        n = len(handles)
        # A request that could never fit the queue is refused at once, even when blocking.
        room = self.max_waiting + self.max_batch
        if n > room:
            raise EngineBusyError(f"{n} sequences at once exceed the engine's capacity of {room}")
        with self._cond:
            while True:
                if self._closed:
                    raise EngineClosedError("the engine is shut down")
                # Requests that free rows will take at once do not count against the queue.
                free = sum(r is None for r in self.rows)
                if len(self.waiting) + n <= self.max_waiting + free:
                    break
                if not block:
                    raise EngineBusyError(
                        f"the server is busy ({len(self.waiting)} requests waiting, limit {self.max_waiting}); retry later"
                    )
                self._cond.wait()
            self.waiting.extend(handles)
            self._cond.notify_all()
        return handles

    def generate(self, prompts: Sequence[Sequence[int] | str], params: SamplingParams) -> list[GenerationResult]:
        """A batch job: every prompt decoded with continuous batching, results in prompt order."""
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        handles = [self.submit(Request(p, params), block=True) for p in ids]
        return [h.result() for h in handles]

    def stats(self) -> dict:
        with self._cond:
            return {
                "running": sum(r is not None for r in self.rows),
                "waiting": len(self.waiting),
                "max_batch": self.max_batch,
                "max_waiting": self.max_waiting,
                "steps": self.steps,
                "tokens": self.tokens,
            }

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def close(self) -> None:
        """Stop the thread; requests still queued or running end with EngineClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cancel(self, handle: Handle) -> None:
        with self._cond:
            if handle.finished or handle.cancelled:
                return
            handle.cancelled = True
            if handle in self.waiting:
                self.waiting.remove(handle)
                self._deliver(handle, Event("", finish_reason="cancelled", result=handle.seq.result()))
            self._cond.notify_all()

    # -- the engine's thread -------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self.waiting and not any(self.rows):
                        self._cond.wait()
                    if self._closed:
                        break
                    self._drop_cancelled()
                    self._admit()
                try:
                    with torch.inference_mode():
                        self._step()
                except Exception as e:  # a failed forward ends the running requests, not the server
                    self._fail_running(e)
        except BaseException as e:
            self.error = e
            raise
        finally:
            with self._cond:
                self._closed = True
                gone = EngineClosedError("the engine shut down before finishing this request")
                for h in [*self.waiting, *(r.handle for r in self.rows if r is not None)]:
                    self._deliver(h, Event("", error=gone))
                self.waiting.clear()
                self.rows = [None] * self.max_batch
                self._cond.notify_all()

    def _drop_cancelled(self) -> None:
        for r in self.rows:
            if r is not None and r.handle.cancelled:
                self._free(r, Event("", finish_reason="cancelled", result=r.handle.seq.result()))

    def _admit(self) -> None:
        for i, slot in enumerate(self.rows):  # lowest rows first: the decode batch stays short
            if not self.waiting:
                break
            if slot is None:
                h = self.waiting.popleft()
                self.rows[i] = _Row(h, i, next(self._order), torch.tensor(h.request.prompt, dtype=torch.long))
        self._cond.notify_all()  # room in the queue for blocked submitters

    def _step(self) -> None:
        prefilling = [r for r in self.rows if r is not None and r.prefilled < len(r.handle.request.prompt)]
        if prefilling:
            group = self._prefill_group(prefilling)
            if group[0].handle.request.prompt_logprobs:
                self._prefill_scored(group[0])
            else:
                self._prefill(group)
        decoding = [r for r in self.rows if r is not None and r.pending is not None]
        if decoding:
            self._decode(decoding)

    def _prefill_group(self, prefilling: list[_Row]) -> list[_Row]:
        """The oldest prefilling row, with the others whose next chunks fit in one forward of at
        most prefill_chunk padded tokens: a burst of short prompts is read at once, while a long
        prompt still goes one chunk per step so the running streams keep moving."""
        ordered = sorted(prefilling, key=lambda r: r.order)
        group = ordered[:1]
        if group[0].handle.request.prompt_logprobs:
            return group
        for r in ordered[1:]:
            candidate = group + [r]
            rows = [c.row for c in candidate]
            t = max(min(self.prefill_chunk, len(c.handle.request.prompt) - c.prefilled) for c in candidate)
            if not r.handle.request.prompt_logprobs and (max(rows) - min(rows) + 1) * t <= self.prefill_chunk:
                group = candidate
        return group

    def _prefill(self, group: list[_Row]) -> None:
        """The next chunk of each row's prompt in one right-padded forward over rows [lo, hi);
        rows outside the group idle as padding. A row whose prompt is done samples its first token."""
        model, dev = self.model, self.model.device
        lo, hi = min(r.row for r in group), max(r.row for r in group) + 1
        spans = {r.row: (r.prefilled, min(r.prefilled + self.prefill_chunk, len(r.handle.request.prompt))) for r in group}
        t = max(stop - start for start, stop in spans.values())
        tokens = torch.zeros(hi - lo, t, dtype=torch.long)
        positions = torch.full((hi - lo, t), -1, dtype=torch.long)
        select = torch.zeros(hi - lo, dtype=torch.long)
        for r in group:
            start, stop = spans[r.row]
            tokens[r.row - lo, : stop - start] = torch.tensor(r.handle.request.prompt[start:stop])
            positions[r.row - lo, : stop - start] = torch.arange(start, stop)
            select[r.row - lo] = stop - start - 1
        logits = model(tokens.to(dev), positions.to(dev), self.cache.rows(lo, hi), select=select.to(dev)).cpu()
        for r in group:
            r.prefilled = spans[r.row][1]
            if r.prefilled == len(r.handle.request.prompt):
                r.pos = r.prefilled
                self._sample(r, logits[r.row - lo])

    def _prefill_scored(self, r: _Row) -> None:
        """One chunk of a prompt that is scored too (echo with logprobs), in a forward over its row."""
        model, prompt = self.model, r.handle.request.prompt
        # Scoring needs the logits of every position, (T, V) floats, hence the smaller chunks.
        start, stop = r.prefilled, min(r.prefilled + min(self.prefill_chunk, 64), len(prompt))
        dev = model.device
        tokens = torch.tensor(prompt[start:stop], device=dev)[None]
        positions = torch.arange(start, stop, device=dev)[None]
        logits = model(tokens, positions, self.cache.rows(r.row, r.row + 1))[0].cpu()  # (T, V)
        if start == 0:
            r.prompt_logprobs.append(None)  # the first token has no context to be scored in
        k = r.handle.request.logprobs or 0
        for i in range(stop - start - 1):
            r.prompt_logprobs.append(_logprob(logits[i], prompt[start + i + 1], k))
        if stop < len(prompt):
            r.prompt_logprobs.append(_logprob(logits[-1], prompt[stop], k))
        r.prefilled = stop
        if stop == len(prompt):
            r.pos = len(prompt)
            self._sample(r, logits[-1])

    def _decode(self, rows: list[_Row]) -> None:
        """One token for every decoding row in one forward over rows [0, hi); other rows idle as padding."""
        model = self.model
        hi = max(r.row for r in rows) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        positions = torch.full((hi, 1), -1, dtype=torch.long)
        for r in rows:
            tokens[r.row, 0], positions[r.row, 0] = r.pending, r.pos
        dev = model.device
        logits = model(tokens.to(dev), positions.to(dev), self.cache.rows(0, hi),
                       select=torch.zeros(hi, dtype=torch.long, device=dev)).cpu()  # fmt: skip
        self.steps += 1
        for r in rows:
            r.pos += 1
            self._sample(r, logits[r.row])

    def _sample(self, r: _Row, logits: torch.Tensor) -> None:
        seq, req = r.handle.seq, r.handle.request
        token = sample_one(logits, seq.params, r.prompt_t, torch.tensor(seq.ids, dtype=torch.long), seq.generator)
        self.tokens += 1
        lp = _logprob(logits, token, req.logprobs) if req.logprobs is not None else None
        first = not seq.ids
        piece = seq.add(token)
        event = Event(piece, token, lp, seq.finish_reason)
        if first and req.prompt_logprobs:
            event.prompt_logprobs = r.prompt_logprobs
        if seq.finish_reason is not None:
            event.result = seq.result()
            with self._cond:
                self._free(r, event)
        else:
            r.pending = token
            if not self._deliver(r.handle, event):
                r.handle.cancelled = True

    def _free(self, r: _Row, last: Event) -> None:
        """Give the row back and send the request's last event (caller holds the lock)."""
        self.rows[r.row] = None
        self.cache.reset(torch.tensor([r.row]))
        self._deliver(r.handle, last)
        self._cond.notify_all()

    def _fail_running(self, error: Exception) -> None:
        with self._cond:
            for r in self.rows:
                if r is not None:
                    self._free(r, Event("", error=error))

    def _deliver(self, handle: Handle, event: Event) -> bool:
        """Hand an event to its sink; False if the consumer is gone (its loop closed, say)."""
        if handle.finished:
            return False
        if event.last:
            handle.finished = True
        try:
            handle._sink(handle, event)
            return True
        except Exception as e:  # e.g. a closed event loop: that consumer loses its request, no one else
            handle.cancelled = True
            handle.sink_error = e
            return False


def _logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    lsm = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        values, ids = torch.topk(lsm, k)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(int(token), float(lsm[token]), top)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing is queued or running (tests and the load script use it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0:
            return True
        time.sleep(0.01)
    return False
