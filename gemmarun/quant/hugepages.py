"""Packed weights in transparent huge pages.

A decoding step streams every packed weight once. In 4 KiB pages the 270M's 168 MB LM head spans
41k pages, one TLB walk each; in 2 MiB pages it spans 84. A standalone two-thread loop over that
LM head took 10.0-11.0 ms in huge pages against 10.7-11.8 in small ones (AMD EPYC, family 23, THP
in `madvise` mode, where memory gets huge pages only when madvise(MADV_HUGEPAGE) asks first).

A model's packed tensors are laid one after another in an Arena: chunks whose 2 MiB pages are
advised before anything touches them, so the 270M's ~250 matrices and scales of 0.3-2.6 MB share
huge pages too. A chunk's untouched tail never becomes resident; a tensor larger than a chunk gets
a chunk of its own. Loaders write into it directly: the GGUF relay re-lays blocks into Arena.empty,
the safetensors reader reads a saved checkpoint's fields into it (weights/safetensors.py).
The price is at load (a 2B int8 checkpoint loads ~3-5 s slower: docs/PERFORMANCE.md);
GEMMARUN_HUGEPAGES=0 keeps ordinary memory, and a saved checkpoint's fields mapped from its file.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from functools import cache
from pathlib import Path

import torch

from ..errors import ConfigError
from .format import Packed

HUGE = 2 << 20  # x86-64 and AArch64 (4 KiB granule) transparent huge page size
MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
CHUNK = 256 << 20  # a chunk's last, partly used huge page is at most 2 MiB resident beyond its tensors: < 1%
ALIGN = 64  # each tensor starts on a cache line, as PyTorch's allocator places them


@cache
def _madvise():
    """libc's madvise where transparent huge pages can be asked for (Linux, THP not `never`, not
    turned off by GEMMARUN_HUGEPAGES=0); else None."""
    wanted = os.environ.get("GEMMARUN_HUGEPAGES", "1").strip()
    if wanted not in ("0", "1"):
        raise ConfigError(f"GEMMARUN_HUGEPAGES={wanted!r}: use 1 (packed weights in huge pages, the default) or 0 (ordinary memory)")
    if wanted == "0" or not sys.platform.startswith("linux"):
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


class Arena:
    """Places contiguous CPU tensors one after another in huge-page chunks (Arena.place)."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._madvise = _madvise()  # read (and GEMMARUN_HUGEPAGES checked) at every load, whatever it loads
        self._buf: torch.Tensor | None = None
        self._at = self._end = 0
        self._spans: list[tuple[int, int]] = []  # the address range of every chunk

    @property
    def advises(self) -> bool:
        """Whether the system gives huge pages to ask for (else place and empty are PyTorch's own)."""
        return self._madvise is not None

    def holds(self, t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in self._spans)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena (torch.empty's where the system gives no huge pages)."""
        if not self.advises:
            return torch.empty(shape, dtype=dtype)
        n = math.prod(shape) * dtype.itemsize
        if n > self.chunk:
            buf, at = self._new(n)
        else:
            at = -(-self._at // ALIGN) * ALIGN
            if self._buf is None or at + n > self._end:
                self._buf, at = self._new(self.chunk)
                self._end = at + self.chunk
            buf, self._at = self._buf, at + n
        return buf[at : at + n].view(dtype).view(shape)

    def place(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A copy of t in the arena; t itself where it lies here already, the system gives no huge
        pages, or t is not a contiguous CPU tensor."""
        if t is None or not self.advises or t.device.type != "cpu" or not t.is_contiguous() or self.holds(t):
            return t
        return self.empty(t.shape, dtype=t.dtype).copy_(t)

    def packed(self, p: Packed) -> Packed:
        """p with its tensors placed."""
        return Packed(self.place(p.q), self.place(p.scales), self.place(p.mins), p.group, p.zero, p.bits)

    def _new(self, n: int) -> tuple[torch.Tensor, int]:
        """An untouched buffer with n bytes from a 2 MiB boundary on, advised for huge pages; and that boundary's offset."""
        buf = torch.empty(n + HUGE, dtype=torch.uint8)  # empty() touches no page: none is resident yet
        start = -buf.data_ptr() % HUGE
        self._madvise(buf.data_ptr() + start, n // HUGE * HUGE, MADV_HUGEPAGE)  # refused: small pages, as without it
        self._spans.append((buf.data_ptr(), buf.data_ptr() + buf.numel()))
        return buf, start


def release_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim). The tensors a loader
    copied into an arena were freed to the heap, which glibc keeps resident otherwise: the
    default model read 612 MB resident after loading without this, 590 MB with it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
