"""Debian's headless Chromium driven by Playwright (sync API), for the chat page's tests.

Playwright's own browser download is never used (it fetches from the network): the system
`chromium` is launched by path, offline; Playwright's launch gives it a fresh temporary profile
(user-data dir) each time and removes it after.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@contextlib.contextmanager
def chromium():
    """Yields a Browser; each test opens its own context (its own localStorage)."""
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


# -- driving the chat page -----------------------------------------------------------------------

WAIT_MS = 30_000  # every wait on the page is bounded by this


def open_page(page, url: str, model: str | None = None) -> None:
    """Load the page and wait until it has asked the server for the model (or failed to)."""
    page.goto(url + "/", timeout=WAIT_MS)
    if model is not None:
        wait_model(page, model)


def wait_model(page, model: str) -> None:
    """Until the page shows the model's name from /v1/models. (Predicates are passed as functions:
    an expression string would be eval'ed inside the page, which its CSP forbids.)"""
    page.wait_for_function(f"() => document.getElementById('model-name').textContent === {model!r}", timeout=WAIT_MS)


def set_settings(page, **values) -> None:
    """Fill the settings form (temperature=, top_p=, max_tokens=, seed=, system=) as a user does."""
    if page.is_hidden("#settings"):
        page.click("#toggle-settings")
    ids = {"temperature": "#temperature", "top_p": "#top-p", "max_tokens": "#max-tokens", "seed": "#seed", "system": "#system-prompt"}
    for name, value in values.items():
        page.fill(ids[name], str(value))
        page.dispatch_event(ids[name], "change")
    page.click("#toggle-settings")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page) -> None:
    """Until the reply in flight has ended (the Stop button is gone again)."""
    page.wait_for_selector("#send", state="visible", timeout=WAIT_MS)


def record_requests(page) -> list:
    """The JSON bodies the page POSTs to /v1, in order, as (path, body, headers)."""
    import json

    seen = []

    def on_request(request):
        if request.method == "POST" and "/v1/" in request.url:
            seen.append((request.url.split("/v1/", 1)[1], json.loads(request.post_data), request.headers))

    page.on("request", on_request)
    return seen


WATCH_REPLY = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const b = document.querySelector('#messages .msg.assistant:last-child .body');
    if (b) window.__lengths.push(b.textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""
