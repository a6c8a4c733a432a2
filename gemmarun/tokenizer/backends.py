"""The two engines under the Tokenizer, each the reference for its format: `tokenizers` for a
tokenizer.json, `sentencepiece` for a tokenizer.model and a GGUF vocabulary. Each turns text without
special tokens into ids and ids back into text."""

from __future__ import annotations

import sentencepiece as spm
import tokenizers


class _SentencePieceEngine:
    def __init__(self, sp: spm.SentencePieceProcessor, specials: dict[str, int] | None = None):
        self.sp = sp
        self.size = sp.get_piece_size()
        # SentencePiece never produces control pieces from text, but Gemma's other tokenizers
        # (tokenizer.json, llama.cpp) match their text whole, so we split them out ourselves.
        if specials is None:
            specials = {sp.id_to_piece(i): i for i in range(self.size) if sp.is_control(i) or sp.is_unknown(i)}
        self.matched_specials = specials

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def pieces(self) -> list[str]:
        return self.sp.id_to_piece(list(range(self.size)))  # one call: 262k pieces in tens of ms

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        # piece_to_id answers unk_id for any unknown piece
        return i if self.sp.id_to_piece(i) == piece else None


class _HFTokenizersEngine:
    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.size = tok.get_vocab_size(with_added_tokens=True)
        self.matched_specials = {}  # the tokenizer.json lists its added tokens; `tokenizers` matches them
        self.added_special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def pieces(self) -> list[str]:
        return [self.tok.id_to_token(i) or "" for i in range(self.size)]

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)
