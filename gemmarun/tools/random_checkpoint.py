"""Random-weight checkpoints of exact model shapes: speed and memory do not depend on the values."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.config import GemmaConfig
from ..model.gemma import Gemma


def parameter_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Gemma(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def write_random_checkpoint(
    config: GemmaConfig, folder: str | Path, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 << 30, seed: int = 0
) -> Path:
    """Write config.json + sharded safetensors + index, tensor by tensor (memory stays at one shard)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(config)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * dtype.itemsize
        if current and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    groups.append(current)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            # Norm weights near 0 (scale 1 + w), matrices at the usual 0.02 init.
            std = 0.1 if "norm" in name else 0.02
            shard[name] = (torch.randn(shapes[name], generator=gen) * std).to(dtype)
            total += shard[name].numel() * dtype.itemsize
            weight_map[name] = fname
        save_file(shard, folder / fname, metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=1))
    return folder
