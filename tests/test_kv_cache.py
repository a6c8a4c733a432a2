"""KVCache rollback: a longer sliding ring and truncate() give the cache of a history that never
held the dropped positions, past the window, on both layer kinds (the primitive that speculative
decoding and the prefix cache resume from)."""

from __future__ import annotations

import pytest
import torch

import gemmarun
from gemmarun.generation import core
from gemmarun.model.cache import KVCache


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def lm(request, checkpoint):
    return gemmarun.load(checkpoint(request.param, seed=3))


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("dropped", [1, 4])
def test_truncate_equals_a_cache_that_never_saw_the_dropped_positions(lm, dropped):
    model, vocab = lm.model, lm.config.vocab_size
    assert lm.config.sliding_window == 16
    history, rejected, after = _ids(40, 1, vocab), _ids(dropped, 2, vocab), _ids(6, 3, vocab)
    with torch.inference_mode():
        rolled = KVCache.for_model(model, 1, 64, ring_extra=4)
        core.prefill(model, rolled, [history], chunk=7)  # chunks that straddle the ring's wrap
        for i, t in enumerate(rejected):
            core.decode(model, rolled, [t], [40 + i])
        rolled.truncate(40)
        assert rolled.filled == 40
        clean = KVCache.for_model(model, 1, 64, ring_extra=4)
        core.prefill(model, clean, [history], chunk=7)
        for name, kv in (("rolled", rolled), ("clean", clean)):
            assert int(kv.pos["sliding"].max()) == 39, name
        # a verify-shaped forward (several positions at once) and then single steps, both exact
        a = core.forward(model, rolled, [after[:3]], [40], last=False)
        b = core.forward(model, clean, [after[:3]], [40], last=False)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        for i, t in enumerate(after[3:]):
            a = core.decode(model, rolled, [t], [43 + i])
            b = core.decode(model, clean, [t], [43 + i])
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_longer_ring_does_not_change_logits(lm):
    """The mask admits `sliding_window` positions whatever the ring's length."""
    ids = _ids(50, 4, lm.config.vocab_size)
    with torch.inference_mode():
        plain = torch.cat([x for _, x in core.score(lm.model, KVCache.for_model(lm.model, 1, 64), ids, chunk=9)])
        longer = torch.cat([x for _, x in core.score(lm.model, KVCache.for_model(lm.model, 1, 64, ring_extra=8), ids, chunk=9)])
    # The longer ring writes its chunks first and attends in the C++ kernel (KVCache.writes_first),
    # the plain one concatenates in PyTorch's formula: float32 rounding apart, not a window apart.
    torch.testing.assert_close(plain, longer, rtol=0, atol=1e-4)


def test_truncating_one_row_leaves_the_others(lm):
    model, vocab = lm.model, lm.config.vocab_size
    rows = [_ids(30, 5, vocab), _ids(30, 6, vocab)]
    with torch.inference_mode():
        cache = KVCache.for_model(model, 2, 64, ring_extra=2)
        core.prefill(model, cache, rows)
        before = {k: v.clone() for k, v in cache.pos.items()}
        cache.truncate(28, torch.tensor([1]))
    for kind, table in cache.pos.items():
        assert torch.equal(table[0], before[kind][0])
        assert int(table[1].max()) == 27
    assert cache.filled == 30
