"""Loading checkpoints: folders, shards, the HF cache layout, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemmarun
from gemmarun import CheckpointError, ConfigError, ModelNotFoundError

from checkpoints import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint.reference("gemma2", seed=3), checkpoint("gemma2", seed=3)


def _copy(ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt[1], dst)  # the tests below break the copy: the shared folder stays whole
    return dst


def test_sharded_checkpoint_loads_same_as_single(ckpt, tmp_path):
    ref, folder = ckpt
    sharded = save_checkpoint(ref, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    ids = list(range(3, 40))
    assert torch.equal(gemmarun.load(sharded).logits(ids), gemmarun.load(folder).logits(ids))


def test_bfloat16_load_and_parameter_count(ckpt):
    ref, folder = ckpt
    lm = gemmarun.load(folder, dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    n = sum(p.numel() for p in lm.model.parameters())
    assert n == lm.config.num_parameters() == sum(p.numel() for p in ref.model.parameters())


def test_float16_warns(ckpt):
    with pytest.warns(UserWarning, match="float16 overflows"):
        gemmarun.load(ckpt[1], dtype="float16")


def test_repo_id_from_hf_cache(ckpt, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny-gemma" / "snapshots" / "abc123"
    shutil.copytree(ckpt[1], snap)
    (tmp_path / "hub" / "models--acme--tiny-gemma" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-gemma" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    lm = gemmarun.load("acme/tiny-gemma")
    assert lm.source == str(snap)
    from gemmarun.weights.listing import list_models

    assert any(r.name == "acme/tiny-gemma" and r.kind == "hf-cache" for r in list_models())


def test_repo_id_missing_from_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        gemmarun.load("google/gemma-2-2b")


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="no model at"):
        gemmarun.load("./no/such/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        gemmarun.load(tmp_path)


def test_unknown_model_type(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        gemmarun.load(folder)


def test_truncated_safetensors(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        gemmarun.load(folder)


def test_garbage_safetensors(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt"):
        gemmarun.load(folder)


def test_missing_tensor_is_named(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        gemmarun.load(folder)


def test_unexpected_tensor_is_named(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight"):
        gemmarun.load(folder)


def test_wrong_shape_is_named(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    sd = load_file(folder / "model.safetensors")
    sd["model.norm.weight"] = torch.zeros(65)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(65,\)"):
        gemmarun.load(folder)


def test_context_limits(ckpt):
    lm = gemmarun.load(ckpt[1], context=32)
    assert lm.context == 32
    with pytest.raises(gemmarun.ContextLengthError, match="context holds 32"):
        lm.generate(list(range(3, 40)), max_new_tokens=4)
    # A prompt that fits gets as many new tokens as the context leaves.
    out = lm.generate(list(range(3, 30)), max_new_tokens=50, ignore_eos=True)
    assert out.completion_tokens == 32 - 27 and out.finish_reason == "length"
    with pytest.raises(gemmarun.ContextLengthError, match="exceeds the model's limit"):
        gemmarun.load(ckpt[1], context=10**6)
