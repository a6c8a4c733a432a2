"""Every kernel variant this CPU runs equals the generic (scalar C++) one within its stated bound:
each packed format qlinear takes, dense float32 / bfloat16 products, decode attention over float32 / float16 / bfloat16 caches,
rms_norm, geglu, the int4 search and the decode stack, odd shapes and tails included. Variants the
CPU cannot run are skipped with the reason (tests/test_kernel_native.py still compiles them)."""

from __future__ import annotations

import pytest
import torch

from gemmarun import kernels
from gemmarun.quant import Packed, dequantize, pack_nibbles, pack_q6, quantize_int4, quantize_int6, quantize_int8

OTHERS = [v for v in kernels.VARIANTS if v != "generic"]


@pytest.fixture(scope="module")
def generic():
    m = kernels.module("generic")
    if m is None:
        pytest.skip("the generic kernels could not be built here (no compiler)")
    return m


@pytest.fixture(scope="module", params=OTHERS)
def variant(request):
    if request.param not in kernels.available():
        pytest.skip(f"this CPU cannot run the {request.param} kernels (it runs {', '.join(kernels.available())})")
    m = kernels.module(request.param)
    if m is None:
        pytest.skip(f"the {request.param} kernels could not be built here")
    assert m.variant() == request.param
    return m


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(n, k, lo, hi, seed):
    return torch.randint(lo, hi + 1, (n, k), generator=_gen(seed))


