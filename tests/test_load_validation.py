"""Loading validates what sizes or scales something before anything is allocated: each config.json
field and GGUF metadata value the issue found accepted (NaN or negative epsilons, zero rope bases,
zero head counts, 1e9 layers, malformed rope fields, an empty eos list) is a ConfigError naming the
field; NaN norm weights, an integer dtype where floats belong and a GGUF tensor off its alignment
are CheckpointErrors. Every case fails within seconds."""

from __future__ import annotations

import json
import math
import shutil
import time

import gguf
import numpy as np
import pytest
from test_gguf import tiny_file

import gemmarun
from gemmarun import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=5)


def _with_config(folder, tmp_path, change) -> object:
    dst = shutil.copytree(folder, tmp_path / "ck", dirs_exist_ok=True)
    raw = json.loads((dst / "config.json").read_text())
    change(raw)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


CONFIG_CASES = {
    "hidden_size -64": (lambda c: c.update(hidden_size=-64), "hidden_size"),
    "num_attention_heads 0": (lambda c: c.update(num_attention_heads=0), "num_attention_heads"),
    "num_key_value_heads 0": (lambda c: c.update(num_key_value_heads=-2), "num_key_value_heads"),
    "sliding_window -5": (lambda c: c.update(sliding_window=-5), "sliding_window"),
    "eos_token_id []": (lambda c: c.update(eos_token_id=[]), "eos_token_id"),
    "eos_token_id out of vocab": (lambda c: c.update(eos_token_id=[1, 10**6]), "eos_token_id"),
    "rope_parameters 'x'": (lambda c: c.update(rope_parameters="x"), "rope_parameters"),
    "rope_scaling 'linear'": (lambda c: (c.pop("rope_parameters", None), c.update(rope_scaling="linear")), "rope_scaling"),
    "rope_theta NaN": (lambda c: (c.pop("rope_parameters", None), c.update(rope_theta=math.nan)), "rope_theta"),
    "rope_theta 0": (lambda c: (c.pop("rope_parameters", None), c.update(rope_theta=0)), "rope_theta"),
    "rms_norm_eps NaN": (lambda c: c.update(rms_norm_eps=math.nan), "rms_norm_eps"),
    "rms_norm_eps -1": (lambda c: c.update(rms_norm_eps=-1), "rms_norm_eps"),
    "num_hidden_layers 1e9, no layer_types": (
        lambda c: (c.pop("layer_types", None), c.update(num_hidden_layers=10**9)),
        "num_hidden_layers",
    ),
    "num_hidden_layers 4.5": (lambda c: c.update(num_hidden_layers=4.5), "num_hidden_layers"),
    "intermediate_size 1e12": (lambda c: c.update(intermediate_size=10**12), "intermediate_size"),
    "max_position_embeddings 0": (lambda c: c.update(max_position_embeddings=0), "max_position_embeddings"),
    "final_logit_softcapping -1": (lambda c: c.update(final_logit_softcapping=-1), "final_logit_softcapping"),
    "text_config a string": (lambda c: c.update(model_type="gemma3", text_config="x"), "text_config"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_json_values_are_checked_and_named(folder, tmp_path, case):
    change, field = CONFIG_CASES[case]
    ck = _with_config(folder, tmp_path, change)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=field) as e:
        gemmarun.load(ck)
    assert time.monotonic() - start < 30  # generous for a loaded machine; 1e9 layers once ran past 180 s
    assert "\n" not in str(e.value)


def test_deeply_nested_or_non_utf8_config_is_a_config_error(folder, tmp_path):
    ck = shutil.copytree(folder, tmp_path / "ck")
    for raw in (b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}", b"\xff\xfe{}"):
        (ck / "config.json").write_bytes(raw)
        with pytest.raises(ConfigError, match="not valid JSON"):
            gemmarun.load(ck)


def _edit_gguf(path, key: str, value) -> None:
    """Overwrite one scalar metadata value in place (same type, so the layout does not move)."""
    r = gguf.GGUFReader(path, "r+")
    field = r.fields[key]
    field.parts[field.data[0]][0] = value
    r.data.flush()


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("gemma3.attention.layer_norm_rms_epsilon", math.nan, "rms_norm_eps"),
        ("gemma3.attention.layer_norm_rms_epsilon", -1.0, "rms_norm_eps"),
        ("gemma3.rope.freq_base", math.nan, "rope_theta"),
        ("gemma3.rope.freq_base", 0.0, "rope_theta"),
        ("gemma3.attention.head_count", 0, "head_count"),
        ("gemma3.attention.head_count_kv", 0, "num_key_value_heads"),
        ("gemma3.block_count", 10**9, "block_count"),
        ("gemma3.context_length", 0, "max_position_embeddings"),
    ],
)
def test_gguf_metadata_values_are_checked_and_named(tmp_path, key, value, field):
    path, _, _ = tiny_file(tmp_path)
    _edit_gguf(path, key, value)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=field):
        gemmarun.load(path)
    assert time.monotonic() - start < 30


def test_nan_norm_weights_are_refused(tmp_path, folder):
    path, _, _ = tiny_file(tmp_path)
    r = gguf.GGUFReader(path, "r+")
    norm = next(t for t in r.tensors if t.name.endswith("attn_norm.weight"))
    norm.data[3] = np.nan
    r.data.flush()
    del r
    with pytest.raises(CheckpointError, match="NaN"):
        gemmarun.load(path)

    from safetensors.torch import load_file, save_file

    ck = shutil.copytree(folder, tmp_path / "ck")
    state = load_file(ck / "model.safetensors")
    name = next(n for n in state if n.endswith("input_layernorm.weight"))
    state[name][0] = float("nan")
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} holds NaN"):
        gemmarun.load(ck)


def test_a_safetensors_dtype_changed_to_an_integer_is_refused(folder, tmp_path):
    ck = shutil.copytree(folder, tmp_path / "ck")
    raw = (ck / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'"F32"', b'"I32"', 1)  # same length: the data offsets stay right
    (ck / "model.safetensors").write_bytes(raw[:8] + header + raw[8 + n :])
    with pytest.raises(CheckpointError, match="torch.int32; Gemma's weights are floating point"):
        gemmarun.load(ck)


def test_a_gguf_tensor_off_the_alignment_is_refused(tmp_path):
    path, _, _ = tiny_file(tmp_path)
    r = gguf.GGUFReader(path, "r+")
    t = r.tensors[0]
    t.field.parts[-1][0] += 3  # the tensor's offset within the data section
    r.data.flush()
    del r
    with pytest.raises(CheckpointError, match="not a multiple of the file's alignment"):
        gemmarun.load(path)
