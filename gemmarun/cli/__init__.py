"""The `gemmarun` command (entry point gemmarun.cli:main; `python -m gemmarun.cli`)."""

from .parser import build_parser, describe, failure, main

__all__ = ["build_parser", "describe", "failure", "main"]
