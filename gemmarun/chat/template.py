"""The chat prompt: OpenAI-style messages rendered in Gemma's turn format or the checkpoint's template.

Gemma has no system role: a system message becomes a prefix of the first user turn; the assistant
speaks as `model`; replies end with `<end_of_turn>` (or `<eos>`).
"""

from __future__ import annotations

from ..errors import GemmarunError, InvalidParameterError
from ..tokenizer import _chat_turns


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for OpenAI-style messages: the checkpoint's own chat template when it ships
    one, Gemma's turn format otherwise. The result starts with <bos>; encode() adds no second one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    # Fold the system message ourselves first: Gemma 2's own template raises on a system role.
    turns = [{"role": "assistant" if role == "model" else role, "content": text} for role, text in _chat_turns(messages)]
    return _jinja(template).render(
        messages=turns,
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.id_to_piece(tokenizer.bos_id),
        eos_token=tokenizer.id_to_piece(tokenizer.eos_id),
    )


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
