"""The Batch API's state on disk (`gemmarun serve --data-dir DIR`), so a restarted server resumes.

    DIR/files/<file-id>.json     the file object (id, bytes, created_at, filename, purpose)
    DIR/files/<file-id>.jsonl    its content; batch outputs grow here line by line
    DIR/batches/<batch-id>.json  the batch object, rewritten (atomically) on every change

Every JSON write goes to a temporary file that replaces the old one, so a killed server leaves
either the old or the new object, never half of one. Output lines are appended and fsynced one by
one before the batch's counts move: a line that is on disk is never run again.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from ..errors import GemmarunError

FINAL = ("completed", "failed", "cancelled", "expired")  # a batch in one of these never changes again
COMPLETION_WINDOW = "24h"  # the only window OpenAI accepts; gemmarun runs batches as soon as it can
WINDOW_S = 24 * 3600


class NotFound(GemmarunError):
    """No file or batch of that id."""


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


class Store:
    """Files and batches under one folder; one lock guards the batch objects held in memory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = self.root / "files"
        self.batch_dir = self.root / "batches"
        self.files.mkdir(parents=True, exist_ok=True)
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.batches: dict[str, dict] = {}
        for path in self.batch_dir.glob("*.json"):
            batch = json.loads(path.read_text(encoding="utf-8"))
            self.batches[batch["id"]] = batch

    # -- files ---------------------------------------------------------------------------------

    def add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        file_id = "file-" + uuid.uuid4().hex
        (self.files / f"{file_id}.jsonl").write_bytes(content)
        return self._file_object(file_id, filename, purpose)

    def _file_object(self, file_id: str, filename: str, purpose: str) -> dict:
        size = (self.files / f"{file_id}.jsonl").stat().st_size
        obj = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": filename,
               "purpose": purpose, "status": "processed", "status_details": None}  # fmt: skip
        _write_json(self.files / f"{file_id}.json", obj)
        return obj

    def file(self, file_id: str) -> dict:
        path = self.files / f"{file_id}.json"
        if "/" in file_id or not path.is_file():  # ids never hold a slash; nothing outside files/ is read
            raise NotFound(f"No such File object: {file_id}")
        return json.loads(path.read_text(encoding="utf-8"))

    def content_path(self, file_id: str) -> Path:
        self.file(file_id)
        return self.files / f"{file_id}.jsonl"

    def list_files(self) -> list[dict]:
        objs = [json.loads(p.read_text(encoding="utf-8")) for p in self.files.glob("*.json")]
        return sorted(objs, key=lambda o: (o["created_at"], o["id"]), reverse=True)

    # -- batches -------------------------------------------------------------------------------

    def add_batch(self, input_file_id: str, endpoint: str, total: int, metadata: dict | None) -> dict:
        now = int(time.time())
        batch_id = "batch_" + uuid.uuid4().hex
        batch = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
            "completion_window": COMPLETION_WINDOW, "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "in_progress_at": None, "expires_at": now + WINDOW_S, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": metadata,
            # Where the lines go while the batch runs; shown as output_file_id / error_file_id at the end.
            "_output": "file-" + uuid.uuid4().hex, "_errors": "file-" + uuid.uuid4().hex, "_order": time.time_ns(),
        }  # fmt: skip
        with self.lock:
            self.batches[batch_id] = batch
            self._save(batch)
        return self.public(batch)

    def _save(self, batch: dict) -> None:  # under the lock
        _write_json(self.batch_dir / f"{batch['id']}.json", batch)

    @staticmethod
    def public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def batch(self, batch_id: str) -> dict:
        with self.lock:
            if batch_id not in self.batches:
                raise NotFound(f"No such Batch object: {batch_id}")
            return self.public(self.batches[batch_id])

    def list_batches(self) -> list[dict]:
        with self.lock:
            ordered = sorted(self.batches.values(), key=lambda b: b["_order"], reverse=True)  # newest first, as OpenAI
            return [self.public(b) for b in ordered]

    def unfinished(self) -> list[str]:
        """Ids of batches not final, oldest first: the worker's queue after a restart."""
        with self.lock:
            return [b["id"] for b in sorted(self.batches.values(), key=lambda b: b["_order"]) if b["status"] not in FINAL]

    def update(self, batch_id: str, **fields) -> dict:
        """Set fields (and `<status>_at` for a new status) and save; returns the stored batch."""
        with self.lock:
            batch = self.batches[batch_id]
            if "status" in fields and batch["status"] != fields["status"]:
                stamp = f"{fields['status']}_at"
                if stamp in batch:
                    batch[stamp] = int(time.time())
            batch.update(fields)
            self._save(batch)
            return dict(batch)

    def count(self, batch_id: str, failed: bool) -> None:
        with self.lock:
            batch = self.batches[batch_id]
            batch["request_counts"]["failed" if failed else "completed"] += 1
            self._save(batch)

    def output_paths(self, batch_id: str) -> tuple[Path, Path]:
        with self.lock:
            batch = self.batches[batch_id]
            return self.files / f"{batch['_output']}.jsonl", self.files / f"{batch['_errors']}.jsonl"

    def finish(self, batch_id: str, status: str) -> dict:
        """A final status: the output and error files become file objects the client can read."""
        out, err = self.output_paths(batch_id)
        with self.lock:
            batch = self.batches[batch_id]
        fields = {"status": status}
        for path, key, public in ((out, "_output", "output_file_id"), (err, "_errors", "error_file_id")):
            if path.exists() and path.stat().st_size:
                self._file_object(batch[key], f"{batch_id}_{public.split('_')[0]}.jsonl", "batch_output")  # OpenAI's purpose for both
                fields[public] = batch[key]
        return self.update(batch_id, **fields)
