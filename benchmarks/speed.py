"""The README's speed tables: the gemma-2-2b shape and the real default model, every engine, one run.

    python benchmarks/speed.py [--threads 2] [--engines gemmarun,transformers,llama.cpp] [--no-compile]

llama.cpp is measured through llama-cpp-python (`pip install -e '.[bench]'`, it builds from source);
without it those rows are skipped. The 2B checkpoint and its GGUF copies (F16, Q8_0 and Q4_0 written
by gguf-py; Q4_0 as llama.cpp's own quantizer makes it from the F16 file) are made once and cached
under ~/.cache/gemmarun/bench (about 16 GB).
"""

from __future__ import annotations

import argparse
import platform
import sys

from gemmarun.tools.bench import report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="gemmarun,transformers,llama.cpp")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--skip-2b", action="store_true", help="only the default model")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (each compiles for minutes)")
    args = ap.parse_args()
    engines = set(args.engines.split(","))
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, python {platform.python_version()}")
    suites = [("real default model (Gemma 3 270M Q4_K_M GGUF)", None)]
    if not args.skip_2b:
        suites.insert(0, ("gemma-2-2b shape, random weights", "gemma-2-2b"))
    for title, shape in suites:
        print("\n" + report(title, shape, None, engines, args.threads, args.prefill, args.decode, not args.no_compile), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
