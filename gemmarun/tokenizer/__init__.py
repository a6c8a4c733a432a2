"""Gemma tokenizer over tokenizer.json, tokenizer.model or a GGUF vocabulary; chat; streaming decode.

Two engines do the actual splitting, and each is the reference for its format (backends.py):
`tokenizers` for a tokenizer.json, `sentencepiece` for a tokenizer.model and for a GGUF vocabulary
(rebuilt in memory as the SentencePiece model it was converted from, spm_proto.py). The Tokenizer
(tokenizer.py) adds what both need around them: special-token text in the input mapped to single
ids (splitter.py), BOS exactly once (pitfall 8), Gemma's turn format (pitfall 9, chat_turns.py)
and a streaming decoder that never splits a character (stream.py).
"""

from .chat_turns import END_OF_TURN, START_OF_TURN, _chat_turns  # noqa: F401 (gemmarun.chat's import)
from .stream import StreamDecoder
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "START_OF_TURN", "END_OF_TURN"]
