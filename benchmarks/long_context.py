"""Decode speed as the context fills: the default model after prompts of 32, 2000 and 6000 tokens,
gemmarun against llama.cpp on the same file, each engine in its own process, alternating.

    python benchmarks/long_context.py [--threads 2] [--lengths 32,2000,6000] [--decode 64]

Decoding reads every weight and, in every layer, the cached keys and values it attends to: the
Gemma 3 270M's sliding layers see at most 512 of them, its 3 global layers all. gemmarun runs
twice: with its default float32 cache and with `cache_dtype="float16"`, llama.cpp's default.
"""

from __future__ import annotations

import argparse
import platform
import sys

from gemmarun.tools.bench import measure
from gemmarun.weights.source import resolve


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="32,2000,6000", help="prompt tokens before decoding, comma-separated")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded after each prompt")
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    path = resolve(None)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; {path.name}; "
          f"{args.decode} tokens decoded after each prompt\n")  # fmt: skip
    print("| prompt tokens | gemmarun, float32 cache | gemmarun, float16 cache | llama.cpp (float16 cache) | "
          "vs llama.cpp (float32 / float16 cache) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for n in lengths:
        spec = dict(model=str(path), prefill=64, decode=args.decode, decode_after=n, context=n + args.decode + 72, threads=args.threads)
        rows = [
            measure("gemmarun", dict(spec, label="as stored")),
            measure("gemmarun", dict(spec, label="as stored", cache_dtype="float16")),
                measure("llama.cpp", dict(spec, label=path.name))]  # fmt: skip
        cells = [f"{m.decode_tok_s:.2f}" if not isinstance(m, str) else f"- ({m})" for m in rows]
        theirs = rows[-1]
        ratios = [f"{m.decode_tok_s / theirs.decode_tok_s:.2f}x" if not isinstance(m, str) and not isinstance(theirs, str) else "-"
                  for m in rows[:2]]  # fmt: skip
        print(f"| {n} | {' | '.join(cells)} | {' / '.join(ratios)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
