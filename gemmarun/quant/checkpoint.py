"""Saved quantised checkpoints (`gemmarun quantize`): writing them and regrouping their tensors at load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .format import Packed, q6_from_canonical, q6_to_canonical
from .modules import _QuantWeight

# A folder like any Hugging Face checkpoint, whose model.safetensors holds `<module>.qweight`,
# `.scales` and (asymmetric schemes) `.mins` beside the dense norms, and names each module's
# scheme in the safetensors metadata: readable by any safetensors reader, on any torch version.
# Each scheme carries the format version of its tensors' layout:
#   1 (or none: files written before versions): q6 words in the kernels' AVX2 lane order;
#   2: the canonical layout of quant/format.py, which no ISA defines (q4 and q8 are the same in both).
# Loading turns a stored layout into the in-memory one the kernels read; saving writes version 2.

METADATA_KEY = "gemmarun.quantization"
FORMAT_VERSION = 2


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors to save, {module name: scheme}) of a model with quantised layers."""
    tensors, schemes = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, _QuantWeight):
            schemes[name] = {**module.scheme(), "version": FORMAT_VERSION}
    for name, t in model.state_dict().items():
        if t is not None:
            tensors[name] = t.contiguous()
    for name, s in schemes.items():
        if s["bits"] == 6:
            tensors[name + ".qweight"] = q6_to_canonical(tensors[name + ".qweight"])
    return tensors, schemes


def _version(module: str, scheme: dict) -> int:
    version = scheme.get("version", 1)
    if version not in (1, FORMAT_VERSION):
        from ..errors import CheckpointError

        raise CheckpointError(f"{module} is stored in layout version {version}; this gemmarun reads versions 1 and "
                              f"{FORMAT_VERSION} (upgrade gemmarun, or re-run gemmarun quantize)")  # fmt: skip
    return version


def regroup(tensors, schemes: dict[str, dict]):
    """Turn a flat (name, tensor) stream of a saved quantised checkpoint back into (name.weight, Packed)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    versions = {module: _version(module, s) for module, s in schemes.items()}  # checked before any tensor is read
    for name, t in tensors:
        module, _, leaf = name.rpartition(".")
        if module not in schemes:
            yield name, t
            continue
        got = parts.setdefault(module, {})
        got[leaf] = t
        s = schemes[module]
        if "qweight" in got and "scales" in got and ("mins" in got or not s["mins"]):
            del parts[module]
            q, bits = got["qweight"], int(s["bits"])
            if bits == 6 and versions[module] >= 2:
                q = q6_from_canonical(q)
            yield module + ".weight", Packed(q, got["scales"], got.get("mins"), int(s["group"]), float(s["zero"]), bits)
    if parts:
        from ..errors import CheckpointError

        raise CheckpointError(f"quantised tensors of {', '.join(sorted(parts))} are incomplete; re-run gemmarun quantize")


def save_quantized(lm, folder) -> Path:
    """Write a quantised model as a checkpoint folder: config.json, tokenizer files, model.safetensors."""
    import json
    import shutil

    from safetensors.torch import save_file

    from ..errors import CheckpointError

    folder = Path(folder)
    source = Path(lm.source)
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a checkpoint folder; quantised copies are made from folders")
    tensors, schemes = quantized_state(lm.model)
    if not schemes:
        raise CheckpointError("the model has no quantised layers; load it with quantize='int8' or 'int4'")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", METADATA_KEY: json.dumps(schemes)})
    (folder / "config.json").write_text(json.dumps(lm.config.to_hf(), indent=1))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):  # fmt: skip
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    return folder
