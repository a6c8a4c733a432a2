"""Packed weights in transparent huge pages (quant/hugepages.py)."""

from __future__ import annotations

import os

import pytest
import torch

import gemmarun
from gemmarun.quant import hugepages
from gemmarun.quant.hugepages import ALIGN, HUGE, Arena
from gemmarun.quant.modules import _QuantWeight

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
