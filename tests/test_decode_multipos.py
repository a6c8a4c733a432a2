"""Several positions per cache row through the C++ attention kernel and the decode stack (a
speculative verify forward): each position gets what a decoding step of one position would."""

from __future__ import annotations

import math

import pytest
import torch

import gemmarun
from gemmarun import kernels
from gemmarun.generation import core
from gemmarun.model.cache import KVCache
from gemmarun.model.config import GLOBAL, SLIDING, GemmaConfig
from gemmarun.model.gemma import Rope

pytestmark = pytest.mark.skipif(kernels.variant() is None, reason="the C++ kernels are not built here")

# A verify forward against the same positions decoded one at a time: every part of the fused stack
# gives a row the bits it gets alone (attention, norms, GeGLU, and the packed matmuls' multi-row
# tiles, qdot.h), so the bound is none.
MODEL_BOUND = 0.0
# The kernel against the float64 formula: float32 scores and sums over at most ~60 keys of values ~1.
FORMULA_BOUND = 2e-5
WINDOW, D, H, HKV = 16, 16, 4, 2


def _config(softcap: float | None) -> GemmaConfig:
    return GemmaConfig(model_type="gemma2", vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=H, num_key_value_heads=HKV, head_dim=D, query_pre_attn_scalar=16.0,
                       sliding_window=WINDOW, layer_types=(SLIDING, GLOBAL), attn_logit_softcapping=softcap)  # fmt: skip


def _history(cache: KVCache, lengths: list[int], g: torch.Generator) -> None:
    """Random keys and values for positions [0, length) of each row, where the cache would hold them."""
    for i, kind in enumerate(("sliding", "global")):
        size = cache.size[kind]
        for b, n in enumerate(lengths):
            for p in range(max(0, n - size) if kind == "sliding" else 0, n):
                slot = p % size if kind == "sliding" else p
                cache.k[i][b, :, slot] = torch.randn(HKV, D, generator=g).to(cache.k[i].dtype)
                cache.v[i][b, :, slot] = torch.randn(HKV, D, generator=g).to(cache.v[i].dtype)
                cache.pos[kind][b, slot] = p
    cache.filled = max(lengths)


def _copy(cache: KVCache) -> KVCache:
    twin = cache.rows(0, cache.batch_size)
    twin.k, twin.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    twin.pos = {kind: p.clone() for kind, p in cache.pos.items()}
    return twin


def _attend(cache, layer, plan, q, k, v, cos, sin, softcap):
    """The kernel on (B, T, ...) inputs, as Backend.decode_attention calls it."""
    b, t = q.shape[:2]
    q, k, v, cos, sin = (x.contiguous().view(b * t, *x.shape[2:]) for x in (q, k, v, cos, sin))
    out = kernels.attention_kernel()(q, k, v, cache.k[layer], cache.v[layer], plan.slots, plan.mask.view(b, t, -1), cos, sin,
                                     16**-0.5, softcap or 0.0)  # fmt: skip
    return out.view(b, t, H, D)


