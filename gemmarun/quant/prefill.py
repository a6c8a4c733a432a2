"""Which GEMM runs a prefill chunk: gemmarun's C++ kernel or one of PyTorch's (quant/gemm.py runs
them), chosen by timing this machine once. The one place that decides.

Where PyTorch's GEMM beats the kernel depends on the machine, not on its name: on an Intel Xeon with
AMX, oneDNN's bfloat16 and int8 GEMMs run several times the kernel's prefill; on an AVX2-only EPYC
PyTorch's bfloat16 GEMM runs near 20 GFLOP/s and its int8 one slower still, and the kernel wins. So
the first chunk that could take a PyTorch path times the candidates on a representative matrix
(LARGE_ROWS x K @ K x N, K the 2B's hidden size), a few runs each, and keeps the times on disk next
to the kernels, keyed by kernels.cpu_key() (CPU model and flags, torch version and threads, kernel
variant); later processes read them.

Kinds of matrix: "q8" (8-bit codes), "q4" (4-bit, and 6-bit, which follows it: both unpack sub-byte
codes in the kernel and cost alike to dequantise), "bf16" (dense bfloat16 weights with bfloat16
activations). Under SMALL_ROWS rows (decoding, small batches) the small-batch path runs without any
timing: the kernel for packed matrices, bfloat16's own GEMM for dense bf16 (model/gemma.py's
dense_linear runs the dense kernel there instead where the kernels are built). From SMALL_ROWS rows on
the fastest candidate at LARGE_ROWS runs from the row count where it overtakes the small-batch path
(interpolated between the two timed sizes).

GEMMARUN_PREFILL forces a path for chunks of SMALL_ROWS rows or more: `kernel` is gemmarun's own
(the kernel up to KERNEL_MAX_ROWS rows, float32 tiles past it; dense bf16 widened to float32 tiles),
torch-fp32 / torch-bf16 / torch-int8 run where they apply (torch-int8: int8 per-channel matrices;
a dense bf16 matrix takes torch-fp32 or torch-bf16) and gemmarun's own path elsewhere; `auto`
(the default) measures.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import cache, lru_cache

import torch

from ..errors import ConfigError
from .gemm import TORCH_PATHS

PATHS = ("kernel", *TORCH_PATHS)
SETTINGS = (*PATHS, "auto")
ENV = "GEMMARUN_PREFILL"
KINDS = ("q8", "q4", "bf16")
SMALL_ROWS, LARGE_ROWS = 16, 128  # the two chunk sizes timed; under SMALL_ROWS nothing is
# N x K of the timed matrix: K the 2B's hidden size, N half its q_proj's 2048 outputs, which keeps
# the calibration near half a second on 2 shared EPYC cores with every GEMM still well shaped.
SHAPE = (1024, 2304)
RUNS = 2  # the faster of two: the first also pays for caches and oneDNN's kernel generation
DROP = 2.0  # a candidate more than this many times slower than the best so far is not timed further
# Another path must beat the first (the kernel, or the small-batch path) by this factor at LARGE_ROWS:
# one timing on a shared machine is noisy, and on the EPYC float32 tiles won an idle timing of int8 by
# a hair, then prefilled the 2B int8 shape 8% slower than the kernel.
MARGIN = 1.25
VERSION = 1  # of what is timed: a change of candidates or shapes must not reuse old times


def kind_of(bits: int) -> str:
    return "q8" if bits == 8 else "q4"


def path(kind: str, rows: int, kernel: bool, int8: bool = False) -> str:
    """The path for a chunk of `rows` rows through a `kind` matrix on the CPU. kernel: the kernel
    takes this call (a packed matrix it fits, rows within its limit, the kernels built); int8:
    torch-int8 applies (int8 codes with one scale per output row)."""
    if rows < SMALL_ROWS:
        return "torch-bf16" if kind == "bf16" else "kernel" if kernel else "torch-fp32"
    forced = setting()
    if forced == "auto" and not torch.compiler.is_compiling():  # a trace must not time anything
        return _choice(kind, candidates(kind, kernel, int8)).pick(rows)
    if forced in ("auto", "kernel") or (forced == "torch-int8" and not int8):
        return "kernel" if kernel and kind != "bf16" else "torch-fp32"
    return forced


@lru_cache(maxsize=1)
def setting() -> str:
    """GEMMARUN_PREFILL, checked; `auto` when unset."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ConfigError(f"{ENV}={value!r} is not a prefill path (choose from {', '.join(SETTINGS)})")
    return value


def candidates(kind: str, kernel: bool, int8: bool) -> tuple[str, ...]:
    """The paths a `kind` matrix can take, the small-batch one first."""
    if kind == "bf16":
        return ("torch-bf16", "torch-fp32")
    return (*(("kernel",) if kernel else ()), "torch-fp32", "torch-bf16", *(("torch-int8",) if int8 else ()))


@dataclass(frozen=True)
class Choice:
    small: str  # under `rows` rows
    best: str  # from `rows` rows on
    rows: int

    def pick(self, rows: int) -> str:
        return self.best if rows >= self.rows else self.small


