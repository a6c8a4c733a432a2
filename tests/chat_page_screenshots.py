"""The chat page's screenshots in docs/, taken with the default model (the real Gemma 3 270M):
`python tests/chat_page_screenshots.py` from the repository root (headless Chromium, Playwright)."""

from __future__ import annotations

import sys
from pathlib import Path

import gemmarun
from gemmarun.generation.engine import Engine
from gemmarun.server import Server

sys.path.insert(0, str(Path(__file__).parent))
import browser  # noqa: E402
from background_server import BackgroundServer  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    lm = gemmarun.load()
    with Engine(lm, max_batch=2, context=2048) as engine, BackgroundServer(Server(lm, engine).app) as s, browser.chromium() as b:
        page = b.new_context(viewport={"width": 1200, "height": 760}, device_scale_factor=1).new_page()
        browser.open_page(page, s.url, "gemma-3-270m-q4_k_m")
        # Completion mode: what suits this pretrained model, and what a new conversation starts in.
        browser.set_settings(page, temperature=0.7, top_p=0.95, seed=3, max_tokens=60)
        page.fill("#document", "The three inventions that changed daily life most in the twentieth century were")
        page.press("#document", "Control+Enter")
        browser.wait_idle(page)
        page.screenshot(path=DOCS / "chat_page_completion.png")
        # Chat mode on the same model, with a system prompt (a pretrained model: the hint says so).
        page.click("#new-chat")
        page.click("#mode-chat")
        browser.set_settings(page, system="Answer in one sentence.", max_tokens=48)
        browser.send(page, "What is the capital of France?")
        browser.wait_idle(page)
        page.click("#conversations .conv.active .conv-rename")
        page.fill(".conv-rename-input", "Capital of France")
        page.press(".conv-rename-input", "Enter")
        page.screenshot(path=DOCS / "chat_page_chat.png")
        page.set_viewport_size({"width": 390, "height": 760})
        page.wait_for_timeout(500)  # the list slides away (a 0.15 s transition)
        page.screenshot(path=DOCS / "chat_page_narrow.png")


if __name__ == "__main__":
    main()
