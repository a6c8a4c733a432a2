"""The `gemmarun` command."""
from __future__ import annotations

import argparse
import sys
import warnings

from .errors import GemmarunError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="checkpoint folder, .gguf file or Hugging Face repo id (default: Gemma 3 270M)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="activation dtype (auto: float32 on CPU, bfloat16 on GPU)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--context", type=int, help="context length to allocate (default: the model's)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


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


def _sampling(args):
    from .sampling import SamplingParams

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
    )


def _load(args):
    import torch

    from .lm import load

    if args.threads is not None:
        if args.threads < 1:
            raise GemmarunError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=args.dtype, device=args.device, context=args.context)


def cmd_generate(args) -> int:
    params = _sampling(args)  # validate before the (slow) load
    if args.prompt_text is not None and args.prompt is not None:
        raise GemmarunError("give the prompt either as an argument or with --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        if sys.stdin.isatty():
            raise GemmarunError("no prompt: pass it as an argument, with --prompt, or on stdin")
        prompt = sys.stdin.read()
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


def cmd_models(args) -> int:
    from .models import list_models

    rows = list_models()
    if not rows:
        print("no models found locally")
    for r in rows:
        print(f"{r.name:48s} {r.kind:12s} {r.size_mb:9.1f} MB  {r.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmarun", description="Run Gemma 2 and Gemma 3 text models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    g.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="prompt text (else --prompt or stdin)")
    g.add_argument("--prompt", "-p", help="prompt text")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

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
    except GemmarunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
