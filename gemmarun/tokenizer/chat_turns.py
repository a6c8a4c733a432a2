"""Gemma's turn format (pitfall 9): messages checked and folded into (role, content) turns."""

from __future__ import annotations

from ..errors import InvalidParameterError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


def _content(message: dict, index: int, trim: bool) -> str:
    """A message's text. Gemma's template trims user and model text (each part of a list)."""
    content = message.get("content")
    if isinstance(content, str):
        return content.strip() if trim else content
    # OpenAI-style parts: [{"type": "text", "text": "..."}]
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"].strip() if trim else p["text"] for p in content)
    raise InvalidParameterError(f"message {index}: 'content' must be a string or a list of text parts")


def _chat_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(gemma_role, content) pairs: system folded in, roles checked to alternate."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidParameterError(f"message {i} must be a dict with a 'role' and a 'content'")
    prefix, first = "", 0
    if messages[0]["role"] == "system":
        prefix, first = _content(messages[0], 0, trim=False) + "\n\n", 1
        if len(messages) == 1:  # Gemma's template would drop it; let it reach the model as a user turn
            return [("user", prefix.strip())]
    turns = []
    for i, m in enumerate(messages[first:], start=first):
        role = {"user": "user", "assistant": "model", "model": "model"}.get(m["role"])
        if role is None:
            where = "allowed only as the first message" if m["role"] == "system" else "unknown"
            raise InvalidParameterError(f"message {i}: role {m['role']!r} is {where}; use system, user, assistant")
        if role != ("user" if (i - first) % 2 == 0 else "model"):
            raise InvalidParameterError("conversation roles must alternate user/assistant/user/..., starting with user")
        turns.append((role, (prefix if i == first else "") + _content(m, i, trim=True)))
    return turns
