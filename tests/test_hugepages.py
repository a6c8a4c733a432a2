"""Packed weights in transparent huge pages (quant/hugepages.py)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

import gemmarun
from gemmarun.errors import ConfigError
from gemmarun.quant import hugepages, save_quantized
from gemmarun.quant.format import q6_from_canonical
from gemmarun.quant.hugepages import ALIGN, HUGE, Arena
from gemmarun.quant.modules import _QuantWeight

from checkpoints import make_reference, save_checkpoint

needs_thp = pytest.mark.skipif(hugepages._madvise() is None, reason="no transparent huge pages to ask for here")


def advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's first byte is advised for huge pages (smaps VmFlags hg)."""
    inside = False
    for line in open(f"/proc/{os.getpid()}/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= t.data_ptr() < hi
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return False


@needs_thp
def test_tensors_share_advised_chunks_and_keep_their_values():
    arena = Arena(chunk=4 * HUGE)
    gen = torch.Generator().manual_seed(0)
    sizes = ((300_003, torch.int8), (90_000, torch.float16), (150_000, torch.float32), (5 * HUGE + 2, torch.int8))
    tensors = [(torch.randn(n, generator=gen) * 50).to(dtype).view(-1, 3) for n, dtype in sizes]
    placed = [arena.place(t) for t in tensors]
    for t, p in zip(tensors, placed):
        assert p is not t and p.dtype == t.dtype and p.shape == t.shape and p.is_contiguous() and torch.equal(p, t)
        assert p.data_ptr() % ALIGN == 0 and arena.holds(p) and advised(p)
    assert placed[1].untyped_storage().data_ptr() == placed[0].untyped_storage().data_ptr()  # one chunk for the small ones
    assert placed[3].untyped_storage().data_ptr() != placed[0].untyped_storage().data_ptr()  # larger than a chunk: its own
    assert arena.place(placed[0]) is placed[0]  # already there


def test_what_cannot_move_stays():
    arena = Arena()
    strided = torch.zeros(64, 2)[:, 0]
    assert arena.place(strided) is strided and arena.place(None) is None
    assert arena.empty((3, 5), dtype=torch.float16).shape == (3, 5)


@needs_thp
def test_the_default_model_streams_from_huge_pages():
    lm = gemmarun.load()
    layers = [m for m in lm.model.modules() if isinstance(m, _QuantWeight)]
    assert layers and all(advised(t) for m in layers for t in (m.qweight, m.scales, m.mins) if t is not None)
    assert lm.generate("The capital of France is", max_new_tokens=4).text.strip()


@needs_thp
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_saved_checkpoint_is_read_into_huge_pages(tmp_path, monkeypatch, scheme):
    """Every packed field of a `gemmarun quantize` checkpoint is read (not mapped) into the arena,
    keeping the stored values; int4's 6-bit embedding arrives re-laid to the kernels' order."""
    folder = save_checkpoint(make_reference("gemma2", seed=5, vocab_size=601), tmp_path / "src")
    saved = save_quantized(gemmarun.load(folder, quantize=scheme), tmp_path / scheme)
    lm = gemmarun.load(saved)
    layers = {n: m for n, m in lm.model.named_modules() if isinstance(m, _QuantWeight)}
    assert layers and any(m.bits == 6 for m in layers.values()) == (scheme == "int4")
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        for name, m in layers.items():
            for leaf in ("qweight", "scales", "mins"):
                t = getattr(m, leaf)
                if t is None:
                    continue
                stored = f.get_tensor(f"{name}.{leaf}")
                if leaf == "qweight" and m.bits == 6:
                    stored = q6_from_canonical(stored)
                assert torch.equal(t, stored) and t.data_ptr() % ALIGN == 0 and advised(t), (name, leaf)
    ids = lm.generate("a b c", max_new_tokens=6).token_ids
    monkeypatch.setattr(Arena, "advises", property(lambda self: False))  # the mapped load of systems without THP
    mapped = gemmarun.load(saved)
    # int4's 6-bit qweight is re-laid into the heap, which may reuse memory an earlier, freed arena
    # advised (a small test arena comes from malloc's heap): only fields left in the file are checked
    assert not any(advised(m.qweight) for m in mapped.model.modules() if isinstance(m, _QuantWeight) and m.bits != 6)
    assert mapped.generate("a b c", max_new_tokens=6).token_ids == ids


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("GEMMARUN_HUGEPAGES", "0")
    hugepages._madvise.cache_clear()
    try:
        arena = Arena()
        assert not arena.advises
        t = torch.ones(4)
        assert arena.place(t) is t  # ordinary memory: nothing moves
        monkeypatch.setenv("GEMMARUN_HUGEPAGES", "yes")
        hugepages._madvise.cache_clear()
        with pytest.raises(ConfigError, match="GEMMARUN_HUGEPAGES='yes'"):
            hugepages._madvise()
    finally:
        monkeypatch.delenv("GEMMARUN_HUGEPAGES")
        hugepages._madvise.cache_clear()
