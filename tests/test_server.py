"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

import gemmarun
from gemmarun import SamplingParams
from gemmarun.chat import render_messages
from gemmarun.generation.engine import Engine, Request, wait_idle
from gemmarun.server import Server

from background_server import BackgroundServer
from checkpoints import make_reference, save_checkpoint

MODEL = "tinychat"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = save_checkpoint(make_reference("gemma2", seed=21), tmp_path_factory.mktemp("srv") / MODEL)
    return gemmarun.load(folder)


@pytest.fixture(scope="module")
def engine(lm):
    with Engine(lm, max_batch=4, max_waiting=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(lm, engine):
    with BackgroundServer(Server(lm, engine).app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(lm, prompt, n, **kw):
    return lm.generate(prompt, SamplingParams(max_new_tokens=n, **kw))


CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"}]


def test_models_and_health(client, server, engine):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4


def test_completion_plain_and_streamed_equal_generate(client, lm):
    expected = _greedy(lm, "Once upon a time", 20, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, 20)
    assert r.usage.total_tokens == expected.prompt_tokens + 20
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_plain_and_streamed_equal_generate(client, lm):
    prompt = lm.tokenizer.encode(render_messages(lm.tokenizer, CHAT))
    assert prompt.count(lm.tokenizer.bos_id) == 1
    expected = _greedy(lm, prompt, 24)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), expected.completion_tokens)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_stop_strings(client, lm):
    full = _greedy(lm, "Hello there", 30, ignore_eos=True).text
    stop = full[5:8]
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=30, temperature=0, stop=[stop, "zzz"],
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=30, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]


def test_seed_reproducibility_and_n(client):
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=16, temperature=1.8, top_p=0.98, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=5, n=3, **kw)
    b = client.completions.create(seed=5, n=3, **kw)
    c = client.completions.create(seed=6, n=3, **kw)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert texts(a) == texts(b) != texts(c)
    assert len(set(texts(a))) > 1 and [ch.index for ch in a.choices] == [0, 1, 2]  # each choice its own stream
    assert a.usage.completion_tokens == 48
    chat = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0.9, seed=3)
    assert client.chat.completions.create(**chat).choices[0].message.content == \
        client.chat.completions.create(**chat).choices[0].message.content  # fmt: skip


def test_completion_logprobs_and_echo_equal_model_scores(client, lm):
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0, logprobs=3, echo=True,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    choice = r.choices[0]
    prompt = lm.tokenizer.encode("Once upon")
    ids = _greedy(lm, "Once upon", 8, ignore_eos=True).token_ids
    assert choice.text == "Once upon" + lm.tokenizer.decode(ids)
    scores = torch.log_softmax(lm.logits(prompt + ids), dim=-1)  # the model's own, soft-capped
    all_ids = prompt + ids
    lp = choice.logprobs
    assert len(lp.tokens) == len(all_ids) and lp.token_logprobs[0] is None
    for k in range(1, len(all_ids)):
        assert lp.token_logprobs[k] == pytest.approx(float(scores[k - 1, all_ids[k]]), abs=1e-4)
        assert len(lp.top_logprobs[k]) <= 3
        assert max(lp.top_logprobs[k].values()) == pytest.approx(float(scores[k - 1].max()), abs=1e-4)
    assert lp.text_offset[len(prompt)] == len("Once upon")


def test_chat_logprobs_equal_model_scores(client, lm):
    prompt = lm.tokenizer.encode(render_messages(lm.tokenizer, CHAT))
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0.7, seed=1,
                                       logprobs=True, top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    # Replay the sampled tokens through the model and score them there.
    ids = lm.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0.7, seed=1)).token_ids
    shown = ids[:-1] if r.choices[0].finish_reason == "stop" else ids  # the final <end_of_turn> shows no text
    scores = torch.log_softmax(lm.logits(prompt + ids), dim=-1)
    assert len(content) == len(shown)
    for k, entry in enumerate(content):
        assert entry.token == lm.tokenizer.decode([shown[k]], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(float(scores[len(prompt) - 1 + k, shown[k]]), abs=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def _post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, timeout=30, **kw)


@pytest.mark.parametrize(
    "path, body, status, param, words",
    [
        ("/v1/completions", b'{"model": "tinychat", "prompt": ', 400, None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "at least 1"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream", "boolean"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt", "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", "token ids"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 100000}, 400, "n", "between 1 and 16"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs", "between 0 and 20"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "non-empty"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages",
         "role"),
        ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema":
         {"name": "x", "schema": {"type": "objectx"}}}}, 400, "response_format", "Invalid type"),
        ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model", "does not exist"),
    ],
)  # fmt: skip
def test_bad_input_gets_openai_error(server, path, body, status, param, words):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_errors_through_the_openai_client(client, lm):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 400)  # over the 512-token context
    assert e.value.code == "context_length_exceeded" and "512" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="between 1 and 16"):
        client.chat.completions.create(model=MODEL, messages=CHAT, n=10**6)


def test_full_queue_answers_503_then_recovers(client, server, engine, lm):
    hold = SamplingParams(max_new_tokens=400, ignore_eos=True)
    blockers = [engine.submit(Request([2, 7 + k], hold)) for k in range(engine.max_batch + engine.max_waiting)]
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        assert e.value.status_code == 503 and "busy" in str(e.value)
    finally:
        for b in blockers:
            b.cancel()
    assert wait_idle(engine)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text == _greedy(lm, "Hello", 4).text


def test_disconnect_mid_stream_frees_the_row(server, engine):
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert engine.stats()["running"] == 1
    deadline = time.monotonic() + 5
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_disconnect_before_a_full_answer_frees_the_row(server, engine):
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 400, "ignore_eos": True}
    before = engine.stats()["tokens"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    assert wait_idle(engine, timeout=10)
    assert engine.stats()["tokens"] - before < 400  # stopped early, not run to the end


def test_api_key_required_when_set(lm, engine):
    with BackgroundServer(Server(lm, engine, api_key="sekret").app) as s:
        anonymous = httpx.get(s.url + "/v1/models")
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open for probes


@pytest.mark.slow
def test_default_model_server():
    """The real Gemma 3 270M behind the server: chat and completions, streamed and not."""
    lm = gemmarun.load()
    with Engine(lm, max_batch=2, context=1024) as engine, BackgroundServer(Server(lm, engine).app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        assert model == "gemma-3-270m-q4_k_m"
        expected = lm.generate("The capital of France is", max_new_tokens=8)
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
                                      logprobs=1)  # fmt: skip
        assert r.choices[0].text == expected.text
        scores = torch.log_softmax(lm.logits(lm.tokenizer.encode("The capital of France is") + expected.token_ids), -1)
        first = scores[len(lm.tokenizer.encode("The capital of France is")) - 1, expected.token_ids[0]]
        assert r.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(first), abs=1e-3)
        messages = [{"role": "user", "content": "Name one colour."}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
        prompt = lm.tokenizer.encode(render_messages(lm.tokenizer, messages))
        assert chat.choices[0].message.content == lm.generate(prompt, max_new_tokens=12).text
