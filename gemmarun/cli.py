"""The `gemmarun` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .errors import GemmarunError, InvalidParameterError

DTYPES = ["auto", "float32", "bfloat16", "float16"]  # --dtype and --cache-dtype


def _add_model_args(p: argparse.ArgumentParser) -> None:
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


def _add_speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", choices=["ngram", "model", "off"],
                   help="speculative decoding: ngram (prompt lookup), model (--draft-model drafts), off "
                        "(default: model with --draft-model, else off)")  # fmt: skip
    p.add_argument("--draft-model", metavar="PATH", help="a smaller model of the same vocabulary that drafts tokens")
    p.add_argument("--draft-tokens", type=int, metavar="K", help="tokens drafted per round at most (default 8)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
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


def _sampling(args):
    from .generation.sampling import SamplingParams

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
        constraint=_constraint(args),
    )


def _load_kwargs(args) -> dict:
    """What load() takes from the model arguments (also sent to Ray replicas and workers, which load their own)."""
    return dict(source=args.model, dtype=args.dtype, device=args.device, context=args.context, quantize=args.quantize,
                group_size=args.group_size, compile=getattr(args, "compile", False), cache_dtype=args.cache_dtype,
                **_speculation_kwargs(args), **getattr(args, "calibration_kwargs", {}))  # fmt: skip


def _constraint(args):
    """--json-schema / --json / --grammar / --regex as a Constraint (checked by llguidance), or None."""
    from pathlib import Path

    from .generation.constraints import Constraint

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


def _load(args):
    import torch

    from .lm import load

    if args.threads is not None:
        if args.threads < 1:
            raise GemmarunError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load(**_load_kwargs(args))


def _speculation_kwargs(args) -> dict:
    """load()'s speculation arguments, for the commands that decode (generate, chat, serve)."""
    if not hasattr(args, "speculate"):
        return {}
    return dict(speculate=args.speculate, draft=args.draft_model, draft_tokens=args.draft_tokens)