def _formula(cache, layer, plan, q, cos, sin, softcap) -> torch.Tensor:
    """(B, T, H, D) in float64 from the cache as written: rope, scores, soft-cap, mask, softmax."""
    half = D // 2
    q, cos, sin = q.double(), cos.double(), sin.double()
    q = q * cos[:, :, None] + torch.cat([-q[..., half:], q[..., :half]], -1) * sin[:, :, None]
    e = plan.mask.shape[-1]
    keys, values = (c[:, :, :e].double().repeat_interleave(H // HKV, 1) for c in (cache.k[layer], cache.v[layer]))
    scores = torch.einsum("bthd,bhsd->bths", q, keys) * 16**-0.5
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    seen = plan.mask[:, 0, :, None, :]  # (B, T, 1, E)
    probs = torch.softmax(scores.masked_fill(~seen, -math.inf), -1).nan_to_num(0.0)  # a padding position sees nothing
    return torch.einsum("bths,bhsd->bthd", probs, values)


@pytest.mark.parametrize("t", [2, 3, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("lengths", [[41], [41, 3, 0, 70]])
def test_positions_of_one_call_equal_single_steps(t, dtype, softcap, lengths):
    """T positions per row in one call against the same positions one call each: bit-identical
    outputs and cache; rows at different positions (past the window, short of it, fresh, and past
    SPAN keys of the global layer), a padded row and a row whose later positions are padding."""
    g = torch.Generator().manual_seed(t * 7 + len(lengths))
    b = len(lengths)
    cache = KVCache(_config(softcap), b, 128, dtype, ring_extra=t - 1)
    assert cache.writes_first(t) and not cache.writes_first(t + 1)
    _history(cache, lengths, g)
    single = _copy(cache)
    positions = torch.tensor([[n + j for j in range(t)] for n in lengths])
    if b > 1:
        positions[2] = -1  # a padding row
        positions[1, t // 2 :] = -1  # a row with fewer drafts
    q, k, v = (torch.randn(b, t, n, D, generator=g) for n in (H, HKV, HKV))
    rope = Rope(D, 10000.0)
    cos, sin = (x[:, 0] for x in rope.cos_sin(positions, torch.float32))  # (B, T, D)
    plans = cache.plan(positions)
    assert not plans["sliding"].concat
    outs = {kind: _attend(cache, i, plans[kind], q, k, v, cos, sin, softcap) for i, kind in enumerate(("sliding", "global"))}
    steps = {"sliding": [], "global": []}
    for j in range(t):
        step = single.plan(positions[:, j : j + 1])
        for i, kind in enumerate(("sliding", "global")):
            args = (q[:, j : j + 1], k[:, j : j + 1], v[:, j : j + 1], cos[:, j : j + 1], sin[:, j : j + 1])
            steps[kind].append(_attend(single, i, step[kind], *args, softcap))
    for i, kind in enumerate(("sliding", "global")):
        assert torch.equal(outs[kind], torch.cat(steps[kind], 1)), kind
        assert torch.equal(cache.pos[kind], single.pos[kind])
        assert torch.equal(cache.k[i][:, :, :-1], single.k[i][:, :, :-1]) and torch.equal(cache.v[i][:, :, :-1], single.v[i][:, :, :-1])
        want = _formula(cache, i, plans[kind], q, cos, sin, softcap)
        torch.testing.assert_close(outs[kind].double(), want, rtol=0, atol=FORMULA_BOUND)
        sees = plans[kind].mask[:, 0].any(-1)  # (B, T): a padding position sees no key and returns zeros
        assert bool(outs[kind][~sees].eq(0).all()) and bool(sees[positions >= 0].all())


def test_a_long_cache_is_split_into_spans_of_fixed_length():
    """Far past SPAN keys (the kernel's span), so many tasks each hold a partial softmax: the result
    equals the formula and does not depend on the thread count."""
    g = torch.Generator().manual_seed(5)
    cache = KVCache(_config(None), 1, 1100, torch.float32, ring_extra=4)
    _history(cache, [1000], g)
    positions = torch.arange(1000, 1005)[None]
    q, k, v = (torch.randn(1, 5, n, D, generator=g) for n in (H, HKV, HKV))
    cos, sin = (x[:, 0] for x in Rope(D, 10000.0).cos_sin(positions, torch.float32))
    plan = cache.plan(positions)["global"]
    threads = torch.get_num_threads()
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            outs.append(_attend(cache, 1, plan, q, k, v, cos, sin, None))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(*outs)
    torch.testing.assert_close(outs[0].double(), _formula(cache, 1, plan, q, cos, sin, None), rtol=0, atol=FORMULA_BOUND)


def test_only_a_ring_with_room_writes_first():
    """The plan's choice: write then mask when the ring's extra slots cover T - 1 positions, or the
    ring is the whole context; concatenate otherwise (a prefill chunk with no extra slots)."""
    config = _config(None)
    assert KVCache(config, 1, 64, torch.float32).writes_first(1)
    assert not KVCache(config, 1, 64, torch.float32).writes_first(2)
    assert KVCache(config, 1, 64, torch.float32, ring_extra=8).writes_first(9)
    assert not KVCache(config, 1, 64, torch.float32, ring_extra=8).writes_first(10)
    assert KVCache(config, 1, 20, torch.float32, ring_extra=8).writes_first(20)  # ring = context: never wraps
    cache = KVCache(config, 1, 64, torch.float32)
    assert cache.plan(torch.arange(8)[None])["sliding"].concat


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("t", [2, 5, 9])
def test_a_verify_forward_through_the_stack_equals_single_steps(checkpoint, kind, quantize, t):
    """The whole tiny model (dense float32 or packed) past the sliding window: T positions through the decode stack
    against T decoding steps: logits and cache within MODEL_BOUND; and bit-identical to the same
    forward with the layers run as modules (the stack computes what they do)."""
    lm = gemmarun.load(checkpoint(kind, seed=3), quantize=quantize)
    model = lm.model
    ids = torch.randint(3, lm.config.vocab_size, (40,), generator=torch.Generator().manual_seed(t)).tolist()
    with torch.inference_mode():
        a, b = (KVCache.for_model(model, 1, 64, ring_extra=t - 1) for _ in range(2))
        for c in (a, b):
            core.prefill(model, c, [ids[:30]])
        assert model.fuses(t, b) and not model.fuses(t + 1, b)
        single = torch.stack([core.decode(model, a, [ids[30 + j]], [30 + j])[0] for j in range(t)])
        stack = model.decode_stack()
        calls = []
        model._stack = _Spy(stack, calls)
        modules = _copy(b)
        try:
            verify = core.forward(model, b, [ids[30 : 30 + t]], [30], last=False)[0]
            model._stack = False  # the layers as modules, with the same kernels
            by_modules = core.forward(model, modules, [ids[30 : 30 + t]], [30], last=False)[0]
        finally:
            model._stack = stack
    assert calls == [t]  # one stack call of T positions: the plan did not concatenate
    assert torch.equal(verify, by_modules)
    assert float((single - verify).abs().max()) <= MODEL_BOUND
    for kv in ("k", "v"):
        for x, y in zip(getattr(a, kv), getattr(b, kv)):
            assert float((x[:, :, :-1] - y[:, :, :-1]).abs().max()) <= MODEL_BOUND
    assert all(torch.equal(a.pos[n], b.pos[n]) for n in a.pos)


class _Spy:
    """The decode stack, counting the positions of each call."""

    def __init__(self, stack, calls):
        self.stack, self.calls = stack, calls

    def forward(self, x, *args):
        self.calls.append(x.shape[0])
        return self.stack.forward(x, *args)
