"""Continuous batching: one KV cache of N rows and a thread that decodes them together.

Requests join and leave between steps. Each iteration of the engine's thread asks the scheduler
(generation/scheduler.py: queue, admission, handles, cancellation, freeing rows) for the occupied
rows, then has the model runner (generation/runner.py: the cache, the core's prefill and decoding
steps, sampling, logprobs) take one step over them; a row's text events go to its request's sink
as soon as the step has sampled them.

The engine serves the HTTP server and batch jobs alike; its thread runs from start() (or entering
the context manager) until close():

    from gemmarun.generation import Engine

    with Engine(gemmarun.load(path), max_batch=8) as engine:
        results = engine.generate(["Hello", "Once upon a time"], SamplingParams(max_new_tokens=32))
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..errors import InvalidParameterError
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import EngineBusyError, EngineClosedError, Event, Handle, Request, Scheduler, Sink, TokenLogprob
from .sequence import GenerationResult, new_sequence

__all__ = ["Engine", "EngineBusyError", "EngineClosedError", "Event", "Handle", "Request", "TokenLogprob", "wait_idle"]


class Engine:
    """Owns a scheduler and a model runner over one KVCache of `max_batch` rows.

    Threads: callers submit, cancel and read stats on their own threads (through the scheduler's
    lock); the engine's thread alone runs the model and writes the runner's state. `steps` and
    `tokens` are written under the scheduler's lock."""

    def __init__(self, lm, max_batch: int = 8, max_waiting: int = 64, context: int | None = None, prefill_chunk: int | None = None,
                 prefix_cache_mb: float = 0, speculate=None):  # fmt: skip
        """prefix_cache_mb: memory for snapshots of finished rows that later prompts starting with the
        same tokens resume from (generation/prefix_cache.py); 0 turns the prefix cache off.
        speculate: "ngram", "model", "off", a SpeculativeConfig, or None for what load() set."""
        if not isinstance(prefix_cache_mb, (int, float)) or isinstance(prefix_cache_mb, bool) or not prefix_cache_mb >= 0:
            raise InvalidParameterError(f"prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidParameterError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise InvalidParameterError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        self.model, self.tokenizer = lm.model, lm.tokenizer
        self.context = min(context or lm.context, lm.context)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        # the engine's own Speculator (its rounds' state is the engine thread's)
        self.speculator = lm.new_speculator(speculate)
        self.runner = ModelRunner(lm.model, max_batch, self.context, prefill_chunk, prefix_cache_mb, self.speculator)
        self.prefill_chunk = self.runner.prefill_chunk
        self.cache = self.runner.cache
        self.scheduler = Scheduler(max_batch, max_waiting, self.runner.release)
        self._lock = self.scheduler.lock
        self.steps = 0  # decode forwards run
        self.tokens = 0  # tokens sampled
        self.error: BaseException | None = None  # set if the loop itself died
        self._thread: threading.Thread | None = None
        self._close_reason = "the engine shut down before finishing this request"  # what unfinished requests are told

    # -- the caller's side -----------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the engine's thread (once); entering the context manager does it too."""
        with self._lock:
            if self.scheduler.closed:
                raise EngineClosedError("the engine is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gemmarun-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, request: Request, sink: Sink | None = None, block: bool = False) -> Handle:
        return self.submit_all([request], sink, block)[0]

    def submit_all(self, requests: Sequence[Request], sink: Sink | None = None, block: bool = False) -> list[Handle]:
        """Queue requests together (all or none). Raises EngineBusyError when the queue is full,
        unless block=True, which waits for room instead. `sink(handle, event)` is called on the
        engine's thread (and must not block); without one, iterate handle.events()."""
        if self._thread is None:
            raise EngineClosedError("the engine is not running; start() it or use `with Engine(lm) as engine:`")
        for r in requests:
            if r.logprobs is not None and not 0 <= r.logprobs <= 20:
                raise InvalidParameterError(f"logprobs alternatives must be between 0 and 20, got {r.logprobs}")
        # Checks the prompt against the context; errors reach the caller before anything is queued.
        handles = [Handle(self.scheduler, r, self._sequence(r), sink) for r in requests]
        self.scheduler.enqueue(handles, block)
        return handles

    def _sequence(self, r: Request):
        return new_sequence(self.model, self.tokenizer, self.context, r.prompt, r.params, r.seed_offset)

    def generate(self, prompts: Sequence[Sequence[int] | str], params: SamplingParams) -> list[GenerationResult]:
        """A batch job: every prompt decoded with continuous batching, results in prompt order."""
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        handles = [self.submit(Request(p, params), block=True) for p in ids]
        return [h.result() for h in handles]

    def stats(self) -> dict:
        with self._lock:
            running, waiting = self.scheduler.counts()
            out = {
                "running": running,
                "waiting": waiting,
                "max_batch": self.max_batch,
                "max_waiting": self.max_waiting,
                "steps": self.steps,
                "tokens": self.tokens,
            }
        if self.runner.prefix is not None:  # hits, misses, tokens reused, evictions, bytes
            out["prefix_cache"] = self.runner.prefix.stats()
        return out

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once nothing is queued or running, False after `timeout` seconds."""
        return self.scheduler.wait_idle(timeout)

    @property
    def healthy(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive() and not self.scheduler.closed

    def close(self, reason: str | None = None) -> None:
        """Stop the thread; requests still queued or running end with EngineClosedError(reason)."""
        if reason is not None:
            self._close_reason = reason
        self.scheduler.close()
        with self._lock:
            thread = self._thread
        if thread is None:  # never started: nothing runs, answer what is queued here
            self.scheduler.shutdown(EngineClosedError(self._close_reason))
        elif threading.current_thread() is not thread:
            thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine's thread -------------------------------------------------------------------

    def _loop(self) -> None:
        scheduler = self.scheduler
        try:
            while (slots := scheduler.next_batch()) is not None:
                try:
                    with torch.inference_mode():
                        events, steps = self.runner.step(slots)
                except Exception as e:  # a failed forward ends the running requests, not the server
                    scheduler.fail(slots, e)
                    continue
                with self._lock:
                    self.steps += steps
                    self.tokens += len(events)
                for slot, event in events:
                    if event.last:
                        scheduler.free(slot, event)
                    else:
                        scheduler.deliver(slot.handle, event)
        except BaseException as e:
            with self._lock:
                self.error = e
            raise
        finally:
            scheduler.shutdown(EngineClosedError(self._close_reason))


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing is queued or running (tests and the load script use it)."""
    return engine.wait_idle(timeout)
