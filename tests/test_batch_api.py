"""The OpenAI Batch API on `gemmarun serve`, driven by the official `openai` client: files.create,
batches.create / retrieve / list / cancel, files.content; a server restarted in the middle of a batch
resumes it from --data-dir and loses no finished line; errors in OpenAI's shape."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from test_batch import answer_text, batch_lines, expected_text

import gemmarun
from gemmarun.generation.engine import Engine
from gemmarun.server import Server

from background_server import BackgroundServer

WAIT = 180  # seconds: every poll is bounded, so a stuck batch fails instead of stalling the suite


@pytest.fixture(scope="module")
def lm(checkpoint):
    return gemmarun.load(checkpoint("gemma2", seed=11))


@pytest.fixture(scope="module")
def engine(lm):
    with Engine(lm, max_batch=2, max_waiting=8) as engine:
        yield engine


def _client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _upload(client, lines) -> str:
    content = "".join(json.dumps(x) + "\n" for x in lines).encode("utf-8")
    f = client.files.create(file=("requests.jsonl", content), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(content) and client.files.content(f.id).content == content
    return f.id


def _wait(client, batch_id: str, done) -> object:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} stuck at {batch.status} {batch.request_counts}")


def _output(client, batch) -> list[dict]:
    return [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]


def test_batch_api_restart_mid_batch_resumes_without_losing_lines(lm, engine, tmp_path):
    lines = [x for x in batch_lines(16) if x["url"] == "/v1/completions"]
    lines += [{**x, "custom_id": x["custom_id"] + "-again"} for x in lines]  # 16 lines, one endpoint
    first = Server(lm, engine, data_dir=tmp_path)
    with BackgroundServer(first.app) as s:
        client = _client(s)
        file_id = _upload(client, lines)
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h",
                                      metadata={"job": "restart"})  # fmt: skip
        assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 16
        # A live request is answered while the batch runs.
        live = client.completions.create(
            model=first.model_id, prompt="Hello there", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert live.choices[0].text == expected_text(lm, {"url": "/v1/completions", "body": {"prompt": "Hello there", "max_tokens": 4}})
        _wait(client, batch.id, lambda b: b.request_counts.completed >= 3)
        first.close()  # the server stops mid-batch: lines in flight are dropped, not written
    stopped = json.loads((tmp_path / "batches" / f"{batch.id}.json").read_text())
    assert stopped["status"] == "in_progress" and 3 <= stopped["request_counts"]["completed"] < 16
    second = Server(lm, engine, data_dir=tmp_path)
    try:
        with BackgroundServer(second.app) as s:
            client = _client(s)
            done = _wait(client, batch.id, lambda b: b.status == "completed")
            assert (done.request_counts.completed, done.request_counts.failed) == (16, 0)
            assert done.metadata == {"job": "restart"} and done.error_file_id is None
            out = _output(client, done)
            assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]  # each line once, in order
            for o, x in zip(out, lines):
                assert o["response"]["status_code"] == 200 and answer_text(o) == expected_text(lm, x)
            assert [b.id for b in client.batches.list().data] == [batch.id]
    finally:
        second.close()


def test_batch_api_errors_cancel_and_error_file(lm, engine, tmp_path):
    server = Server(lm, engine, data_dir=tmp_path)
    try:
        with BackgroundServer(server.app) as s:
            client = _client(s)
            with pytest.raises(openai.NotFoundError):
                client.batches.retrieve("batch_nope")
            for path in ("/v1/batches/batch_nope", "/v1/files/file-nope", "/v1/files/file-nope/content"):
                r = httpx.get(s.url + path)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
            with pytest.raises(openai.NotFoundError):
                client.batches.cancel("batch_nope")
            with pytest.raises(openai.BadRequestError, match="purpose"):
                client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
            bad = _upload(client, [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}])
            with pytest.raises(openai.BadRequestError, match="differs from the batch's endpoint"):
                client.batches.create(input_file_id=bad, endpoint="/v1/chat/completions", completion_window="24h")
            r = httpx.post(s.url + "/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/completions"})
            assert r.status_code == 404 and r.json()["error"]["param"] == "input_file_id"
            # A line the endpoint refuses lands in the error file; the others in the output file.
            mixed = [
                {"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 2}},
                {"custom_id": "no", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": -1}},
            ]
            done = client.batches.create(input_file_id=_upload(client, mixed), endpoint="/v1/completions", completion_window="24h")
            done = _wait(client, done.id, lambda b: b.status == "completed")
            assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
            assert [o["custom_id"] for o in _output(client, done)] == ["ok"]
            errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
            assert errors[0]["custom_id"] == "no" and errors[0]["response"]["status_code"] == 400
            # Cancelling a long batch: it ends cancelled with fewer lines than it holds.
            long = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                     "body": {"prompt": "Once", "max_tokens": 24, "ignore_eos": True}} for i in range(40)]  # fmt: skip
            batch = client.batches.create(input_file_id=_upload(client, long), endpoint="/v1/completions", completion_window="24h")
            client.batches.cancel(batch.id)
            cancelled = _wait(client, batch.id, lambda b: b.status == "cancelled")
            assert cancelled.request_counts.completed < 40 and cancelled.cancelled_at is not None
    finally:
        server.close()


def test_a_cancel_while_the_worker_reads_the_input_file_ends_cancelled(lm, engine, tmp_path, monkeypatch):
    """The race CI once hit: the worker had taken the batch, cancel() marked it cancelling, and the
    worker's own 'in_progress' then overwrote that, leaving the batch in progress for good."""
    server = Server(lm, engine, data_dir=tmp_path)
    try:
        with BackgroundServer(server.app) as s:
            client = _client(s)
            lines = [
                {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 4}}
                for i in range(3)
            ]
            file_id = _upload(client, lines)
            store, worker = server.batches.store, server.batches.worker
            read = store.content_path
            ids = []

            def cancel_first(fid):  # the worker reads the input file: a cancel arrives just then
                if ids and fid == file_id:
                    worker.cancel(ids[0])
                return read(fid)

            monkeypatch.setattr(store, "content_path", cancel_first)
            batch = store.add_batch(file_id, "/v1/completions", len(lines), None)
            ids.append(batch["id"])
            worker.submit(batch["id"])
            done = _wait(client, batch["id"], lambda b: b.status in ("cancelled", "completed"))
            assert done.status == "cancelled" and done.cancelled_at is not None
    finally:
        server.close()
