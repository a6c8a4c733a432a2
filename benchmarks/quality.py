"""What quantisation costs in accuracy (issue: int8 within 0.5 % of fp32 perplexity, int4 g32 within 3 %).

    python benchmarks/quality.py [--text benchmarks/perplexity_text.txt] [--skip-2b]

1. Perplexity of the real Gemma 3 270M on a fixed text: the GGUF decoded to float32 (the reference),
   re-quantised by gemmarun to int8 and int4 (g32 by the weights alone; g32 and g128 calibrated on the
   built-in text, as `gemmarun quantize` does), and the file's own Q4_K_M blocks kept packed.
2. Logit error of int8 / int4 against float32 on the gemma-2-2b shape (random weights; made by
   `gemmarun bench --shape gemma-2-2b` or benchmarks/speed.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import gemmarun
from gemmarun.evaluate.perplexity import perplexity
from gemmarun.weights.source import cache_dir


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(Path(__file__).with_name("perplexity_text.txt")))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--skip-2b", action="store_true")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    print(f"### Perplexity, Gemma 3 270M, {Path(args.text).name}, window {args.window}, stride {args.stride}\n")
    print("| weights | perplexity | vs float32 | wall s |\n|---|---|---|---|")
    ref = None
    for label, kw in [("float32 (GGUF decoded)", dict(quantize="none")), ("int8 (per channel)", dict(quantize="int8")),
                      ("int4 g32, weights only", dict(quantize="int4", group_size=32)),
                      ("int4 g32, calibrated (built-in text)", dict(quantize="int4", group_size=32, calibration=True)),
                      ("int4 g128, calibrated (built-in text)", dict(quantize="int4", group_size=128, calibration=True)),
                      ("Q4_K_M blocks as stored", {})]:  # fmt: skip
        lm = gemmarun.load(**kw)
        t = time.perf_counter()
        ppl = perplexity(lm, text, window=args.window, stride=args.stride).perplexity
        ref = ref or ppl
        print(f"| {label} | {ppl:.4f} | {100 * (ppl / ref - 1):+.2f}% | {time.perf_counter() - t:.0f} |", flush=True)
    hf = cache_dir() / "bench" / "gemma-2-2b-random"
    if args.skip_2b or not hf.exists():
        return 0
    ids = [2] + torch.randint(1000, 200000, (127,), generator=torch.Generator().manual_seed(0)).tolist()
    base = gemmarun.load(hf, dtype="float32").logits(ids)
    print("\n### Logit error against float32, gemma-2-2b shape (random weights, 128 tokens)\n")
    print("| weights | max abs | mean abs | relative RMS | top-1 agreement |\n|---|---|---|---|---|")
    for label, kw in [("int8", dict(quantize="int8")), ("int4 g32", dict(quantize="int4"))]:
        got = gemmarun.load(hf, **kw).logits(ids)
        d = got - base
        rel = (d.pow(2).mean() / base.pow(2).mean()).sqrt().item()
        agree = (got.argmax(-1) == base.argmax(-1)).float().mean().item()
        print(f"| {label} | {d.abs().max():.4f} | {d.abs().mean():.4f} | {rel:.4f} | {100 * agree:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