@cache
def _choice(kind: str, paths: tuple[str, ...]) -> Choice:
    t = timings()
    small = paths[0]
    large = {small: t.seconds(kind, small, LARGE_ROWS)}
    for p in paths[1:]:
        limit = DROP * min(large.values())
        # time grows with the rows: slower at SMALL_ROWS than `limit` at LARGE_ROWS, it cannot win
        if t.seconds(kind, p, SMALL_ROWS, limit) <= limit:
            large[p] = t.seconds(kind, p, LARGE_ROWS, limit)
    best = min(large, key=large.get)
    if best == small or large[best] * MARGIN > large[small]:
        return Choice(small, small, SMALL_ROWS)
    d_small = t.seconds(kind, best, SMALL_ROWS) - t.seconds(kind, small, SMALL_ROWS)
    if d_small <= 0:
        return Choice(small, best, SMALL_ROWS)
    # each path's time taken as linear in the rows between the two sizes: where the lines cross
    d_large = large[best] - large[small]
    return Choice(small, best, math.ceil(SMALL_ROWS + (LARGE_ROWS - SMALL_ROWS) * d_small / (d_small - d_large)))


def describe() -> str:
    """What prefill chunks run on here, for `--verbose` and the benchmark's caption, e.g.
    'prefill: int8 kernel, int4 kernel, bf16 torch-fp32 from 19 rows (timed on this CPU)'."""
    from ..kernels import qlinear_kernel

    kernel = qlinear_kernel() is not None
    forced = setting()
    parts = []
    for kind, name in zip(KINDS, ("int8", "int4", "bf16")):
        if forced != "auto":
            got = {path(kind, LARGE_ROWS, kernel, kind == "q8")}
            parts.append(f"{name} {got.pop()}")
            continue
        c = _choice(kind, candidates(kind, kernel, kind == "q8"))
        parts.append(f"{name} {c.small}" if c.best == c.small else f"{name} {c.best} from {c.rows} rows")
    how = f"{ENV}={forced}" if forced != "auto" else "timed on this CPU"
    return f"prefill: {', '.join(parts)} ({how})"


class Timings:
    """Seconds per call of (kind, path, rows) on this machine, measured once and kept on disk."""

    def __init__(self, file, key: str):
        self.file, self.key = file, key
        self.known: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):  # none yet, or half-written by a process that died
            return {}
        return data.get("seconds", {}) if data.get("key") == self.key and data.get("version") == VERSION else {}

    def seconds(self, kind: str, path: str, rows: int, limit: float = math.inf) -> float:
        name = f"{kind} {path} {rows}"
        if name not in self.known:
            if not self.known:
                print("gemmarun: timing this CPU's prefill GEMMs against the kernel (once, about a second)", file=sys.stderr, flush=True)
                _warm_up()
            self.known[name] = measure(kind, path, rows, limit)
            self._write()
        return self.known[name]

    def _write(self) -> None:
        merged = {**self._read(), **self.known}  # another process may have timed other entries
        tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"key": self.key, "version": VERSION, "seconds": merged}, indent=1))
            os.replace(tmp, self.file)
        except OSError:  # a read-only cache: this process keeps its times, the next one measures again
            tmp.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def timings() -> Timings:
    from ..kernels import cpu_key
    from ..weights.source import cache_dir

    key = cpu_key()
    folder = cache_dir() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    return Timings(folder / f"prefill-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json", key)


def measure(kind: str, path: str, rows: int, limit: float = math.inf) -> float:
    """The fastest of RUNS calls of one path on the timed matrix, seconds; stops after a run slower
    than `limit` (that run's time is kept: the path is out of the running)."""
    call = _call(kind, path, rows)
    best = math.inf
    with torch.inference_mode():
        for _ in range(RUNS):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
            if best > limit:
                break
    return best


def _warm_up() -> None:
    """One small call of each PyTorch GEMM: the first in a process pays ~20 ms for its library's setup."""
    x, w = torch.randn(8, 64), torch.randn(24, 64)
    torch.nn.functional.linear(x, w)
    torch.nn.functional.linear(x.bfloat16(), w.bfloat16())
    torch._int_mm(x.to(torch.int8), w.to(torch.int8).t())


def _call(kind: str, path: str, rows: int):
    """A call of `path` on the timed matrix of `kind` and `rows` random rows, as the model makes it."""
    from . import gemm

    x, p = torch.randn(rows, SHAPE[1], generator=torch.Generator().manual_seed(rows)), _matrix(kind)
    if kind == "bf16":
        xb = x.bfloat16()
        return lambda: gemm.run_dense(path, xb, p)
    if path == "kernel":
        from ..kernels import qlinear_kernel

        kernel = qlinear_kernel()
        return lambda: kernel(x, [p.q], [p.scales], [p.mins], [p.group], [p.zero], [p.bits])
    return lambda: gemm.run(path, x, p)


@cache
def _matrix(kind: str):
    """The timed matrix (SHAPE) of `kind`, random codes and scales: a dense bfloat16 one, int8 per
    channel as the int8 scheme stores it, or 4-bit in the int4 scheme's groups of 32 with float16 scales and mins."""
    from .format import Packed, pack_nibbles

    n, k = SHAPE
    g = torch.Generator().manual_seed(1)
    if kind == "bf16":
        return (torch.rand(n, k, generator=g) - 0.5).bfloat16()
    if kind == "q8":
        return Packed(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, 1, generator=g) / 1e3, None, k, 0.0, 8)
    scales = (torch.rand(n, k // 32, generator=g) / 1e3).half()
    return Packed(pack_nibbles(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)), scales, -8 * scales, 32, 0.0, 4)


def reset() -> None:
    """Forget the setting and the choices (a test changing GEMMARUN_PREFILL or the cache folder)."""
    for f in (setting, _choice, timings, _matrix):
        f.cache_clear()
