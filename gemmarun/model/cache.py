"""KV cache: full-length buffers for global layers, ring buffers for sliding layers.

Every slot stores the absolute position of the token in it (-1 when empty), so the attention
mask is computed from positions alone: exact past the window and for batch rows that sit at
different positions. Each buffer has one extra "trash" slot at the end where padding tokens
are written, so a batched write never needs a per-row branch.

A sliding ring may be longer than the window (`ring_extra` slots): the mask still admits only
`sliding_window` positions, and the spare slots keep the keys a rollback needs. `truncate` forgets
positions from a given one on; on a sliding layer it is exact when at most `ring_extra` positions
written since are dropped (speculative tokens rejected, a cached prefix resumed short of its end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GemmaConfig


@dataclass
class AttnPlan:
    """How one layer kind attends during one forward call (shared by all layers of that kind)."""

    slots: torch.Tensor  # (B, T) slot each new token is written to; the trash slot for padding
    mask: torch.Tensor  # (B, 1, T, S) True where a query may see a key
    concat: bool  # keys are [cache before this call] + [this call's keys] (sliding prefill; see writes_first)
    end: int  # attend over buffer slots [:end] (global layers only need the filled prefix); with
    # concat, the slots of the cache as it was that come before this call's keys


class KVCache:
    """Per-layer K/V buffers of shape (B, Hkv, S + 1, D), S = context (global) or window (sliding)."""

    def __init__(self, config: GemmaConfig, batch_size: int, context: int, dtype: torch.dtype, device="cpu", static: bool = False,
                 ring_extra: int = 0):  # fmt: skip
        self.config = config
        # static: decoding steps attend over whole buffers, so no shape depends on the positions and
        # torch.compile traces one graph per (batch, context); see plan_static.
        self.static = static
        self.batch_size = batch_size
        self.context = context
        if ring_extra < 0:
            raise ValueError(f"ring_extra must be >= 0, got {ring_extra}")
        self.ring_extra = ring_extra
        window = min(config.sliding_window + ring_extra, context)
        self.size = {"global": context, "sliding": window}
        b, h, d = batch_size, config.num_key_value_heads, config.head_dim
        self.k, self.v = [], []
        for i in range(config.num_hidden_layers):
            s = self.size["sliding" if config.is_sliding(i) else "global"] + 1
            self.k.append(torch.zeros(b, h, s, d, dtype=dtype, device=device))
            self.v.append(torch.zeros(b, h, s, d, dtype=dtype, device=device))
        # absolute position held by each slot, one table per layer kind
        self.pos = {kind: torch.full((b, n + 1), -1, dtype=torch.long, device=device) for kind, n in self.size.items()}
        self.filled = 0  # 1 + the highest position written so far (global slots are positions)

    @classmethod
    def for_model(cls, model, batch_size: int, context: int, static: bool = False, ring_extra: int = 0) -> KVCache:
        """A cache for `model` (a Gemma): its config, device and cache_dtype."""
        return cls(model.config, batch_size, context, model.cache_dtype, model.device, static=static, ring_extra=ring_extra)

    def repeat(self, batch: int) -> KVCache:
        """A new cache of `batch` rows, each a copy of this cache's single row (the eval scorer's
        shared prefixes)."""
        dst = KVCache(self.config, batch, self.context, self.k[0].dtype, self.k[0].device, ring_extra=self.ring_extra)
        for d, s in zip(dst.k + dst.v, self.k + self.v):
            d.copy_(s.expand_as(d))
        for kind, table in self.pos.items():
            dst.pos[kind].copy_(table.expand_as(dst.pos[kind]))
        dst.filled = self.filled
        return dst

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget everything (or only the given batch rows) so the slots can be reused."""
        for p in self.pos.values():
            if rows is None:
                p.fill_(-1)
            else:
                p[rows] = -1
        if rows is None:
            self.filled = 0

    def truncate(self, length: int, rows: torch.Tensor | None = None) -> None:
        """Forget every position >= length (of all rows, or of the given batch rows): the cache as it
        was before they were written, provided a sliding ring dropped at most `ring_extra` of them
        (older ring slots were overwritten by the dropped positions otherwise)."""
        for p in self.pos.values():
            view = p if rows is None else p[rows]
            view = torch.where(view >= length, -1, view)
            if rows is None:
                p.copy_(view)
            else:
                p[rows] = view
        self.filled = int(self.pos["global"].max()) + 1

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over batch rows [start, stop) that shares this one's buffers (writes land here).

        The engine prefills one row, or decodes the occupied rows only, without paying for the
        padding of every other row. `filled` is the view's own, read from its position table.
        """
        view = object.__new__(KVCache)
        view.config, view.context, view.size, view.static = self.config, self.context, self.size, self.static
        view.ring_extra = self.ring_extra
        view.batch_size = stop - start
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.pos = {kind: p[start:stop] for kind, p in self.pos.items()}
        view.filled = int(view.pos["global"].max()) + 1  # global slots are positions; -1 (empty) gives 0
        return view

    def writes_first(self, positions: int) -> bool:
        """Whether a forward of `positions` per row can write every key before any query reads (as a
        decoding step does) instead of concatenating on the sliding layers: the ring's oldest slots
        that the later positions overwrite must lie outside every earlier position's window. True
        when positions - 1 <= ring size - sliding_window (the ring's extra slots), or when the ring
        is the whole context and never wraps."""
        ring = self.size["sliding"]
        return positions - 1 <= ring - self.config.sliding_window or ring == self.context

    def plan(self, positions: torch.Tensor) -> dict[str, AttnPlan]:
        """Build both kinds' write slots and masks for `positions` (B, T; -1 = padding), then record them."""
        if self.static and positions.shape[1] == 1:
            return self.plan_static(positions)
        if self.static:  # its decoding steps left `filled` behind (plan_static cannot advance it)
            self.filled = int(self.pos["global"].max()) + 1
        valid = positions >= 0
        last = int(positions.max())
        filled = max(self.filled, last + 1)
        plans = {}
        for kind, size in self.size.items():
            sliding = kind == "sliding"
            pos_table = self.pos[kind]
            if sliding:
                # Of a chunk longer than the window only the last `size` tokens of each row survive;
                # writing the older ones too would collide in the ring.
                row_last = positions.max(dim=1, keepdim=True).values
                write = valid & (positions > row_last - size)
                slots = torch.where(write, positions % size, size)
            else:
                if last >= size:
                    raise IndexError(f"position {last} is past the cache's context {size}")
                slots = torch.where(valid, positions, size)
            concat = sliding and not self.writes_first(positions.shape[1])
            if concat:
                # Attend to the cache as it was plus this chunk, since the chunk overwrites ring slots
                # that its own earlier queries still need. A ring that has not wrapped holds keys in
                # slots [0, filled) only: a first chunk attends to itself, not to a window of empties.
                prefix = self.filled if self.filled <= size else size + 1
                kpos = torch.cat([pos_table[:, :prefix], torch.where(valid, positions, -1)], dim=1)
            else:
                self._record(pos_table, slots, positions, valid)
                kpos = pos_table
            end = prefix if concat else kpos.shape[1]
            # Global slots are positions, so only the filled prefix matters; a ring that has not
            # wrapped yet holds keys in slots [0, filled) only, so short sequences skip the rest.
            if not sliding or (not concat and filled <= size):
                end = filled
                kpos = kpos[:, :end]
            plans[kind] = AttnPlan(slots=slots, mask=self._visible(kpos, positions, sliding), concat=concat, end=end)
            if concat:
                self._record(pos_table, slots, positions, valid)
        self.filled = filled
        return plans

    def plan_static(self, positions: torch.Tensor) -> dict[str, AttnPlan]:
        """plan() for one token per row with no int() of a tensor and no shape that depends on the
        positions: torch.compile traces it into the decoding step. Masks span whole buffers (the
        unwritten slots hold position -1 and are masked), and `filled` stays behind: plan() reads it
        back from the position table."""
        valid = positions >= 0
        plans = {}
        for kind, size in self.size.items():
            sliding = kind == "sliding"
            slots = torch.where(valid, positions % size if sliding else positions, size)
            self._record(self.pos[kind], slots, positions, valid)
            plans[kind] = AttnPlan(slots=slots, mask=self._visible(self.pos[kind], positions, sliding), concat=False, end=size + 1)
        return plans

    @staticmethod
    def _record(table: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Write each token's position into its slot of the table (B, S + 1)."""
        table.scatter_(1, slots, torch.where(valid, positions, -1))
        table[:, -1] = -1  # the trash slot never holds a visible key

    def _visible(self, kpos: torch.Tensor, positions: torch.Tensor, sliding: bool) -> torch.Tensor:
        """(B, 1, T, S): which key positions kpos (B, S; -1 = empty) each query position sees."""
        q = positions[:, None, :, None]  # (B, 1, T, 1)
        k = kpos[:, None, None, :]  # (B, 1, 1, S)
        mask = (k >= 0) & (k <= q)
        if sliding:
            mask &= q - k < self.config.sliding_window  # the query itself and window - 1 keys before it
        return mask

    def update(self, layer: int, plan: AttnPlan, k: torch.Tensor, v: torch.Tensor):
        """Write this call's k, v (B, Hkv, T, D) and return the keys/values to attend over, in the cache's dtype."""
        kc, vc = self.k[layer], self.v[layer]
        k, v = k.to(kc.dtype), v.to(vc.dtype)  # a float16 / bfloat16 cache rounds them once, here
        idx = plan.slots[:, None, :, None].expand_as(k)
        if plan.concat:
            keys = torch.cat([kc[:, :, : plan.end], k], dim=2)
            values = torch.cat([vc[:, :, : plan.end], v], dim=2)
            kc.scatter_(2, idx, k)
            vc.scatter_(2, idx, v)
            return keys, values
        if k.shape[2] == 1:
            # One token per row: index_put with per-row slots avoids building an expanded index.
            rows = torch.arange(k.shape[0], device=k.device)
            kc[rows, :, plan.slots[:, 0]] = k[:, :, 0]
            vc[rows, :, plan.slots[:, 0]] = v[:, :, 0]
        else:
            kc.scatter_(2, idx, k)
            vc.scatter_(2, idx, v)
        return kc[:, :, : plan.end], vc[:, :, : plan.end]


def plan_without_cache(config: GemmaConfig, positions: torch.Tensor) -> dict[str, AttnPlan]:
    """Masks for a forward pass over one self-contained chunk (no cache)."""
    q = positions[:, None, :, None]
    k = torch.where(positions >= 0, positions, -1)[:, None, None, :]
    causal = (k >= 0) & (k <= q)
    t = positions.shape[1]
    empty = torch.empty(positions.shape[0], 0, dtype=torch.long, device=positions.device)
    return {
        "global": AttnPlan(slots=empty, mask=causal, concat=False, end=t),
        "sliding": AttnPlan(slots=empty, mask=causal & (q - k < config.sliding_window), concat=False, end=t),
    }
