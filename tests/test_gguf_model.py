"""GGUF files end to end: a random transformers checkpoint written as GGUF (with its tokenizer),
loaded through gemmarun.load and the CLI, against the reference and the safetensors copy."""

from __future__ import annotations

import copy
import subprocess
import sys

import gguf
import pytest
import sentencepiece as spm
import torch

import gemmarun
from gemmarun.model.config import GemmaConfig
from gemmarun.weights.gguf import hf_name, is_norm, read_gguf
from gemmarun.weights.gguf.writer import write_gguf


# GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
def tokenizer_fields(model_file) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()

    def kind(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        if sp.is_unused(i):
            return 5
        return 4 if sp.id_to_piece(i).startswith("<") and sp.id_to_piece(i).endswith(">") else 1

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.padding_token_id": sp.pad_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def files(request, tmp_path_factory, checkpoint):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"gguf-{kind}")
    ref = checkpoint.reference(kind, seed=11)
    folder = checkpoint(kind, seed=11)
    config = GemmaConfig.from_json_file(folder / "config.json")
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    fields = tokenizer_fields(folder / "tokenizer.model")
    paths = {}
    for qtype in ("F32", "Q8_0"):
        paths[qtype] = tmp / f"model-{qtype}.gguf"
        write_gguf(paths[qtype], config, state, tokenizer_fields=fields, qtype=qtype)
    return ref, folder, paths


def test_f32_gguf_equals_reference_and_safetensors(files):
    ref, folder, paths = files
    lm = gemmarun.load(paths["F32"])
    st = gemmarun.load(folder)
    text = "The quick brown fox jumps over the lazy dog, again and again and again."
    ids = lm.tokenizer.encode(text)
    assert ids == st.tokenizer.encode(text)
    assert len(ids) > ref.config.sliding_window
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (lm.logits(ids) - expected).abs().max().item() < 1e-4
    a = lm.generate(text, max_new_tokens=20, ignore_eos=True)
    b = st.generate(text, max_new_tokens=20, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_q8_gguf_equals_reference_on_gguf_dequantised_weights(files):
    """The reference model, given the weights as gguf-py itself dequantises them, gives our logits."""
    ref, _, paths = files
    lm = gemmarun.load(paths["Q8_0"])
    state = {}
    for t in read_gguf(paths["Q8_0"]).tensors.values():
        w = torch.from_numpy(gguf.quants.dequantize(t.data.numpy(), t.ggml_type).copy()).reshape(t.shape)
        state[hf_name(t.name)] = w - 1 if is_norm(hf_name(t.name)) else w  # llama.cpp stores norms as 1 + w
    dequantised = copy.deepcopy(ref)
    dequantised.load_state_dict(state, strict=False)
    ids = lm.tokenizer.encode("Some text to score with the quantised copy of the model, long enough to pass the window.")
    with torch.no_grad():
        expected = dequantised(torch.tensor([ids])).logits[0]
        assert (ref(torch.tensor([ids])).logits[0] - expected).abs().max() > 1e-3  # the weights did change
    assert (gemmarun.load(paths["Q8_0"], quantize="none").logits(ids) - expected).abs().max().item() < 1e-4
    # Kept packed, the kernel rounds activations to int16: measured at most 2.3e-3 here.
    assert (lm.logits(ids) - expected).abs().max().item() < 1e-2


def test_cli_runs_a_gguf_file(files):
    _, _, paths = files
    lm = gemmarun.load(paths["F32"])
    expected = lm.generate("Hello world", max_new_tokens=10).text
    r = subprocess.run(
        [sys.executable, "-m", "gemmarun.cli", "generate", "--model", str(paths["F32"]), "-p", "Hello world", "-n", "10"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


@pytest.mark.parametrize("damage, message", [("truncate", "truncated"), ("garbage", "not a gguf")])
def test_cli_bad_gguf_is_one_line(files, tmp_path, damage, message):
    _, _, paths = files
    bad = tmp_path / "bad.gguf"
    data = paths["F32"].read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"NOPE" + data[4:])
    r = subprocess.run(
        [sys.executable, "-m", "gemmarun.cli", "generate", "--model", str(bad), "-p", "x"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0
    assert message in r.stderr.lower() and "Traceback" not in r.stderr
