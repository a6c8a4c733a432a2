"""Time to first token of a scripted chat, with and without the engine's prefix cache.

    flock /work/bench.lock python benchmarks/prefix_cache.py [--model PATH] [--turns 6] [--reply-tokens 300]

A conversation of --turns user messages, each answered greedily with up to --reply-tokens tokens,
resent whole every turn as chat clients do (rendered with the model's chat template). Two engines
over the same loaded model, one with the prefix cache off and one with it on, run the same turn
one after the other, the order alternating from turn to turn (the machine is noisy); each turn's
time to first token is the time from submitting to the first sampled token. Every reply must be
identical on both (greedy output does not depend on the cache). This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import gemmarun
from gemmarun import SamplingParams
from gemmarun.chat import render_messages
from gemmarun.generation.engine import Engine, Request

QUESTIONS = [
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Continue the story: what did the message say, and what did the keeper do next?",
    "Now tell the same story from the point of view of the person who wrote the message.",
    "Describe the town near the lighthouse in detail: its people, its harbour, its history.",
    "Write the final chapter, where the keeper and the writer finally meet.",
    "Summarise the whole story, chapter by chapter, and say what its theme is.",
    "Write an epilogue set twenty years later.",
    "Give the story a title and explain the choice.",
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def turn(engine: Engine, lm, messages: list[dict], params: SamplingParams) -> tuple[float, list[int], str, int]:
    """(time to first token, reply ids, reply text, prompt tokens) of one turn."""
    prompt = lm.tokenizer.encode(render_messages(lm.tokenizer, messages))
    t0 = time.perf_counter()
    handle = engine.submit(Request(prompt, params))
    ttft = None
    for event in handle.events(timeout=600):
        if ttft is None and event.token_id is not None:
            ttft = time.perf_counter() - t0
        if event.error is not None:
            raise event.error
        if event.last:
            return ttft, event.result.token_ids, event.result.text, len(prompt)
    raise RuntimeError("the engine ended the request without a result")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder or .gguf (default: the default model)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--reply-tokens", type=int, default=300)
    ap.add_argument("--prefix-cache-mb", type=float, default=512)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if not 1 <= args.turns <= len(QUESTIONS):
        ap.error(f"--turns must be between 1 and {len(QUESTIONS)}")

    lm = gemmarun.load(args.model)
    params = SamplingParams(max_new_tokens=args.reply_tokens)
    context = min(lm.context, 8192)
    engines = {
        "off": Engine(lm, max_batch=1, context=context).start(),
        "on": Engine(lm, max_batch=1, context=context, prefix_cache_mb=args.prefix_cache_mb).start(),
    }
    histories = {name: [] for name in engines}
    rows = []
    try:
        with torch.inference_mode():
            # Warm up (kernels, the prefill path's first shapes): a raw text shares only BOS with the
            # chat prompts, so the cache gains nothing it could reuse from it.
            warm = lm.tokenizer.encode(" ".join(QUESTIONS[-2:]))
            for e in engines.values():
                e.submit(Request(warm, SamplingParams(max_new_tokens=4))).result(600)
            for i in range(args.turns):
                order = ["off", "on"] if i % 2 == 0 else ["on", "off"]
                row = {"turn": i + 1}
                for name in order:
                    messages = histories[name]
                    messages.append({"role": "user", "content": QUESTIONS[i]})
                    ttft, ids, text, n = turn(engines[name], lm, messages, params)
                    messages.append({"role": "assistant", "content": text})
                    row[name] = ttft
                    row[f"{name}_ids"] = ids
                    row["prompt_tokens"], row["reply_tokens"] = n, len(ids)
                row["identical"] = row.pop("off_ids") == row.pop("on_ids")
                row["ratio"] = row["on"] / row["off"]
                rows.append(row)
                print(f"turn {row['turn']}: prompt {row['prompt_tokens']} tokens, reply {row['reply_tokens']}; "
                      f"TTFT off {row['off']:.3f} s, on {row['on']:.3f} s ({row['ratio']:.2f}x); "
                      f"identical {row['identical']}", flush=True)  # fmt: skip
        stats = engines["on"].stats()["prefix_cache"]
    finally:
        for e in engines.values():
            e.close()
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads, {lm.source}")
    print("| turn | prompt tokens | TTFT, cache off | TTFT, cache on | on / off |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['off']:.3f} s | {r['on']:.3f} s | {r['ratio']:.2f} |")
    print(f"prefix cache: {json.dumps(stats)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": torch.get_num_threads(), "model": str(lm.source), "turns": rows,
                       "prefix_cache": stats}, f, indent=2)  # fmt: skip
    if not all(r["identical"] for r in rows):
        raise SystemExit("error: a reply differed with the prefix cache on")


if __name__ == "__main__":
    main()
