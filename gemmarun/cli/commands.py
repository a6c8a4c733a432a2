"""One function per `gemmarun` command (generate, chat, serve, batch, quantize, bench, models, eval,
perplexity): each takes the parsed arguments and returns the exit status."""

from __future__ import annotations

import sys
import warnings

from ..errors import GemmarunError, InvalidParameterError
from .args import argument_text, check_writable, load_kwargs, load_model, ray_threads, sampling_params, stdin_text


def cmd_generate(args) -> int:
    params = sampling_params(args)  # validate before the (slow) load
    if args.prompt_text is not None and args.prompt is not None:
        raise GemmarunError("give the prompt either as an argument or with --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        if sys.stdin is not None and sys.stdin.isatty():
            raise GemmarunError("no prompt: pass it as an argument, with --prompt, or on stdin")
        prompt = stdin_text("prompt")
    prompt = argument_text(prompt, "the prompt")
    if prompt == "":
        raise GemmarunError("the prompt is empty")
    lm = load_model(args)
    if args.echo:
        sys.stdout.write(prompt)
    for piece in lm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from ..chat import ChatSession, run_repl

    params = sampling_params(args)
    if sys.stdin is None:
        raise GemmarunError("no messages: stdin is closed (chat reads them from a terminal or a pipe)")
    if args.system is not None:
        argument_text(args.system, "--system")
    lm = load_model(args)
    notice = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 are an error, not lone surrogates
        sys.stdin.reconfigure(errors="strict")
    return run_repl(lm, ChatSession(lm, system=args.system, params=params, notify=notice), stdin=sys.stdin)


def cmd_serve(args) -> int:
    from ..server import serve

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
        from ..distributed.serve import serve_on_ray

        serve_on_ray(load_kwargs(args), replicas=args.replicas, threads=ray_threads(args), address=args.ray_address,
                     host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                     max_waiting=args.max_waiting, model_id=args.served_model_name, context=args.context,
                     prefix_cache_mb=args.prefix_cache_mb, metrics_key=args.metrics_key)  # fmt: skip
        return 0
    serve(load_model(args), host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_waiting=args.max_waiting, model_id=args.served_model_name, context=args.context,
          prefix_cache_mb=args.prefix_cache_mb, metrics_key=args.metrics_key, data_dir=args.data_dir,
          shutdown_timeout=args.shutdown_timeout)  # fmt: skip
    return 0


def cmd_batch(args) -> int:
    from ..batch import read_lines, run_batch

    read_lines(args.input)  # a malformed input fails before the (slow) load
    if args.ray:
        from ..distributed.data import run_batch_on_ray

        s = run_batch_on_ray(load_kwargs(args), args.input, args.output, workers=args.workers, threads=ray_threads(args),
                             address=args.ray_address, max_batch=args.max_batch, model_id=args.served_model_name,
                             progress=not args.quiet)  # fmt: skip
    else:
        s = run_batch(
            load_model(args), args.input, args.output, max_batch=args.max_batch, model_id=args.served_model_name, progress=not args.quiet
        )
    print(f"{args.output}: {s.completed} lines answered, {s.failed} with errors, {s.skipped} already done ({s.total} in all)")
    return 0


def cmd_quantize(args) -> int:
    from pathlib import Path

    from ..quant import save_quantized
    from ..quant.checkpoint import check_destination

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
    lm = load_model(args)
    out = save_quantized(lm, Path(args.dst), force=args.force)
    how = "" if args.scheme == "int8" else f", groups of {args.group_size}" + (", calibrated" if calibrated else "")
    print(f"wrote {out} ({args.scheme}{how})")
    return 0


def cmd_bench(args) -> int:
    from ..tools.bench import report

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
    from ..weights.listing import list_models

    rows = list_models()
    if not rows:
        print("no models found locally")
    for r in rows:
        print(f"{r.name:48s} {r.kind:12s} {r.size_mb:9.1f} MB  {r.path}")
    return 0


def cmd_eval(args) -> int:
    from ..evaluate import evaluate, get_task, markdown, write_json

    tasks = [get_task(t.strip()) for name in args.task for t in name.split(",") if t.strip()]  # validate before the load
    if not tasks:
        raise InvalidParameterError("--task names no task; give one, e.g. --task piqa")
    if args.output:
        check_writable(args.output)  # before the run, not after an hour of it
    if len(tasks) > 1 and args.data is not None:
        raise GemmarunError("--data names one task's data; run one task at a time with it")
    lm = load_model(args)
    scorer = None
    if args.ray:
        from ..distributed.eval import ray_scorer

        scorer = ray_scorer(lm, load_kwargs(args), workers=args.workers, threads=ray_threads(args), address=args.ray_address)
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


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from ..evaluate.perplexity import perplexity, window_count
    from ..evaluate.report import Progress

    path = Path(args.file)
    if not path.is_file():
        raise GemmarunError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidParameterError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    lm = load_model(args)
    window = min(args.window, lm.context)
    n = len(lm.tokenizer.encode(text, add_bos=False))
    bar = Progress(window_count(n, window, args.stride), "perplexity", enabled=not args.quiet)
    r = perplexity(lm, text, window=window, stride=args.stride, progress=bar)
    print(f"perplexity {r.perplexity:.4f}  nll {r.nll:.4f} nats/token  {r.bits_per_byte:.4f} bits/byte  "
          f"{r.tokens} tokens  {r.windows} windows of {r.window} (stride {r.stride})")  # fmt: skip
    return 0
