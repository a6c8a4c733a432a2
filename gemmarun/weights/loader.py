"""Build the model from a resolved source: a checkpoint folder (safetensors, dense or saved quantised)
or a .gguf file; the dtype names."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, ModelNotFoundError
from ..model.config import GemmaConfig
from ..model.gemma import Gemma
from ..quant import Packed, install
from ..quant.hugepages import Arena, release_heap

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}  # fmt: skip


def parse_dtype(dtype, device: torch.device, what: str = "dtype") -> torch.dtype:
    if dtype is None or dtype == "auto":
        # torch's bf16 matrix kernels are very slow on CPUs without native bf16, so fp32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"unsupported {what} {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported {what} {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def build_model(
    config: GemmaConfig,
    tensors: Iterable[tuple[str, torch.Tensor | Packed]],
    dtype: torch.dtype,
    device: torch.device,
    source: str,
    quantize: str | None = None,
    group_size: int = 32,
    arena: Arena | None = None,
) -> Gemma:
    """Build on the meta device and assign the checkpoint's tensors: strict, and no second copy.

    Matrices arrive dense (quantised here when `quantize` names a scheme, one at a time, so peak
    memory stays near the quantised size) or already packed (GGUF blocks, saved quantised checkpoints).
    Every packed matrix ends in `arena` (huge pages; a new one by default): the loaders read or re-lay
    most straight into it, and place() copies the rest (matrices quantised here, 6-bit codes re-laid).
    """
    arena = arena or Arena()
    if not config.tie_word_embeddings:
        raise ConfigError(f"{source}: an untied LM head is not a Gemma layout (tie_word_embeddings is false)")
    if quantize:  # the schemes load only when a load quantises (see gemmarun.quant)
        from ..quant import is_quantizable, quantize_weight, scheme_for
    with torch.device("meta"):
        model = Gemma(config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state, packed, unexpected = {}, {}, []
    for name, t in tensors:
        name = _strip_wrapper(name)
        if name is None or name == "lm_head.weight":  # vision tower of a gemma3 wrapper; tied head
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        shape = (t.q.shape[0], t.in_features) if isinstance(t, Packed) else tuple(t.shape)
        if shape != expected[name]:
            raise CheckpointError(f"{source}: tensor {name} has shape {shape}, the config implies {expected[name]}")
        if not isinstance(t, Packed) and not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} is stored as {t.dtype}; Gemma's weights are floating point")
        if "norm" in name and not isinstance(t, Packed) and not torch.isfinite(t).all():  # small: checked whole
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values; the checkpoint is corrupt")
        if isinstance(t, Packed):  # GGUF blocks and saved fields mostly arrive in the arena already
            packed[name] = arena.packed(t)
        elif quantize and is_quantizable(name):
            packed[name] = arena.packed(quantize_weight(t, scheme_for(name, quantize), group_size))
        else:
            state[name] = t.to(device=device, dtype=dtype)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(sorted(unexpected)[:5])}; is the config right?")
    missing = sorted(set(expected) - set(state) - set(packed))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    for name, p in packed.items():
        install(model, name, p)
    model.load_state_dict(state, strict=not packed, assign=True)
    model.eval()
    return model


def _strip_wrapper(name: str) -> str | None:
    """Names of a multimodal gemma3 checkpoint's text part, mapped to the text model's names."""
    for prefix, repl in (("language_model.model.", "model."), ("model.language_model.", "model."), ("language_model.", "")):
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")):
        return None
    return name


QUANTIZE_CHOICES = ("none", "int8", "int4")


def load_checkpoint(path: Path, dtype: torch.dtype, device: torch.device, quantize: str | None = None, group_size: int = 32):
    """(config, model, tokenizer) from a folder or a .gguf file.

    quantize: None keeps a checkpoint as it is stored (GGUF blocks stay packed on CPU, dense
    checkpoints stay dense); "int8"/"int4" quantise dense weights at load; "none" decodes everything.
    """
    from ..tokenizer import Tokenizer

    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    scheme = quantize if quantize in ("int8", "int4") else None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf; give a checkpoint folder or a .gguf file")
        from .gguf import load_gguf
        from .gguf.relay import packer

        keep = quantize is None and device.type == "cpu"
        arena = Arena()  # the blocks are re-laid straight into it: no second copy of a matrix
        relay = partial(packer, empty=arena.empty) if arena.advises else packer
        config, state, metadata = load_gguf(path, dtype=dtype, packer=relay if keep else None)
        model = build_model(config, state.items(), dtype, device, str(path), scheme, group_size, arena)
        del state
        release_heap()
        return config, model, Tokenizer.from_gguf_fields(metadata)
    tokenizer = Tokenizer.from_dir(path) if (path / "config.json").exists() else None
    config, model = load_folder_weights(path, dtype, device, scheme, group_size, decode=quantize == "none")
    release_heap()
    return config, model, tokenizer


def load_folder_weights(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    quantize: str | None = None,
    group_size: int = 32,
    decode: bool = False,
) -> tuple[GemmaConfig, Gemma]:
    """Config and weights of a Hugging Face checkpoint folder (no tokenizer needed)."""
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; it is not a Hugging Face checkpoint folder")
    from ..quant import METADATA_KEY, dequantize, regroup
    from .safetensors import iter_tensors, read_metadata, shard_files

    config = GemmaConfig.from_json_file(path / "config.json")
    files = shard_files(path)
    schemes = read_metadata(files[0]).get(METADATA_KEY)
    if schemes:  # a checkpoint written by `gemmarun quantize`
        try:
            schemes = json.loads(schemes)
        except json.JSONDecodeError:
            raise CheckpointError(f"{files[0]}: malformed {METADATA_KEY} metadata; re-run gemmarun quantize") from None
        if not isinstance(schemes, dict) or not all(isinstance(s, dict) for s in schemes.values()):
            raise CheckpointError(f"{files[0]}: {METADATA_KEY} metadata is not a table of schemes; re-run gemmarun quantize")
    arena = Arena()
    empty_for = partial(_packed_field_memory, schemes, arena) if schemes and not decode and arena.advises else None
    tensors = iter_tensors(files, empty_for)
    if schemes:
        tensors = regroup(tensors, schemes)
        if decode:
            tensors = ((n, dequantize(t) if isinstance(t, Packed) else t) for n, t in tensors)
    return config, build_model(config, tensors, dtype, device, str(path), quantize, group_size, arena)


def _packed_field_memory(schemes: dict, arena: Arena, name: str):
    """Where a saved checkpoint's tensor is read to: a packed field into the arena, except a 6-bit
    qweight, which regroup re-lays into new memory (build_model places that copy); None: mapped."""
    module, _, leaf = name.rpartition(".")
    scheme = schemes.get(module)
    if scheme is None:  # a dense tensor (a norm)
        return None
    return torch.empty if leaf == "qweight" and scheme.get("bits") == 6 else arena.empty


def warn_dtype(config: GemmaConfig, dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        warnings.warn(
            "float16 overflows in Gemma's activations (NaN or <pad> output); use bfloat16 or float32",
            stacklevel=3,
        )
