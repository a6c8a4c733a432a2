"""llama.cpp tensor names <-> Hugging Face names, and the tensors a Gemma checkpoint holds."""

from __future__ import annotations

from ...errors import CheckpointError
from ...model.config import GemmaConfig

# llama.cpp name -> Hugging Face name (convert_hf_to_gguf / gguf-py tensor_mapping for GEMMA2 and GEMMA3).
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # never written for Gemma (tied head); tolerated if present
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",  # Gemma's pre-MLP norm takes llama.cpp's plain ffn_norm name
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_GGUF = {v: k for k, v in _TOP_NAMES.items()}
_BLOCK_GGUF = {v: k for k, v in _BLOCK_NAMES.items()}


def hf_name(name: str) -> str:
    """Hugging Face name of a llama.cpp tensor name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    raise CheckpointError(f"unexpected tensor {name!r} in a Gemma GGUF file; is it a text-only gemma2/gemma3 model?")


def gguf_name(name: str) -> str:
    """llama.cpp name of a Hugging Face tensor name."""
    if name in _TOP_GGUF:
        return _TOP_GGUF[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3].endswith(".weight"):
        module = parts[3][: -len(".weight")]
        if module in _BLOCK_GGUF:
            return f"blk.{parts[2]}.{_BLOCK_GGUF[module]}.weight"
    raise CheckpointError(f"tensor {name!r} is not part of a Gemma text model")


def is_norm(name: str) -> bool:
    """True for the RMSNorm weights (q/k norms included): the tensors convert_hf_to_gguf stores as 1 + w."""
    return name.endswith("norm.weight")


def expected_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> torch shape of every tensor a Gemma checkpoint holds (tied head: no lm_head)."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "pre_feedforward_layernorm.weight": (h,),
                p + "post_feedforward_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
    return shapes
