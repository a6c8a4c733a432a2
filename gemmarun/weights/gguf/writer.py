"""Write a GemmaConfig and a Hugging Face-named state dict as a llama.cpp GGUF file.

Used by tests and by benchmarks that make GGUF copies of a checkpoint. The file carries the keys
llama.cpp's convert_hf_to_gguf.py writes for gemma2 / gemma3, norms stored as 1 + w, llama.cpp names,
and 2-D weights in the requested type (1-D tensors stay F32, as the converter keeps them).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ...errors import CheckpointError, ConfigError
from ...model.config import SLIDING, GemmaConfig
from .config import default_layer_types, default_query_scalar
from .names import expected_shapes, gguf_name, is_norm

# Types both gguf-py can quantise to and gemmarun can read back.
WRITE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def write_gguf(
    path: str | Path,
    config: GemmaConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer_fields: dict | None = None,
    qtype: str = "F32",
) -> None:
    """Write `state_dict` (Hugging Face names, norms as w) for `config` to a GGUF file at `path`.
    tokenizer_fields: tokenizer.ggml.* keys to copy in, full ("tokenizer.ggml.tokens") or short ("tokens")."""
    if qtype.upper() not in WRITE_TYPES:
        raise ConfigError(f"cannot write GGUF tensors as {qtype!r}; choose one of {', '.join(WRITE_TYPES)}")
    qt = QT[qtype.upper()]
    arch = "gemma2" if config.is_gemma2 else "gemma3"
    tensors = _checked_tensors(config, state_dict)
    writer = gguf.GGUFWriter(str(path), arch)
    _write_hparams(writer, config, arch)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qt == QT.F32 else gguf.LlamaFileType[f"MOSTLY_{qt.name}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_fields:
        _write_tokenizer(writer, tokenizer_fields, config)
    for name, tensor in tensors.items():
        data, raw_type = _encode(name, tensor, qt)
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _checked_tensors(config: GemmaConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in state_dict]
    if missing:
        raise CheckpointError(f"the state dict lacks {len(missing)} tensor(s) of this config, e.g. {', '.join(missing[:3])}")
    tensors = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue  # tied to the embedding: convert_hf_to_gguf drops it too
            if config.is_gemma2:
                raise ConfigError("llama.cpp's gemma2 architecture has no output.weight; an untied head cannot be written")
            shapes[name] = (config.vocab_size, config.hidden_size)
        if name not in shapes:
            raise CheckpointError(f"tensor {name!r} is not part of this Gemma config")
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}; the config needs {shapes[name]}")
        tensors[name] = tensor
    return tensors


def _write_hparams(w: gguf.GGUFWriter, c: GemmaConfig, arch: str) -> None:
    """The keys convert_hf_to_gguf.py writes, plus the newer optional ones where the config needs them."""
    gemma2 = arch == "gemma2"
    scalar = default_query_scalar(arch, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim)
    if c.query_pre_attn_scalar != scalar:  # GGUF has no key for it; llama.cpp derives it from the size
        raise ConfigError(f"query_pre_attn_scalar {c.query_pre_attn_scalar} cannot be stored in GGUF: llama.cpp would use {scalar}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_freq_base(c.rope_theta)
    if c.rope_local_theta != (c.rope_theta if gemma2 else 10000.0):  # llama.cpp's default local base
        w.add_rope_freq_base_swa(c.rope_local_theta)
    if c.rope_scaling_factor != 1.0:
        if gemma2:
            raise ConfigError("llama.cpp would scale RoPE on gemma2 sliding layers too; cannot write this config")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    if gemma2:
        if c.attn_logit_softcapping is None or c.final_logit_softcapping is None:
            raise ConfigError("llama.cpp always soft-caps gemma2 logits; a gemma2 config without soft-caps cannot be written")
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    else:
        if c.attn_logit_softcapping is not None:
            raise ConfigError("llama.cpp's gemma3 has no attention soft-cap; cannot write this config")
        if c.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
    if gemma2 or SLIDING in c.layer_types:  # a gemma3 file without a window runs every layer global
        w.add_sliding_window(c.sliding_window)
        if c.layer_types != default_layer_types(arch, c.num_hidden_layers):
            w.add_sliding_window_pattern([t == SLIDING for t in c.layer_types])


def _write_tokenizer(w: gguf.GGUFWriter, fields: dict, config: GemmaConfig) -> None:
    for key, value in fields.items():
        key = key if key.startswith("tokenizer.") else f"tokenizer.ggml.{key}"
        if isinstance(value, (np.ndarray, torch.Tensor)):
            value = value.tolist()
        if key == "tokenizer.ggml.tokens" and len(value) != config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(value)} tokens but the config {config.vocab_size}; llama.cpp needs them equal")
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)  # token ids
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            w.add_array(key, list(value))  # str -> STRING, float -> FLOAT32 (scores), int -> INT32 (token types)
        else:
            raise ConfigError(f"tokenizer field {key} has a {type(value).__name__} value; expected str, number, bool or list")


def _encode(name: str, tensor: torch.Tensor, qt: QT) -> tuple[np.ndarray, QT | None]:
    """(array, raw type) for GGUFWriter.add_tensor; raw type None means 'from the numpy dtype'."""
    x = tensor.detach().to("cpu", torch.float32).numpy()
    if is_norm(name):
        x = x + np.float32(1)  # llama.cpp's converter bakes Gemma's (1 + w) into the stored weight
    if x.ndim == 1 or qt == QT.F32:
        return np.ascontiguousarray(x, dtype=np.float32), None
    if qt == QT.F16:
        return x.astype(np.float16), None
    if x.shape[-1] % GGML_QUANT_SIZES[qt][0]:
        return x.astype(np.float16), None  # rows that do not split into blocks: the converter falls back to F16
    return gguf.quants.quantize(np.ascontiguousarray(x), qt), qt
