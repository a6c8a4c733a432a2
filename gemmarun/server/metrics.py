"""GET /metrics: the server's Prometheus metrics (prometheus-client, text format).

Each Server has its own registry (several servers may live in one process, as in the tests):
- counters the handlers move: requests by endpoint (route template) and status, prompt and
  completion tokens;
- histograms the engine's thread feeds through each request's sink: time to first token (submit to
  the first sampled token) and inter-token latency (between a sequence's consecutive tokens);
- what the engine reports, read when scraped: queue depth, running rows, decoding steps, tokens
  sampled, and the prefix cache's hits, misses, tokens reused, evictions, entries and bytes (zeros
  when it is off).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds. A first token waits for the prompt's prefill (up to tens of seconds for long prompts on
# a CPU); a decoding step of the models served takes milliseconds to a few hundred.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, float("inf"))
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))
PREFIX_COUNTERS = {
    "hits": "Requests that resumed from a prefix-cache snapshot",
    "misses": "Requests that found no usable prefix-cache snapshot",
    "tokens_reused": "Prompt tokens taken from the prefix cache instead of prefilled",
    "evictions": "Prefix-cache snapshots evicted to stay within the memory limit",
}
PREFIX_GAUGES = {
    "entries": "Snapshots held by the prefix cache",
    "bytes": "Memory held by the prefix cache's snapshots",
    "limit_bytes": "The prefix cache's memory limit (0: off)",
}


class EngineCollector:
    """The engine's own figures, read at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("gemmarun_queue_depth", "Requests waiting for a cache row", value=s["waiting"])
        yield GaugeMetricFamily("gemmarun_running_rows", "Cache rows prefilling or decoding", value=s["running"])
        yield CounterMetricFamily("gemmarun_decode_steps", "Decoding forwards run by the engine", value=s["steps"])
        yield CounterMetricFamily("gemmarun_tokens_sampled", "Tokens sampled by the engine", value=s["tokens"])
        prefix = s.get("prefix_cache", {})
        for name, doc in PREFIX_COUNTERS.items():
            yield CounterMetricFamily(f"gemmarun_prefix_cache_{name}", doc, value=prefix.get(name, 0))
        for name, doc in PREFIX_GAUGES.items():
            yield GaugeMetricFamily(f"gemmarun_prefix_cache_{name}", doc, value=prefix.get(name, 0))


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gemmarun_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gemmarun_prompt_tokens", "Prompt tokens of the requests served", registry=r)
        self.completion_tokens = Counter("gemmarun_completion_tokens", "Tokens generated for the requests served", registry=r)
        self.ttft = Histogram("gemmarun_time_to_first_token_seconds", "From submitting a sequence to its first token",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("gemmarun_inter_token_latency_seconds", "Between a sequence's consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        r.register(EngineCollector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observer(self):
        """For one API request: observe(choice, handle, event) on the engine's thread, from submit on."""
        start, last = time.perf_counter(), {}

        def observe(choice: int, handle, event) -> None:
            now = time.perf_counter()
            if event.token_id is not None:
                prev = last.get(handle.id)
                (self.ttft.observe(now - start) if prev is None else self.itl.observe(now - prev))
                last[handle.id] = now
            if event.last and event.result is not None:
                self.completion_tokens.inc(event.result.completion_tokens)
                if choice == 0:  # the n choices of one request share its prompt, as usage counts it
                    self.prompt_tokens.inc(event.result.prompt_tokens)

        return observe


class RequestCounter:
    """ASGI middleware: counts each HTTP request by route template and response status. Plain ASGI,
    not BaseHTTPMiddleware, so the request's receive channel is the server's own (app.py)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # a handler that fails before responding

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            # the template, not the path, so /v1/models/{id} is one series; unmatched paths are one too
            endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
