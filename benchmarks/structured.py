"""What constrained decoding costs per token on the default model (Gemma 3 270M, 262k vocabulary).

    flock /work/bench.lock python benchmarks/structured.py [--threads 2] [--tokens 96] [--rounds 3]

The same chat prompts are decoded with and without a JSON schema, alternating within each round so
the machine's noise falls on both; the figure is the decoding time per token (after the first
token, so prefill is left out). Then the grammar's own cost on the 262k vocabulary is timed alone,
replaying the constrained replies' tokens: llguidance's mask computation, and turning its bitmask
into -inf logits (what sample_one pays on the sampling thread when the mask is ready).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gemmarun
from gemmarun import Constraint, SamplingParams
from gemmarun.chat import render_messages
from gemmarun.generation.constraints import GrammarState, token_table
from gemmarun.generation.engine import Engine, Request, wait_idle

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "science fiction", "documentary"]}},
        "cast": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 40}, "role": {"type": "string", "maxLength": 40}},
                "required": ["name", "role"],
                "additionalProperties": False,
            },
            "minItems": 8,  # long enough that most replies reach the token count
        },
    },
    "required": ["title", "year", "genres", "cast"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe the film Casablanca as JSON with its title, year, genres and cast.",
    "Give me a JSON record of a science fiction movie you like, with the full cast.",
    "Write a JSON description of a documentary about the ocean, listing everyone who appears in it.",
]


def decode_ms_per_token(lm, prompt: str, params: SamplingParams) -> tuple[float, int, str]:
    """(ms per token after the first, tokens, text) of one generation."""
    times, text = [], []
    for piece_events in lm.generator.run([lm.encode(prompt)], params):
        times.append(time.perf_counter())
        text += [e.text for e in piece_events]
    n = len(times)
    return (times[-1] - times[0]) / max(n - 1, 1) * 1e3, n, "".join(text)


def engine_rows(lm, prompts, free, constrained, rounds) -> dict:
    """The engine with four rows: three unconstrained, the fourth unconstrained or constrained.
    Median ms per token of the three unconstrained rows, after their first token, in each case."""
    out = {"4 free": [], "3 free + 1 constrained": []}
    ids = [lm.encode(p) for p in prompts] + [lm.encode(prompts[0])]
    with Engine(lm, max_batch=4) as engine:
        for r in range(rounds):
            cases = list(out) if r % 2 == 0 else list(out)[::-1]
            for case in cases:
                times: dict[int, list[float]] = {}

                def sink(handle, event, times=times):  # on the engine's thread, the only writer
                    times.setdefault(handle.id, []).append(time.perf_counter())

                last = constrained if case != "4 free" else free
                reqs = [Request(p, free) for p in ids[:3]] + [Request(ids[3], last)]
                handles = engine.submit_all(reqs, sink)
                wait_idle(engine, 600)
                for h in handles[:3]:
                    t = times[h.id]
                    out[case].append((t[-1] - t[0]) / (len(t) - 1) * 1e3)
    return {case: statistics.median(v) for case, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = gemmarun.load()
    tok = lm.tokenizer
    width = lm.config.vocab_size
    t = time.perf_counter()
    token_table(tok, width)
    table_s = time.perf_counter() - t
    prompts = [render_messages(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    constraint = Constraint.json_schema(SCHEMA)
    free = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=args.tokens, constraint=constraint)
    decode_ms_per_token(lm, prompts[0], free)  # warm up: kernels, caches
    per = {"free": [], "constrained": []}
    replies = []
    for r in range(args.rounds):
        for p in prompts:
            order = [("free", free), ("constrained", constrained)]
            for name, params in order if r % 2 == 0 else order[::-1]:
                ms, n, text = decode_ms_per_token(lm, p, params)
                per[name].append(ms)
                if name == "constrained" and r == 0:
                    replies.append(tok.encode(text, add_bos=False))
    free_ms, con_ms = statistics.median(per["free"]), statistics.median(per["constrained"])
    batch = engine_rows(lm, prompts, free, constrained, args.rounds)

    # The grammar alone, replaying the constrained replies: the mask computation, then the bitmask
    # to -inf logits.
    compute, apply = [], []
    logits = torch.randn(width)
    for ids in replies:
        state = GrammarState(constraint, tok, width, tok.stop_ids)
        state._next.result()
        for token in ids:
            t = time.perf_counter()
            state._compute()
            compute.append(time.perf_counter() - t)
            t = time.perf_counter()
            state.mask(logits)
            apply.append(time.perf_counter() - t)
            if state.advance(token):
                break
            state._next.result()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {args.threads} threads; default model (Gemma 3 270M Q4_K_M, vocabulary {width})")
    print(f"decoding, median of {len(per['free'])} runs of {args.tokens} tokens (ms per token after the first):")
    print(f"  unconstrained {free_ms:.2f}   json_schema {con_ms:.2f}   cost {100 * (con_ms / free_ms - 1):+.1f}%")
    print(f"  all runs: free {[round(x, 2) for x in per['free']]}, constrained {[round(x, 2) for x in per['constrained']]}")
    p90 = lambda xs: statistics.quantiles(xs, n=10)[-1] * 1e6  # noqa: E731
    print(f"grammar alone over {len(compute)} tokens (microseconds per token): mask computation median "
          f"{statistics.median(compute) * 1e6:.0f} (p90 {p90(compute):.0f}), "
          f"bitmask to logits median {statistics.median(apply) * 1e6:.0f} (p90 {p90(apply):.0f})")  # fmt: skip
    print("engine, four rows, ms per token of the three unconstrained rows: "
          + ", ".join(f"{case} {ms:.2f}" for case, ms in batch.items()))  # fmt: skip
    print(f"token table (once per tokenizer): {table_s:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
