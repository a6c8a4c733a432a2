"""What drawing one sampled token costs on the default model's real logits (262k vocabulary).

    python benchmarks/sampling.py [--threads 2]

gemmarun's sample_one beside the textbook path it replaced: softmax, a full sort for top-p, then
torch.multinomial over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import gemmarun
from gemmarun.generation.sampling import SamplingParams, sample_one


def full_sort(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    probs = torch.softmax(logits / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def ms_per_call(fn, n: int = 30) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logits = gemmarun.load().logits("The history of the city begins in")[-1]
    print("| settings | gemmarun sample_one ms | sort + multinomial ms |\n|---|---|---|")
    for kw in (dict(temperature=1.0), dict(temperature=1.0, top_p=0.95), dict(temperature=0.7, top_p=0.9)):
        params, gen = SamplingParams(**kw), torch.Generator().manual_seed(0)
        ours = ms_per_call(lambda: sample_one(logits, params, None, [], gen))  # noqa: B023 (called within this iteration)
        peer = ms_per_call(lambda: full_sort(logits, params, gen))  # noqa: B023
        print(f"| {', '.join(f'{k} {v}' for k, v in kw.items())} | {ours:.1f} | {peer:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
