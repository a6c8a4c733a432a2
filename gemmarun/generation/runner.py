"""The engine's model runner: its KV cache of `max_batch` rows, the core's prefill / decode /
scoring over them, sampling and logprobs. Only the engine's thread calls it.

One step = at most one prefill forward of at most `prefill_chunk` padded tokens (the next chunk of
the oldest new prompt, plus those of other new prompts that fit beside it), so running streams keep
moving while a long prompt is read, then one decoding forward over every row that has a token to
feed, each row at its own position.
"""

from __future__ import annotations

import torch

from ..model.cache import KVCache
from . import core
from .prefix_cache import MIN_TOKENS, PrefixCache, Ring, ring_extra_for
from .sampling import sample_one
from .scheduler import Event, Slot, TokenLogprob
from .speculative import RowState, SpecRow, Speculator, decode_round, ring_extra


class ModelRunner:
    def __init__(self, model, max_batch: int, context: int, prefill_chunk: int | None = None, prefix_cache_mb: float = 0,
                 speculator: Speculator | None = None):  # fmt: skip
        self.model = model
        # Speculating, every row's decoding step is a speculative round (per-row drafts, one verify
        # forward); the sliding rings keep the spare slots its rollback needs.
        self.speculator = speculator if speculator is not None and speculator.config.on else None
        self._spec_rows: dict[int, RowState] = {}  # each decoding row's draft state and controller
        # The prefix cache resumes sliding rings a few positions short of a snapshot's end, and a
        # speculative round rolls back its rejected drafts: the rings keep both slacks beyond the
        # window (the mask is unchanged).
        extra = ring_extra_for(model.config.sliding_window) if prefix_cache_mb > 0 else 0
        extra += ring_extra(self.speculator.config) if self.speculator else 0
        self.cache = KVCache.for_model(model, max_batch, context, ring_extra=extra)
        self.prefix = PrefixCache(self.cache, int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.prompt_rings: dict[int, Ring] = {}  # row -> its sliding rings when its prompt was read
        # Padded tokens per prefill forward: the core's policy, which is also the engine's per-step
        # budget for reading prompts (a smaller one keeps running streams' steps shorter).
        self.prefill_chunk = prefill_chunk or core.prefill_chunk_for(model)
        # A scored prompt keeps every position's logits: the core's bound for them, within the budget.
        self.score_chunk = min(self.prefill_chunk, core.score_chunk_for(model))

    def release(self, s: Slot, sound: bool = True) -> None:
        """Forget a freed row's keys and values, so decoding over the rows below it reads less;
        the prefix cache snapshots it first, unless a failed forward left it unsound."""
        earlier = self.prompt_rings.pop(s.row, None)
        if self.prefix is not None and sound:
            self.prefix.store(s.row, fed(s), earlier)
        self.cache.reset(torch.tensor([s.row]))
        self._spec_rows.pop(s.row, None)

    def _admit(self, s: Slot) -> None:
        """A new row: resume its prompt from the prefix cache's best snapshot, if any. Scored
        prompts (echo with logprobs) need every position's logits, so they prefill from the start."""
        s.fresh = False
        if self.prefix is None or s.handle.request.prompt_logprobs:
            return
        match = self.prefix.match(s.prompt)
        if match.snapshot is not None:
            self.prefix.restore(match, s.row)
            s.prefilled = match.resume
        s.branch = match.branch

    def step(self, slots: list[Slot]) -> tuple[list[tuple[Slot, Event]], int]:
        """One engine step over the occupied slots: (each sampled token's slot and event, in order;
        decoding forwards run)."""
        out: list[tuple[Slot, Event]] = []
        for s in slots:
            if s.fresh:
                self._admit(s)
        prefilling = [s for s in slots if s.prefilled < len(s.prompt)]
        if prefilling:
            group = self._prefill_group(prefilling)
            if group[0].handle.request.prompt_logprobs:
                self._prefill_scored(group[0], out)
            else:
                self._prefill(group, out)
        decoding = [s for s in slots if s.pending is not None and s.handle.seq.finish_reason is None]
        if decoding:
            self._decode(decoding, out)
        return out, int(bool(decoding))

    def _prefill_group(self, prefilling: list[Slot]) -> list[Slot]:
        """The oldest prefilling row, with the others whose next chunks fit in one forward of at
        most prefill_chunk padded tokens: a burst of short prompts is read at once, while a long
        prompt still goes one chunk per step so the running streams keep moving."""
        ordered = sorted(prefilling, key=lambda s: s.order)
        group = ordered[:1]
        if group[0].handle.request.prompt_logprobs:
            return group
        for s in ordered[1:]:
            candidate = group + [s]
            rows = [c.row for c in candidate]
            t = max(min(self.prefill_chunk, len(c.prompt) - c.prefilled) for c in candidate)
            if not s.handle.request.prompt_logprobs and (max(rows) - min(rows) + 1) * t <= self.prefill_chunk:
                group = candidate
        return group

    def _prefill(self, group: list[Slot], out: list) -> None:
        """The next chunk of each row's prompt in one forward over rows [lo, hi); rows outside the
        group idle as padding. A row whose prompt is done samples its first token."""
        lo, hi = min(s.row for s in group), max(s.row for s in group) + 1
        pieces: list[list[int]] = [[] for _ in range(hi - lo)]
        starts = [0] * (hi - lo)
        for s in group:
            stop = s.prefilled + self.prefill_chunk
            if s.branch > s.prefilled:  # a chunk ends at the branch point, for its snapshot
                stop = min(stop, s.branch)
            pieces[s.row - lo] = s.prompt[s.prefilled : stop]
            starts[s.row - lo] = s.prefilled
        logits = core.forward(self.model, self.cache.rows(lo, hi), pieces, starts).cpu()  # (hi - lo, V)
        for s in group:
            s.prefilled += len(pieces[s.row - lo])
            if s.branch and s.prefilled == s.branch:
                self.prefix.store(s.row, s.prompt[: s.branch])
                s.branch = 0
            if s.prefilled == len(s.prompt):
                s.pos = s.prefilled
                self._keep_prompt_rings(s)
                out.append((s, self._sample(s, logits[s.row - lo])))

    def _keep_prompt_rings(self, s: Slot) -> None:
        """Copy a row's sliding rings at the end of its prompt when its reply may wrap them: its
        snapshot can then resume a next prompt that keeps this one but not the reply as sampled."""
        n = len(s.prompt)
        if self.prefix is not None and n >= MIN_TOKENS and n + s.handle.seq.max_new > self.prefix.size:
            self.prompt_rings[s.row] = self.prefix.ring(s.row, n)

    def _prefill_scored(self, s: Slot, out: list) -> None:
        """One chunk of a prompt that is scored too (echo with logprobs), in a forward over its row."""
        prompt, start = s.prompt, s.prefilled
        chunk = prompt[start : start + self.score_chunk]
        [(_, logits)] = core.score(self.model, self.cache.rows(s.row, s.row + 1), chunk, start, len(chunk))
        logits = logits.cpu()  # (T, V)
        stop = start + len(chunk)
        if start == 0:
            s.prompt_logprobs.append(None)  # the first token has no context to be scored in
        k = s.handle.request.logprobs or 0
        for i in range(len(chunk) - 1):
            s.prompt_logprobs.append(logprob(logits[i], prompt[start + i + 1], k))
        if stop < len(prompt):
            s.prompt_logprobs.append(logprob(logits[-1], prompt[stop], k))
        s.prefilled = stop
        if stop == len(prompt):
            s.pos = len(prompt)
            out.append((s, self._sample(s, logits[-1])))

    def _decode(self, slots: list[Slot], out: list) -> None:
        """One token for every decoding row in one forward over rows [0, hi); other rows idle as padding."""
        if self.speculator is not None:
            return self._decode_speculative(slots, out)
        hi = max(s.row for s in slots) + 1
        tokens: list[int | None] = [None] * hi
        positions = [-1] * hi
        for s in slots:
            tokens[s.row], positions[s.row] = s.pending, s.pos
        logits = core.decode(self.model, self.cache.rows(0, hi), tokens, positions).cpu()  # (hi, V)
        for s in slots:
            s.pos += 1
            out.append((s, self._sample(s, logits[s.row])))

    def _decode_speculative(self, slots: list[Slot], out: list) -> None:
        """A speculative round over the decoding rows (generation/speculative.py): each row may add
        several tokens, each with its event and logprob from the target's logits that chose it."""
        hi = max(s.row for s in slots) + 1
        by_row = {s.row: s for s in slots}
        rows = []
        for s in slots:
            if s.row not in self._spec_rows:
                self._spec_rows[s.row] = self.speculator.new_row(self.cache.context)
            rows.append(SpecRow(s.row, s.handle.seq, s.prompt_t, s.pending, s.pos, self._spec_rows[s.row]))

        def take(r: SpecRow, token: int, logits: torch.Tensor) -> None:
            out.append((by_row[r.row], self._event(by_row[r.row], token, logits)))

        decode_round(self.model, self.cache.rows(0, hi), rows, self.speculator, take)
        for r in rows:
            by_row[r.row].pending, by_row[r.row].pos = r.pending, r.pos

    def _sample(self, s: Slot, logits: torch.Tensor) -> Event:
        seq = s.handle.seq
        token = sample_one(logits, seq.params, s.prompt_t, torch.tensor(seq.ids, dtype=torch.long), seq.generator, seq.grammar)
        return self._event(s, token, logits)

    def _event(self, s: Slot, token: int, logits: torch.Tensor) -> Event:
        """Add a chosen token to the row's sequence: its event, with its logprob when asked."""
        seq, req = s.handle.seq, s.handle.request
        lp = logprob(logits, token, req.logprobs) if req.logprobs is not None else None
        first = not seq.ids
        piece = seq.add(token)
        event = Event(piece, token, lp, seq.finish_reason)
        if first and req.prompt_logprobs:
            event.prompt_logprobs = s.prompt_logprobs
        if seq.finish_reason is not None:
            event.result = seq.result()
        else:
            s.pending = token
        return event


def fed(s: Slot) -> list[int]:
    """The tokens a row's cache holds: the prompt read so far, then each sampled token fed back
    (the last one sampled is never fed)."""
    if s.prefilled < len(s.prompt):
        return s.prompt[: s.prefilled]
    return (s.prompt + s.handle.seq.ids)[: s.pos]


def logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """A token's log-probability under one row of logits (V,), with the k most likely alternatives."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        values, ids = torch.topk(lsm, k)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return TokenLogprob(int(token), float(lsm[token]), top)
