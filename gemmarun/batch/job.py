"""`gemmarun batch INPUT OUTPUT`: a file of OpenAI batch lines through one engine, resumable.

Output lines are written in input order and flushed one by one, so an interrupted job leaves a
prefix of the finished file; run again, it skips every custom_id already in OUTPUT and appends
the rest (the Ray Data path in gemmarun/distributed/data.py shares this contract).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..evaluate.report import Progress
from ..generation.engine import Engine
from .lines import Line, LineRunner, finished_ids, line_failed, read_lines


@dataclass
class BatchSummary:
    total: int  # lines in the input
    skipped: int  # already in the output when the job started
    completed: int  # answered 200 in this run
    failed: int  # answered with an error in this run


def pending_lines(input_path: str | Path, output_path: str | Path) -> tuple[list[Line], list[Line]]:
    """(every input line, those not yet in the output); the output's cut-short last line is dropped."""
    lines = read_lines(input_path)
    done = finished_ids(Path(output_path))
    return lines, [line for line in lines if line.custom_id not in done]


class OutputFile:
    """Appends output lines as they come, each flushed whole, counting and drawing progress."""

    def __init__(self, path: str | Path, total: int, skipped: int, progress: bool):
        self.file = Path(path).open("a", encoding="utf-8")
        self.bar = Progress(total, "batch", enabled=progress)
        self.bar(skipped)
        self.completed = self.failed = 0

    def __call__(self, out: dict) -> None:
        self.file.write(json.dumps(out, ensure_ascii=False) + "\n")
        self.file.flush()
        self.failed += line_failed(out)
        self.completed += not line_failed(out)
        self.bar()

    def close(self) -> None:
        self.file.close()


def run_batch(lm, input_path: str | Path, output_path: str | Path, *, max_batch: int = 8, model_id: str | None = None,
              progress: bool = True) -> BatchSummary:  # fmt: skip
    """Answer every line of INPUT not yet in OUTPUT through one engine of `max_batch` rows."""
    from ..server.app import model_id_for

    lines, todo = pending_lines(input_path, output_path)
    out = OutputFile(output_path, len(lines), len(lines) - len(todo), progress)
    try:
        if todo:
            # Twice the rows queued, so a row that frees is refilled at once.
            with Engine(lm, max_batch=max_batch, max_waiting=2 * max_batch) as engine:
                LineRunner(engine, lm.tokenizer, model_id or model_id_for(lm.source)).run(todo, out)
    finally:
        out.close()
    return BatchSummary(len(lines), len(lines) - len(todo), out.completed, out.failed)
