"""Mutated checkpoint files, fed by hypothesis: the GGUF reader (with the model build after it), the
safetensors loader, the config parser and the tokenizer builders each either load or raise a
GemmarunError, never another exception, within a time bound and without a memory blow-up.

Examples per test: GEMMARUN_FUZZ_EXAMPLES (default 25, so the whole file runs in about 30 s in CI;
set 2000 or more for a long run). Crashers found are kept below as explicit examples (@example)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_gguf import tiny_file
from test_tokenizer_gguf import _gguf_fields_from_spm

from gemmarun.errors import GemmarunError
from gemmarun.model.config import GemmaConfig
from gemmarun.tokenizer import Tokenizer
from gemmarun.weights.gguf.reader import load_gguf
from gemmarun.weights.loader import build_model, load_folder_weights

EXAMPLES = int(os.environ.get("GEMMARUN_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
SECONDS = 20  # per example, on a loaded 2-core machine: a load of these tiny files takes well under 1 s
RSS_GROWTH_MB = 1024  # a corrupt size must never turn into a large allocation


def _bounded(call):
    """Run call(): a GemmarunError or a result is fine; anything else fails, as does a slow or large run."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    try:
        call()
    except GemmarunError as e:
        assert "\n" not in str(e).strip(), str(e)
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown < RSS_GROWTH_MB, f"peak memory grew {grown:.0f} MB"


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, stamp: tuple[int, int] | None) -> bytes:
    out = bytearray(data)
    for pos, bit in flips:
        out[pos % len(out)] ^= 1 << bit
    if stamp is not None:  # an 8-byte count or length made huge
        pos = stamp[0] % max(1, len(out) - 8)
        out[pos : pos + 8] = struct.pack("<Q", stamp[1])
    if cut is not None:
        del out[cut % len(out) :]
    return bytes(out)


mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 7)), max_size=8),
    st.none() | st.integers(0, 1 << 30),
    st.none() | st.tuples(st.integers(0, 4096), st.sampled_from([0, 1, 255, 1 << 31, 1 << 40, (1 << 64) - 1])),
)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    path, _, _ = tiny_file(tmp_path_factory.mktemp("fuzz_gguf"))
    return path.read_bytes()


@FUZZ
@given(mutation=mutations)
@example(mutation=([], None, (24, (1 << 64) - 1)))  # n_kv past the end: a truncated header, not a hang
def test_mutated_gguf_loads_or_raises_a_typed_error(gguf_bytes, tmp_path, mutation):
    path = tmp_path / "m.gguf"
    path.write_bytes(_mutate(gguf_bytes, *mutation))

    def load():
        config, state, _ = load_gguf(path)
        build_model(config, state.items(), torch.float32, torch.device("cpu"), str(path))

    _bounded(load)


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=5)


@FUZZ
@given(mutation=mutations, header_only=st.booleans())
@example(mutation=([(101, 0)], None, None), header_only=False)  # a tensor entry without data_offsets: KeyError
def test_mutated_safetensors_loads_or_raises_a_typed_error(folder, tmp_path, mutation, header_only):
    ck = tmp_path / "ck"
    if not ck.exists():
        shutil.copytree(folder, ck)
    data = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    if header_only:  # aim at the 8-byte length and the JSON header, where the structure lives
        flips, cut, stamp = mutation
        mutated = _mutate(data[: 8 + n], [(p % (8 + n), b) for p, b in flips], None, stamp) + data[8 + n :]
        mutated = mutated[: cut % len(mutated)] if cut is not None else mutated
    else:
        mutated = _mutate(data, *mutation)
    (ck / "model.safetensors").write_bytes(mutated)
    _bounded(lambda: load_folder_weights(ck, torch.float32, torch.device("cpu"), None, 32))


json_leaf = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=8)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
CONFIG_KEYS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types", "rope_theta",
               "rope_parameters", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern", "attn_logit_softcapping",
               "final_logit_softcapping", "rms_norm_eps", "max_position_embeddings", "hidden_activation", "bos_token_id",
               "eos_token_id", "pad_token_id", "text_config", "tie_word_embeddings"]  # fmt: skip


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_value, max_size=5), drop=st.sets(st.sampled_from(CONFIG_KEYS), max_size=3)
)
@example(changes={"vocab_size": float("inf")}, drop=set())  # int(inf) raised OverflowError
@example(changes={"rope_parameters": {"full_attention": [1]}}, drop=set())  # .get on a list
def test_mutated_configs_parse_or_raise_a_config_error(folder, changes, drop):
    raw = json.loads((folder / "config.json").read_text())
    for k in drop:
        raw.pop(k, None)
    raw.update(changes)
    _bounded(lambda: GemmaConfig.from_hf(raw))


@pytest.fixture(scope="module")
def spm_fields(tiny_spm) -> dict:
    return _gguf_fields_from_spm(tiny_spm)


TOKENIZER_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
                  "tokenizer.ggml.precompiled_charsmap"]  # fmt: skip


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(TOKENIZER_KEYS), json_value, max_size=3), cut=st.none() | st.integers(0, 1000))
@example(changes={"tokenizer.ggml.token_type": [1 << 63]}, cut=None)  # OverflowError in numpy
@example(changes={"tokenizer.ggml.bos_token_id": []}, cut=None)  # int([]): TypeError
@example(changes={"tokenizer.ggml.precompiled_charsmap": [None]}, cut=None)  # bytes([None]): TypeError
def test_mutated_gguf_vocabularies_build_or_raise_a_typed_error(spm_fields, changes, cut):
    fields = dict(spm_fields)
    if cut is not None:  # the arrays of unequal length
        fields["tokenizer.ggml.scores"] = list(fields["tokenizer.ggml.scores"])[:cut]
    fields.update(changes)

    def build():
        tok = Tokenizer.from_gguf_fields(fields)
        tok.decode(tok.encode("Hello <start_of_turn>user\nworld"))

    _bounded(build)


@FUZZ
@given(mutation=mutations)
@example(mutation=([(4, 7)], None, None))  # a piece that is not UTF-8: UnicodeDecodeError reading the pieces
def test_mutated_sentencepiece_models_load_or_raise_a_typed_error(tiny_spm, tmp_path, mutation):
    path = Path(tmp_path) / "tokenizer.model"
    path.write_bytes(_mutate(tiny_spm.read_bytes(), *mutation))

    def build():
        tok = Tokenizer.from_file(path)
        tok.decode(tok.encode("Hello <start_of_turn>user\nworld"))

    _bounded(build)
