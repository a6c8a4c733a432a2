"""The Gemma 2 / Gemma 3 text decoder: forward(tokens, positions, cache) -> logits.

Module names follow the Hugging Face checkpoints, so a safetensors state dict loads as is.
Every Gemma numeric quirk is written where it happens, with its reason (docs/ARCHITECTURE.md, "Gemma's numeric pitfalls").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import attention_kernel, decode_stack_module, dense_linear_kernel, geglu_kernel, rms_norm_kernel
from ..quant.gemm import run_dense
from ..quant.prefill import SMALL_ROWS
from ..quant.prefill import path as prefill_path
from .backend import TORCH_OPS, Backend
from .cache import AttnPlan, KVCache, plan_without_cache
from .config import GemmaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as w; the scale is (1 + w)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, ops: Backend = TORCH_OPS) -> torch.Tensor:
        """norm(x), or residual + norm(x) (a block's skip connection) in one pass when given; with
        the model's ops inside Gemma.forward, PyTorch's formula when called on its own."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


def dense_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a dense weight. Under SMALL_ROWS rows on the CPU (decoding, small batches) the
    kernel's matrix-vector products run: they stream float32 and bfloat16 weights faster than
    PyTorch's, and give a row the same bits in any batch. More rows take PyTorch's GEMM: for
    bfloat16 its own or float32 tiles, whichever quant/prefill.py timed faster on this CPU."""
    if x.device.type != "cpu":
        return F.linear(x, w)
    rows = x.numel() // x.shape[-1]
    kernel = dense_linear_kernel()  # None while torch.compile traces, or without kernels
    if kernel is not None and rows < SMALL_ROWS and x.dtype == w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous():
        return kernel(x, w)
    if x.dtype == torch.bfloat16:
        return run_dense(prefill_path("bf16", rows, False), x, w)
    return F.linear(x, w)


class Linear(nn.Linear):
    """nn.Linear without its random init: models are built on the meta device and every weight
    comes from a checkpoint, and the init's meta-tensor decompositions cost a second at load."""

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight)


class Rope:
    """Rotary embedding on the full head_dim, half-split layout (rotate_half)."""

    def __init__(self, head_dim: int, base: float, scaling: float = 1.0):
        # Linear scaling divides positions by the factor, i.e. divides the frequencies.
        # Explicit CPU device: models are built under torch.device("meta"), and this is no parameter.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (base**exponent) / scaling
        # Each frequency twice, as the reference's cat([freqs, freqs]) has the angles: one product
        # per angle either way, so the same bits, and one op less a step.
        self.inv_freq2 = torch.cat([inv_freq, inv_freq])

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        # (B, T) -> two (B, 1, T, D); angles in fp32, then cast like the reference does.
        if self.inv_freq2.device != positions.device:
            self.inv_freq2 = self.inv_freq2.to(positions.device)
        emb = (positions.clamp(min=0).float()[..., None] * self.inv_freq2)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.sliding = config.is_sliding(layer)
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = Linear(h, self.n_heads * d, bias=False)
        self.k_proj = Linear(h, self.n_kv * d, bias=False)
        self.v_proj = Linear(h, self.n_kv * d, bias=False)
        self.o_proj = Linear(self.n_heads * d, h, bias=False)
        if config.qk_norm:  # Gemma 3 normalises each head's q and k
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        # Gemma scales by query_pre_attn_scalar**-0.5, not head_dim**-0.5 (they differ on 27B: 144).
        self.scale = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping

    def forward(self, x, cos, sin, plan: AttnPlan, cache: KVCache | None, ops: Backend):
        b, t, _ = x.shape
        q, k, v = ops.linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q, ops=ops), self.k_norm(k, ops=ops)
        # a decoding step: one fused call instead of ~25 ops, when the backend takes it
        out = ops.decode_attention(q, k, v, cache, self.layer, plan, cos, sin, self.scale, self.softcap)
        if out is not None:
            return self.o_proj(out)
        v = v.transpose(1, 2)  # (B, Hkv, T, D)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, plan, k, v)  # (B, Hkv, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)  # widened from a half-precision cache
        g = self.n_heads // self.n_kv
        # GQA without repeating K/V: fold the g query heads of a group into the time axis.
        q = q.reshape(b, self.n_kv, g * t, self.head_dim)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, Hkv, g*T, S)
        if self.softcap is not None:
            # Soft-cap before the mask; fused SDPA paths that skip this are a known Gemma 2 bug.
            scores = torch.tanh(scores / self.softcap) * self.softcap
        s = scores.shape[-1]
        scores = scores.view(b, self.n_kv, g, t, s)
        # finfo.min rather than -inf: padding queries see no key and must not turn into NaN.
        scores = scores.masked_fill(~plan.mask[:, :, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype).view(b, self.n_kv, g * t, s)
        out = (probs @ v).view(b, self.n_heads, t, self.head_dim)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, bias=False)
        self.up_proj = Linear(h, i, bias=False)
        self.down_proj = Linear(i, h, bias=False)

    def forward(self, x, ops: Backend):
        gate, up = ops.linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(ops.geglu(gate, up))  # GeGLU, tanh GELU, as Gemma was trained


