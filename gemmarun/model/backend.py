"""Kernel dispatch, decided once per model placement: the ops a Gemma forward runs.

A Backend holds the C++ kernel entry points this process uses (gemmarun/kernels, one variant per
CPU) or none of them; each op runs its kernel when the call fits it (float32 activations, one
token of decoding for attention) and the PyTorch formula otherwise, so gemmarun/model.py states
the math once and never asks which machine it runs on. The model chooses its backend when first
run after loading or moving (Gemma.ops). The kernel entries are looked up at that moment, never
while torch.compile traces (it cannot trace into the extension; the PyTorch ops compile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import linears, on_kernel
from ..quant.prefill import SMALL_ROWS

# Positions per row the attention kernel and the decode stack take: a verify forward has at most 33
# (32 drafts + 1); longer chunks are prefill, which keeps the batched matmuls quant/prefill.py
# calibrates (bmm, dense tiles) instead of one kernel dot per (query, key). Measured on the 270M
# (EPYC, 2 threads, after 200 tokens): the stack is faster at 16 positions (116 against 127 ms),
# level at 32 and 8% slower at 64, so the cap is what speculation needs.
FUSED_MAX_POSITIONS = 33
# A stack of dense matrices runs every product in the matrix-vector kernel, which the layers as
# modules use under SMALL_ROWS rows only (PyTorch's GEMM is faster from there): so it takes fewer
# positions, and a prompt of 16 tokens or more prefills through the GEMM as before.
DENSE_FUSED_MAX_POSITIONS = SMALL_ROWS - 1


def _eager() -> bool:
    return not torch.compiler.is_compiling()


@dataclass(frozen=True)
class Backend:
    """The kernels for one placement; None entries run as PyTorch ops (TORCH_OPS has none)."""

    rms_norm_kernel: Callable | None = None
    geglu_kernel: Callable | None = None
    attention_kernel: Callable | None = None
    stack_module: Any = None  # the extension holding DecodeStack, DecodeLayer and Matrices

    @property
    def name(self) -> str:
        """'kernels:<variant>' or 'torch'."""
        return f"kernels:{self.stack_module.variant()}" if self.stack_module is not None else "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Gemma's norm(x) = x * rsqrt(mean(x^2) + eps) * (1 + w), or residual + norm(x) in one pass."""
        # fp32 throughout, and 1 + w added in fp32: in bf16 the sum loses w's low bits.
        if self.rms_norm_kernel is not None and _eager() and (residual is None or residual.dtype == torch.float32):
            # one fused call instead of four or five ops: ~110 norms per decoded token
            res = residual if residual is None else residual.contiguous()
            return self.rms_norm_kernel(x.float().contiguous(), weight.float(), eps, res).type_as(x)
        # (F.rms_norm computes x * rsqrt(mean(x^2) + eps) * scale in one op, in x's dtype.)
        scale = weight.float() + 1.0
        out = F.rms_norm(x.float(), scale.shape, scale, eps).type_as(x)
        return out if residual is None else residual + out  # the add in the activation dtype, as the reference

    def geglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """GeGLU with the tanh approximation of GELU, as Gemma was trained."""
        if self.geglu_kernel is not None and _eager() and gate.dtype == torch.float32:
            return self.geglu_kernel(gate.contiguous(), up.contiguous())
        return F.gelu(gate, approximate="tanh") * up

    def linears(self, x: torch.Tensor, layers) -> list[torch.Tensor]:
        """x through linear layers that share it (q, k, v; gate, up): one kernel call when all are packed."""
        return linears(x, layers)

    def decode_attention(self, q, k, v, cache, layer: int, plan, cos, sin, scale: float, softcap: float | None):
        """Attention with rope and the cache write in one call for a decoding step or any forward
        that writes before it reads (plan not concat), (B, T, H * D); None when the kernel does not
        take the call (the caller runs the PyTorch formula). q (B, T, H, D), k and v (B, T, Hkv, D)
        before rope."""
        b, t, h, d = q.shape
        if (self.attention_kernel is None or not _eager() or cache is None or q.dtype != torch.float32 or plan.concat
                or t > FUSED_MAX_POSITIONS):  # fmt: skip
            return None
        out = self.attention_kernel(q.reshape(b * t, h, d).contiguous(), k.reshape(b * t, -1, d).contiguous(),
                                    v.reshape(b * t, -1, d).contiguous(), cache.k[layer], cache.v[layer], plan.slots.contiguous(),
                                    plan.mask.view(b, t, -1), cos.reshape(b * t, -1).contiguous(),
                                    sin.reshape(b * t, -1).contiguous(), scale, softcap or 0.0)  # fmt: skip
        return out.view(b, t, h * d)

    def decode_stack(self, model: nn.Module) -> tuple[Any, int] | None:
        """The C++ loop over every decoder layer of a one-token step and the most positions per row
        it takes, when each group of matrices sharing an input (q, k, v; o; gate, up; down) is all
        packed for the kernel or all dense float32 / bfloat16, and the model's dtype is one of
        those two; None otherwise (the layers run as modules). The stack's activations are float32:
        a bfloat16 model's weights stay bfloat16 (widened exactly in the products) and its rows are
        rounded to bfloat16 again after the last layer (Gemma.forward)."""
        m = self.stack_module
        if m is None or not _eager() or model.dtype not in STACK_DTYPES:
            return None
        layers = model.model.layers
        kinds = {_group_kind(group) for layer in layers for group in _groups(layer)}
        if None in kinds:
            return None
        stack = m.DecodeStack([decode_layer(m, layer) for layer in layers], model.config.rms_norm_eps)
        return stack, DENSE_FUSED_MAX_POSITIONS if "dense" in kinds else FUSED_MAX_POSITIONS


