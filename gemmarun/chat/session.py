"""A conversation that keeps its KV cache across turns, fed through the generation core."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..errors import ContextLengthError, InvalidParameterError
from ..generation import core
from ..generation.sampling import SamplingParams, sample_one
from ..generation.speculative import SpecRow, decode_round, ring_extra
from ..model.cache import KVCache
from .template import ChatPrompt, render_prompt


class ChatSession:
    """A conversation on one model whose tokens stay in a KV cache of batch 1.

    Each turn feeds only its new tokens: the end of the previous reply, the user's turn and the
    `model` header. When the context would overflow, the oldest turns are dropped (the system
    text stays) and the rest is prefilled again; `notify` is told about it.
    """

    def __init__(self, lm, system: str | None = None, params: SamplingParams | None = None,
                 notify: Callable[[str], None] | None = None, prefill_chunk: int | None = None):  # fmt: skip
        self.lm = lm
        self.system = system
        self.params = params or SamplingParams(max_new_tokens=512)
        self.notify = notify or (lambda message: None)
        self.prefill_chunk = prefill_chunk or core.prefill_chunk_for(lm.model)
        self.speculator = lm.speculator()  # load()'s speculation setting, or None
        extra = ring_extra(self.speculator.config) if self.speculator else 0
        self.cache = KVCache.for_model(lm.model, 1, lm.context, ring_extra=extra)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system text stays)."""
        self.turns: list[dict] = []  # user and assistant messages so far
        self.ids: list[int] = []  # tokens whose keys and values are in the cache
        self._rendered = ""  # the rendered prompt of the last turn, up to the `model` header
        self._reply = ""  # the raw text of the last reply, which the cache holds after that header
        self._cache_matches_text = False
        self.cache.reset()

    def _messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to one user message; the turn is recorded when the stream ends or is closed."""
        if not text.strip():
            raise InvalidParameterError("the message is empty")
        tok = self.lm.tokenizer
        turns = self.turns + [{"role": "user", "content": text}]
        rendered = render_prompt(tok, self._messages(turns))
        new = self._new_tokens(rendered)
        reserve = min(self.params.max_new_tokens, self.lm.context // 2)  # room left for the reply
        if new is None or len(self.ids) + len(new) + reserve > self.lm.context:
            turns, rendered = self._fit(turns, rendered, reserve)
            self.cache.reset()
            self.ids, new = [], rendered.encode(tok)
        self.turns = turns
        seq = self.lm.generator.new_sequence(self.ids + new, self.params)
        logits = self._feed(new)
        if self.speculator is not None:
            yield from self._send_speculative(turns, rendered, seq, logits)
            return
        unfed = None  # a sampled reply token whose keys and values are not in the cache yet
        try:
            while True:
                token = sample_one(logits, seq.params, torch.tensor(seq.prompt), torch.tensor(seq.ids), seq.generator, seq.grammar)
                unfed = None if token in seq.stop_ids else token  # the next turn's text closes the turn itself
                piece = seq.add(token)
                if piece:
                    yield piece
                if seq.finish_reason == "stop":
                    break
                logits = self._feed([token])
                unfed = None
                if seq.finish_reason == "length":
                    break
        finally:
            # The next turn extends the cache only if it holds exactly the reply's text: not when a
            # stop string cut the text short, nor when an interruption left a token unfed.
            self._record(turns, rendered, seq, unfed is None)

    def _record(self, turns: list[dict], rendered: ChatPrompt, seq, matches: bool) -> None:
        # Interrupted or not, the reply so far is part of the conversation.
        self.turns = turns + [{"role": "assistant", "content": seq.text}]
        self._rendered, self._reply = rendered.text, seq.text
        self._cache_matches_text = matches
        self.last_prompt, self.last_result = seq.prompt, seq.result()

    def _send_speculative(self, turns: list[dict], rendered: ChatPrompt, seq, logits: torch.Tensor) -> Iterator[str]:
        """send()'s loop in speculative rounds (generation/speculative.py) over the session's cache."""
        pieces: list[str] = []

        def take(r: SpecRow, token: int, _logits) -> None:
            pieces.append(seq.add(token))

        r = SpecRow(0, seq, torch.tensor(seq.prompt), -1, len(seq.prompt), self.speculator.new_row(self.lm.context))
        take(r, sample_one(logits, seq.params, r.prompt_t, seq.ids, seq.generator, seq.grammar), logits)
        r.pending = seq.ids[-1]
        try:
            while True:
                yield from (p for p in pieces if p)
                pieces.clear()
                if seq.finish_reason is not None:
                    break
                with torch.inference_mode():
                    decode_round(self.lm.model, self.cache, [r], self.speculator, take)
        finally:
            # Positions before r.pos hold the reply's tokens (a round that finished the reply may
            # have written drafts past them): keep those, feed the rest of the reply but a stop token.
            reply = seq.prompt + seq.ids
            if seq.ids and seq.ids[-1] in seq.stop_ids:
                reply.pop()
            self.cache.truncate(r.pos)
            self.ids = reply[: r.pos]
            if len(reply) > r.pos:
                self._feed(reply[r.pos :])
            stop_string = seq.finish_reason == "stop" and (not seq.ids or seq.ids[-1] not in seq.stop_ids)
            self._record(turns, rendered, seq, not stop_string)

    def _new_tokens(self, rendered: ChatPrompt) -> list[int] | None:
        """The tokens that extend the cache to `rendered`, or None when the cache cannot be extended."""
        if not self.ids:
            return rendered.encode(self.lm.tokenizer)
        if not self._cache_matches_text or not rendered.text.startswith(self._rendered):
            return None
        rest = rendered.text[len(self._rendered) :]
        reply = self._reply.strip()  # templates trim the reply; the cache keeps it as generated
        if not rest.startswith(reply):
            return None
        return rendered.after(len(self._rendered) + len(reply)).encode(self.lm.tokenizer, add_bos=False)

    def _fit(self, turns: list[dict], rendered: ChatPrompt, reserve: int) -> tuple[list[dict], ChatPrompt]:
        """Drop the oldest user/assistant pairs until the conversation and a reply fit the context."""
        tok, context = self.lm.tokenizer, self.lm.context
        dropped = 0
        while len(rendered.encode(tok)) + reserve > context:
            if len(turns) <= 1:
                raise ContextLengthError(
                    f"this message has {len(rendered.encode(tok))} tokens with the template, and with {reserve} "
                    f"left for the reply that exceeds the context of {context}; shorten it or lower --max-new-tokens"
                )
            turns = turns[2:]
            dropped += 1
            rendered = render_prompt(tok, self._messages(turns))
        if dropped:
            self.notify(f"[context full: dropped the oldest {dropped} exchange(s)]")
        return turns, rendered

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Run tokens through the model at the next positions; logits (V,) after the last one."""
        with torch.inference_mode():
            logits = core.prefill(self.lm.model, self.cache, [tokens], [len(self.ids)], self.prefill_chunk)[0]
        self.ids.extend(tokens)
        return logits.cpu()