def _argument_text(value: str, what: str) -> str:
    """An argument's text; Python hands bytes that are not UTF-8 over as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameterError(f"{what} is not valid UTF-8 (at character {e.start})") from None
    return value


def _stdin_text(what: str) -> str:
    """All of stdin as UTF-8 text; a closed stdin (`<&-`) or bytes that are not UTF-8 are errors."""
    if sys.stdin is None:
        raise GemmarunError(f"no {what}: stdin is closed")
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidParameterError(f"the {what} on stdin is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def cmd_generate(args) -> int:
    params = _sampling(args)  # validate before the (slow) load
    if args.prompt_text is not None and args.prompt is not None:
        raise GemmarunError("give the prompt either as an argument or with --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        if sys.stdin is not None and sys.stdin.isatty():
            raise GemmarunError("no prompt: pass it as an argument, with --prompt, or on stdin")
        prompt = _stdin_text("prompt")
    prompt = _argument_text(prompt, "the prompt")
    if prompt == "":
        raise GemmarunError("the prompt is empty")
    lm = _load(args)
    if args.echo:
        sys.stdout.write(prompt)
    for piece in lm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession, run_repl

    params = _sampling(args)
    if sys.stdin is None:
        raise GemmarunError("no messages: stdin is closed (chat reads them from a terminal or a pipe)")
    if args.system is not None:
        _argument_text(args.system, "--system")
    lm = _load(args)
    notice = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 are an error, not lone surrogates
        sys.stdin.reconfigure(errors="strict")
    return run_repl(lm, ChatSession(lm, system=args.system, params=params, notify=notice), stdin=sys.stdin)


def cmd_serve(args) -> int:
    from .server import serve

    if not 0 <= args.port <= 65535:
        raise InvalidParameterError(f"--port must be from 0 to 65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise InvalidParameterError("--api-key is empty: it would let every request in; give a key or leave the option out")
    if not 0 <= args.shutdown_timeout <= 3600:  # also refuses NaN
        raise InvalidParameterError(f"--shutdown-timeout must be from 0 to 3600 seconds, got {args.shutdown_timeout}")
    for name in ("max_batch", "max_waiting"):
        if getattr(args, name) < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"serving on {args.host} without --api-key: anyone who can reach it can use it", stacklevel=2)
    if args.prefix_cache_mb < 0:
        raise GemmarunError(f"--prefix-cache-mb must be >= 0 (0 turns it off), got {args.prefix_cache_mb:g}")
    if args.ray:
        from .distributed.serve import serve_on_ray

        serve_on_ray(_load_kwargs(args), replicas=args.replicas, threads=_ray_threads(args), address=args.ray_address,
                     host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                     max_waiting=args.max_waiting, model_id=args.served_model_name, context=args.context,
                     prefix_cache_mb=args.prefix_cache_mb, metrics_key=args.metrics_key)  # fmt: skip
        return 0
    serve(_load(args), host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_waiting=args.max_waiting, model_id=args.served_model_name, context=args.context,
          prefix_cache_mb=args.prefix_cache_mb, metrics_key=args.metrics_key, data_dir=args.data_dir,
          shutdown_timeout=args.shutdown_timeout)  # fmt: skip
    return 0


def _add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", action="store_true", help=f"run on a Ray cluster ({what}; needs the 'ray' extra)")
    p.add_argument("--ray-address", help="join this running cluster (e.g. HEAD:6379, or 'auto'); default: start a local one")


def _ray_threads(args) -> int:
    """Torch threads of each Ray replica or worker, and the CPUs it asks the cluster for."""
    threads = 1 if args.threads is None else args.threads
    if threads < 1:
        raise GemmarunError(f"--threads must be >= 1, got {threads}")
    return threads


def cmd_batch(args) -> int:
    from .batch import read_lines, run_batch

    read_lines(args.input)  # a malformed input fails before the (slow) load
    if args.ray:
        from .distributed.data import run_batch_on_ray

        s = run_batch_on_ray(_load_kwargs(args), args.input, args.output, workers=args.workers, threads=_ray_threads(args),
                             address=args.ray_address, max_batch=args.max_batch, model_id=args.served_model_name,
                             progress=not args.quiet)  # fmt: skip
    else:
        s = run_batch(
            _load(args), args.input, args.output, max_batch=args.max_batch, model_id=args.served_model_name, progress=not args.quiet
        )
    print(f"{args.output}: {s.completed} lines answered, {s.failed} with errors, {s.skipped} already done ({s.total} in all)")
    return 0


def cmd_quantize(args) -> int:
    from pathlib import Path

    from .quant import save_quantized
    from .quant.checkpoint import check_destination

    src = Path(args.src)
    if src.is_file():
        raise GemmarunError(f"{src} is a file; gemmarun quantize takes a checkpoint folder (GGUF files load packed as they are)")
    if src.is_dir():  # before the (slow) load; a repo id is checked once it resolves, below
        check_destination(src, args.dst, args.force)
    args.model, args.quantize = args.src, args.scheme
    calibrated = args.scheme == "int4" and not args.no_calibration
    if args.scheme != "int4" and args.calibration is not None:
        raise GemmarunError("--calibration applies to --scheme int4 (int8 rounds each channel to its own maximum)")
    if args.no_calibration and args.calibration is not None:
        raise GemmarunError("give either --calibration FILE or --no-calibration, not both")
    if calibrated:
        text = True
        if args.calibration is not None:
            try:
                text = Path(args.calibration).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GemmarunError(f"cannot read the calibration text {args.calibration}: {e}; give a UTF-8 text file") from None
        args.calibration_kwargs = dict(calibration=text, calibration_tokens=args.calibration_tokens)
    lm = _load(args)
    out = save_quantized(lm, Path(args.dst), force=args.force)
    how = "" if args.scheme == "int8" else f", groups of {args.group_size}" + (", calibrated" if calibrated else "")
    print(f"wrote {out} ({args.scheme}{how})")
    return 0


def cmd_bench(args) -> int:
    from .tools.bench import report

    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    unknown = engines - {"gemmarun", "transformers", "llama.cpp"}
    if unknown:
        raise GemmarunError(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from gemmarun, transformers, llama.cpp")
    for name in ("threads", "prefill", "decode"):
        if getattr(args, name) < 1:
            raise InvalidParameterError(f"--{name} must be >= 1, got {getattr(args, name)}")
    title = args.shape or args.model or "default model"
    try:
        print(report(title, args.shape, args.model, engines, args.threads, args.prefill, args.decode, args.compile, args.cache_dtype))
    except ValueError as e:
        raise GemmarunError(str(e)) from None
    return 0


def cmd_models(args) -> int:
    from .weights.listing import list_models

    rows = list_models()
    if not rows:
        print("no models found locally")
    for r in rows:
        print(f"{r.name:48s} {r.kind:12s} {r.size_mb:9.1f} MB  {r.path}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, get_task, markdown, write_json

    tasks = [get_task(t.strip()) for name in args.task for t in name.split(",") if t.strip()]  # validate before the load
    if not tasks:
        raise InvalidParameterError("--task names no task; give one, e.g. --task piqa")
    if args.output:
        _check_writable(args.output)  # before the run, not after an hour of it
    if len(tasks) > 1 and args.data is not None:
        raise GemmarunError("--data names one task's data; run one task at a time with it")
    lm = _load(args)
    scorer = None
    if args.ray:
        from .distributed.eval import ray_scorer

        scorer = ray_scorer(lm, _load_kwargs(args), workers=args.workers, threads=_ray_threads(args), address=args.ray_address)
    results = []
    for task in tasks:
        results.append(evaluate(lm, task, shots=args.shots, limit=args.limit, data=args.data, seed=args.seed, progress=not args.quiet,
                                scorer=scorer))  # fmt: skip
        print(markdown(results[-1:]), flush=True)
    if len(results) > 1:
        print("\n" + markdown(results))
    if args.output:
        write_json(results, args.output)
    return 0


def _check_writable(path: str) -> None:
    """Fail now if `path` cannot be written as a file: a folder, or a folder that does not exist."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise GemmarunError(f"--output {p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise GemmarunError(f"--output {p}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise GemmarunError(f"--output {p}: permission denied")


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from .evaluate.perplexity import perplexity, window_count
    from .evaluate.report import Progress

    path = Path(args.file)
    if not path.is_file():
        raise GemmarunError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidParameterError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    lm = _load(args)
    window = min(args.window, lm.context)
    n = len(lm.tokenizer.encode(text, add_bos=False))
    bar = Progress(window_count(n, window, args.stride), "perplexity", enabled=not args.quiet)
    r = perplexity(lm, text, window=window, stride=args.stride, progress=bar)
    print(f"perplexity {r.perplexity:.4f}  nll {r.nll:.4f} nats/token  {r.bits_per_byte:.4f} bits/byte  "
          f"{r.tokens} tokens  {r.windows} windows of {r.window} (stride {r.stride})")  # fmt: skip
    return 0


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
    _add_model_args(g)
    _add_speculation_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat in the terminal (piped input: one message per line)")
    c.add_argument("--system", help="system text (Gemma has no system role: it prefixes the first user turn)")
    _add_model_args(c)
    _add_speculation_args(c)
    _add_sampling_args(c)
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
    _add_ray_args(s, "Ray Serve, one engine per replica behind one endpoint")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: engines serving the endpoint (default 1)")
    _add_model_args(s)
    _add_speculation_args(s)
    s.set_defaults(func=cmd_serve)

    bt = sub.add_parser("batch", help="answer a file of OpenAI batch lines (resumable), here or on a Ray cluster")
    bt.add_argument("input", metavar="INPUT", help="JSON lines: custom_id, method, url (/v1/chat/completions or /v1/completions), body")
    bt.add_argument("output", metavar="OUTPUT", help="OpenAI batch output lines; lines already there are not redone")
    bt.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per engine (default 8)")
    bt.add_argument("--served-model-name", help="model id in the responses (default: the folder or file name)")
    bt.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_ray_args(bt, "Ray Data, an actor pool of engines")
    bt.add_argument("--workers", type=int, default=2, help="with --ray: engines in the pool (default 2)")
    _add_model_args(bt)
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
    _add_ray_args(e, "items sharded across workers, scores identical to one process")
    e.add_argument("--workers", type=int, default=2, help="with --ray: scoring workers (default 2)")
    _add_model_args(e)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("perplexity", help="perplexity of a text file with a sliding window")
    x.add_argument("file", metavar="FILE", help="UTF-8 text file")
    x.add_argument("--window", type=int, default=1024, help="tokens per window, BOS included (default 1024)")
    x.add_argument("--stride", type=int, default=512, help="text tokens each window advances (default 512)")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_model_args(x)
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
    from . import __version__

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


if __name__ == "__main__":
    sys.exit(main())
