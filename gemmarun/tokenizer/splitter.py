"""Special-token text cut out of the input before the engine sees it."""

from __future__ import annotations


class _SpecialSplitter:
    """Cuts text into plain strings and special-token ids, leftmost-longest like `tokenizers`."""

    def __init__(self, specials: dict[str, int]):
        self.specials = specials
        lengths: dict[str, set[int]] = {}
        for piece in specials:
            if piece:
                lengths.setdefault(piece[0], set()).add(len(piece))
        self.lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}

    def split(self, text: str) -> list[str | int]:
        if not self.lengths or not any(c in text for c in self.lengths):
            return [text]
        parts: list[str | int] = []
        start = i = 0
        while i < len(text):
            for n in self.lengths.get(text[i], ()):
                special = self.specials.get(text[i : i + n])
                if special is not None:
                    parts += [text[start:i], special]
                    i = start = i + n
                    break
            else:
                i += 1
        parts.append(text[start:])
        return [p for p in parts if p != ""]
