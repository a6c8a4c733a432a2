"""The chat page at /: its files and routes, then end to end in headless Chromium against a live
server on the tiny random model (streaming, Stop, persistence, safe rendering, errors, API key)."""

from __future__ import annotations

import fnmatch
import json
import re
import time
from pathlib import Path

import httpx
import pytest

import gemmarun
from gemmarun.generation.engine import Engine, Request, wait_idle
from gemmarun.generation.sampling import SamplingParams
from gemmarun.server import Server
from gemmarun.server.app import STATIC

import browser
from background_server import BackgroundServer
from browser import WAIT_MS, WATCH_REPLY, open_page, record_requests, send, set_settings
from checkpoints import make_reference, save_checkpoint

MODEL = "tinychat"
CONTEXT = 1024  # the tiny model's max_position_embeddings here: room for a long streamed reply
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    reference = make_reference("gemma2", seed=21, max_position_embeddings=CONTEXT)
    return gemmarun.load(save_checkpoint(reference, tmp_path_factory.mktemp("page") / MODEL))


@pytest.fixture(scope="module")
def engine(lm):
    with Engine(lm, max_batch=2, max_waiting=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(lm, engine):
    with BackgroundServer(Server(lm, engine).app) as s:
        yield s


def running(server) -> int:
    return httpx.get(server.url + "/health", timeout=10).json()["running"]


# -- the files and routes (no browser needed) ------------------------------------------------


def test_page_and_its_files_are_served(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    scripts = re.findall(r'<script src="([^"]+)"', r.text)
    assert scripts == ["/static/markdown.js", "/static/api.js", "/static/store.js", "/static/messages.js", "/static/app.js"]
    for path, kind in [(s, "javascript") for s in scripts] + [("/static/style.css", "text/css")]:
        f = httpx.get(server.url + path, timeout=10)
        assert f.status_code == 200 and kind in f.headers["content-type"], path
    missing = httpx.get(server.url + "/static/nope.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/static/../app.py", timeout=10).status_code == 404


def test_page_fetches_nothing_from_outside():
    for f in STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, f.name


def test_every_page_file_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gemmarun"]
    for f in STATIC.iterdir():
        rel = f.relative_to(ROOT / "gemmarun").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in [tool.setuptools.package-data]"


def test_model_card_tells_context_and_chat_template(lm, engine, server):
    card = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == MODEL and card["context_length"] == engine.context == CONTEXT
    assert card["chat_template"] is False  # the tiny checkpoint ships none
    lm.tokenizer.chat_template, saved = "{{ messages }}", lm.tokenizer.chat_template
    try:
        assert Server(lm, engine).model_card()["chat_template"] is True
    finally:
        lm.tokenizer.chat_template = saved


def test_page_is_open_when_the_api_needs_a_key(lm, engine):
    with BackgroundServer(Server(lm, engine, api_key="sekret").app) as s:
        assert httpx.get(s.url + "/", timeout=10).status_code == 200
        assert httpx.get(s.url + "/static/app.js", timeout=10).status_code == 200
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401


# -- in the browser ------------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))


@pytest.fixture(scope="module")
def chromium():
    if browser.missing():
        pytest.skip(browser.missing())
    with browser.chromium() as b:
        yield b


@pytest.fixture
def page(chromium):
    """A fresh browser context (empty localStorage); fails the test on any script error in the page."""
    context = chromium.new_context(viewport={"width": 1200, "height": 800})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == []


def _chat(page, server, **settings):
    open_page(page, server.url, MODEL)
    page.click("#mode-chat")
    if settings:
        set_settings(page, **settings)


@needs_browser
def test_reply_streams_with_stats_and_system_prompt(page, server):
    requests = record_requests(page)
    _chat(page, server, system="Answer briefly.", temperature=0.9, seed=1, max_tokens=400)
    page.evaluate(WATCH_REPLY)
    page.click("#input")
    page.keyboard.type("Hello")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("there")
    page.keyboard.press("Enter")
    browser.wait_idle(page)
    assert page.text_content(".msg.user .body") == "Hello\nthere"
    path, body, _ = requests[-1]
    assert path == "chat/completions" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello\nthere"}]
    assert (body["temperature"], body["seed"], body["max_tokens"], body["model"]) == (0.9, 1, 400, MODEL)
    lengths = page.evaluate("window.__lengths")
    final = len(page.text_content(".msg.assistant .body"))
    growing = sorted(set(n for n in lengths if 0 < n < final))
    assert final > 0 and len(growing) >= 2, lengths  # seen at two lengths short of the whole reply
    assert lengths == sorted(lengths)  # text only ever added
    stats = page.text_content(".msg.assistant .stats")
    assert re.fullmatch(rf"\d+ tokens · [\d.]+ tokens/s · prompt \d+ / {CONTEXT} tokens · .+", stats), stats
    assert re.search(rf"the last prompt took \d+ of {CONTEXT} tokens", page.text_content("#stats"))


def _ignore_eos(route):
    """The request as the page sent it plus ignore_eos: a random model may end its reply at any token."""
    route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True}))


