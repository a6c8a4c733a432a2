"""Generator: batched prefill, one-position decode steps, stop handling and text events."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .cache import KVCache
from .errors import ContextLengthError, InvalidParameterError
from .model import Gemma
from .sampling import SamplingParams, sample_one


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

    Shared by Generator and engine.Engine, so stop handling and detokenizing exist once."""

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

    def add(self, token: int) -> str:
        """Take one sampled token; return the text that became safe to show."""
        self.ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.text += self.decoder.flush()
        else:
            self.text += self.decoder.push(token)
            if len(self.ids) >= self.max_new:
                self.finish_reason = "length"
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


def prefill_chunk_for(model: Gemma) -> int:
    """Prompt tokens per prefill forward. 128 rows keep the packed kernels and the bfloat16 path as
    fast as 512 did (2B shape: int8, int4, bf16; the 270M) and hold a quarter of the activations
    (2B int8 peak RSS at a 512-token prompt: 3042 -> 2934 MB). Dense float32 products run PyTorch's
    GEMM, which reads every weight once per chunk: 512 (23 tok/s on the 2B, 20 at 128)."""
    dense32 = any(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 for m in model.modules())
    return 512 if dense32 else 128


def static_context(needed: int, context: int) -> int:
    """Cache length of a compiled run: a power of two from 256, so requests of similar length share
    one compiled graph (each new length costs a compile; decoding attends over the whole buffer)."""
    return min(context, max(256, 1 << (needed - 1).bit_length()))


class Generator:
    """Runs a batch of prompts to completion, yielding text events after every decode step."""

    def __init__(self, model: Gemma, tokenizer, context: int, prefill_chunk: int | None = None, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.context = context
        self.prefill_chunk = prefill_chunk or prefill_chunk_for(model)
        self.compile = compile
        self._compiled = None  # the torch.compile'd model, made on the first compiled decoding step

    def check_prompt(self, prompt: Sequence[int]) -> None:
        if len(prompt) == 0:
            raise InvalidParameterError("the prompt is empty; give at least one token (BOS counts)")
        if len(prompt) >= self.context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.context}; "
                f"shorten the prompt or load with a larger context (the model allows "
                f"{self.model.config.max_position_embeddings})"
            )

    def run(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[TextEvent]]:
        """Text events of every step; a sequence's last event carries its finish_reason."""
        return self._steps(self._sequences(prompts, params))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationResult]:
        seqs = self._sequences(prompts, params)
        for _ in self._steps(seqs):
            pass
        return [s.result() for s in seqs]

    def _sequences(self, prompts, params: SamplingParams) -> list[SequenceState]:
        return [self.new_sequence(p, params) for p in prompts]

    def new_sequence(self, prompt: Sequence[int], params: SamplingParams, seed_offset: int = 0) -> SequenceState:
        """Checked state for one prompt; the engine gives each of a request's n choices its own seed_offset."""
        self.check_prompt(prompt)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.stop_ids)
        return SequenceState(
            prompt=list(prompt),
            params=params,
            max_new=min(params.max_new_tokens, self.context - len(prompt)),
            stop_ids=frozenset(stop_ids),
            decoder=self.tokenizer.stream_decoder(),
            generator=params.make_generator(seed_offset),
        )

    def _steps(self, seqs: list[SequenceState]) -> Iterator[list[TextEvent]]:
        model = self.model
        b = len(seqs)
        if b == 0:
            return
        size = min(max(len(s.prompt) + s.max_new for s in seqs), self.context)
        if self.compile:
            cache = KVCache.for_model(model, b, static_context(size, self.context), static=True)
        else:
            cache = KVCache.for_model(model, b, size)
        step = self._compiled_step if self.compile else model
        with torch.inference_mode():
            logits = self._prefill(seqs, cache)  # (B, V)
        prompts = [torch.tensor(s.prompt) for s in seqs]
        positions = torch.tensor([len(s.prompt) for s in seqs])
        while True:
            events, next_ids = [], []
            for i, s in enumerate(seqs):
                if s.finish_reason is not None:
                    next_ids.append(0)
                    continue
                tok = sample_one(logits[i], s.params, prompts[i], s.ids, s.generator)
                piece = s.add(tok)
                events.append(TextEvent(index=i, text=piece, token_id=tok, finish_reason=s.finish_reason))
                next_ids.append(tok)
            yield events
            done = torch.tensor([s.finish_reason is not None for s in seqs])
            if bool(done.all()):
                return
            tokens = torch.tensor(next_ids, device=model.device)[:, None]
            pos = torch.where(done, -1, positions)[:, None].to(model.device)  # finished rows idle as padding
            with torch.inference_mode():
                logits = step(tokens, pos, cache, select=torch.zeros(b, dtype=torch.long, device=model.device))
            positions += 1

    def _compiled_step(self, tokens, positions, cache, select):
        """A decoding step through torch.compile (one graph per batch size and cache length). If
        compiling fails (no C++ compiler for inductor, say) the run goes on in eager mode."""
        if self._compiled is None:
            print("gemmarun: compiling the decoding step (torch.compile, a minute or more per batch size "
                  "and cache length)", file=sys.stderr, flush=True)  # fmt: skip
            self._compiled = torch.compile(self.model, fullgraph=True, dynamic=False)
        if self._compiled is not False:
            try:
                return self._compiled(tokens, positions, cache, select=select)
            except Exception as e:  # inductor raises its own types; the eager step below re-raises real errors
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); decoding without it")
                self._compiled = False
        return self.model(tokens, positions, cache, select=select)

    def _prefill(self, seqs: list[SequenceState], cache: KVCache) -> torch.Tensor:
        """Right-padded chunked prefill; returns each row's logits at its last prompt token."""
        model = self.model
        lengths = torch.tensor([len(s.prompt) for s in seqs])
        t = int(lengths.max())
        tokens = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt)] = torch.tensor(s.prompt)
        positions = torch.arange(t).expand(len(seqs), t)
        positions = torch.where(positions < lengths[:, None], positions, -1)
        out = torch.empty(len(seqs), model.config.vocab_size)
        for start in range(0, t, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, t)
            last = lengths - 1
            here = (last >= start) & (last < stop)
            select = (last - start).clamp(0, stop - start - 1)
            logits = model(
                tokens[:, start:stop].to(model.device),
                positions[:, start:stop].to(model.device),
                cache,
                select=select.to(model.device),
            )
            out[here] = logits[here.to(logits.device)].cpu()
        return out.to(model.device)
