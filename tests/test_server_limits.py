"""One large request costs the server little and stalls nobody: a 50 MB body is refused with a 413
before it is read (declared or chunked), a prompt that cannot fit the context is refused from its byte
length before it is tokenised, and meanwhile /health answers within 1 s and a concurrent stream's
largest gap stays under 1 s. Also: an empty API key is refused, a fault of ours is a 500 in OpenAI's
shape, and fields that do nothing are logged."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest

import gemmarun
from gemmarun.generation.engine import Engine
from gemmarun.server.app import Server
from gemmarun.server.limits import MAX_BODY_BYTES

from background_server import BackgroundServer


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma2", seed=5))


@pytest.fixture(scope="module")
def server(lm):
    with Engine(lm, max_batch=4, max_waiting=4) as engine:
        srv = Server(lm, engine, model_id="tiny")
        with BackgroundServer(srv.app) as background:
            background.srv = srv
            yield background


def _raw_post(url: str, path: str, body_size: int, chunked: bool) -> tuple[int, float]:
    """POST a JSON body of body_size bytes by hand (httpx would fail writing once the server answers):
    a thread sends while this one waits for the status line; its status and the seconds it took."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {body_size}\r\n\r\n"

        def send():
            piece = b'{"prompt": "' + b"a" * (1 << 20)
            try:
                s.sendall(head.encode())
                for sent in range(0, body_size, len(piece)):
                    data = piece[: body_size - sent]
                    s.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
            except OSError:  # the server answered and closed: the rest is not wanted
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        while b"\r\n" not in answer:
            got = s.recv(4096)
            assert got, "the server closed without an answer"
            answer += got
    return int(answer.split()[1]), time.monotonic() - start


def test_a_50_mb_prompt_is_refused_while_health_and_a_stream_keep_moving(server, lm):
    arrivals: list[float] = []
    health: list[float] = []
    done = threading.Event()

    def stream():
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 500, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                arrivals.append(time.monotonic())

    def poll():
        while not done.is_set():
            start = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
            health.append(time.monotonic() - start)
            time.sleep(0.05)

    threads = [threading.Thread(target=stream), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not arrivals and time.monotonic() < deadline:
        time.sleep(0.01)
    size = 50 << 20
    declared = _raw_post(server.url, "/v1/completions", size, chunked=False)
    chunked = _raw_post(server.url, "/v1/chat/completions", size, chunked=True)
    # under the body limit, far over the context (512): refused from its length, never tokenised
    calls = []
    encode = lm.tokenizer.encode
    lm.tokenizer.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        start = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "word " * 400_000, "max_tokens": 4}, timeout=60)
        overflow = time.monotonic() - start
    finally:
        lm.tokenizer.encode = encode
    threads[0].join(timeout=120)
    done.set()
    threads[1].join(timeout=60)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    print(f"\n50 MB declared: {declared[0]} in {declared[1]:.3f} s; chunked: {chunked[0]} in {chunked[1]:.3f} s; "
          f"2 MB over the context: {r.status_code} in {overflow:.3f} s; /health max {max(health):.3f} s over {len(health)}; "
          f"stream: {len(arrivals)} events, largest gap {max(gaps):.3f} s")  # fmt: skip
    assert declared[0] == 413 and chunked[0] == 413
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" and not calls
    assert max(health) < 1.0 and max(gaps) < 1.0 and len(arrivals) > 100


def test_the_body_limit_is_one_openai_error(server):
    r = httpx.post(server.url + "/v1/completions", content=b" " * (MAX_BODY_BYTES + 1), timeout=60)
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.json()["error"]["code"] == "request_too_large"


def test_an_empty_api_key_is_refused(lm):
    with Engine(lm, max_batch=1) as engine:
        for key in ("", "  "):
            with pytest.raises(gemmarun.InvalidParameterError, match="API key is empty"):
                Server(lm, engine, api_key=key)


def test_a_fault_of_ours_is_a_500_in_openai_shape(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.srv.writer, "full_response", broken)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "RuntimeError: a bug" in r.json()["error"]["message"]


def test_fields_without_effect_are_logged(server, caplog):
    with caplog.at_level(logging.WARNING, logger="gemmarun.server"):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, content=json.dumps({
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "echo": True,
            "stream_options": {"include_usage": True}, "stop_token_ids": [1, 10**6]}))  # fmt: skip
    assert r.status_code == 200
    text = caplog.text
    assert "'echo' applies to /v1/completions only" in text and "'stream_options' without 'stream'" in text
    assert "[1000000] are outside the vocabulary" in text
