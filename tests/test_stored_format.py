"""The stored layout of `gemmarun quantize` checkpoints: canonical (version 2) q6 words that no ISA
defines, turned into the kernels' order at load; files of the older layout (no version, or 1) load alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gemmarun
from gemmarun.quant import METADATA_KEY, pack_q6, save_quantized, unpack_q6
from gemmarun.quant.format import q6_from_canonical, q6_from_v1, q6_to_canonical

from checkpoints import make_reference, save_checkpoint


def _canonical_by_hand(codes: np.ndarray) -> np.ndarray:
    """(N, K) codes -32..31 -> canonical q6 bytes, one value at a time from the documented layout:
    q + 32's low nibble as ggml's Q4_0 (value j low, j + 16 high), its top two bits at bit 2 v of the word."""
    n, k = codes.shape
    out = np.zeros((n, k // 32, 24), dtype=np.uint8)
    u = (codes.astype(np.int64) + 32).reshape(n, k // 32, 32)
    for v in range(32):
        out[:, :, v % 16] |= ((u[:, :, v] & 15) << (4 * (v // 16))).astype(np.uint8)
        out[:, :, 16 + v // 4] |= ((u[:, :, v] >> 4) << (2 * (v % 4))).astype(np.uint8)
    return out.reshape(n, k // 32 * 24)


def _word_by_hand(canonical: np.ndarray, byte_and_bit) -> np.ndarray:
    """Canonical q6 bytes with each word rewritten, value v's top bits moved to byte_and_bit(v)."""
    blocks = canonical.reshape(canonical.shape[0], -1, 24)
    out = blocks.copy()
    out[:, :, 16:] = 0
    for v in range(32):
        top = (blocks[:, :, 16 + v // 4] >> (2 * (v % 4))) & 3
        byte, bit = byte_and_bit(v)
        out[:, :, 16 + byte] |= (top << bit).astype(np.uint8)
    return out.reshape(canonical.shape)


def _kernel_layout_by_hand(canonical: np.ndarray) -> np.ndarray:
    """Canonical q6 bytes -> the kernels' in-memory order, as isa/common.h states it: value
    v = 16 lane + 2 i + r keeps its top bits in byte i, at bit 2 lane + 4 r."""
    return _word_by_hand(canonical, lambda v: ((v >> 1) & 7, 2 * (v >> 4) + 4 * (v & 1)))


def _old_layout_by_hand(canonical: np.ndarray) -> np.ndarray:
    """Canonical q6 bytes -> the layout of version 1 files (the kernels' order before): value
    v = 16 lane + 8 h + 2 i + r keeps its top bits in byte 2 i + (r xor lane), at bit 2 h + 4 (1 - lane)."""
    return _word_by_hand(canonical, lambda v: (2 * ((v >> 1) & 3) + ((v & 1) ^ (v >> 4)), 2 * ((v >> 3) & 1) + 4 * (1 - (v >> 4))))


@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (5, 320), (17, 64)])
def test_canonical_round_trip_on_odd_shapes(shape):
    codes = torch.randint(-32, 32, shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.int8)
    kernel = pack_q6(codes)
    canonical = q6_to_canonical(kernel, rows=2)  # row chunks that do not divide the rows
    assert np.array_equal(canonical.numpy(), _canonical_by_hand(codes.numpy()))
    assert torch.equal(q6_from_canonical(canonical, rows=2), kernel)
    assert torch.equal(unpack_q6(q6_from_canonical(canonical)), codes)
    assert np.array_equal(_kernel_layout_by_hand(canonical.numpy()), kernel.numpy())
    old = torch.from_numpy(_old_layout_by_hand(canonical.numpy()))
    assert torch.equal(q6_from_v1(old, rows=2), kernel)


def test_canonical_word_by_hand():
    one = torch.full((1, 32), -32, dtype=torch.int8)  # codes q + 32 = 0 ...
    one[0, 6], one[0, 17] = 31, 0  # ... but value 6's top bits 3 and value 17's 2 (q + 32 = 63, 32)
    word = int.from_bytes(bytes(q6_to_canonical(pack_q6(one))[0, 16:].tolist()), "little")
    assert word == 3 << 12 | 2 << 34


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An int4 checkpoint (its tied embedding at 6 bits) of a model with an odd vocabulary, as saved now."""
    root = tmp_path_factory.mktemp("format")
    folder = save_checkpoint(make_reference("gemma2", seed=4, vocab_size=601, initializer_range=0.05), root / "src")
    return save_quantized(gemmarun.load(folder, quantize="int4"), root / "int4")


def _rewrite(src, dst, tensors=None, schemes=None):
    """A copy of checkpoint `src` in `dst` with some tensors and the scheme metadata replaced."""
    import shutil

    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        got = {name: f.get_tensor(name) for name in f.keys()}
    got.update(tensors or {})
    if schemes is not None:
        meta = {**meta, METADATA_KEY: json.dumps(schemes)}
    save_file(got, dst / "model.safetensors", metadata=meta)
    return dst


def _stored(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return json.loads(f.metadata()[METADATA_KEY]), f.get_tensor("model.embed_tokens.qweight")


def test_saved_checkpoint_is_canonical_and_versioned(saved):
    schemes, stored = _stored(saved)
    assert schemes["model.embed_tokens"]["bits"] == 6 and all(s["version"] == 2 for s in schemes.values())
    model = gemmarun.load(saved).model
    codes = unpack_q6(model.model.embed_tokens.qweight)  # what the kernels read in memory
    assert codes.shape == (601, 64)
    assert np.array_equal(stored.numpy(), _canonical_by_hand(codes.numpy()))


@pytest.mark.parametrize("version", [None, 1])
def test_old_layout_checkpoint_loads_with_the_same_logits(saved, tmp_path, version):
    schemes, stored = _stored(saved)
    old = {m: {k: v for k, v in s.items() if k != "version"} | ({} if version is None else {"version": version})
           for m, s in schemes.items()}  # fmt: skip
    old_bytes = torch.from_numpy(_old_layout_by_hand(stored.numpy()))
    assert not torch.equal(old_bytes, stored)  # the two layouts differ: the test can tell them apart
    folder = _rewrite(saved, tmp_path / "old", {"model.embed_tokens.qweight": old_bytes}, old)
    ids = list(range(3, 45))
    assert torch.equal(gemmarun.load(folder).logits(ids), gemmarun.load(saved).logits(ids))
    # a version 1 file read as version 2 would scramble the head: the version is what decides
    wrong = _rewrite(saved, tmp_path / "wrong", {"model.embed_tokens.qweight": old_bytes})
    assert not torch.equal(gemmarun.load(wrong).logits(ids), gemmarun.load(saved).logits(ids))


def test_newer_layout_version_is_a_one_line_error(saved, tmp_path):
    schemes, _ = _stored(saved)
    folder = _rewrite(saved, tmp_path / "new", schemes={m: {**s, "version": 3} for m, s in schemes.items()})
    with pytest.raises(gemmarun.CheckpointError, match="layout version 3; this gemmarun reads versions 1 and 2") as e:
        gemmarun.load(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("schemes", [["int8"], {"model.embed_tokens": "int4"}])
def test_scheme_metadata_that_is_not_a_table_is_a_one_line_error(saved, tmp_path, schemes):
    folder = _rewrite(saved, tmp_path / "bad", schemes=schemes)
    with pytest.raises(gemmarun.CheckpointError, match="metadata is not a table of schemes") as e:
        gemmarun.load(folder)
    assert "\n" not in str(e.value)
