"""Packed weights in transparent huge pages (quant/hugepages.py)."""

from __future__ import annotations

import os

import pytest
import torch

from gemmarun.quant import hugepages
from gemmarun.quant.hugepages import HUGE, in_huge_pages
from gemmarun.quant.modules import QuantLinear
from gemmarun.quant.schemes import quantize_weight

needs_thp = pytest.mark.skipif(hugepages._madvise() is None, reason="no transparent huge pages to ask for here")


def advised(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's first whole 2 MiB page is advised for huge pages (VmFlags hg)."""
    page = t.data_ptr() + (-t.data_ptr() % HUGE)
    inside = False
    for line in open(f"/proc/{os.getpid()}/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= page < hi
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return False


@needs_thp
@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.float32])
def test_copy_is_equal_and_advised(dtype):
    t = (torch.randn(3 * HUGE // 2 + 17) * 50).to(dtype).view(-1, 1)  # 3 to 12 MB, not a whole number of pages
    out = in_huge_pages(t)
    assert out is not t and out.dtype == t.dtype and out.shape == t.shape and out.is_contiguous()
    assert torch.equal(out, t)
    assert out.data_ptr() % HUGE == 0 and advised(out)


def test_small_or_strided_tensors_stay():
    small = torch.zeros(HUGE // 2, dtype=torch.uint8)
    strided = torch.zeros(HUGE, 2, dtype=torch.uint8)[:, 0]
    assert in_huge_pages(small) is small and in_huge_pages(strided) is strided and in_huge_pages(None) is None


@needs_thp
def test_packed_layers_hold_their_matrix_in_huge_pages():
    w = torch.randn(2048, 1536)  # 3 MB of int8
    layer = QuantLinear(quantize_weight(w, "int8", 32))
    assert advised(layer.qweight)
    x = torch.randn(3, 1536)
    assert torch.equal(layer(x), QuantLinear(quantize_weight(w, "int8", 32))(x))  # same bits wherever it lies
