"""GemmaConfig: one frozen dataclass for Gemma 2 and Gemma 3 text, read from config.json or GGUF."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

SLIDING = "sliding_attention"
GLOBAL = "full_attention"

GEMMA2_TYPES = ("gemma2",)
GEMMA3_TYPES = ("gemma3_text", "gemma3")

# Bounds on what sizes something, checked before anything is allocated: each is far past any Gemma
# (262144 pieces, 5376 wide, 62 layers, 128k positions) and far below what would exhaust memory
# building tables or placeholders from a corrupt value (1e9 layers would build a 1e9-entry list).
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "sliding_window": 1 << 24,
    "max_position_embeddings": 1 << 24,
}


def checked_size(name: str, value, source: str = "config") -> int:
    """An integer field that sizes something: a whole number from 1 to SIZE_LIMITS[name]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or isinstance(value, float)
        and not value.is_integer()
    ):
        raise ConfigError(f"{source} field {name} must be a positive integer, got {value!r}")
    if not 1 <= value <= SIZE_LIMITS[name]:
        raise ConfigError(f"{source} field {name} is {int(value)}; it must be from 1 to {SIZE_LIMITS[name]}")
    return int(value)


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # "gemma2" or "gemma3_text"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float  # scores are scaled by its -1/2 power
    sliding_window: int  # a sliding-layer query sees itself and the sliding_window - 1 keys before it
    layer_types: tuple[str, ...]  # SLIDING or GLOBAL per layer; read, never assumed
    rope_theta: float = 10000.0  # RoPE base of global layers
    rope_local_theta: float = 10000.0  # RoPE base of sliding layers (Gemma 3 differs from global)
    rope_scaling_factor: float = 1.0  # linear RoPE scaling on global layers (Gemma 3 4B+)
    attn_logit_softcapping: float | None = None  # Gemma 2: 50.0
    final_logit_softcapping: float | None = None  # Gemma 2: 30.0
    qk_norm: bool = False  # Gemma 3: per-head RMSNorm on q and k
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    extra_eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        self._check_values()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"config has {len(self.layer_types)} layer_types for {self.num_hidden_layers} layers; fix config.json")
        bad = set(self.layer_types) - {SLIDING, GLOBAL}
        if bad:
            raise ConfigError(f"unsupported layer type(s) {sorted(bad)}; expected {SLIDING!r} or {GLOBAL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    def _check_values(self) -> None:
        """Every size within SIZE_LIMITS, every float finite and of the sign the maths needs."""
        for name in SIZE_LIMITS:
            checked_size(name, getattr(self, name))
        if self.head_dim % 2:
            raise ConfigError(f"config field head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        positive = {
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "rope_theta": self.rope_theta,
            "rope_local_theta": self.rope_local_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
        }
        for name, v in positive.items():
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"config field {name} must be a finite number > 0, got {v!r}")
        # 0 divides by zero on an all-zero row; 1 or more swamps every activation
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise ConfigError(f"config field rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ConfigError(f"config field {name} is {v}, outside the vocabulary (0..{self.vocab_size - 1})")
        bad = [i for i in self.extra_eos_token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"config field eos_token_id holds {bad[0]}, outside the vocabulary (0..{self.vocab_size - 1})")

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def num_parameters(self) -> int:
        """Parameter count with the tied embedding counted once."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        block = attn + 3 * h * i + 4 * h + (2 * d if self.qk_norm else 0)
        return self.vocab_size * h + self.num_hidden_layers * block + h

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, raw: dict) -> GemmaConfig:
        """Build from a Hugging Face config.json dict (old and v5 layouts)."""
        model_type = raw.get("model_type")
        if model_type == "gemma3" and "text_config" in raw:
            if not isinstance(raw["text_config"], dict):
                raise ConfigError(f"config.json field text_config must be an object, got {type(raw['text_config']).__name__}")
            text = dict(raw["text_config"])
            text.setdefault("model_type", "gemma3_text")
            return cls.from_hf(text)
        if model_type not in GEMMA2_TYPES + GEMMA3_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r}; gemmarun runs gemma2 and gemma3_text checkpoints")
        gemma2 = model_type == "gemma2"
        try:
            n_layers = checked_size("num_hidden_layers", raw["num_hidden_layers"], "config.json")  # before the layer list
            hidden = checked_size("hidden_size", raw["hidden_size"], "config.json")
            heads = checked_size("num_attention_heads", raw["num_attention_heads"], "config.json")
            head_dim = int(raw.get("head_dim") or hidden // heads)
            layer_types = raw.get("layer_types")
            if layer_types is None:
                if gemma2:  # Gemma 2 alternates, starting with a sliding layer
                    layer_types = [SLIDING if i % 2 == 0 else GLOBAL for i in range(n_layers)]
                else:
                    pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
                    layer_types = [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
            rope_theta, local_theta, factor = _rope_from_hf(raw, gemma2)
            eos = raw.get("eos_token_id", 1)
            eos_list = list(eos) if isinstance(eos, (list, tuple)) else [eos]
            if not eos_list:
                raise ConfigError("config.json field eos_token_id is an empty list; give at least one id")
            return cls(
                model_type="gemma2" if gemma2 else "gemma3_text",
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or head_dim),
                sliding_window=int(raw.get("sliding_window") or 4096),
                layer_types=tuple(layer_types),
                rope_theta=rope_theta,
                rope_local_theta=local_theta,
                rope_scaling_factor=factor,
                attn_logit_softcapping=_opt_float(raw.get("attn_logit_softcapping")),
                final_logit_softcapping=_opt_float(raw.get("final_logit_softcapping")),
                qk_norm=not gemma2,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
                hidden_activation=raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh",
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                bos_token_id=int(raw.get("bos_token_id", 2) if raw.get("bos_token_id") is not None else 2),
                eos_token_id=int(eos_list[0]),
                pad_token_id=int(raw.get("pad_token_id", 0) if raw.get("pad_token_id") is not None else 0),
                extra_eos_token_ids=tuple(int(e) for e in eos_list[1:]),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError, AttributeError) as e:  # a field of the wrong type or an infinite count
            raise ConfigError(f"config.json has a malformed field: {str(e)[:200]}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> GemmaConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path} is not valid JSON ({str(e)[:120]}); re-download the checkpoint") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_hf(raw)

    def to_hf(self) -> dict:
        """The config.json dict transformers reads (used when writing checkpoints)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            rope = {"rope_type": "linear", "factor": self.rope_scaling_factor, "rope_theta": self.rope_theta}
        d = {
            "model_type": self.model_type,
            "architectures": ["Gemma2ForCausalLM" if self.is_gemma2 else "Gemma3ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            # transformers' config classes type-check this field as an int
            "query_pre_attn_scalar": int(q) if (q := self.query_pre_attn_scalar) == int(q) else q,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": self.hidden_activation,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": [self.eos_token_id, *self.extra_eos_token_ids] if self.extra_eos_token_ids else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.is_gemma2:
            d["rope_theta"] = self.rope_theta
        else:
            d["rope_parameters"] = {
                GLOBAL: rope,
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_theta},
            }
        return d


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def _rope_from_hf(raw: dict, gemma2: bool) -> tuple[float, float, float]:
    """(global base, local base, global linear factor) from either config layout."""
    params = raw.get("rope_parameters")
    for name in ("rope_parameters", "rope_scaling"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"config.json field {name} must be an object, got {raw[name]!r:.40}")
    if isinstance(params, dict) and GLOBAL in params:  # transformers v5, per layer kind
        glob = params[GLOBAL] or {}
        loc = params.get(SLIDING) or {}
        factor = float(glob.get("factor", 1.0)) if glob.get("rope_type", "default") == "linear" else 1.0
        return float(glob.get("rope_theta", 1e6)), float(loc.get("rope_theta", 1e4)), factor
    if isinstance(params, dict):  # v5, one set for all layers
        theta = float(params.get("rope_theta", 10000.0))
        factor = float(params.get("factor", 1.0)) if params.get("rope_type", "default") == "linear" else 1.0
        local = float(raw.get("rope_local_base_freq", theta if gemma2 else 10000.0))
        return theta, local, factor
    theta = float(raw.get("rope_theta", 10000.0 if gemma2 else 1e6))
    scaling = raw.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    if kind not in (None, "default", "linear"):
        raise ConfigError(f"unsupported rope_scaling type {kind!r}; gemmarun supports linear scaling")
    local = float(raw.get("rope_local_base_freq", theta if gemma2 else 10000.0))
    return theta, local, factor


def _gemma2_preset(hidden, layers, heads, kv_heads, head_dim, scalar, inter) -> GemmaConfig:
    return GemmaConfig(
        model_type="gemma2",
        vocab_size=256000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=scalar,
        sliding_window=4096,
        layer_types=tuple(SLIDING if i % 2 == 0 else GLOBAL for i in range(layers)),
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        extra_eos_token_ids=(107,),  # <end_of_turn> ends a chat reply
    )


# Gemma's published configs (docs/ARCHITECTURE.md); only the 27B scales queries by 144**-0.5.
PRESETS: dict[str, GemmaConfig] = {
    "gemma-2-2b": _gemma2_preset(2304, 26, 8, 4, 256, 256, 9216),
    "gemma-2-9b": _gemma2_preset(3584, 42, 16, 8, 256, 256, 14336),
    "gemma-2-27b": _gemma2_preset(4608, 46, 32, 16, 128, 144, 36864),
}
