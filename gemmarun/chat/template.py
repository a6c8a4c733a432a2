"""The chat prompt: OpenAI-style messages rendered in Gemma's turn format or the checkpoint's template.

Gemma has no system role: a system message becomes a prefix of the first user turn; the assistant
speaks as `model`; replies end with `<end_of_turn>` (or `<eos>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import GemmarunError, InvalidParameterError
from ..tokenizer import _chat_turns


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt and the character spans of its message text, which encode with
    special-token text kept as text: only the template's own markers are control tokens, so a
    message holding `<end_of_turn>\n<start_of_turn>model\n` cannot forge a turn."""

    text: str
    literal: tuple[tuple[int, int], ...] = ()

    def encode(self, tokenizer, add_bos: bool = True) -> list[int]:
        return tokenizer.encode(self.text, add_bos=add_bos, literal=self.literal)

    def after(self, start: int) -> ChatPrompt:
        """The prompt from character `start` on, its spans moved along."""
        spans = tuple((max(a, start) - start, b - start) for a, b in self.literal if b > start)
        return ChatPrompt(self.text[start:], spans)


# Stand-ins for message text while the template runs: private-use characters and digits, which no
# template filter (trim, upper, escape) changes, so each marks where its message's text lands.
_MARK = re.compile("\ue000(\\d+)\ue001")


def render_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> ChatPrompt:
    """The prompt for OpenAI-style messages: the checkpoint's own chat template when it ships one,
    Gemma's turn format otherwise; it starts with <bos>, so encode() adds no second one."""
    turns = _chat_turns(messages)
    # Fold the system message ourselves first: Gemma 2's own template raises on a system role.
    marked = [{"role": "assistant" if role == "model" else role, "content": f"\ue000{i}\ue001"} for i, (role, _) in enumerate(turns)]
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        text = tokenizer.render_chat(marked, add_generation_prompt=add_generation_prompt)
    else:
        try:
            text = _jinja(template).render(
                messages=marked,
                add_generation_prompt=add_generation_prompt,
                bos_token=tokenizer.id_to_piece(tokenizer.bos_id),
                eos_token=tokenizer.id_to_piece(tokenizer.eos_id),
            )
        except GemmarunError:
            raise
        except Exception as e:  # the template's own fault (jinja errors, undefined names, type errors)
            raise InvalidParameterError(f"the model's chat template failed on these messages ({type(e).__name__}: {e})") from None
    out, spans, pos, length = [], [], 0, 0
    for m in _MARK.finditer(text):
        content = turns[int(m.group(1))][1]
        out += [text[pos : m.start()], content]
        length += m.start() - pos
        spans.append((length, length + len(content)))
        length += len(content)
        pos = m.end()
    out.append(text[pos:])
    return ChatPrompt("".join(out), tuple(spans))


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of render_prompt(); encode it with render_prompt(...).encode() to keep the
    message text from forging control tokens."""
    return render_prompt(tokenizer, messages, add_generation_prompt).text


_TEMPLATES: dict[str, object] = {}


def _jinja(source: str):
    """Compile a Hugging Face chat template the way transformers does (sandboxed, trimmed blocks)."""
    if source not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InvalidParameterError(f"the model's chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            _TEMPLATES[source] = env.from_string(source)
        except TemplateError as e:
            raise GemmarunError(f"the checkpoint's chat template does not compile: {e}") from None
    return _TEMPLATES[source]
