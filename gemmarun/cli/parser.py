"""The `gemmarun` command line: the parser, and the one place a failure becomes an `error:` line
and an exit status."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from ..errors import GemmarunError
from .args import DTYPES, add_model_args, add_ray_args, add_sampling_args, add_speculation_args
from .commands import cmd_batch, cmd_bench, cmd_chat, cmd_eval, cmd_generate, cmd_models, cmd_perplexity, cmd_quantize, cmd_serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmarun", description="Run Gemma 2 and Gemma 3 text models.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: GEMMARUN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    g.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="prompt text (else --prompt or stdin)")
    g.add_argument("--prompt", "-p", help="prompt text")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile with a static cache (dense weights: --quantize none or a "
                        "float checkpoint; the first step compiles for a minute or more)")  # fmt: skip
    add_model_args(g)
    add_speculation_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat in the terminal (piped input: one message per line)")
    c.add_argument("--system", help="system text (Gemma has no system role: it prefixes the first user turn)")
    add_model_args(c)
    add_speculation_args(c)
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat, max_new_tokens=512)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 503 (default 64)")
    s.add_argument("--shutdown-timeout", type=float, default=15.0,
                   help="seconds running requests get on SIGTERM / Ctrl-C before they end with an error (default 15)")  # fmt: skip
    s.add_argument("--served-model-name", help="model id clients use (default: the folder or file name)")
    s.add_argument("--prefix-cache-mb", type=float, default=1024,
                   help="memory for cached prompt prefixes reused across requests (default 1024; 0 = off)")  # fmt: skip
    s.add_argument("--metrics-key", help="require 'Authorization: Bearer KEY' on /metrics (default: the --api-key)")
    s.add_argument("--data-dir", help="keep the Batch API's files and batches here, resumed on restart (default: a temporary folder)")
    add_ray_args(s, "Ray Serve, one engine per replica behind one endpoint")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: engines serving the endpoint (default 1)")
    add_model_args(s)
    add_speculation_args(s)
    s.set_defaults(func=cmd_serve)

    bt = sub.add_parser("batch", help="answer a file of OpenAI batch lines (resumable), here or on a Ray cluster")
    bt.add_argument("input", metavar="INPUT", help="JSON lines: custom_id, method, url (/v1/chat/completions or /v1/completions), body")
    bt.add_argument("output", metavar="OUTPUT", help="OpenAI batch output lines; lines already there are not redone")
    bt.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per engine (default 8)")
    bt.add_argument("--served-model-name", help="model id in the responses (default: the folder or file name)")
    bt.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_ray_args(bt, "Ray Data, an actor pool of engines")
    bt.add_argument("--workers", type=int, default=2, help="with --ray: engines in the pool (default 2)")
    add_model_args(bt)
    bt.set_defaults(func=cmd_batch)

    e = sub.add_parser("eval", help="run a model card benchmark (PIQA, ARC, MMLU, HumanEval, ...)")
    e.add_argument("--task", action="append", required=True,
                   help="benchmark name (repeatable or comma-separated): mmlu, hellaswag, piqa, siqa, boolq, "
                        "winogrande, arc_easy, arc_challenge, triviaqa, nq_open, humaneval, mbpp, gsm8k, math, "
                        "agieval, drop, bbh")  # fmt: skip
    e.add_argument("--shots", type=int, help="few-shot examples (default: the model card's setting)")
    e.add_argument("--limit", type=int, help="score only the first N items (per subject for MMLU)")
    e.add_argument("--data", help="file or folder with the task's records (default: HF caches, eval packages)")
    e.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw")
    e.add_argument("--output", "-o", help="write the results as JSON to this file")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_ray_args(e, "items sharded across workers, scores identical to one process")
    e.add_argument("--workers", type=int, default=2, help="with --ray: scoring workers (default 2)")
    add_model_args(e)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("perplexity", help="perplexity of a text file with a sliding window")
    x.add_argument("file", metavar="FILE", help="UTF-8 text file")
    x.add_argument("--window", type=int, default=1024, help="tokens per window, BOS included (default 1024)")
    x.add_argument("--stride", type=int, default=512, help="text tokens each window advances (default 512)")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_model_args(x)
    x.set_defaults(func=cmd_perplexity)

    q = sub.add_parser("quantize", help="write a quantised copy of a checkpoint folder (loads without re-quantising)")
    q.add_argument("src", metavar="SRC", help="checkpoint folder or Hugging Face repo id")
    q.add_argument("dst", metavar="DST", help="output folder")
    q.add_argument("--scheme", choices=["int8", "int4"], default="int8")
    q.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128], help="int4 group size (default 32)")
    q.add_argument("--calibration", metavar="FILE",
                   help="int4: a UTF-8 text whose activations weight the rounding (default: the built-in text, "
                        "CPython's reference manual)")  # fmt: skip
    q.add_argument("--calibration-tokens", type=int, default=2048, help="int4: calibration tokens to run (default 2048)")
    q.add_argument("--no-calibration", action="store_true", help="int4: round by the weights alone (faster, less exact)")
    q.add_argument("--force", action="store_true", help="replace DST when it already holds files (never the source)")
    q.set_defaults(func=cmd_quantize, dtype="float32", device="cpu", context=None, threads=None, cache_dtype="auto")

    b = sub.add_parser("bench", help="speed and memory, side by side with transformers and llama.cpp")
    b.add_argument("--model", "-m", help="model to measure (default: the default model)")
    b.add_argument("--shape", choices=["gemma-2-2b"], help="measure a random-weight model of this exact shape instead")
    b.add_argument("--engines", default="gemmarun,transformers,llama.cpp", help="comma-separated engines to run")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill figure")
    b.add_argument("--decode", type=int, default=128, help="tokens decoded for the decode figure")
    b.add_argument("--compile", action="store_true", help="add a gemmarun bfloat16 row decoding through torch.compile")
    b.add_argument("--cache-dtype", choices=DTYPES, default="auto",
                   help="KV cache dtype of the gemmarun rows (auto: the activations' dtype)")  # fmt: skip
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("models", help="list the models available locally")
    m.set_defaults(func=cmd_models)
    return parser


def _version() -> str:
    from .. import __version__

    return f"gemmarun {__version__}"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BaseException as e:  # noqa: BLE001 - the one place every failure becomes an exit status
        if args.debug or os.environ.get("GEMMARUN_DEBUG", "") not in ("", "0"):
            raise
        return failure(e)


def failure(e: BaseException) -> int:
    """The exit status for an exception that ended a command, after one `error:` line on stderr.
    Ctrl-C exits 130 quietly (keeping what was printed); a closed pipe downstream exits 0."""
    if isinstance(e, KeyboardInterrupt):
        print("", file=sys.stderr)
        return 130
    if isinstance(e, SystemExit):
        raise e
    if isinstance(e, BrokenPipeError):
        # stdout's reader left (`| head`); point stdout at /dev/null so the flush at exit stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"error: {describe(e)}", file=sys.stderr)
    if isinstance(e, GemmarunError):
        return 2 if isinstance(e, ValueError) else 1
    return 2 if isinstance(e, (UnicodeError, json.JSONDecodeError)) else 1


def describe(e: BaseException) -> str:
    """One line for any exception: our own messages as they are, the OS's with the path it names."""
    if isinstance(e, GemmarunError):
        text = str(e)
    elif isinstance(e, OSError):
        path = f"{e.filename}: " if e.filename is not None else ""
        text = f"{path}{e.strerror or e}"
    elif isinstance(e, UnicodeDecodeError):
        text = f"input is not valid {e.encoding} (byte {e.start}: {e.reason})"
    elif isinstance(e, UnicodeError):
        text = f"text is not valid UTF-8 ({e})"
    elif isinstance(e, json.JSONDecodeError):
        text = f"invalid JSON: {e}"
    elif isinstance(e, MemoryError):
        text = "out of memory (try a smaller --context or --max-batch, or --quantize int8)"
    else:  # not a user mistake we know of: say so, and how to get the details for a report
        text = f"{type(e).__name__}: {e} (a gemmarun bug? rerun with --debug for the traceback)"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(e).__name__
