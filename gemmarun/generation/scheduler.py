"""The engine's scheduler: the waiting queue, admission into cache rows, handles, cancellation and
freeing rows. It never touches the model; generation/runner.py does.

Thread ownership. One lock (`Scheduler.lock`, a Condition) guards every field shared between the
callers' threads and the engine's thread:
- `waiting`: callers append (submit) and remove (cancel); the engine thread pops (admit);
- `slots`: written by the engine thread only (admit, free), read by callers (submit, stats);
- `closed`: set by close() on any thread, or by the engine thread when its loop ends;
- a Handle's `cancelled`, `finished` and `sink_error`: written under the lock only.
A Slot's other fields (the runner's progress through the prompt) are the engine thread's alone.
Waiting is on the condition (submitters for room, the engine thread for work, wait_idle for
quiet), never on a polling timer.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import GemmarunError, InvalidParameterError
from .sampling import SamplingParams
from .sequence import GenerationResult, SequenceState

BATCH_PRIORITY = 10  # batch lines: admitted only when no live request waits


class EngineBusyError(GemmarunError):
    """The waiting queue is full; the server answers 503 and the client should retry later."""


class EngineClosedError(GemmarunError):
    """The engine was shut down (or not started) before it could finish the request."""


@dataclass(frozen=True)
class Request:
    prompt: list[int]  # token ids, BOS included
    params: SamplingParams
    logprobs: int | None = None  # report each sampled token's logprob and this many alternatives; None = off
    prompt_logprobs: bool = False  # also score the prompt's tokens (completions with echo + logprobs)
    seed_offset: int = 0  # the n choices of one API request draw from seed, seed + 1, ...
    priority: int = 0  # lower is admitted first; FIFO within a priority (the Batch API's lines use BATCH_PRIORITY)


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

    def __init__(self, scheduler: Scheduler, request: Request, seq: SequenceState, sink: Sink | None):
        self.id = next(self._ids)
        self.scheduler = scheduler
        self.request = request
        self.seq = seq  # written by the engine thread only (the runner samples into it)
        self._queue: queue.Queue | None = None
        if sink is None:
            self._queue = queue.Queue()
            sink = lambda handle, event: handle._queue.put(event)  # noqa: E731
        self._sink = sink
        self.cancelled = False  # under the scheduler's lock
        self.finished = False  # under the scheduler's lock: its last event was handed out
        self.sink_error: Exception | None = None  # why the sink refused an event, if it did (under the lock)

    def cancel(self) -> None:
        """Stop generating; a running request's row is freed before the next step."""
        self.scheduler.cancel(self)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The request's events as they come; TimeoutError if none comes for `timeout` seconds."""
        if self._queue is None:
            raise InvalidParameterError("this handle delivers its events to the sink it was given")
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event from the engine in {timeout} s") from None
            yield event
            if event.last:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        for event in self.events(timeout):
            if event.error is not None:
                raise event.error
            if event.last:
                return event.result


@dataclass
class Slot:
    """A request occupying one cache row. `handle`, `row` and `order` are set at admission; the
    rest is the runner's progress, written on the engine thread only."""

    handle: Handle
    row: int
    order: int  # admission order: the oldest prefill goes first
    prompt_t: torch.Tensor  # the prompt as a tensor, for the penalties
    prefilled: int = 0  # prompt tokens already in the cache
    pending: int | None = None  # sampled token not yet fed to the model
    pos: int = 0  # position `pending` will be written at
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    fresh: bool = True  # not yet seen by the runner, which looks its prompt up in the prefix cache then
    branch: int = 0  # the prefix cache snapshots the row once its prefill reaches this position (0: never)

    @property
    def prompt(self) -> list[int]:
        return self.handle.request.prompt