@needs_browser
def test_stop_cancels_and_frees_the_row(page, server):
    page.route("**/v1/chat/completions", _ignore_eos)  # long enough to be stopped, whatever it samples
    _chat(page, server, temperature=0.9, seed=1, max_tokens=CONTEXT)
    send(page, "Tell me a long story")
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20")
    assert page.is_visible("#stop") and running(server) == 1
    page.click("#stop")
    deadline = time.monotonic() + 10
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(server) == 0  # the server saw the client leave and freed the row
    browser.wait_idle(page)
    assert page.text_content(".msg.assistant .stats").endswith("stopped")
    kept = page.text_content(".msg.assistant .body")
    time.sleep(0.3)
    assert kept and page.text_content(".msg.assistant .body") == kept  # nothing arrives after Stop
    page.click("#new-chat")  # Escape stops too (the same request again: a reply known to stream)
    page.click("#mode-chat")
    send(page, "Tell me a long story")
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20")
    page.keyboard.press("Escape")
    browser.wait_idle(page)
    assert page.text_content(".msg.assistant .stats").endswith("stopped")


@needs_browser
def test_conversations_persist_rename_switch_delete(page, server):
    _chat(page, server, max_tokens=4)
    send(page, "First question")
    browser.wait_idle(page)
    page.click("#new-chat")
    page.click("#mode-chat")
    send(page, "Second question")
    browser.wait_idle(page)
    page.click(".conv.active .conv-rename")
    page.fill(".conv-rename-input", "My second")
    page.press(".conv-rename-input", "Enter")
    page.reload()
    page.wait_for_selector(".conv")
    assert page.locator(".conv-title").all_text_contents() == ["My second", "First question"]
    assert page.text_content(".conv.active .conv-title") == "My second"
    assert page.text_content(".msg.user .body") == "Second question"
    page.click(".conv-title >> text=First question")  # switch
    assert page.text_content(".msg.user .body") == "First question" and page.locator(".msg.assistant").count() == 1
    page.hover(".conv:has-text('My second')")  # its buttons show on hover (always on touch screens)
    page.click(".conv:has-text('My second') .conv-delete")
    assert page.locator(".conv").count() == 2  # the first click only asks
    page.click(".conv:has-text('My second') .conv-delete")
    assert page.locator(".conv-title").all_text_contents() == ["First question"]
    page.reload()
    page.wait_for_selector(".conv")
    assert page.locator(".conv-title").all_text_contents() == ["First question"]


EVIL = ('Look: <script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2">\n\n'
        '```html\n<script>window.__pwned = 3</script>\n```\n'
        '**bold <b>x</b>** `<i>code</i>` [bad](javascript:window.__pwned=4) [good](https://example.com/a)\n'
        '- item <svg onload="window.__pwned=5">\n> quote <iframe src="javascript:1">')  # fmt: skip
ALLOWED = {
    "P",
    "BR",
    "PRE",
    "CODE",
    "STRONG",
    "EM",
    "A",
    "UL",
    "OL",
    "LI",
    "BLOCKQUOTE",
    "H3",
    "H4",
    "H5",
    "H6",
    "HR",
    "BUTTON",
}  # fmt: skip  (BUTTON: the code block's copy button, added by the page)


def _elements(page, selector):
    return page.evaluate(f"[...document.querySelectorAll({selector!r})].map(e => e.tagName)")


