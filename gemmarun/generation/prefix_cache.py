"""Prefix caching across requests: snapshots of finished cache rows, resumed by later prompts.

A snapshot is one cache row as it stood after `tokens` (positions 0..L-1): every global layer's
keys and values up to L, and every sliding layer's ring (the window plus `ring_extra` slots) with
its position table. A new prompt that starts with a snapshot's first m tokens copies the snapshot
into its row, truncates it to m (`KVCache.truncate`) and prefills only the rest.

Global layers resume anywhere up to L. A sliding ring holds only the last window + ring_extra
positions, so resuming at m < L from rings taken at L is exact while at most ring_extra positions
are dropped (or the ring never wrapped): that is the slack a chat's next turn needs, which diverges
a few tokens before the cached end (the last sampled token was never fed; the reply may re-tokenise
differently). A row also copies its rings when its prompt is read (only when they may wrap before
it ends), and its snapshot keeps them when the reply wrapped past them: a client that trims or
rewrites the reply still resumes from the end of its previous prompt, as llama.cpp's context
checkpoints do. Global layers are stored once per snapshot; each ring copy costs min(L, window +
ring_extra) positions of the sliding layers.

Snapshots are taken when a request leaves its row (its prompt and the reply fed so far) and at
branch points: a prompt that shares a longer prefix with a snapshot than it can resume from (two
conversations with one system prompt, say) stops its prefill there once and stores the row as it is
at that point, so a third prompt with that prefix resumes from it. Memory is bounded by `limit`
bytes, least recently used snapshots evicted first. Owned by the engine's thread; `stats()` may be
read from any thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..model.cache import KVCache

# Fewer shared tokens than this are not worth a row copy (every chat shares its first few: BOS and
# the turn marker), nor a branch snapshot.
MIN_TOKENS = 16
# Ring slots kept beyond the window while the cache is on: a chat's next turn diverges within a few
# tokens of the cached end; at most one more window, so small windows (the tests' 16) wrap too.
SLACK = 64


def ring_extra_for(sliding_window: int) -> int:
    return min(SLACK, sliding_window)


@dataclass
class Ring:
    """The sliding layers' rings as they stood after `at` tokens."""

    at: int
    k: list[torch.Tensor | None]  # per layer (Hkv, min(at, ring), D); None on global layers
    v: list[torch.Tensor | None]
    pos: torch.Tensor  # (min(at, ring),) the sliding position table's slots

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.k + self.v if x is not None) + self.pos.numel() * 8


@dataclass
class Snapshot:
    tokens: torch.Tensor  # (L,) the row's tokens at positions 0..L-1
    k: list[torch.Tensor | None]  # per layer (Hkv, L, D) on global layers; None on sliding ones
    v: list[torch.Tensor | None]
    rings: list[Ring]  # the sliding state at the end (at = L) and, for a chat, at the prompt's end
    key: int  # its key in the LRU order

    @property
    def nbytes(self) -> int:
        own = sum(x.numel() * x.element_size() for x in self.k + self.v if x is not None) + self.tokens.numel() * 8
        return own + sum(r.nbytes for r in self.rings)


@dataclass
class Match:
    snapshot: Snapshot | None  # the one to resume from, None when none is usable
    ring: Ring | None  # its sliding state to resume from
    resume: int  # tokens taken from it (0 without one)
    branch: int  # take a branch snapshot once the prefill reaches this position (0: none)


