"""GGUF metadata -> GemmaConfig, filling what a file leaves out as llama.cpp's loader does."""

from __future__ import annotations

from ...errors import ConfigError
from ...model.config import GLOBAL, SLIDING, GemmaConfig, checked_size

ARCHITECTURES = ("gemma2", "gemma3")


def default_layer_types(arch: str, n_layers: int, pattern: int | list | None = None) -> tuple[str, ...]:
    """llama.cpp's layer kinds: `{arch}.attention.sliding_window_pattern` (a period or a per-layer list, true =
    sliding), else period 2 for gemma2 and 6 for gemma3. With period p, layer i slides iff i % p < p - 1."""
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ConfigError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return tuple(SLIDING if p else GLOBAL for p in pattern)
    p = int(pattern) if pattern is not None else (2 if arch == "gemma2" else 6)
    return tuple(SLIDING if p == 0 or i % p < p - 1 else GLOBAL for i in range(n_layers))


def default_query_scalar(arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> float:
    """llama.cpp picks the 27B query scale by layer count (46: Gemma 2, 62: Gemma 3): hidden // heads there,
    head_dim for every other size. GGUF has no key for it (gemma_pytorch's query_pre_attn_scalar)."""
    return float(hidden // heads) if n_layers == (46 if arch == "gemma2" else 62) else float(head_dim)


_REQUIRED = object()


def config_from_gguf(metadata: dict, *, vocab_size: int | None = None) -> GemmaConfig:
    """GemmaConfig from GGUF metadata, filling what the file leaves out as llama.cpp's loader does.
    vocab_size, when given (the embedding's row count), wins over the metadata."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; gemmarun runs 'gemma2' and 'gemma3' GGUF files")
    gemma2 = arch == "gemma2"

    def key(name: str, default=_REQUIRED):
        v = metadata.get(f"{arch}.{name}", default)
        if v is _REQUIRED:
            raise ConfigError(f"GGUF metadata lacks {arch}.{name}; re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        if isinstance(v, list):  # llama.cpp allows per-layer arrays; Gemma's are uniform
            if len(set(v)) != 1:
                raise ConfigError(f"GGUF key {arch}.{name} varies per layer ({v}); gemmarun needs one value")
            v = v[0]
        return v

    n_layers = checked_size("num_hidden_layers", key("block_count"), f"GGUF {arch}.block_count:")
    hidden = checked_size("hidden_size", key("embedding_length"), f"GGUF {arch}.embedding_length:")
    heads = checked_size("num_attention_heads", key("attention.head_count"), f"GGUF {arch}.attention.head_count:")
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"GGUF {arch}.attention.value_length differs from key_length; Gemma uses one head_dim")
    context = int(key("context_length"))
    rope_theta = float(key("rope.freq_base", 10000.0))
    factor = _rope_factor(metadata, arch)
    if gemma2 and factor != 1.0:
        raise ConfigError("GGUF gemma2 file asks for RoPE scaling; gemmarun supports it on Gemma 3 global layers only")

    window = int(key("attention.sliding_window", 4096 if gemma2 else 0))
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if gemma2 or window > 0:
        layer_types = default_layer_types(arch, n_layers, pattern)
    else:  # a gemma3 file without a window: llama.cpp runs every layer global
        layer_types, window = (GLOBAL,) * n_layers, context

    if vocab_size is None:
        vocab_size = metadata.get(f"{arch}.vocab_size")
    if vocab_size is None and "tokenizer.ggml.tokens" in metadata:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    if vocab_size is None:
        raise ConfigError(f"GGUF metadata gives no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")

    eos = int(metadata.get("tokenizer.ggml.eos_token_id", 1))
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    if eot is None and "<end_of_turn>" in tokens:  # Gemma chat turns end with it; stop there too
        eot = tokens.index("<end_of_turn>")
    final_cap = key("final_logit_softcapping", 30.0 if gemma2 else None)
    return GemmaConfig(
        model_type="gemma2" if gemma2 else "gemma3_text",
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        query_pre_attn_scalar=default_query_scalar(arch, n_layers, hidden, heads, head_dim),
        sliding_window=window,
        layer_types=layer_types,
        rope_theta=rope_theta,
        # llama.cpp: gemma2 sliding layers share the global base; gemma3 sliding layers use 10000
        rope_local_theta=float(key("rope.freq_base_swa", rope_theta if gemma2 else 10000.0)),
        rope_scaling_factor=factor,
        # llama.cpp defaults the gemma2 caps to 50 / 30 when the keys are missing; gemma3 has no attention cap
        attn_logit_softcapping=float(key("attn_logit_softcapping", 50.0)) if gemma2 else None,
        final_logit_softcapping=None if final_cap is None else float(final_cap),
        qk_norm=not gemma2,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=context,
        bos_token_id=int(metadata.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=eos,
        pad_token_id=int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        extra_eos_token_ids=(int(eot),) if eot is not None and int(eot) != eos else (),
    )


def _rope_factor(metadata: dict, arch: str) -> float:
    """llama.cpp: rope.scaling.factor, else the older rope.scale_linear; 0 or absent means none."""
    kind = metadata.get(f"{arch}.rope.scaling.type", "linear")
    factor = float(metadata.get(f"{arch}.rope.scaling.factor") or metadata.get(f"{arch}.rope.scale_linear") or 0.0)
    if factor in (0.0, 1.0):
        return 1.0
    if kind not in ("linear", "none"):
        raise ConfigError(f"GGUF asks for {kind!r} RoPE scaling; gemmarun supports linear scaling")
    return factor
