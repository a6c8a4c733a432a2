"""Ray Serve: the official `openai` client against a 2-replica Serve app answers exactly as a plain
server, streamed and not; a replica killed with 20 requests in flight: those on the other replica
complete, the rest fail (no hang), and the app serves again within seconds."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest

import gemmarun
from gemmarun.generation.engine import Engine
from gemmarun.server import Server

from background_server import BackgroundServer

WAIT = 240  # seconds: replicas load a model each on a loaded 2-core machine; every wait is bounded


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=11)


@pytest.fixture(scope="module")
def plain(folder):
    """A plain `gemmarun serve` of the same checkpoint: the answers to match."""
    lm = gemmarun.load(folder)
    with Engine(lm, max_batch=4, max_waiting=16) as engine:
        server = Server(lm, engine)
        with BackgroundServer(server.app) as s:
            yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60), server.model_id
        server.close()


@pytest.fixture(scope="module")
def serve_app(ray_cluster, folder):
    from ray import serve

    from gemmarun.distributed.serve import DEPLOYMENT, build_app

    with socket.socket() as sock:  # a free port for Serve's proxy
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"source": str(folder)}, replicas=2, threads=1, max_batch=4, max_waiting=32), name=DEPLOYMENT,
              route_prefix="/")  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _client(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def _answers(client, model: str) -> list:
    """Completions and chat, plain and streamed, as comparable tuples."""
    kw = dict(model=model, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    chat = [{"role": "user", "content": "Hello there"}]
    out = []
    for prompt in ("Once upon a time", "def add(a, b):"):
        r = client.completions.create(prompt=prompt, **kw)
        out.append((r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens))
        out.append("".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **kw)))
    r = client.chat.completions.create(messages=chat, **kw)
    out.append((r.choices[0].message.content, r.usage.prompt_tokens))
    out.append("".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(messages=chat, stream=True, **kw)))
    return out


def test_two_replicas_answer_as_a_plain_server(serve_app, plain):
    client, model = plain
    ray_client = _client(serve_app)
    assert [m.id for m in ray_client.models.list().data] == [model]
    expected = _answers(client, model)
    for _ in range(2):  # requests spread over both replicas; each answers the same
        assert _answers(ray_client, model) == expected
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # gemmarun's own errors, through Serve
        ray_client.completions.create(model=model, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="no Batch API"):  # one store per replica would mislead
        ray_client.batches.list()


def _replicas(ray) -> list[str]:
    """Names of the live replica actors (named actors need no dashboard, unlike the state API)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in named if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::")]


def test_killed_replica_fails_its_requests_and_is_replaced(serve_app, plain, ray_cluster):
    ray = ray_cluster
    _, model = plain
    expected = _client(serve_app).completions.create(model=model, prompt="Once upon", max_tokens=48, temperature=0,
                                                     extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    replicas = _replicas(ray)
    assert len(replicas) == 2
    results: list = [None] * 20
    started = threading.Semaphore(0)

    def request(i: int) -> None:
        try:
            stream = _client(serve_app, timeout=WAIT).completions.create(
                model=model, prompt="Once upon", max_tokens=48, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            text = ""
            for chunk in stream:
                if not text:
                    started.release()
                text += chunk.choices[0].text if chunk.choices else ""
            results[i] = text
        except Exception as e:  # the request died with its replica: an error, which is what we want
            started.release()
            results[i] = e

    threads = [threading.Thread(target=request, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for _ in range(4):  # a few streams are under way on both replicas
        assert started.acquire(timeout=WAIT)
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica died"
    done = [r for r in results if isinstance(r, str)]
    failed = [r for r in results if isinstance(r, Exception)]
    assert done and all(r == expected for r in done)  # the other replica's requests finished, exactly
    assert failed, "no request was on the killed replica"
    # Serve replaces the replica; the endpoint answers again (on the survivor at once).
    deadline = time.monotonic() + WAIT
    while len(set(_replicas(ray)) - {replicas[0]}) < 2:
        assert time.monotonic() < deadline, "the dead replica was not replaced"
        time.sleep(0.5)
    assert _client(serve_app).completions.create(model=model, prompt="Once upon", max_tokens=48, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text == expected  # fmt: skip


def test_cli_ray_options_fail_in_one_line(folder, capsys):
    pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'gemmarun[ray]')")
    from gemmarun.cli import main

    assert main(["serve", "--ray", "--replicas", "0", "--model", str(folder)]) == 1
    assert main(["serve", "--ray", "--threads", "0", "--model", str(folder)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --replicas must be >= 1, got 0", "error: --threads must be >= 1, got 0"]
