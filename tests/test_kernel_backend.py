"""Kernel dispatch decided once per placement (gemmarun/backend.py) and the typed decode-stack contract."""

from __future__ import annotations

import pytest
import torch

import gemmarun
from gemmarun import kernels
from gemmarun.model.backend import TORCH_OPS, decode_layer, kernel_backend


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma3", seed=3, initializer_range=0.05)


def test_backend_is_chosen_once_and_again_after_a_move(folder):
    model = gemmarun.load(folder).model
    ops = model.ops
    assert model.ops is ops  # not looked up again per call
    want = f"kernels:{kernels.variant()}" if kernels.variant() else "torch"
    assert ops.name == want
    stack = model.decode_stack()
    model.to(torch.bfloat16)
    assert model._ops is None and model._stack is None  # a move may change what fits
    assert model.ops.name == want
    if kernels.variant() is not None:  # dense bfloat16 matrices go into a stack of their own
        assert model.decode_stack() and model.decode_stack() is not stack
    model.to(torch.float16)
    assert not model.decode_stack()  # float16 activations overflow: the layers run as modules


def test_torch_ops_equal_the_kernels_through_a_forward(folder):
    if kernels.variant() is None:
        pytest.skip("no kernels here: every model runs the PyTorch ops")
    model = gemmarun.load(folder).model
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    with torch.inference_mode():
        fast = model(ids, pos)
        model._ops = TORCH_OPS
        slow = model(ids, pos)
    assert (fast - slow).abs().max().item() < 1e-4 * slow.abs().max().item()


def test_decode_layer_contract_is_typed(folder):
    m = kernels.decode_stack_module()
    if m is None:
        pytest.skip("no kernels here")
    model = gemmarun.load(folder, quantize="int8").model
    layer = model.model.layers[0]
    built = decode_layer(m, layer)
    a = layer.self_attn
    assert (built.heads, built.kv_heads, built.head_dim, built.sliding) == (a.n_heads, a.n_kv, a.head_dim, a.sliding)
    args = a.q_proj.kernel_args
    with pytest.raises(TypeError):  # a field missing or misspelt fails at construction
        m.DecodeLayer(input_norm=layer.input_layernorm.weight)
    with pytest.raises(RuntimeError, match="q, k, v"):  # the wrong number of matrices
        fields = dict(input_norm=layer.input_layernorm.weight.float(), post_attention_norm=layer.input_layernorm.weight.float(),
                      pre_feedforward_norm=layer.input_layernorm.weight.float(), post_feedforward_norm=layer.input_layernorm.weight.float(),
                      q_norm=None, k_norm=None, qkv=m.Matrices([args]), o=m.Matrices([args]), gate_up=m.Matrices([args, args]),
                      down=m.Matrices([args]), sliding=True, heads=4, kv_heads=2, head_dim=16, scale=0.25, softcap=0.0)  # fmt: skip
        m.DecodeLayer(**fields)
    with pytest.raises(RuntimeError, match="each matrix is"):
        m.Matrices([args[:5]])
    assert m.Matrices([args, args]).count == 2
    assert kernel_backend(m).decode_stack(model) is not None
