"""`gemmarun quantize` never destroys what it reads or silently writes over what is there: the source
and folders in or around it are refused (the source stays byte-identical), a folder that holds files
needs --force, a file or a path under one is refused, and the copy appears only once complete."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

import gemmarun
from gemmarun import CheckpointError, cli
from gemmarun.quant import checkpoint as qcheckpoint


@pytest.fixture
def source(checkpoint, tmp_path):
    return shutil.copytree(checkpoint("gemma2", seed=5), tmp_path / "src")


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _quantize(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["quantize", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("where", ["itself", "itself, spelt with ..", "inside", "around"])
def test_the_source_and_folders_in_or_around_it_are_refused_and_unchanged(source, capsys, where):
    dst = {"itself": source, "itself, spelt with ..": source / ".." / source.name, "inside": source / "q8",
           "around": source.parent}[where]  # fmt: skip
    before = _digest(source)
    for force in ([], ["--force"]):
        code, err = _quantize(capsys, source, dst, "--scheme", "int8", *force)
        assert code == 1 and err.startswith("error: ") and "source checkpoint" in err and "Traceback" not in err
        assert _digest(source) == before
    assert not (source / "q8").exists()


def test_a_folder_holding_a_checkpoint_needs_force(source, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert _quantize(capsys, source, dst, "--scheme", "int8") == (0, "")
    first = _digest(dst)
    code, err = _quantize(capsys, source, dst, "--scheme", "int4", "--no-calibration")
    assert code == 1 and "holds a checkpoint (config.json, model.safetensors" in err and "--force" in err
    assert _digest(dst) == first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, err = _quantize(capsys, source, tmp_path / "other", "--scheme", "int8")
    assert code == 1 and "is not empty" in err

    code, _ = _quantize(capsys, source, dst, "--scheme", "int4", "--no-calibration", "--force")
    assert code == 0 and _digest(dst) != first
    ids = list(range(3, 30))
    want = gemmarun.load(source, quantize="int4").logits(ids)
    assert torch.equal(gemmarun.load(dst).logits(ids), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "other", "src"]  # no temporary folder left


def test_a_file_or_a_path_under_a_file_is_refused(source, tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"keep me")
    for dst in (f, f / "q8"):
        code, err = _quantize(capsys, source, dst, "--scheme", "int8")
        assert code == 1 and "is a file" in err
    assert f.read_bytes() == b"keep me"


def test_a_failed_write_leaves_nothing_behind(source, tmp_path, monkeypatch):
    lm = gemmarun.load(source, quantize="int8")
    dst = tmp_path / "dst"
    old = shutil.copytree(source, tmp_path / "old")  # an existing folder, replaced only on success

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    for target, force in ((dst, False), (old, True)):
        before = _digest(old)
        with pytest.raises(OSError, match="No space"):
            qcheckpoint.save_quantized(lm, target, force=force)
        assert not dst.exists() and _digest(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "src"]


def test_the_library_call_checks_too(source):
    lm = gemmarun.load(source, quantize="int8")
    before = _digest(source)
    with pytest.raises(CheckpointError, match="is the source checkpoint"):
        qcheckpoint.save_quantized(lm, source, force=True)
    assert _digest(source) == before