class PrefixCache:
    def __init__(self, cache: KVCache, limit_bytes: int):
        self.cache, self.limit = cache, limit_bytes
        self.size = cache.size["sliding"]  # ring slots: the window plus ring_extra
        self.sliding = [cache.config.is_sliding(i) for i in range(cache.config.num_hidden_layers)]
        self.entries: OrderedDict[int, Snapshot] = OrderedDict()  # least recently used first
        self._ids = 0
        self._lock = threading.Lock()  # the counters and the byte total, for stats() on other threads
        self.bytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = self.stored = 0

    # -- lookup and resume -----------------------------------------------------------------------

    def resumable(self, at: int, m: int) -> bool:
        """Whether rings taken after `at` tokens can resume at m: they still hold the window before
        m (they never wrapped, or at most ring_extra positions are dropped)."""
        return m <= at and (at <= self.size or at - m <= self.cache.ring_extra)

    def match(self, prompt: list[int]) -> Match:
        """The snapshot to resume `prompt` from (the most tokens; the latest of equals) and where
        to take a branch snapshot. At least one prompt token is always left to prefill, for its
        logits."""
        p = torch.tensor(prompt, dtype=torch.long)
        best, ring, resume, shared = None, None, 0, 0
        for snap in reversed(self.entries.values()):  # most recent first
            n = min(len(snap.tokens), len(p))
            diff = (snap.tokens[:n] != p[:n]).nonzero()
            common = int(diff[0]) if len(diff) else n
            shared = max(shared, common)
            m = min(common, len(p) - 1)
            if m <= resume or m < MIN_TOKENS:
                continue
            usable = [r for r in snap.rings if self.resumable(r.at, m)]
            if usable:
                best, ring, resume = snap, min(usable, key=lambda r: r.at), m
        branch = min(shared, len(p) - 1)
        with self._lock:
            if best is None:
                self.misses += 1
            else:
                self.hits += 1
                self.tokens_reused += resume
                self.entries.move_to_end(best.key)
        return Match(best, ring, resume, branch if branch >= MIN_TOKENS and branch > resume else 0)

    def restore(self, match: Match, row: int) -> None:
        """Copy the matched snapshot into `row` (a free row: its position tables are empty) and
        forget its positions from `match.resume` on."""
        snap, ring, m = match.snapshot, match.ring, match.resume
        view, ns = self.cache.rows(row, row + 1), len(match.ring.pos)
        for i, sliding in enumerate(self.sliding):
            if sliding:
                view.k[i][0, :, :ns].copy_(ring.k[i])
                view.v[i][0, :, :ns].copy_(ring.v[i])
            else:
                view.k[i][0, :, :m].copy_(snap.k[i][:, :m])
                view.v[i][0, :, :m].copy_(snap.v[i][:, :m])
        view.pos["global"][0, :m] = torch.arange(m, device=ring.pos.device)
        view.pos["sliding"][0, :ns] = ring.pos
        self.cache.truncate(m, rows=torch.tensor([row]))  # the ring's positions from m on

    # -- storing ---------------------------------------------------------------------------------

    def ring(self, row: int, at: int) -> Ring:
        """A copy of `row`'s sliding rings, which hold `at` tokens."""
        view, ns = self.cache.rows(row, row + 1), min(at, self.size)
        k = [view.k[i][0, :, :ns].clone() if s else None for i, s in enumerate(self.sliding)]
        v = [view.v[i][0, :, :ns].clone() if s else None for i, s in enumerate(self.sliding)]
        return Ring(at, k, v, view.pos["sliding"][0, :ns].clone())

    def store(self, row: int, tokens: list[int], earlier: Ring | None = None) -> None:
        """Snapshot `row`, which holds exactly `tokens` (positions 0..len-1), with the rings of an
        `earlier` point when those let more prompts resume (the end rings have wrapped past
        them), evicting the least recently used snapshots to stay within the limit."""
        length = len(tokens)
        if length < MIN_TOKENS:
            return
        t = torch.tensor(tokens, dtype=torch.long)
        for snap in self.entries.values():
            if len(snap.tokens) == length and torch.equal(snap.tokens, t):
                self.entries.move_to_end(snap.key)  # already held: only fresher
                return
        rings = [self.ring(row, length)]
        if earlier is not None and earlier.at >= MIN_TOKENS and not self.resumable(length, earlier.at):
            rings.insert(0, earlier)
        view = self.cache.rows(row, row + 1)
        k = [None if s else view.k[i][0, :, :length].clone() for i, s in enumerate(self.sliding)]
        v = [None if s else view.v[i][0, :, :length].clone() for i, s in enumerate(self.sliding)]
        snap = Snapshot(t, k, v, rings, 0)
        nbytes = snap.nbytes
        if nbytes > self.limit:
            return
        with self._lock:
            while self.bytes + nbytes > self.limit:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1
            self._ids += 1
            snap.key = self._ids
            self.entries[snap.key] = snap
            self.bytes += nbytes
            self.stored += 1

    def stats(self) -> dict:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "tokens_reused": self.tokens_reused,
                "evictions": self.evictions,
                "snapshots_stored": self.stored,
                "entries": len(self.entries),
                "bytes": self.bytes,
                "limit_bytes": self.limit,
            }