def _scheme(name: str, n: int, k: int, seed: int) -> Packed:
    """A random matrix in one of qlinear's formats: gemmarun's own schemes and the GGUF re-lays."""
    g = _gen(seed)
    half = lambda cols: (torch.rand(n, cols, generator=g) * 0.1 + 0.01).half()  # noqa: E731
    if name == "int8":
        return quantize_int8(torch.randn(n, k, generator=g))
    if name == "int4 g32":
        return quantize_int4(torch.randn(n, k, generator=g), 32)
    if name == "int4 g128":
        return quantize_int4(torch.randn(n, k, generator=g), 128)
    if name == "int6 g32":
        return quantize_int6(torch.randn(n, k, generator=g))
    if name == "6-bit g16":  # the kernel takes plain 6-bit codes under Q6_K's sub-block scales too
        return Packed(pack_q6(_codes(n, k, -32, 31, seed)), half(k // 16), None, 16, 0.0, 6)
    if name in ("Q8_0", "Q5_0"):  # Q5_0 re-lays to int8 codes -16..15
        lo, hi = (-128, 127) if name == "Q8_0" else (-16, 15)
        return Packed(_codes(n, k, lo, hi, seed).to(torch.int8), half(k // 32), None, 32, 0.0, 8)
    if name == "Q5_1":
        return Packed(_codes(n, k, 0, 31, seed).to(torch.int8), half(k // 32), half(k // 32) - 0.05, 32, 0.0, 8)
    if name == "Q4_0":
        return Packed(pack_nibbles(_codes(n, k, 0, 15, seed)), half(k // 32), None, 32, 8.0, 4)
    if name == "Q4_1":
        return Packed(pack_nibbles(_codes(n, k, 0, 15, seed)), half(k // 32), -half(k // 32), 32, 0.0, 4)
    if name == "Q4_K":  # float32 sub-block scales and mins
        return Packed(pack_nibbles(_codes(n, k, 0, 15, seed)), half(k // 32).float(), -half(k // 32).float(), 32, 0.0, 4)
    if name == "Q5_K":
        return Packed(_codes(n, k, 0, 31, seed).to(torch.int8), half(k // 32).float(), -half(k // 32).float(), 32, 0.0, 8)
    if name == "Q6_K":
        return Packed(_codes(n, k, -32, 31, seed).to(torch.int8), half(k // 16).float(), None, 16, 0.0, 8)
    raise AssertionError(name)


SCHEMES = ["int8", "int4 g32", "int4 g128", "int6 g32", "6-bit g16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def _terms(p: Packed) -> torch.Tensor:
    """(N, K) |scale| * (largest code + |zero| + 32) + |min|: a bound on what the kernel sums per weight."""
    ng = p.scales.shape[1]
    k = p.in_features
    s = p.scales.float().abs().repeat_interleave(k // ng, 1)
    m = p.mins.float().abs().repeat_interleave(k // ng, 1) if p.mins is not None else 0
    return s * (2 ** (p.bits - 1) * 2 + abs(p.zero) + 32) + m


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qlinear_equals_generic(generic, variant, scheme):
    # K 352: 11 blocks (odd, not a multiple of 8 blocks); N 37: a partial weight tile; M up to 9:
    # every activation-row tile (4, 3, 2, 1); several matrices in one call, as q, k, v run.
    k = 384 if scheme == "int4 g128" else 352
    ps = [_scheme(scheme, n, k, seed) for seed, n in enumerate((37, 5))]
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, k, generator=_gen(100 + m)) * 3
        args = list(zip(*[(p.q, p.scales, p.mins, p.group, p.zero, p.bits) for p in ps]))
        got, ref = variant.qlinear(x, *args), generic.qlinear(x, *args)
        for p, a, b in zip(ps, got, ref):
            bound = 1e-6 * (x.abs() @ _terms(p).T)  # float32 sums of the same exact int32 block products
            assert ((a - b).abs() <= bound).all(), (scheme, m, ((a - b).abs() / bound).max().item())
            # and both are the matrix's product, up to the int16 rounding of the activations
            exact = x.double() @ dequantize(p).double().T
            assert ((b.double() - exact).abs() <= x.abs().amax().item() / 32767 * (dequantize(p).abs().sum(1)) + bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", [(1, 262, 640), (5, 37, 100), (15, 9, 2304), (3, 3, 17)])
def test_dense_linear_equals_generic(generic, variant, dtype, m, n, k):
    g = torch.Generator().manual_seed(n * k)
    x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    want, got = generic.dense_linear(x, w).double(), variant.dense_linear(x, w).double()
    mag = x.double().abs() @ w.double().abs().T
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24  # the result's one rounding to x's dtype
    assert ((got - want).abs() <= 1e-6 * mag + 2 * rounding * want.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, keys, d", [(4, 1, 161, 64), (8, 4, 30, 72), (2, 2, 700, 40), (3, 1, 5, 18)])
def test_decode_attention_equals_generic(generic, variant, dtype, heads, kv_heads, keys, d):
    gen = _gen(heads * 1000 + keys + d)
    b, s = 3, keys + 9
    q, k, v = (torch.randn(b, n, d, generator=gen) for n in (heads, kv_heads, kv_heads))
    kc, vc = (torch.randn(b, kv_heads, s, d, generator=gen).to(dtype) for _ in range(2))
    slots = torch.tensor([keys - 1, keys // 2, s - 1])
    mask = torch.rand(b, keys, generator=gen) < 0.6
    mask[0] = True
    mask[2] = False  # a padding row that sees nothing
    mask[1, keys // 2] = True
    angles = torch.rand(b, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    for softcap in (0.0, 30.0):
        caches = [(kc.clone(), vc.clone()) for _ in range(2)]
        got = variant.decode_attention(q, k, v, *caches[0], slots, mask, cos, sin, 0.125, softcap)
        ref = generic.decode_attention(q, k, v, *caches[1], slots, mask, cos, sin, 0.125, softcap)
        # the same writes, up to rope's float32 products (an FMA where the compiler fuses them)
        assert (caches[0][0].float() - caches[1][0].float()).abs().max().item() <= 1e-6 * 8
        assert torch.equal(caches[0][1], caches[1][1])
        # outputs are convex combinations of values (|v| <= ~5): float32 summation order only
        assert (got - ref).abs().max().item() < 2e-5


def test_rms_norm_and_geglu_equal_generic(generic, variant):
    for c in (1, 7, 72, 640, 1153):  # tails past 4-, 8- and 16-lane blocks
        x = torch.randn(5, c, generator=_gen(c)) * 3
        w, r = torch.randn(c, generator=_gen(c + 1)), torch.randn(5, c, generator=_gen(c + 2))
        for res in (None, r):
            a, b = variant.rms_norm(x, w, 1e-6, res), generic.rms_norm(x, w, 1e-6, res)
            assert ((a - b).abs() <= 1e-5 * (b.abs() + (0 if res is None else r.abs())) + 1e-6).all()
    for n in (1, 9, 31, 16385, 50001):  # 16385: one past a parallel chunk
        g = torch.randn(n, generator=_gen(n)) * 4
        g[::13] = torch.linspace(-90, 90, g[::13].numel())
        u = torch.randn(n, generator=_gen(n + 1))
        a, b = variant.geglu(g, u), generic.geglu(g, u)
        # the vector exp is within 2 ulp; it clamps at 88.3, so huge negative gates give ~x * 5e-39
        assert ((a - b).abs() <= 1e-6 * b.abs() + 1e-9 * u.abs()).all()


def test_int4_search_equals_generic(generic, variant):
    w = torch.randn(40, 256, generator=_gen(5)) * torch.rand(40, 1, generator=_gen(6))
    w[4, 32:64] = 0.25  # a constant group: exact at scale 0
    imp = torch.rand(256, generator=_gen(7)) ** 4

    def error(scales, mins, wt, group):  # each group rounded to its nearest levels, weighted as the search weights it
        s, m = scales.double().repeat_interleave(group, 1), mins.double().repeat_interleave(group, 1)
        levels = torch.where(s > 0, torch.round((w.double() - m) / torch.where(s > 0, s, 1)).clamp(0, 15), 0)
        return (wt * (s * levels + m - w.double()) ** 2).view(40, -1, group).sum(-1)

    for importance in (None, imp):
        for group in (32, 64):
            x = w.double().view(40, -1, group)
            wt = (x.pow(2).mean(-1, keepdim=True) + x.pow(2)).sqrt().view(40, 256)
            wt = wt * (1 if importance is None else importance.double())
            (sa, ma), (sb, mb) = variant.int4_search(w, importance, group), generic.int4_search(w, importance, group)
            if group == 32:  # the constant group
                assert sa[4, 1] == 0 and ma[4, 1] == 0.25
            # candidates are compared by float32 sums in different orders: a near tie may pick the
            # other one, whose weighted error is then equal within that rounding
            ea, eb = error(sa, ma, wt, group), error(sb, mb, wt, group)
            assert ((ea - eb).abs() <= 1e-4 * eb + 1e-12).all()
            # and almost every group takes the same candidate, whose least-squares fit then differs in
            # the float32 sums' last bits only
            same = ((sa - sb).abs() <= 1e-4 * sb.abs()) & ((ma - mb).abs() <= 1e-4 * mb.abs() + 1e-6)
            assert same.float().mean().item() > 0.9


@pytest.mark.parametrize("kind, scheme", [("gemma2", "int8"), ("gemma3", "int4")])
def test_decode_stack_equals_generic(generic, variant, kind, scheme, checkpoint):
    """The whole C++ decoding step of each variant against generic's, past the sliding window."""
    import gemmarun
    from gemmarun.model.backend import kernel_backend
    from gemmarun.model.cache import KVCache

    model = gemmarun.load(checkpoint(kind, seed=5, initializer_range=0.05), quantize=scheme).model
    built = [kernel_backend(m).decode_stack(model) for m in (variant, generic)]  # (stack, positions) each
    assert None not in built
    stacks = [stack for stack, _ in built]
    ids = torch.randint(3, model.config.vocab_size, (2, 30), generator=_gen(6))
    caches = [KVCache(model.config, 2, 30, torch.float32) for _ in stacks]
    with torch.inference_mode():
        for cache in caches:
            model(ids[:, :4], torch.arange(4).expand(2, 4), cache)
        for t in range(4, 30):
            pos = torch.tensor([[t], [t]])
            logits = []
            for stack, cache in zip(stacks, caches):
                model._stack = stack
                logits.append(model(ids[:, t : t + 1], pos, cache, select=torch.zeros(2, dtype=torch.long)))
            # float32 sums in another order, and where a value lands within an ulp of an int16 rounding
            # boundary its code differs by one (1/32767 of its block's largest): through every layer
            assert (logits[0] - logits[1]).abs().max().item() < 1e-3 * logits[1].abs().max().item(), f"step {t}"
