"""Saved quantised checkpoints (`gemmarun quantize`): writing them and regrouping their tensors at load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .format import Packed, q6_from_canonical, q6_from_v1, q6_to_canonical
from .modules import _QuantWeight

# A folder like any Hugging Face checkpoint, whose model.safetensors holds `<module>.qweight`,
# `.scales` and (asymmetric schemes) `.mins` beside the dense norms, and names each module's
# scheme in the safetensors metadata: readable by any safetensors reader, on any torch version.
# Each scheme carries the format version of its tensors' layout:
#   1 (or none: files written before versions): q6 words in an earlier kernels' order (V1_HIGH_BITS);
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
            if bits == 6:
                q = q6_from_canonical(q) if versions[module] >= 2 else q6_from_v1(q)
            yield module + ".weight", Packed(q, got["scales"], got.get("mins"), int(s["group"]), float(s["zero"]), bits)
    if parts:
        from ..errors import CheckpointError

        raise CheckpointError(f"quantised tensors of {', '.join(sorted(parts))} are incomplete; re-run gemmarun quantize")


CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model")


def check_destination(source, folder, force: bool = False) -> Path:
    """The folder a quantised copy of `source` may be written to, checked before any work: never the
    source itself or a folder inside or around it (the copy would replace the weights it is made
    from), never a file or a path under one, and an existing non-empty folder only with force."""
    from ..errors import CheckpointError

    folder, source = Path(folder).absolute(), Path(source).absolute()
    if source.exists() and folder.exists() and folder.samefile(source):
        raise CheckpointError(f"{folder} is the source checkpoint; write the quantised copy to another folder")
    src, dst = source.resolve(), folder.resolve()
    if dst.is_relative_to(src) or src.is_relative_to(dst):
        where = "inside" if dst.is_relative_to(src) else "around"
        raise CheckpointError(f"{folder} is {where} the source checkpoint {source}; write the quantised copy elsewhere")
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise CheckpointError(f"{folder}: {p} is a file; give a folder for the quantised copy")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        held = [n for n in CHECKPOINT_FILES if (folder / n).exists()]
        what = f"holds a checkpoint ({', '.join(held)})" if held else "is not empty"
        raise CheckpointError(f"{folder} {what}; choose another folder or pass --force (force=True) to replace it")
    return folder


def save_quantized(lm, folder, force: bool = False) -> Path:
    """Write a quantised model as a checkpoint folder: config.json, tokenizer files, model.safetensors.
    The files go to a temporary folder beside `folder` that is renamed into place once complete, so
    an interrupted or failed write leaves no half checkpoint and replaces nothing."""
    import json
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from ..errors import CheckpointError

    source = Path(lm.source)
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a checkpoint folder; quantised copies are made from folders")
    folder = check_destination(source, folder, force)
    tensors, schemes = quantized_state(lm.model)
    if not schemes:
        raise CheckpointError("the model has no quantised layers; load it with quantize='int8' or 'int4'")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write in {folder.parent}: {e.strerror or e}") from None
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", METADATA_KEY: json.dumps(schemes)})
        (tmp / "config.json").write_text(json.dumps(lm.config.to_hf(), indent=1))
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "generation_config.json"):  # fmt: skip
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the copy reads like any other folder
        old = None
        if folder.exists():  # force: the old folder steps aside first, and goes only once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.rename(folder, old / folder.name)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
