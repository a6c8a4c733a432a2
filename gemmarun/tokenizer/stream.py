"""Streaming decode: token ids in, text out, never splitting a character."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def _as_ids(ids) -> list[int]:
    """One id or many (a list, a numpy array, a torch tensor) as a list of ints."""
    if hasattr(ids, "tolist"):  # numpy / torch, 0-d or 1-d
        ids = ids.tolist()
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


@dataclass
class StreamDecoder:
    """Incremental detokenizer: push ids, get the text they add.

    Decodes the recent tokens with and without the new ones and emits the difference, so a
    piece's leading space comes out right, and holds text back while it ends in U+FFFD: a
    multi-byte character whose byte-fallback tokens have not all arrived.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    _ids: list[int] = field(default_factory=list, init=False)  # context tokens, then pending ones
    _read: int = field(default=0, init=False)  # how many of _ids are context (already emitted)

    def push(self, token_ids: int | list[int]) -> str:
        self._ids += _as_ids(token_ids)
        before, after = self._texts()
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        # What was just emitted becomes the context for the next push; older tokens are dropped.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD)."""
        before, after = self._texts()
        self._ids.clear()
        self._read = 0
        return after[len(before) :]

    def _texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self._ids[: self._read], self.skip_special_tokens), decode(self._ids, self.skip_special_tokens)
