"""Speculative decoding: tokens/s with and without it on the default model, and what a verify
forward of k + 1 positions costs against one position on the 2B shape.

    flock /work/bench.lock python benchmarks/speculative.py [--tokens 128] [--reps 2] [--parts abc]

(a) Input-grounded prompts (rewrite, repeat or continue a given text or code: the n-gram source's
    case) and (b) free generation, greedy, on the default Gemma 3 270M: decode tokens/s (first token
    to last, prefill excluded) with speculate off and ngram, alternated within the run (the machine
    is noisy), whether the tokens are identical (greedy and seeded sampling alike), the acceptance
    rate and the k chosen.
Every figure is the best of --reps alternated runs: the machine is shared, and a slow run is
someone else's load, not the variant's.
(c) The default model, and the 2B shape with random weights (drafts would be chance there) in int8
    and int4: the time of one verify forward of T = 2..9 positions over a 256-token cache against
    T = 1, the bound on what speculation can gain per format.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import gemmarun
from gemmarun.generation import core
from gemmarun.model.cache import KVCache

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished "
    "the great lens until it gleamed, and wound the clockwork that turned the light. Ships passing the "
    "rocky point relied on its steady beam, and for forty years it had never once gone dark."
)
CODE = """def merge_sorted(a, b):
    result = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            result.append(a[i])
            i += 1
        else:
            result.append(b[j])
            j += 1
    result.extend(a[i:])
    result.extend(b[j:])
    return result
"""
GROUNDED = {
    "repeat text": f"Repeat the following paragraph exactly.\n\n{TEXT}",
    "rewrite text": f"Rewrite this paragraph in the past perfect tense, changing nothing else.\n\n{TEXT}",
    "copy code": f"Here is a Python function:\n\n{CODE}\nWrite it out again with a docstring added.",
    "rename code": f"Rename the variable `result` to `merged` in this code and show the whole function.\n\n{CODE}",
    "continue list": "Continue this list in the same format up to 20:\n1. one\n2. two\n3. three\n4. four\n5. five\n6. six",
    "fix typos": "Fix the spelling in this text and return it: The quick brwn fox jumpd over the lazy dgo. "
    "Then the fox ran into the forrest, where it met an owl who was sitting on a branch.",
}
FREE = {
    "story": "Write a short story about a dragon who learns to cook.",
    "explain": "Explain how a refrigerator works to a ten year old.",
    "poem": "Write a poem about the sea at night.",
}


def chat(lm, text: str) -> list[int]:
    return lm.tokenizer.encode(lm.tokenizer.render_chat([{"role": "user", "content": text}]))


def run_prompts(lm, prompts: dict[str, str], params, reps: int) -> list[dict]:
    rows = []
    for name, text in prompts.items():
        ids = chat(lm, text)
        spec = lm.speculator("ngram")
        rates = {"off": [], "ngram": []}
        before = dict(spec.totals)
        k_before = dict(spec.k_chosen)
        outs = {}
        for _ in range(reps):
            for mode in ("off", "ngram"):  # alternated, so drift on a shared machine hits both
                first, n, toks = None, 0, []
                for events in lm.generator.run([ids], params, lm.speculator(mode)):
                    toks += [e.token_id for e in events]
                    if first is None:
                        first = time.perf_counter()
                n = len(toks) - 1
                rates[mode].append(n / (time.perf_counter() - first))
                outs[mode] = toks
        t = {k: spec.totals[k] - before[k] for k in spec.totals}
        ks = {k: spec.k_chosen.get(k, 0) - k_before.get(k, 0) for k in spec.k_chosen}
        mean_k = sum(k * c for k, c in ks.items()) / max(1, sum(ks.values()))
        row = dict(
            name=name, tokens=len(outs["off"]), off=max(rates["off"]), ngram=max(rates["ngram"]),
            identical=outs["off"] == outs["ngram"], accept=t["accepted"] / max(1, t["drafted"]),
            per_round=t["tokens"] / max(1, t["rounds"]), mean_k=mean_k, off_switches=t["switched_off"],
        )  # fmt: skip
        row["speedup"] = row["ngram"] / row["off"]
        print(
            f"  {name:14s} {row['tokens']:4d} tok  off {row['off']:6.1f} tok/s  ngram {row['ngram']:6.1f} tok/s  "
            f"x{row['speedup']:.2f}  identical {row['identical']}  accepted {row['accept']:.0%}  "
            f"tokens/round {row['per_round']:.2f}  mean k {row['mean_k']:.1f}  switched off {row['off_switches']}",
            flush=True,
        )
        rows.append(row)
    geo = statistics.geometric_mean([r["speedup"] for r in rows])
    print(f"  geometric mean speedup x{geo:.2f}", flush=True)
    return rows


def verify_cost(lm, label: str, reps: int) -> None:
    model = lm.model
    ids = torch.randint(3, lm.config.vocab_size, (256 + 16,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = KVCache.for_model(model, 1, 512, ring_extra=10)
    with torch.inference_mode():
        core.prefill(model, cache, [ids[:256]])
        times: dict[int, list[float]] = {t: [] for t in range(1, 10)}
        for _ in range(reps):
            for t in range(1, 10):  # every T once a pass, so drift hits them alike
                start = time.perf_counter()
                core.forward(model, cache, [ids[256 : 256 + t]], [256], last=False)
                times[t].append(time.perf_counter() - start)
                cache.truncate(256)
    one = min(times[1])
    cells = "  ".join(f"T={t} x{min(times[t]) / one:.2f}" for t in range(2, 10))
    print(f"  {label}: one position {one * 1e3:.0f} ms;  {cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--parts", default="abc", help="a: input-grounded, b: free generation, c: the 2B verify cost")
    args = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, torch threads {torch.get_num_threads()}", flush=True)
    lm = gemmarun.load()
    print(f"default model {lm.source}, backend {lm.model.ops.name}, draft tokens {lm.speculator('ngram').config.draft_tokens}")
    if "a" in args.parts:
        print("(a) input-grounded, greedy")
        run_prompts(lm, GROUNDED, gemmarun.SamplingParams(max_new_tokens=args.tokens), args.reps)
    if "b" in args.parts:
        # Sampled: the default model is a base model, and its greedy continuations of these prompts
        # fall into loops that n-gram drafts copy; sampling is the free text that drafts rarely hit.
        print("(b) free generation, sampled (temperature 1, top_p 0.95, seeded)")
        free = gemmarun.SamplingParams(max_new_tokens=args.tokens, temperature=1.0, top_p=0.95, seed=0)
        run_prompts(lm, FREE, free, args.reps)
        print("(b') free generation, greedy (the base model's loops)")
        run_prompts(lm, FREE, gemmarun.SamplingParams(max_new_tokens=args.tokens), args.reps)
    if "c" in args.parts:
        from gemmarun.tools.bench import gemma2_2b_files

        print("(c) a verify forward of T positions against one, after 256 tokens: the default model, and the 2B shape (random weights)")
        verify_cost(lm, "default model", max(5, args.reps * 2))
        files = gemma2_2b_files(Path.home() / ".cache/gemmarun/bench", (), schemes=("int8", "int4"))
        for label in ("int8", "int4"):
            verify_cost(gemmarun.load(files[label]), f"2B {label}", max(5, args.reps * 2))


if __name__ == "__main__":
    main()
