"""Packed weights in transparent huge pages.

A decoding step streams every packed weight once. In 4 KiB pages the 270M's 168 MB LM head spans
41k pages, one TLB walk each; in 2 MiB pages it spans 84. A standalone two-thread loop over that
LM head took 10.0-11.0 ms in huge pages against 10.7-11.8 in small ones (AMD EPYC, family 23, THP
in `madvise` mode, where memory gets huge pages only when madvise(MADV_HUGEPAGE) asks first).

Only the 2 MiB-aligned interior of a tensor is advised, so no page outside its bytes is ever made
resident: the tensor costs the memory it did, plus up to 2 MiB of untouched address space.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from pathlib import Path

import torch

HUGE = 2 << 20  # x86-64 and AArch64 (4 KiB granule) transparent huge page size
MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@cache
def _madvise():
    """libc's madvise where transparent huge pages can be asked for (Linux, THP not `never`); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mode = THP_MODE.read_text()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    if "[never]" in mode:
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def in_huge_pages(t: torch.Tensor | None) -> torch.Tensor | None:
    """t copied to memory whose whole 2 MiB pages are transparent huge pages; t itself when it is
    smaller than one, not a contiguous CPU tensor, or the system gives none."""
    madvise = _madvise()
    if t is None or madvise is None or t.device.type != "cpu" or not t.is_contiguous():
        return t
    n = t.numel() * t.element_size()
    if n < HUGE:
        return t
    buf = torch.empty(n + HUGE, dtype=torch.uint8)  # untouched: its pages are not resident yet
    start = -buf.data_ptr() % HUGE  # to the first 2 MiB boundary; a multiple of the allocator's 64
    if madvise(buf.data_ptr() + start, n // HUGE * HUGE, MADV_HUGEPAGE) != 0:
        return t
    out = buf[start : start + n].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
