"""Throughput of `gemmarun serve --ray` with 1 and with 2 replicas on one machine, alternating.

    flock /work/bench.lock python benchmarks/ray_replicas.py [--model PATH] [--rounds 2]

Starts a local Ray cluster of --cpus logical CPUs, deploys the Serve app with 1 replica, sends
--requests greedy completions (--concurrency at a time, --max-tokens each, ignore_eos) through
the openai client, redeploys with 2 replicas and does the same, --rounds times, alternating, and
prints aggregate completion tokens per second for each. Each replica runs torch on --threads
threads. This is a script, not a unit test.
"""

from __future__ import annotations

import argparse
import socket
import time
from concurrent.futures import ThreadPoolExecutor


def measure(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> float:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> int:
        r = client.completions.create(model=model, prompt=f"Request {i}: once upon a time", max_tokens=max_tokens,
                                      temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        return r.usage.completion_tokens

    one(-1)  # warm: the first request on each replica pays for kernel dispatch and allocation
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or .gguf (default: the default model)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per replica")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local cluster")
    args = p.parse_args()

    import ray
    from ray import serve

    from gemmarun.distributed.serve import DEPLOYMENT, build_app
    from gemmarun.server.app import model_id_for
    from gemmarun.weights.source import resolve

    source = str(resolve(args.model))  # the default model when None
    model = model_id_for(source)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    figures: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(args.rounds):
            for replicas in (1, 2):
                app = build_app({"source": source}, replicas=replicas, threads=args.threads, max_batch=args.concurrency)
                serve.run(app, name=DEPLOYMENT, route_prefix="/")
                figures[replicas].append(measure(url, model, args.requests, args.concurrency, args.max_tokens))
                print(f"{replicas} replica(s): {figures[replicas][-1]:.1f} tok/s", flush=True)
                serve.delete(DEPLOYMENT)
    finally:
        serve.shutdown()
        ray.shutdown()
    for replicas, values in figures.items():
        print(f"{replicas} replica(s), {args.threads} thread(s) each: " + ", ".join(f"{v:.1f}" for v in values) + " tok/s")


if __name__ == "__main__":
    main()
