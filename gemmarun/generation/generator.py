"""Generator: a static batch of prompts decoded to completion in the caller's thread.

LanguageModel.generate/stream run on it rather than on the Engine: the compiled path needs a
static cache of the batch's own size (one torch.compile graph per batch size and cache length),
while the engine decodes over a view of its occupied rows whose size changes as requests come and
go (a recompile each time); and a batch job here needs no scheduler thread. Prefill, decoding
steps and the context check are the core's (generation/core.py), as for the engine.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence

import torch

from ..model.cache import KVCache
from ..model.gemma import Gemma
from . import core
from .sampling import SamplingParams, sample_one
from .sequence import GenerationResult, SequenceState, TextEvent, new_sequence
from .speculative import SpecRow, Speculator, decode_round, ring_extra


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
        self.prefill_chunk = prefill_chunk or core.prefill_chunk_for(model)
        self.compile = compile
        self._compiled = None  # the torch.compile'd model, made on the first compiled decoding step

    def check_prompt(self, prompt: Sequence[int]) -> None:
        core.check_prompt(len(prompt), self.context, self.model.config.max_position_embeddings)

    def run(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, speculator: Speculator | None = None
    ) -> Iterator[list[TextEvent]]:
        """Text events of every step (of every round, speculating); a sequence's last event carries its finish_reason."""
        seqs = self._sequences(prompts, params)
        return self._speculative_steps(seqs, speculator) if self._speculates(speculator) else self._steps(seqs)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, speculator: Speculator | None = None
    ) -> list[GenerationResult]:
        seqs = self._sequences(prompts, params)
        for _ in self._speculative_steps(seqs, speculator) if self._speculates(speculator) else self._steps(seqs):
            pass
        return [s.result() for s in seqs]

    def _speculates(self, speculator: Speculator | None) -> bool:
        # The compiled path traces one-token steps over a static cache: it decodes without speculation.
        return speculator is not None and speculator.config.on and not self.compile

    def _sequences(self, prompts, params: SamplingParams) -> list[SequenceState]:
        return [self.new_sequence(p, params) for p in prompts]

    def new_sequence(self, prompt: Sequence[int], params: SamplingParams, seed_offset: int = 0) -> SequenceState:
        """Checked state for one prompt; the engine gives each of a request's n choices its own seed_offset."""
        return new_sequence(self.model, self.tokenizer, self.context, prompt, params, seed_offset)

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
        step = self._compiled_step if self.compile else None
        with torch.inference_mode():
            logits = core.prefill(model, cache, [s.prompt for s in seqs], chunk=self.prefill_chunk)  # (B, V)
        prompts = [torch.tensor(s.prompt) for s in seqs]
        positions = [len(s.prompt) for s in seqs]
        while True:
            events, next_ids = [], []
            for i, s in enumerate(seqs):
                if s.finish_reason is not None:
                    next_ids.append(None)  # finished rows idle as padding
                    continue
                tok = sample_one(logits[i], s.params, prompts[i], s.ids, s.generator, s.grammar)
                piece = s.add(tok)
                events.append(TextEvent(index=i, text=piece, token_id=tok, finish_reason=s.finish_reason))
                next_ids.append(tok)
            yield events
            if all(s.finish_reason is not None for s in seqs):
                return
            with torch.inference_mode():
                logits = core.decode(model, cache, next_ids, positions, step=step)
            positions = [p + 1 for p in positions]

    def _speculative_steps(self, seqs: list[SequenceState], spec: Speculator) -> Iterator[list[TextEvent]]:
        """_steps with speculative rounds (generation/speculative.py): a round may add several tokens a row."""
        model, b = self.model, len(seqs)
        if b == 0:
            return
        size = min(max(len(s.prompt) + s.max_new for s in seqs), self.context)
        cache = KVCache.for_model(model, b, size, ring_extra=ring_extra(spec.config))
        with torch.inference_mode():
            logits = core.prefill(model, cache, [s.prompt for s in seqs], chunk=self.prefill_chunk)  # (B, V)
        events: list[TextEvent] = []

        def take(r: SpecRow, tok: int, _logits) -> None:
            piece = r.seq.add(tok)
            events.append(TextEvent(index=r.row, text=piece, token_id=tok, finish_reason=r.seq.finish_reason))

        rows = []
        for i, s in enumerate(seqs):
            r = SpecRow(i, s, torch.tensor(s.prompt), -1, len(s.prompt), spec.new_row(size))
            take(r, sample_one(logits[i], s.params, r.prompt_t, s.ids, s.generator, s.grammar), logits[i])
            r.pending = s.ids[-1]
            rows.append(r)
        spec.force_plain = False
        while True:
            yield events
            rows = [r for r in rows if r.seq.finish_reason is None]
            if not rows:
                return
            events = []
            with torch.inference_mode():
                decode_round(model, cache, rows, spec, take)

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
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); decoding without it", stacklevel=2
                )
                self._compiled = False
        return self.model(tokens, positions, cache, select=select)
