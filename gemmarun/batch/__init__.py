"""Offline batch jobs over OpenAI batch-format lines: lines.py reads and answers lines through an
engine, job.py is `gemmarun batch` (resumable), store.py and worker.py hold the server's Batch API
(/v1/files, /v1/batches) state on disk and run it at low priority."""

from .job import BatchSummary, run_batch
from .lines import BatchInputError, Line, LineRunner, parse_lines, read_lines

__all__ = ["BatchInputError", "BatchSummary", "Line", "LineRunner", "parse_lines", "read_lines", "run_batch"]
