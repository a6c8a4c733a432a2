"""Cases shared by the tokenizer tests (test_tokenizer.py, test_tokenizer_gguf.py): hard strings,
random strings, chats, a streaming text, and the one-line error check."""

from __future__ import annotations

import random

from gemmarun.tokenizer import Tokenizer

# Hard strings for every tokenizer: whitespace runs, code, digits, scripts, emoji, specials.
HARD = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "Hello world",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "tab\tseparated\tvalues",
    "\t\tdouble tab indent",
    "line one\nline two\n\n\nline five",
    "\n\n  \t",
    "  \n \t\n\r\n",
    "def add(a, b):\n    return a + b\n",
    "class A:\n    def f(self):\n        if x:\n            pass\n",
    "for (int i = 0; i < n; i++) {\n\tsum += i;\n}",
    "12345 3.14159",
    "1,000,000 and 2024-01-31T12:45:00Z",
    "日本語のテキストです。",
    "中文测试，你好！",
    "한국어 텍스트",
    "😀 👍🏽 🇫🇷 👨‍👩‍👧",
    "café naïve résumé Zürich",
    "Ünïcödé ßtraße",
    "https://example.com/path/to/page?q=1&r=two#frag",
    "email: someone@example.org",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "text<end_of_turn>",
    "x<start_of_turn>y",
    "<<start_of_turn>>",
    "<start_of_turn",
    "a <b> c </b>",
    "   \n    indented after newline",
    "mixed\t \t \tspace and tab",
    "∑ → € ™ ©",
    "\"quotes\" and 'apostrophes' — dashes…",
]


def _random_strings(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = (
        list("abcdefghijXYZ \t\n0123456789.,;:!?()[]{}<>/\\'\"-_=+*&^%$#@~`")
        + list("éüñ日本語中文한국어😀👍🏽🇫🇷ß∑→€")
        + ["    ", "\n\n", "\t\t", "the ", " and", "ing", "<start_of_turn>", "<end_of_turn>"]
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def _one_line_error(exc_info, *words):
    message = str(exc_info.value)
    assert "\n" not in message and message
    for w in words:
        assert w in message


STREAM_TEXT = "  Hello 世界! café 😀👍🏽 naïve\n\t🇫🇷 end  ok 한국어 ∑→€ done"


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    dec = tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    return pieces + [dec.flush()]


CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?\n"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi. "},
        {"role": "user", "content": [{"type": "text", "text": " Part one. "}, {"type": "text", "text": "Two"}]},
    ],
    [{"role": "user", "content": "code:\n    x = 1\n"}, {"role": "assistant", "content": "ok"}],
]
