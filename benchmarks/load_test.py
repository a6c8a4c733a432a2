"""Load test of `gemmarun serve`: many concurrent clients, then every answer checked against a solo run.

    python benchmarks/load_test.py --model PATH            # PATH: checkpoint folder or .gguf; default model if omitted

It starts `gemmarun serve` on a free loopback port, runs --clients concurrent clients that each send
--requests greedy requests (completions and chat, streamed and not, prompts and lengths mixed),
with some streams dropped mid-way. Then it checks that every completed answer equals the same
request run alone with LanguageModel.generate, that none was lost, and that the server is still
healthy and idle. Last it measures aggregate decode throughput at 1 and at 8 concurrent streams.
This is a script, not a unit test: speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by one had not but "
         "what all were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first been its "
         "who now people my made over did down only way find use may water long little very after words called just "
         "where most know model token language small test gemma run fast text stream decode encode sample window").split()  # fmt: skip


def make_workload(clients: int, per_client: int, seed: int, max_tokens: int) -> list[list[dict]]:
    """Each client's list of requests: kind, stream, prompt or messages, max_tokens, drop_after."""
    rng = random.Random(seed)
    plan = []
    for _ in range(clients):
        reqs = []
        for _ in range(per_client):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.choice([2, 5, 12, 40, 120])))
            kind = rng.choice(["completion", "chat"])
            stream = rng.random() < 0.5
            req = {
                "kind": kind,
                "stream": stream,
                "max_tokens": min(max_tokens, rng.choice([4, 8, 16, 32, 64])),
                "drop_after": rng.choice([2, 4]) if stream and rng.random() < 0.25 else None,
            }
            if kind == "completion":
                req["prompt"] = words.capitalize()
            else:
                req["messages"] = [{"role": "user", "content": words}]
            reqs.append(req)
        plan.append(reqs)
    return plan


async def run_request(http: httpx.AsyncClient, model: str, req: dict) -> dict:
    path = "/v1/completions" if req["kind"] == "completion" else "/v1/chat/completions"
    body = {"model": model, "max_tokens": req["max_tokens"], "temperature": 0, "stream": req["stream"]}
    body.update({"prompt": req["prompt"]} if req["kind"] == "completion" else {"messages": req["messages"]})
    if not req["stream"]:
        r = await http.post(path, json=body)
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.text}
        data = r.json()
        choice = data["choices"][0]
        text = choice["text"] if req["kind"] == "completion" else choice["message"]["content"]
        return {"status": 200, "text": text, "finish_reason": choice["finish_reason"], "usage": data["usage"]}
    body["stream_options"] = {"include_usage": True}
    text, finish, usage, chunks = "", None, None, 0
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode()}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return {"status": 200, "text": text, "finish_reason": finish, "usage": usage}
            chunks += 1
            if req["drop_after"] is not None and chunks >= req["drop_after"]:
                return {"status": "dropped"}  # leaving the block closes the connection mid-stream
            data = json.loads(line[6:])
            if "error" in data:
                return {"status": "stream-error", "error": data["error"]}
            usage = data.get("usage") or usage
            for c in data["choices"]:
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
                finish = c.get("finish_reason") or finish
    return {"status": "truncated"}  # the stream ended without [DONE]


async def load_phase(url: str, model: str, plan: list[list[dict]]) -> tuple[list[tuple[dict, dict]], float]:
    limits = httpx.Limits(max_connections=len(plan) + 8, max_keepalive_connections=len(plan) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as http:

        async def client(reqs):
            return [(req, await run_request(http, model, req)) for req in reqs]

        start = time.perf_counter()
        results = await asyncio.gather(*(client(reqs) for reqs in plan))
        return [pair for rs in results for pair in rs], time.perf_counter() - start


async def throughput(url: str, model: str, streams: int, tokens: int) -> float:
    """Aggregate decode tok/s in the steady state: chunks received while every stream was running
    (after the last stream's first token, until the first stream's last), over that time."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:

        async def one():
            times = []
            async with http.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            return times

        runs = await asyncio.gather(*(one() for _ in range(streams)))
    start, end = max(t[0] for t in runs), min(t[-1] for t in runs)
    if end <= start:
        raise SystemExit("the streams never ran all at once; raise --throughput-tokens")
    return sum(start < x <= end for t in runs for x in t) / (end - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder or .gguf (default: the default model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64, help="cap on each request's max_tokens (4..64 mixed)")
    ap.add_argument("--throughput-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads, for the server and the solo runs alike")
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gemmarun.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--context", str(args.context)] + (["--model", args.model] if args.model else [])  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                print("server did not start:\n" + server.stderr.read(), file=sys.stderr)
                return 1
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        plan = make_workload(args.clients, args.requests, args.seed, args.max_tokens)
        print(f"model {model}; {args.clients} clients x {args.requests} requests, max batch {args.max_batch}; "
              f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
        pairs, wall = asyncio.run(load_phase(url, model, plan))
        statuses: dict = {}
        for _, res in pairs:
            statuses[res["status"]] = statuses.get(res["status"], 0) + 1
        print(f"load phase: {len(pairs)} requests in {wall:.1f} s; outcomes {statuses}")
        time.sleep(1.0)  # let the server notice the last dropped streams
        health = httpx.get(url + "/health").json()
        print(f"health after: {health}")
        healthy = health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0

        rates = {}
        for streams in (1, 8, 1, 8):  # twice each, best kept: other load on the machine only slows runs
            rate = asyncio.run(throughput(url, model, streams, args.throughput_tokens))
            rates[streams] = max(rates.get(streams, 0.0), rate)
        print(f"decode throughput: 1 stream {rates[1]:.1f} tok/s, 8 streams {rates[8]:.1f} tok/s ({rates[8] / rates[1]:.2f}x)")
    finally:
        server.terminate()
        server.wait(timeout=60)

    # Every completed answer against the same request run alone (the server is gone: no contention).
    import torch

    import gemmarun
    from gemmarun.chat import render_messages

    if args.threads:
        torch.set_num_threads(args.threads)  # the same kernels as the server's: results must be identical
    lm = gemmarun.load(args.model, context=args.context)
    solo: dict = {}
    mismatches, checked = [], 0
    for req, res in pairs:
        if res["status"] != 200:
            continue
        if req["kind"] == "completion":
            ids = lm.tokenizer.encode(req["prompt"])
        else:
            ids = lm.tokenizer.encode(render_messages(lm.tokenizer, req["messages"]))
        key = (tuple(ids), req["max_tokens"])
        if key not in solo:
            solo[key] = lm.generate(ids, max_new_tokens=req["max_tokens"])
        ref = solo[key]
        checked += 1
        usage = {"prompt_tokens": ref.prompt_tokens, "completion_tokens": ref.completion_tokens, "total_tokens": ref.total_tokens}
        if (res["text"], res["finish_reason"], res["usage"]) != (ref.text, ref.finish_reason, usage):
            mismatches.append((req, res, ref))
    lost = [r for _, r in pairs if r["status"] not in (200, "dropped")]
    print(f"checked {checked} completed answers against solo runs: {len(mismatches)} differ; "
          f"{statuses.get('dropped', 0)} dropped on purpose; {len(lost)} lost or failed")  # fmt: skip
    for req, res, ref in mismatches[:5]:
        print(f"  MISMATCH {req}\n    server {res}\n    alone  {ref}")
    for res in lost[:5]:
        print(f"  FAILED {res}")
    ok = not mismatches and not lost and healthy
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