@needs_browser
def test_markup_in_messages_and_replies_shows_as_text(page, server):
    _chat(page, server, max_tokens=4)
    send(page, EVIL)  # the user's own text
    browser.wait_idle(page)
    assert page.text_content(".msg.user .body") == EVIL
    assert _elements(page, ".msg.user .body *") == []
    # The page's own renderer on a crafted reply: only markdown's elements, the markup as text.
    tags = page.evaluate("""(src) => {
      const box = document.createElement('div');
      box.appendChild(GemmarunMarkdown.render(src));
      document.body.appendChild(box);
      return {tags: [...box.querySelectorAll('*')].map(e => e.tagName), text: box.textContent,
              code: box.querySelector('pre code').textContent, links: [...box.querySelectorAll('a')].map(a => a.href)};
    }""", EVIL)  # fmt: skip
    assert set(tags["tags"]) <= ALLOWED and "PRE" in tags["tags"] and "STRONG" in tags["tags"]
    assert "<script>window.__pwned = 1</script>" in tags["text"] and '<img src=x onerror="window.__pwned = 2">' in tags["text"]
    assert tags["code"] == "<script>window.__pwned = 3</script>"
    assert tags["links"] == ["https://example.com/a"] and "[bad](javascript:window.__pwned=4)" in tags["text"]
    # A stored reply that says it, shown by the page's real path after a reload.
    page.evaluate("""(src) => {
      const data = JSON.parse(localStorage.getItem('gemmarun.chat.v1'));
      data.conversations[0].messages.push({role: 'assistant', content: src, stats: null});
      localStorage.setItem('gemmarun.chat.v1', JSON.stringify(data));
    }""", EVIL)  # fmt: skip
    page.reload()
    page.wait_for_selector(".msg.assistant:nth-child(3)")
    assert set(_elements(page, ".msg.assistant .body *")) <= ALLOWED
    assert "<script>window.__pwned = 1</script>" in page.text_content(".msg.assistant:nth-child(3) .body")
    time.sleep(0.2)  # any onerror/onload would have fired by now
    assert page.evaluate("window.__pwned") is None


@needs_browser
def test_too_long_prompt_shows_the_servers_error(page, server):
    _chat(page, server)
    send(page, "word " * (CONTEXT + 100))
    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error")
    assert error.startswith("Error 400 (context_length_exceeded):") and str(CONTEXT) in error
    assert page.locator(".msg.assistant").count() == 0 and page.locator(".msg.user").count() == 1
    assert page.is_visible("#send")


@needs_browser
def test_overloaded_server_503_shown(page, server, engine):
    _chat(page, server)
    hold = SamplingParams(max_new_tokens=CONTEXT - 8, ignore_eos=True)
    blockers = [engine.submit(Request([2, 7 + k], hold)) for k in range(engine.max_batch + engine.max_waiting)]
    try:
        send(page, "Hello")
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error").startswith("Error 503 (server_overloaded):")
    finally:
        for b in blockers:
            b.cancel()
    assert wait_idle(engine, timeout=10)
    page.click(".msg.user:last-child .edit")  # edit-and-resend recovers once the server has room
    page.press(".edit-box", "Enter")
    browser.wait_idle(page)
    assert page.is_hidden("#error") and page.locator(".msg.assistant").count() == 1


@needs_browser
def test_api_key_asked_once_then_kept(page, lm, engine):
    with BackgroundServer(Server(lm, engine, api_key="sekret").app) as s:
        requests = record_requests(page)
        open_page(page, s.url)
        page.wait_for_selector("#key-banner:not([hidden])")
        assert page.text_content("#error").startswith("Error 401 (invalid_api_key):")
        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        page.wait_for_selector("#key-banner:not([hidden])")
        page.fill("#api-key", "sekret")
        page.click("#save-key")
        browser.wait_model(page, MODEL)
        assert page.is_hidden("#key-banner") and page.is_hidden("#error")
        page.click("#mode-chat")
        send(page, "Hi")
        browser.wait_idle(page)
        assert page.is_hidden("#error") and requests[-1][2]["authorization"] == "Bearer sekret"
        page.reload()  # kept in the browser: asked once
        browser.wait_model(page, MODEL)
        assert page.is_hidden("#key-banner")


