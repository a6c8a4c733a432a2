"""`gemmarun batch --ray`: the lines of a batch through Ray Data, an actor pool of engines (one per
worker, `threads` CPUs each). The driver writes the output lines in input order as they stream
back, so the file has the contract of the local job (gemmarun/batch/job.py): a prefix of the
finished file if interrupted, resumed by skipping every custom_id already in it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..batch.job import BatchSummary, OutputFile, pending_lines
from ..batch.lines import Line
from . import import_ray, init_ray

ROWS_PER_CALL = 16  # lines per actor call: enough to keep an engine's rows busy, small for a steady progress bar


class EngineWorker:
    """One engine in a Ray Data actor; each call answers a block of lines through it."""

    def __init__(self, load_kwargs: dict, threads: int, max_batch: int, model_id: str | None):
        import torch

        from ..batch.lines import LineRunner
        from ..generation.engine import Engine
        from ..lm import load
        from ..server.app import model_id_for

        torch.set_num_threads(threads)
        lm = load(**load_kwargs)
        self.engine = Engine(lm, max_batch=max_batch, max_waiting=2 * max_batch).start()
        self.runner = LineRunner(self.engine, lm.tokenizer, model_id or model_id_for(lm.source))

    def __call__(self, batch: dict) -> dict:
        lines = [Line(**json.loads(x)) for x in batch["line"]]
        outs: list[dict] = []
        self.runner.run(lines, outs.append)
        return {"output": [json.dumps(o, ensure_ascii=False) for o in outs]}


def run_batch_on_ray(load_kwargs: dict, input_path: str | Path, output_path: str | Path, *, workers: int = 2, threads: int = 1,
                     address: str | None = None, max_batch: int = 8, model_id: str | None = None,
                     progress: bool = True) -> BatchSummary:  # fmt: skip
    """Answer every line of INPUT not yet in OUTPUT on `workers` engines of the cluster."""
    from ..errors import GemmarunError

    if workers < 1:
        raise GemmarunError(f"--workers must be >= 1, got {workers}")
    lines, todo = pending_lines(input_path, output_path)
    out = OutputFile(output_path, len(lines), len(lines) - len(todo), progress)
    try:
        if todo:
            ray = import_ray()
            init_ray(address, num_cpus=None)
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # output in input order, so a cut file is a prefix
            context.enable_progress_bars = False  # the job draws its own bar
            rows = [{"line": json.dumps(asdict(line), ensure_ascii=False)} for line in todo]
            blocks = max(1, -(-len(rows) // ROWS_PER_CALL))
            ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                EngineWorker,
                fn_constructor_kwargs=dict(load_kwargs=load_kwargs, threads=threads, max_batch=max_batch, model_id=model_id),
                batch_size=ROWS_PER_CALL,
                concurrency=workers,
                num_cpus=threads,
            )
            for row in ds.iter_rows():
                out(json.loads(row["output"]))
    finally:
        out.close()
    return BatchSummary(len(lines), len(lines) - len(todo), out.completed, out.failed)
