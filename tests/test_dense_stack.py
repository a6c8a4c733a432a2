"""Dense float32 and bfloat16 matrices in the C++ decode stack (model/backend.py, kernels/src/decode.cpp):
a float32 model's steps bit-identical to its layers run as modules, a bfloat16 model's within the
bound of its rounding against float64, and the Matrices contract for dense weights."""

from __future__ import annotations

import copy

import pytest
import torch

import gemmarun
from gemmarun import kernels
from gemmarun.model.backend import DENSE_FUSED_MAX_POSITIONS
from gemmarun.model.cache import KVCache
from gemmarun.quant.gemm import BF16_UNIT

from checkpoints import make_reference, save_checkpoint

pytestmark = pytest.mark.skipif(kernels.decode_stack_module() is None, reason="no kernels here: dense models decode layer by layer")


def _steps(model, ids: torch.Tensor, cache_dtype: torch.dtype, stack: bool) -> torch.Tensor:
    """Logits of 2 rows: 4 tokens of prefill, then one decoding step per token (row 1 padding from
    token 20 on), through the stack or the layers as modules. (steps, 2, V)"""
    saved = model.decode_stack()
    if not stack:
        model._stack = False
    cache = KVCache(model.config, 2, ids.shape[1], cache_dtype)
    out = []
    try:
        with torch.inference_mode():
            model(ids[:, :4], torch.arange(4).expand(2, 4), cache)
            for t in range(4, ids.shape[1]):
                assert model.fuses(1, cache) == stack
                pos = torch.tensor([[t], [t if t < 20 else -1]])
                out.append(model(ids[:, t : t + 1], pos, cache, select=torch.zeros(2, dtype=torch.long)))
    finally:
        model._stack = saved
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_float32_stack_equals_layer_by_layer(kind, checkpoint):
    """Past the sliding window, with a padding row beside a live one: the same kernels in one C++
    loop, so the same bits."""
    model = gemmarun.load(checkpoint(kind, seed=5, initializer_range=0.05)).model
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    fast, slow = _steps(model, ids, torch.float32, True), _steps(model, ids, torch.float32, False)
    assert torch.equal(fast[:16], slow[:16]) and torch.equal(fast[16:, 0], slow[16:, 0])  # row 1 is padding from step 16


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_bfloat16_stack_decodes_within_its_rounding(kind, tmp_path):
    """A bfloat16 model's steps through the stack (float32 activations, bfloat16 weights and cache)
    and through its layers as modules (bfloat16 activations) against float64 with the same bfloat16
    weights, within bounds of bfloat16 rounding (u = 2^-8). Measured on these models, of the
    largest logit: the stack 1.5 u (gemma2) and 2.4 u (gemma3); the layers, which round every
    activation, 2.5 u and 5.7 u."""
    ref = make_reference(kind, seed=21, initializer_range=0.05)
    model = gemmarun.load(save_checkpoint(ref, tmp_path), dtype=torch.bfloat16).model
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    fast, slow = _steps(model, ids, torch.bfloat16, True), _steps(model, ids, torch.bfloat16, False)
    r = copy.deepcopy(ref).double()
    with torch.no_grad():
        r.load_state_dict({k: v.double() for k, v in model.state_dict().items() if k in r.state_dict()}, strict=False)
        want = r(ids[:1]).logits[0, 4:].float()  # row 0 at every decoded position
    scale = want.abs().max().item()
    stack_err = (fast[:, 0] - want).abs().max().item() / scale
    layers_err = (slow[:, 0] - want).abs().max().item() / scale
    assert 0 < stack_err <= 4 * BF16_UNIT, stack_err  # rounded (bfloat16 weights and cache), and only by that
    assert layers_err <= 8 * BF16_UNIT, layers_err


def test_a_bfloat16_prompt_under_the_dense_limit_prefills_through_the_stack(checkpoint):
    """Up to DENSE_FUSED_MAX_POSITIONS positions a row, a dense model's forward is one stack call;
    from there on its layers run as modules (PyTorch's GEMM for the products)."""
    model = gemmarun.load(checkpoint("gemma3", seed=5), dtype=torch.bfloat16).model
    cache = KVCache.for_model(model, 1, 64, ring_extra=DENSE_FUSED_MAX_POSITIONS)  # a ring wide enough for either
    assert model.fuses(DENSE_FUSED_MAX_POSITIONS, cache) and not model.fuses(DENSE_FUSED_MAX_POSITIONS + 1, cache)


def test_matrices_take_dense_weights_and_refuse_a_mix(checkpoint):
    m = kernels.decode_stack_module()
    w = torch.randn(8, 16)
    assert m.Matrices([w, w.bfloat16()]).count == 2
    packed = gemmarun.load(checkpoint("gemma3", seed=5), quantize="int8").model.model.layers[0].self_attn.q_proj.kernel_args
    with pytest.raises(RuntimeError, match="all packed or all dense"):
        m.Matrices([packed, w])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        m.Matrices([w.half()])
    with pytest.raises(RuntimeError, match="contiguous"):
        m.Matrices([w.t()])
