"""GET /metrics: Prometheus text parsed with prometheus_client.parser, counters moving as requests are
served; behind --api-key, or its own --metrics-key."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import gemmarun
from gemmarun.generation.engine import Engine
from gemmarun.server import Server

from background_server import BackgroundServer

MODEL = "tiny"
WAIT = 120
PROMPT = "Water runs down the long river to the little sea, and the model reads every word. " * 2


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma2", seed=41))


@pytest.fixture(scope="module")
def engine(lm):
    with Engine(lm, max_batch=2, prefix_cache_mb=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(lm, engine):
    with BackgroundServer(Server(lm, engine, model_id=MODEL).app) as s:
        yield s


def scrape(url: str, key: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(url + "/metrics", headers=headers, timeout=WAIT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(r.text) for s in f.samples}


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_move_as_requests_are_served(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)
    before = scrape(server.url)
    a = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))  # fmt: skip
    b = client.completions.create(model=MODEL, prompt=PROMPT + " And then", max_tokens=6, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-1)
    httpx.get(server.url + "/nowhere", timeout=WAIT)
    after = scrape(server.url)

    assert delta(after, before, "gemmarun_requests_total", endpoint="/v1/completions", status="200") == 2
    assert delta(after, before, "gemmarun_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta(after, before, "gemmarun_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta(after, before, "gemmarun_requests_total", endpoint="unmatched", status="404") == 1
    # the scrape before this one counted too
    assert delta(after, before, "gemmarun_requests_total", endpoint="/metrics", status="200") == 1
    usage = chunks[-1].usage
    assert delta(after, before, "gemmarun_prompt_tokens_total") == a.usage.prompt_tokens + usage.prompt_tokens + b.usage.prompt_tokens
    completion = a.usage.completion_tokens + usage.completion_tokens + b.usage.completion_tokens
    assert completion == 8 + 5 + 12
    assert delta(after, before, "gemmarun_completion_tokens_total") == completion
    # one first token per sequence (4), every other token an inter-token gap
    assert delta(after, before, "gemmarun_time_to_first_token_seconds_count") == 4
    assert delta(after, before, "gemmarun_inter_token_latency_seconds_count") == completion - 4
    assert delta(after, before, "gemmarun_time_to_first_token_seconds_bucket", le="+Inf") == 4
    assert delta(after, before, "gemmarun_time_to_first_token_seconds_sum") > 0
    assert delta(after, before, "gemmarun_tokens_sampled_total") == completion
    # the second completion resumed from the first one's snapshot (both of its choices)
    assert delta(after, before, "gemmarun_prefix_cache_hits_total") == 2
    assert delta(after, before, "gemmarun_prefix_cache_tokens_reused_total") >= 2 * (a.usage.prompt_tokens - 4)
    assert after[("gemmarun_prefix_cache_limit_bytes", ())] == 8 * 2**20
    assert after[("gemmarun_prefix_cache_bytes", ())] > 0
    assert (after[("gemmarun_queue_depth", ())], after[("gemmarun_running_rows", ())]) == (0, 0)  # idle again


def test_metrics_behind_the_api_key_or_its_own_key(lm, engine):
    with BackgroundServer(Server(lm, engine, model_id=MODEL, api_key="k1").app) as s:
        assert httpx.get(s.url + "/metrics", timeout=WAIT).status_code == 401
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer k2"}, timeout=WAIT).status_code == 401
        assert ("gemmarun_queue_depth", ()) in scrape(s.url, "k1")
    with BackgroundServer(Server(lm, engine, model_id=MODEL, api_key="k1", metrics_key="m1").app) as s:
        r = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer k1"}, timeout=WAIT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert ("gemmarun_queue_depth", ()) in scrape(s.url, "m1")
        assert httpx.get(s.url + "/health", timeout=WAIT).status_code == 200  # /health stays open


def test_prefix_cache_figures_are_zero_when_it_is_off(lm):
    with Engine(lm, max_batch=1) as engine, BackgroundServer(Server(lm, engine, model_id=MODEL).app) as s:
        m = scrape(s.url)
        assert "prefix_cache" not in httpx.get(s.url + "/health", timeout=WAIT).json()
    assert m[("gemmarun_prefix_cache_hits_total", ())] == 0 and m[("gemmarun_prefix_cache_limit_bytes", ())] == 0


def test_cli_serve_flags(lm, capsys):
    """`gemmarun serve --prefix-cache-mb 4 --metrics-key m`: the limit in /health, /metrics behind its key;
    a negative limit is a one-line error."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from gemmarun.cli import main

    assert main(["serve", "--model", str(lm.source), "--prefix-cache-mb", "-1"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: --prefix-cache-mb must be >= 0") and err.count("\n") == 1

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gemmarun.cli", "serve", "--model", str(lm.source), "--port", str(port),
           "--prefix-cache-mb", "4", "--metrics-key", "m"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180  # loading and starting on a loaded machine
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                health = httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        assert health["prefix_cache"]["limit_bytes"] == 4 * 2**20
        assert httpx.get(url + "/metrics", timeout=WAIT).status_code == 401
        assert scrape(url, "m")[("gemmarun_prefix_cache_limit_bytes", ())] == 4 * 2**20
    finally:
        proc.terminate()
        proc.wait(timeout=60)
