"""`gemmarun batch`: OpenAI batch lines through one engine against lm.generate, per-line errors, resuming
an interrupted job, the CLI; and the scheduler's priority (batch lines after live requests)."""

from __future__ import annotations

import json

import pytest

import gemmarun
from gemmarun import SamplingParams
from gemmarun.batch import BatchInputError, run_batch
from gemmarun.batch.lines import parse_lines
from gemmarun.chat import render_messages
from gemmarun.cli import main
from gemmarun.generation.engine import Engine, Request
from gemmarun.generation.scheduler import BATCH_PRIORITY

WAIT = 120  # seconds: bounded waits, so a hang fails instead of stalling the suite


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=11)


@pytest.fixture(scope="module")
def lm(folder):
    return gemmarun.load(folder)


def batch_lines(n: int) -> list[dict]:
    """n requests alternating completions and chat, of different lengths; greedy."""
    out = []
    for i in range(n):
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"Tell me {i} things"}], "max_tokens": 3 + i % 5, "temperature": 0}
            url = "/v1/chat/completions"
        else:
            body = {"prompt": f"Once upon a time {i}", "max_tokens": 4 + i % 7, "temperature": 0, "ignore_eos": True}
            url = "/v1/completions"
        out.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    return out


def expected_text(lm, line: dict) -> str:
    body = line["body"]
    if line["url"] == "/v1/chat/completions":
        prompt = render_messages(lm.tokenizer, body["messages"])
        return lm.generate(lm.tokenizer.encode(prompt), SamplingParams(max_new_tokens=body["max_tokens"])).text
    return lm.generate(body["prompt"], SamplingParams(max_new_tokens=body["max_tokens"], ignore_eos=True)).text


def answer_text(out: dict) -> str:
    choice = out["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def write_lines(path, lines) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def read_out(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def normalized(path) -> list[dict]:
    """Output lines without `created`, the only field that depends on when a line ran."""
    rows = read_out(path)
    for r in rows:
        if r["response"] is not None:
            r["response"]["body"].pop("created", None)
    return rows


def test_batch_equals_generate_with_per_line_errors(lm, tmp_path):
    lines = batch_lines(12)
    lines.insert(3, {"custom_id": "bad-body", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 0}})
    lines.insert(5, {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})
    write_lines(tmp_path / "in.jsonl", lines)
    s = run_batch(lm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_batch=3, progress=False)
    assert (s.total, s.skipped, s.completed, s.failed) == (14, 0, 12, 2)
    out = read_out(tmp_path / "out.jsonl")
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]  # input order
    by_id = {o["custom_id"]: o for o in out}
    bad = by_id.pop("bad-body")
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"]["error"]["param"] == "max_tokens"
    assert bad["error"] is None
    url = by_id.pop("bad-url")
    assert url["response"] is None and url["error"]["code"] == "invalid_url"
    for line in lines:
        if line["custom_id"] in by_id:
            o = by_id[line["custom_id"]]
            assert o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
            assert answer_text(o) == expected_text(lm, line), line["custom_id"]


def test_interrupted_batch_resumes_to_the_same_file(lm, tmp_path):
    write_lines(tmp_path / "in.jsonl", batch_lines(10))
    run_batch(lm, tmp_path / "in.jsonl", tmp_path / "whole.jsonl", max_batch=4, progress=False)
    whole = (tmp_path / "whole.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    # Killed after 4 lines, in the middle of writing the 5th.
    (tmp_path / "cut.jsonl").write_text("".join(whole[:4]) + whole[4][:20], encoding="utf-8")
    s = run_batch(lm, tmp_path / "in.jsonl", tmp_path / "cut.jsonl", max_batch=4, progress=False)
    assert (s.skipped, s.completed) == (4, 6)
    assert normalized(tmp_path / "cut.jsonl") == normalized(tmp_path / "whole.jsonl")
    again = run_batch(lm, tmp_path / "in.jsonl", tmp_path / "cut.jsonl", progress=False)  # nothing left to do
    assert (again.skipped, again.completed) == (10, 0)


def test_cli_batch_and_its_errors(folder, lm, tmp_path, capsys):
    lines = batch_lines(4)
    write_lines(tmp_path / "in.jsonl", lines)
    assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--model", str(folder), "-q"]) == 0
    assert "4 lines answered, 0 with errors" in capsys.readouterr().out
    assert [answer_text(o) for o in read_out(tmp_path / "out.jsonl")] == [expected_text(lm, x) for x in lines]
    (tmp_path / "broken.jsonl").write_text('{"custom_id": "a", "url": "/v1/completions"}\n{not json\n', encoding="utf-8")
    assert main(["batch", str(tmp_path / "broken.jsonl"), str(tmp_path / "o.jsonl"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: line 2: not valid JSON") and err.count("\n") == 1
    with pytest.raises(BatchInputError, match="used twice"):
        parse_lines('{"custom_id": "a"}\n{"custom_id": "a"}\n')
    with pytest.raises(BatchInputError, match="differs from the batch's endpoint"):
        parse_lines('{"custom_id": "a", "url": "/v1/completions"}\n', endpoint="/v1/chat/completions")


def test_live_requests_are_admitted_before_waiting_batch_lines(lm):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompt = lm.tokenizer.encode("Hello there")
    finished = []
    sink = lambda handle, event: event.last and finished.append(handle.request.priority)  # noqa: E731
    with Engine(lm, max_batch=1, max_waiting=8) as engine:
        with engine.scheduler.lock:  # the engine thread cannot admit until all five are queued
            engine.submit_all([Request(prompt, params, priority=BATCH_PRIORITY) for _ in range(3)], sink)
            engine.submit_all([Request(prompt, params) for _ in range(2)], sink)
        assert engine.wait_idle(WAIT)
    # One row, so requests finish in admission order: the live ones queued last went first.
    assert finished == [0, 0] + [BATCH_PRIORITY] * 3
