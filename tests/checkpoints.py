"""Small random Gemma checkpoints made with transformers (the reference) and saved for real."""

from __future__ import annotations

from pathlib import Path

import torch

from spm_fixture import train_tiny_spm

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=16,
    max_position_embeddings=512,
    attn_implementation="eager",
    # A wide init keeps the random logits far apart, so greedy choices are not coin flips.
    initializer_range=0.3,
)


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises the (1 + w) norm weights to zero; random ones test the formula."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def make_reference(kind: str = "gemma2", seed: int = 0, vocab_size: int | None = None, **overrides):
    """A random transformers model (eager attention) of the tiny shape."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    kw = dict(TINY, vocab_size=vocab_size or 600, **overrides)
    if kind == "gemma2":
        kw.setdefault("num_hidden_layers", 4)
        kw.setdefault("query_pre_attn_scalar", 16)
        model = Gemma2ForCausalLM(Gemma2Config(**kw))
    else:
        kw.setdefault("num_hidden_layers", 6)  # five sliding layers to one global
        kw.setdefault("query_pre_attn_scalar", 16)
        kw.setdefault(
            "rope_parameters",
            {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
        )
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    _randomize_norms(model, seed)
    return model.eval()


def save_checkpoint(model, folder: Path, max_shard_size: str | None = None) -> Path:
    """Save weights + config as transformers does, with a sentencepiece tokenizer trained here."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    spm = train_tiny_spm(folder / "spm", vocab_size=model.config.vocab_size)
    (folder / "tokenizer.model").write_bytes(Path(spm).read_bytes())
    return folder