@needs_browser
def test_completion_mode_streams_a_continuation(page, server):
    requests = record_requests(page)
    open_page(page, server.url, MODEL)
    assert "completion mode suits it" in page.text_content("#mode-hint")
    assert page.is_visible("#document") and page.is_hidden("#input")  # a new conversation starts in the mode that suits
    set_settings(page, temperature=0.9, seed=2, max_tokens=300)
    page.fill("#document", "Once upon a time")
    page.evaluate("""() => { window.__lengths = []; const d = document.getElementById('document');
      window.__timer = setInterval(() => window.__lengths.push(d.value.length), 2); }""")  # fmt: skip
    page.press("#document", "Control+Enter")
    browser.wait_idle(page)
    lengths = page.evaluate("clearInterval(window.__timer), window.__lengths")
    text = page.input_value("#document")
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert len(set(n for n in lengths if len("Once upon a time") < n < len(text))) >= 2, lengths
    path, body, _ = requests[-1]
    assert path == "completions" and body["prompt"] == "Once upon a time" and body["stream"] is True
    assert re.search(r"\d+ tokens · [\d.]+ tokens/s", page.text_content("#stats"))
    page.click("#regenerate-doc")  # Redo: the same prompt again
    browser.wait_idle(page)
    assert requests[-1][1]["prompt"] == "Once upon a time" and page.input_value("#document").startswith("Once upon a time")


@needs_browser
def test_regenerate_and_edit_the_last_message(page, server):
    requests = record_requests(page)
    _chat(page, server, max_tokens=6)
    send(page, "first")
    browser.wait_idle(page)
    page.click(".msg.assistant .regenerate")
    browser.wait_idle(page)
    assert [r[1]["messages"] for r in requests] == [[{"role": "user", "content": "first"}]] * 2
    assert page.locator(".msg").count() == 2
    page.click(".msg.user .edit")
    page.fill(".edit-box", "second")
    page.press(".edit-box", "Enter")
    browser.wait_idle(page)
    assert requests[-1][1]["messages"] == [{"role": "user", "content": "second"}]
    assert page.locator(".msg").count() == 2 and page.text_content(".msg.user .body") == "second"


@needs_browser
def test_markdown_structure(page, server):
    open_page(page, server.url, MODEL)
    got = page.evaluate("""(src) => {
      const box = document.createElement('div');
      box.appendChild(GemmarunMarkdown.render(src));
      return [...box.children].map(e => [e.tagName, e.textContent, e.dataset.lang || null, e.children.length]);
    }""", "# Title\nline one\nline two\n\n- a\n- b *c*\n\n3. x\n\n```py\nprint(1)\n\n```\n> q\n\n---\n```\nopen")  # fmt: skip
    assert got == [
        ["H3", "Title", None, 0],
        ["P", "line oneline two", None, 1],
        ["UL", "ab c", None, 2],
        ["OL", "x", None, 1],
        ["PRE", "print(1)\n", "py", 1],
        ["BLOCKQUOTE", "q", None, 1],
        ["HR", "", None, 0],
        ["PRE", "open", None, 1],
    ]  # fmt: skip  (a fence still streaming runs to the end)


@needs_browser
def test_mode_suggestion(page, server):
    open_page(page, server.url, MODEL)
    cards = [({"id": "gemma-2-2b-it", "chat_template": False}, "chat"), ({"id": "x", "chat_template": True}, "chat"),
             ({"id": "gemma-3-270m-q4_k_m", "chat_template": False}, "completion"),
             ({"id": "tinychat", "chat_template": False}, "completion")]  # fmt: skip
    for card, mode in cards:
        assert page.evaluate("(c) => GemmarunPage.suggestMode(c)", card) == mode, card


@needs_browser
def test_narrow_screen(page, server):
    page.set_viewport_size({"width": 380, "height": 740})
    _chat(page, server, max_tokens=4)
    box = page.locator("#sidebar").bounding_box()
    assert box["x"] + box["width"] <= 0  # the list is off screen until asked for
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    send(page, "A message on a phone " * 8)
    browser.wait_idle(page)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.click("#open-sidebar")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    page.click("#close-sidebar")
    assert page.is_visible("#input") and page.is_visible("#send")
