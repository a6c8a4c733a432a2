"""Gemma tokenizer."""
from .tokenizer import END_OF_TURN, START_OF_TURN, StreamDecoder, Tokenizer, _chat_turns, _sentencepiece_proto
