"""Per-sequence state shared by every decoder: sampled ids, visible text, stop handling, results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import core
from .constraints import GrammarState
from .sampling import SamplingParams


@dataclass
class GenerationResult:
    text: str  # the continuation, cut before a stop string; the stop token is not rendered
    token_ids: list[int]  # every token sampled, the final stop token included
    finish_reason: str  # "stop" (eos, <end_of_turn>, stop id or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TextEvent:
    index: int  # which prompt of the batch
    text: str  # newly visible text, possibly empty (held back while it may start a stop string)
    token_id: int
    finish_reason: str | None = None  # set on the sequence's last event


@dataclass
class SequenceState:
    """Per-row state: sampled ids, visible text and how much of it was handed out.

    Shared by Generator, Engine and ChatSession, so stop handling and detokenizing exist once."""

    prompt: list[int]
    params: SamplingParams
    max_new: int
    stop_ids: frozenset[int]
    decoder: object
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    grammar: GrammarState | None = None  # the constraint's matcher, when params has one

    def add(self, token: int) -> str:
        """Take one sampled token; return the text that became safe to show."""
        self.ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.text += self.decoder.flush()
        else:
            self.text += self.decoder.push(token)
            done = self.grammar is not None and self.grammar.advance(token)  # the grammar admits nothing more
            if done or len(self.ids) >= self.max_new:
                self.finish_reason = "stop" if done else "length"
                self.text += self.decoder.flush()
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
        visible = len(self.text) if self.finish_reason else len(self.text) - self._held_back()
        piece = self.text[self.emitted : visible]
        self.emitted = max(self.emitted, visible)
        return piece

    def _find_stop(self) -> int | None:
        if not self.params.stop:
            return None
        # A stop string can only end in text that is not yet handed out.
        start = max(0, self.emitted - max(len(s) for s in self.params.stop))
        hits = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        best = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=list(self.ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.ids),
        )


def new_sequence(model, tokenizer, context: int, prompt: Sequence[int], params: SamplingParams, seed_offset: int = 0) -> SequenceState:
    """Checked state for one prompt against `context`; the engine gives each of a request's n
    choices its own seed_offset."""
    core.check_prompt(len(prompt), context, model.config.max_position_embeddings)
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= set(tokenizer.stop_ids)
    grammar = None
    if params.constraint is not None:
        grammar = GrammarState(params.constraint, tokenizer, model.config.vocab_size, stop_ids)
    return SequenceState(
        prompt=list(prompt),
        params=params,
        max_new=min(params.max_new_tokens, context - len(prompt)),
        stop_ids=frozenset(stop_ids),
        decoder=tokenizer.stream_decoder(),
        generator=params.make_generator(seed_offset),
        grammar=grammar,
    )