class Scheduler:
    """The queue of `max_waiting` requests and the table of `max_batch` cache rows."""

    def __init__(self, max_batch: int, max_waiting: int, release: Callable[[Slot, bool], None]):
        self.max_batch, self.max_waiting = max_batch, max_waiting
        # forgets a freed row's keys and values (the runner's cache; engine thread); the flag says
        # whether the row's state is sound (no failed forward), so the prefix cache may keep it
        self.release = release
        self.lock = threading.Condition()
        self.waiting: deque[Handle] = deque()
        self.slots: list[Slot | None] = [None] * max_batch
        self.closed = False
        self._order = itertools.count()

    # -- the callers' threads --------------------------------------------------------------------

    def enqueue(self, handles: list[Handle], block: bool) -> None:
        """Queue handles together (all or none): EngineBusyError when the queue is full, unless
        `block`, which waits for room instead."""
        n = len(handles)
        # A request that could never fit the queue is refused at once, even when blocking.
        room = self.max_waiting + self.max_batch
        if n > room:
            raise EngineBusyError(f"{n} sequences at once exceed the engine's capacity of {room}")
        with self.lock:
            while True:
                if self.closed:
                    raise EngineClosedError("the engine is shut down")
                # Requests that free rows will take at once do not count against the queue.
                free = sum(s is None for s in self.slots)
                if len(self.waiting) + n <= self.max_waiting + free:
                    break
                if not block:
                    raise EngineBusyError(
                        f"the server is busy ({len(self.waiting)} requests waiting, limit {self.max_waiting}); retry later"
                    )
                self.lock.wait()
            self.waiting.extend(handles)
            self.lock.notify_all()

    def cancel(self, handle: Handle) -> None:
        with self.lock:
            if handle.finished or handle.cancelled:
                return
            handle.cancelled = True
            if handle in self.waiting:
                self.waiting.remove(handle)
                self.deliver(handle, Event("", finish_reason="cancelled", result=handle.seq.result()))
            self.lock.notify_all()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or running; False after `timeout` seconds."""
        with self.lock:
            return self.lock.wait_for(lambda: not self.waiting and not any(self.slots), timeout)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return sum(s is not None for s in self.slots), len(self.waiting)

    # -- the engine's thread ---------------------------------------------------------------------

    def next_batch(self) -> list[Slot] | None:
        """Wait for work, drop cancelled rows, admit waiting requests into free rows; the occupied
        slots, or None once the engine is closed."""
        with self.lock:
            while not self.closed and not self.waiting and not any(self.slots):
                self.lock.wait()
            if self.closed:
                return None
            for s in self.slots:
                if s is not None and s.handle.cancelled:
                    self.free(s, Event("", finish_reason="cancelled", result=s.handle.seq.result()))
            for i, slot in enumerate(self.slots):  # lowest rows first: the decode batch stays short
                if not self.waiting:
                    break
                if slot is None:
                    h = min(self.waiting, key=lambda w: w.request.priority)  # the first of the most urgent
                    self.waiting.remove(h)
                    self.slots[i] = Slot(h, i, next(self._order), torch.tensor(h.request.prompt, dtype=torch.long))
            self.lock.notify_all()  # room in the queue for blocked submitters
            return [s for s in self.slots if s is not None]

    def free(self, slot: Slot, last: Event) -> None:
        """Give the row back and send the request's last event."""
        with self.lock:
            self.slots[slot.row] = None
            self.release(slot, last.error is None)
            self.deliver(slot.handle, last)
            self.lock.notify_all()

    def fail(self, slots: Sequence[Slot], error: Exception) -> None:
        for s in slots:
            if self.slots[s.row] is s:
                self.free(s, Event("", error=error))

    def shutdown(self, error: Exception) -> None:
        """The loop ended: every request still queued or running gets `error` as its last event."""
        with self.lock:
            self.closed = True
            for h in [*self.waiting, *(s.handle for s in self.slots if s is not None)]:
                self.deliver(h, Event("", error=error))
            self.waiting.clear()
            self.slots = [None] * self.max_batch
            self.lock.notify_all()

    def deliver(self, handle: Handle, event: Event) -> bool:
        """Hand an event to its sink; False if the consumer is gone (its loop closed, say)."""
        with self.lock:
            if handle.finished:
                return False
            if event.last:
                handle.finished = True
        try:
            handle._sink(handle, event)
            return True
        except Exception as e:  # e.g. a closed event loop: that consumer loses its request, no one else
            with self.lock:
                handle.cancelled = True
                handle.sink_error = e
            return False
