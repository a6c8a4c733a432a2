"""The Batch API's worker: one thread beside the server that runs accepted batches, oldest first,
through the server's own engine at BATCH_PRIORITY, so live requests are admitted before any line.

At most half the engine's rows hold batch lines at once (`window`), so live traffic always finds
rows free soon. A restarted server's worker picks up every batch not in a final state and skips
the lines whose output is already on disk.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from ..generation.engine import Engine, EngineClosedError
from ..generation.scheduler import BATCH_PRIORITY
from .lines import LineRunner, finished_ids, line_failed, parse_lines
from .store import Store

log = logging.getLogger("gemmarun.batch")


class _Appender:
    """Successful lines to the output file, failed ones to the error file, each fsynced before it counts."""

    def __init__(self, store: Store, batch_id: str):
        self.store, self.batch_id = store, batch_id
        out, err = store.output_paths(batch_id)
        self.out, self.err = out.open("a", encoding="utf-8"), err.open("a", encoding="utf-8")

    def __call__(self, line: dict) -> None:
        failed = line_failed(line)
        f = self.err if failed else self.out
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self.store.count(self.batch_id, failed)

    def close(self) -> None:
        self.out.close()
        self.err.close()


class BatchWorker:
    def __init__(self, store: Store, engine: Engine, tokenizer, model_id: str):
        self.store = store
        self.runner = LineRunner(engine, tokenizer, model_id, priority=BATCH_PRIORITY, window=max(1, engine.max_batch // 2))
        self.wake = threading.Condition()
        self.queue: list[str] = store.unfinished()
        self.cancels: dict[str, threading.Event] = {}  # a stop event per batch the thread is running
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="gemmarun-batches", daemon=True)
        self.thread.start()

    def submit(self, batch_id: str) -> None:
        with self.wake:
            self.queue.append(batch_id)
            self.wake.notify_all()

    def cancel(self, batch_id: str) -> dict:
        """cancelling while it runs (the thread then marks it cancelled); cancelled at once if queued."""
        with self.wake:
            batch = self.store.batch(batch_id)
            if batch["status"] in ("completed", "failed", "cancelled", "expired", "cancelling"):
                return batch
            if batch_id in self.cancels:
                self.store.update(batch_id, status="cancelling")
                self.cancels[batch_id].set()
                return self.store.batch(batch_id)
            if batch_id in self.queue:
                self.queue.remove(batch_id)
            self.store.update(batch_id, status="cancelling")
            return self.store.public(self.store.finish(batch_id, "cancelled"))

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the lines in flight are cancelled; their batch stays in progress for a restart."""
        self.closed.set()
        with self.wake:
            for stop in self.cancels.values():
                stop.set()
            self.wake.notify_all()
        self.thread.join(timeout)

    # -- the worker's thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.queue and not self.closed.is_set():
                    self.wake.wait()
                if self.closed.is_set():
                    return
                batch_id = self.queue.pop(0)
                stop = self.cancels[batch_id] = threading.Event()
            try:
                self._run(batch_id, stop)
            except EngineClosedError:  # the server is shutting down: resume after the restart
                return
            except Exception as e:  # a broken input file fails its batch, not the worker
                log.exception("batch %s failed", batch_id)
                self.store.update(batch_id, errors={"object": "list", "data": [{"code": "batch_failed", "message": str(e)}]})
                self.store.finish(batch_id, "failed")
            finally:
                with self.wake:
                    self.cancels.pop(batch_id, None)

    def _run(self, batch_id: str, stop: threading.Event) -> None:
        batch = self.store.batch(batch_id)
        if batch["status"] == "cancelling":  # cancelled just before a restart
            self.store.finish(batch_id, "cancelled")
            return
        text = Path(self.store.content_path(batch["input_file_id"])).read_text(encoding="utf-8")
        lines = parse_lines(text, batch["endpoint"])
        out, err = self.store.output_paths(batch_id)
        done_ok, done_failed = finished_ids(out), finished_ids(err)
        counts = {"total": len(lines), "completed": len(done_ok), "failed": len(done_failed)}
        with self.wake:  # as cancel() does: a cancel that came while the file was read is not overwritten
            if stop.is_set() and not self.closed.is_set():
                self.store.finish(batch_id, "cancelled")
                return
            self.store.update(batch_id, status="in_progress", request_counts=counts)
        todo = [line for line in lines if line.custom_id not in done_ok | done_failed]
        appender = _Appender(self.store, batch_id)
        try:
            finished = self.runner.run(todo, appender, stop)
        finally:
            appender.close()
        if finished:
            self.store.update(batch_id, status="finalizing")
            self.store.finish(batch_id, "completed")
        elif self.store.batch(batch_id)["status"] == "cancelling":
            self.store.finish(batch_id, "cancelled")