TORCH_OPS = Backend()

STACK_DTYPES = (torch.float32, torch.bfloat16)  # model dtypes the decode stack takes (float16 overflows)


def _groups(layer) -> tuple[tuple[nn.Module, ...], ...]:
    """A decoder layer's matrices in the groups that share an input, as DecodeLayer takes them."""
    a, mlp = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)


def _is_dense(x: nn.Module) -> bool:
    return isinstance(x, nn.Linear) and x.weight.device.type == "cpu" and x.weight.dtype in STACK_DTYPES and x.weight.is_contiguous()


def _group_kind(group) -> str | None:
    """'packed' or 'dense' when the stack takes every matrix of the group that way, else None."""
    if all(on_kernel(x) for x in group):
        return "packed"
    return "dense" if all(_is_dense(x) for x in group) else None


def kernel_backend(module) -> Backend:
    """Every op of one compiled kernel extension (gemmarun.kernels.module(variant))."""
    return Backend(module.rms_norm, module.geglu, module.decode_attention, module)


def decode_layer(m, layer) -> Any:
    """A decoder layer (model.Block) as the extension's typed DecodeLayer: its norm weights in float32,
    its matrices (qlinear's arguments when packed, the weight when dense) and its attention shape."""
    a = layer.self_attn
    qkv, o, gate_up, down = (m.Matrices([x.kernel_args if on_kernel(x) else x.weight for x in g]) for g in _groups(layer))
    return m.DecodeLayer(
        input_norm=layer.input_layernorm.weight.float(), post_attention_norm=layer.post_attention_layernorm.weight.float(),
        pre_feedforward_norm=layer.pre_feedforward_layernorm.weight.float(),
        post_feedforward_norm=layer.post_feedforward_layernorm.weight.float(),
        q_norm=a.q_norm.weight.float() if a.qk_norm else None, k_norm=a.k_norm.weight.float() if a.qk_norm else None,
        qkv=qkv, o=o, gate_up=gate_up, down=down,
        sliding=a.sliding, heads=a.n_heads, kv_heads=a.n_kv, head_dim=a.head_dim, scale=a.scale, softcap=a.softcap or 0.0,
    )  # fmt: skip
