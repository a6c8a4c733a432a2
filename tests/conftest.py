"""Fixtures shared by the whole session: the tiny tokenizer and the tiny random checkpoints, each
built once however many modules use it (building one is a transformers model, a save and a load)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from checkpoints import make_reference, save_checkpoint
from spm_fixture import train_tiny_spm

# Prefill chunks take gemmarun's kernel unless a test forces another path (tests/test_prefill.py
# tests each): the automatic choice is timed per machine, and the parity bounds of the other tests
# are those of the kernel's int16 activations, not of whichever GEMM won the timing on that CPU.
os.environ.setdefault("GEMMARUN_PREFILL", "kernel")


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    """tests/spm_fixture.py's SentencePiece model: the path of its tokenizer.model (read only)."""
    return train_tiny_spm(tmp_path_factory.mktemp("tiny_spm"))


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder with its size and modification time: what a write would change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


class Checkpoints:
    """checkpoint(kind, seed=..., **overrides): the folder of make_reference(kind, seed, **overrides)
    saved by save_checkpoint, built on first request and shared after. The folder is shared, so it is
    read only: a test that writes, deletes or quantises into it copies it first (shutil.copytree).
    Each use checks that no earlier one changed it (root ignores file modes, so a chmod would not)."""

    def __init__(self, factory: pytest.TempPathFactory):
        self._factory = factory
        self._refs: dict[str, tuple[object, torch.Tensor]] = {}
        self._folders: dict[str, tuple[Path, dict]] = {}

    @staticmethod
    def _key(kind: str, seed: int, overrides: dict) -> str:
        # repr, since an override may be a dict (rope_parameters); sorted, so the order of keywords does not matter
        return repr((kind, seed, sorted(overrides.items())))

    def reference(self, kind: str, seed: int, **overrides):
        """The transformers model itself (eval mode), for tests that compare against it; do not modify it."""
        key = self._key(kind, seed, overrides)
        if key not in self._refs:
            model = make_reference(kind, seed=seed, **overrides)
            self._refs[key] = model, torch.get_rng_state()
        model, rng = self._refs[key]
        # make_reference seeds torch's global generator; leave it as a fresh build would, so a test
        # that draws from it sees the same numbers whether or not the checkpoint was built before
        torch.set_rng_state(rng)
        return model

    def __call__(self, kind: str, seed: int, **overrides) -> Path:
        key = self._key(kind, seed, overrides)
        model = self.reference(kind, seed, **overrides)  # built or not, this also sets the generator
        if key not in self._folders:
            name = "-".join([kind, f"seed{seed}", *(f"{k}{v}" for k, v in sorted(overrides.items()) if not isinstance(v, dict))])
            folder = save_checkpoint(model, self._factory.mktemp(name))
            self._folders[key] = folder, _listing(folder)
        folder, listing = self._folders[key]
        assert _listing(folder) == listing, f"a test changed the shared checkpoint {folder}: change a copy"
        return folder

    def check_unchanged(self) -> None:
        changed = [str(folder) for folder, listing in self._folders.values() if _listing(folder) != listing]
        assert not changed, f"tests changed the shared checkpoints {changed}: change a copy"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The session's Checkpoints: checkpoint("gemma2", seed=5) is that checkpoint's folder."""
    checkpoints = Checkpoints(tmp_path_factory)
    yield checkpoints
    checkpoints.check_unchanged()


@pytest.fixture(scope="session")
def sp(tiny_spm):
    """sentencepiece's own processor over the tiny tokenizer: the reference the tokenizer tests use."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_spm))


@pytest.fixture(scope="session")
def tok(tiny_spm):
    """gemmarun's Tokenizer over the tiny tokenizer."""
    from gemmarun.tokenizer import Tokenizer

    return Tokenizer.from_file(tiny_spm)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every Ray test of the session (starting one takes seconds), stopped at
    the end; skipped with a reason when the `ray` extra is not installed. 4 logical CPUs on any
    machine: two Serve replicas and then two Ray Data workers of one CPU each, with room to spare."""
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'gemmarun[ray]')")
    # Workers are new processes: they must import this tree's gemmarun, as the tests do.
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "GEMMARUN_PREFILL": os.environ["GEMMARUN_PREFILL"]}})  # fmt: skip
    yield ray
    ray.shutdown()