class Block(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        # Four norms per block: Gemma normalises both the input and the output of each sublayer.
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x, cos, sin, plan, cache, ops: Backend):
        x = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x, ops=ops), cos, sin, plan, cache, ops), x, ops)
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x, ops=ops), ops), x, ops)


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the LM head (Gemma ties them)."""

    def reset_parameters(self) -> None:
        pass  # as Linear: the weights come from a checkpoint

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight)


class Backbone(nn.Module):
    """Named `model` inside Gemma so parameter names match the checkpoints (model.layers.N...)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.embed_tokens = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.rope_global = Rope(config.head_dim, config.rope_theta, config.rope_scaling_factor)
        self.rope_local = Rope(config.head_dim, config.rope_local_theta)
        self._ops: Backend | None = None  # chosen on the first forward after loading or moving
        self._stack = None  # the C++ decode loop over the layers, built on the first decoding step
        self._stack_positions = 0  # the most positions per row it takes
        self._cache_dtype: torch.dtype | None = None
        self._embed_scales: dict[torch.dtype, torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        # a move may change the device or dtype the backend was chosen for, and the decode stack
        # holds the weight tensors, which .to() and friends replace
        self._ops, self._stack = None, None
        return super()._apply(fn, recurse)

    @property
    def ops(self) -> Backend:
        """The ops this model runs, decided once for its device: PyTorch's off the CPU; on it, the C++
        kernels of this process's variant (each op falls back to PyTorch for calls its kernel does not take)."""
        if torch.compiler.is_compiling():  # a lookup now would find no kernels (see backend.py): never cached
            return self._ops or TORCH_OPS
        if self._ops is None:
            cpu = self.device.type == "cpu"
            self._ops = Backend(rms_norm_kernel(), geglu_kernel(), attention_kernel(), decode_stack_module()) if cpu else TORCH_OPS
        return self._ops

    def fuses(self, positions: int, cache: KVCache | None) -> bool:
        """Whether a forward of `positions` per row with `cache` runs the fused C++ decode stack. It
        computes every position as a decoding step of one position would (each query's attention
        is independent of the others', and the row-wise kernels of the row count), so speculation
        can take such a verify forward's logits for single steps'."""
        return (
            cache is not None
            and not torch.compiler.is_compiling()
            and bool(self.decode_stack())
            and positions <= self._stack_positions
            and cache.writes_first(positions)
        )

    def decode_stack(self):
        """Every layer of a one-token step in one C++ call on CPU, when its matrices are packed for
        the kernel or dense float32 / bfloat16 (Backend.decode_stack); False otherwise (the layers
        run as modules)."""
        if self._stack is None:
            self._stack, self._stack_positions = self.ops.decode_stack(self) or (False, 0)
        return self._stack

    def _embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """sqrt(hidden_size) as a scalar tensor of `dtype`, made once per dtype (a tensor a step cost ~10 us)."""
        scale = self._embed_scales.get(dtype)
        if scale is None:
            scale = torch.tensor(math.sqrt(self.config.hidden_size), dtype=dtype)
            if not torch.compiler.is_compiling():  # a traced step keeps its own constant
                self._embed_scales[dtype] = scale
        return scale

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # norms stay dense when the matrices are quantised

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the activations' unless set (float16 or bfloat16 halve a float32 cache)."""
        return self._cache_dtype or self.dtype

    @cache_dtype.setter
    def cache_dtype(self, dtype: torch.dtype | None) -> None:
        self._cache_dtype = dtype

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, positions: (B, T); positions < 0 mark padding.

        Returns float32 logits (B, T, V), or (B, V) at the indices `select` (B,) when given,
        which is how decoding computes the lm_head for one position only.
        """
        cfg = self.config
        dtype = self.dtype
        x = self.model.embed_tokens(tokens).to(dtype)  # (B, T, C)
        # sqrt(hidden) rounded to the activation dtype first: the reference multiplies by a bf16 scalar.
        x = x * self._embed_scale(dtype)
        plans = cache.plan(positions) if cache is not None else plan_without_cache(cfg, positions)
        cos_g, sin_g = self.rope_global.cos_sin(positions, dtype)
        cos_l, sin_l = self.rope_local.cos_sin(positions, dtype)
        b, t = tokens.shape
        if self.fuses(t, cache):
            # float32 activations in the stack; a bfloat16 model's (and its rope tables) widen
            # exactly, and its rows are rounded back once after the last layer
            g, s = plans["global"], plans["sliding"]
            x = self._stack.forward(
                x.view(b * t, -1).float(),
                cache.k,
                cache.v,
                cos_g.view(b * t, -1).float(),
                sin_g.view(b * t, -1).float(),
                g.slots,
                g.mask.view(b, t, -1),
                cos_l.view(b * t, -1).float(),
                sin_l.view(b * t, -1).float(),
                s.slots,
                s.mask.view(b, t, -1),
            )
            x = x.view(b, t, -1).to(dtype)
        else:
            ops = self.ops
            for layer in self.model.layers:
                if layer.self_attn.sliding:
                    x = layer(x, cos_l, sin_l, plans["sliding"], cache, ops)
                else:
                    x = layer(x, cos_g, sin_g, plans["global"], cache, ops)
        if select is not None and t > 1:  # with one position x is (B, 1, C) already
            x = x[torch.arange(x.shape[0], device=x.device), select][:, None]  # (B, 1, C)
        x = self.model.norm(x, ops=self.ops)
        logits = self.model.embed_tokens.attend(x).float()  # tied LM head
        if cfg.final_logit_softcapping is not None:
            # Final soft-cap: greedy decoding hides its absence, log-probabilities do not.
            cap = cfg.final_logit_softcapping
            logits = logits / cap
            # tanh one (V,) row at a time: PyTorch's vectorised tanh takes a chunk's tail through a
            # scalar formula of other rounding, so over (B, T, V) a row's bits would depend on where
            # it lies; alone, a row is computed the same in a verify forward as in a single step.
            for row in logits.view(-1, logits.shape[-1]):
                row.tanh_()
            logits = logits * cap
        return logits[:, 0] if select is not None else logits
