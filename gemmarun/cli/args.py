"""The arguments the `gemmarun` commands share (model, sampling, speculation, Ray) and what they
become: load() keywords, SamplingParams, a Constraint, text from the command line or stdin."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import GemmarunError, InvalidParameterError

DTYPES = ["auto", "float32", "bfloat16", "float16"]  # --dtype and --cache-dtype


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="checkpoint folder, .gguf file or Hugging Face repo id (default: Gemma 3 270M)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="activation dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--context", type=int, help="context length to allocate (default: the model's)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quantize", choices=["int8", "int4", "none"],
                   help="quantise weights at load (int8 per channel, int4 in groups); 'none' decodes a GGUF's "
                        "blocks to dense weights (default: keep the checkpoint's own form)")  # fmt: skip
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128], help="int4 group size (default 32)")
    p.add_argument("--cache-dtype", choices=DTYPES, default="auto",
                   help="KV cache dtype: float16 or bfloat16 halve a float32 cache (auto: the activations' dtype)")  # fmt: skip


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", choices=["ngram", "model", "off"],
                   help="speculative decoding: ngram (prompt lookup), model (--draft-model drafts), off "
                        "(default: model with --draft-model, else off)")  # fmt: skip
    p.add_argument("--draft-model", metavar="PATH", help="a smaller model of the same vocabulary that drafts tokens")
    p.add_argument("--draft-tokens", type=int, metavar="K", help="tokens drafted per round at most (default 8)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-new-tokens tokens")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the output is JSON matching this JSON schema file")
    shape.add_argument("--json", action="store_true", help="the output is a JSON object")
    shape.add_argument("--grammar", metavar="FILE", help="the output matches this Lark grammar file (.gbnf: llama.cpp's GBNF)")
    shape.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")


def sampling_params(args):
    from ..generation.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        constraint=constraint_from(args),
    )


def load_kwargs(args) -> dict:
    """What load() takes from the model arguments (also sent to Ray replicas and workers, which load their own)."""
    return dict(source=args.model, dtype=args.dtype, device=args.device, context=args.context, quantize=args.quantize,
                group_size=args.group_size, compile=getattr(args, "compile", False), cache_dtype=args.cache_dtype,
                **speculation_kwargs(args), **getattr(args, "calibration_kwargs", {}))  # fmt: skip


def constraint_from(args):
    """--json-schema / --json / --grammar / --regex as a Constraint (checked by llguidance), or None."""
    from pathlib import Path

    from ..generation.constraints import Constraint

    if args.regex is not None:
        return Constraint.regex(args.regex)
    if args.json:
        return Constraint.json_object()
    path = args.json_schema or args.grammar
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GemmarunError(f"cannot read {path}: {e}") from None
    if args.grammar is not None:
        return Constraint.gbnf(text) if path.endswith(".gbnf") else Constraint.lark(text)
    return Constraint.json_schema(text)


def load_model(args):
    import torch

    from ..lm import load

    if args.threads is not None:
        if args.threads < 1:
            raise GemmarunError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load(**load_kwargs(args))


def speculation_kwargs(args) -> dict:
    """load()'s speculation arguments, for the commands that decode (generate, chat, serve)."""
    if not hasattr(args, "speculate"):
        return {}
    return dict(speculate=args.speculate, draft=args.draft_model, draft_tokens=args.draft_tokens)


def argument_text(value: str, what: str) -> str:
    """An argument's text; Python hands bytes that are not UTF-8 over as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameterError(f"{what} is not valid UTF-8 (at character {e.start})") from None
    return value


def stdin_text(what: str) -> str:
    """All of stdin as UTF-8 text; a closed stdin (`<&-`) or bytes that are not UTF-8 are errors."""
    if sys.stdin is None:
        raise GemmarunError(f"no {what}: stdin is closed")
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidParameterError(f"the {what} on stdin is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", action="store_true", help=f"run on a Ray cluster ({what}; needs the 'ray' extra)")
    p.add_argument("--ray-address", help="join this running cluster (e.g. HEAD:6379, or 'auto'); default: start a local one")


def ray_threads(args) -> int:
    """Torch threads of each Ray replica or worker, and the CPUs it asks the cluster for."""
    threads = 1 if args.threads is None else args.threads
    if threads < 1:
        raise GemmarunError(f"--threads must be >= 1, got {threads}")
    return threads


def check_writable(path: str) -> None:
    """Fail now if `path` cannot be written as a file: a folder, or a folder that does not exist."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise GemmarunError(f"--output {p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise GemmarunError(f"--output {p}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise GemmarunError(f"--output {p}: permission denied")
