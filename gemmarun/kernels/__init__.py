"""The C++ kernels (quantised and dense matmul, decode attention, RMSNorm, GeGLU, int4 rounding search), one
build per CPU variant, compiled on first use and cached; None where unavailable.

Variants (isa/*.h; the ISA-free code in src/ is shared): `generic` (scalar C++, any CPU, the
reference the others are tested against), `avx2` (AVX2 + FMA + F16C), `avx512` (AVX-512 F/BW/VL +
VNNI) and `neon` (AArch64). The best one the CPU runs is chosen from its feature flags;
GEMMARUN_KERNELS=generic|avx2|avx512|neon forces one, and a name that is unknown or that this CPU
cannot run raises gemmarun.errors.ConfigError (a forced choice that silently fell back would
measure or test something else than asked). GEMMARUN_NO_KERNELS=1 keeps the portable PyTorch path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from contextlib import contextmanager
from functools import cache, lru_cache
from pathlib import Path

import torch

from ..errors import ConfigError

HERE = Path(__file__).parent
_SOURCE_NAMES = ("bindings.cpp", "qlinear.cpp", "dense.cpp", "attention.cpp", "elementwise.cpp", "decode.cpp", "quantize.cpp")
SOURCES = [HERE / "src" / n for n in _SOURCE_NAMES]
HEADERS = sorted((HERE / "src").glob("*.h")) + sorted((HERE / "isa").glob("*.h"))

VARIANTS = ("avx512", "avx2", "neon", "generic")  # best first
# -fopenmp: at::parallel_for is inline and runs serially without it; libgomp.so.1 is the runtime
# torch itself ships, so the process keeps one thread pool.
_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "neon": [],  # Advanced SIMD is part of every AArch64 CPU
}
# /proc/cpuinfo flags each x86 variant needs
_X86_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"), "avx2": ("avx2", "fma", "f16c")}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`), or None where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (x86 `model name`, ARM `Model` or `CPU part`), else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_key() -> str:
    """What a measurement of this CPU's speed depends on: its model, feature flags, torch's version and
    threads, and the kernel variant in use (quant/prefill.py keys its calibration by it)."""
    flags = " ".join(sorted(_cpu_flags() or ()))
    return f"{cpu_model()} | {flags} | torch {torch.__version__} | threads {torch.get_num_threads()} | kernels {variant()}"


@lru_cache(maxsize=1)
def available() -> tuple[str, ...]:
    """The variants this CPU can run, best first (always ending with generic)."""
    machine = platform.machine().lower()
    found = []
    if machine in ("aarch64", "arm64"):
        found.append("neon")
    elif machine in ("x86_64", "amd64"):
        flags = _cpu_flags()
        if flags is None:  # no /proc (macOS, some containers): PyTorch's own detection
            cap = torch.backends.cpu.get_cpu_capability()
            flags = {"avx2", "fma", "f16c"} if cap in ("AVX2", "AVX512") else set()
        found += [v for v, need in _X86_NEEDS.items() if flags.issuperset(need)]
    return (*found, "generic")


def chosen() -> str | None:
    """The variant the kernels use here: GEMMARUN_KERNELS, else the best available; None with GEMMARUN_NO_KERNELS=1."""
    if os.environ.get("GEMMARUN_NO_KERNELS") == "1":
        return None
    forced = os.environ.get("GEMMARUN_KERNELS", "").strip().lower()
    if not forced:
        return available()[0]
    if forced not in VARIANTS:
        raise ConfigError(f"GEMMARUN_KERNELS={forced!r} is not a kernel variant (choose from {', '.join(VARIANTS)})")
    if forced not in available():
        raise ConfigError(f"GEMMARUN_KERNELS={forced}: this CPU cannot run it (it runs {', '.join(available())})")
    return forced


def _build_dir(name: str) -> Path:
    from ..weights.source import cache_dir

    # One folder per torch version, source and variant, so an upgrade never loads a stale binary;
    # the sources' folder is hashed too, since two checkouts of the same sources sharing one folder
    # would rebuild it each time they alternate (the build file names the source paths).
    digest = hashlib.sha256(str(HERE).encode() + b"".join(s.read_bytes() for s in SOURCES + HEADERS)).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-{digest}-{name}"
    d = cache_dir() / "kernels" / tag
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _build_lock(build: Path):
    """Serialise builds of one folder across processes with flock, which the OS releases when its
    holder dies. torch's own lock is a file that a killed build leaves behind, after which every
    later load waits forever; while we hold the flock nobody else can be building here, so such a
    file is stale and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock file alone
        yield
        return
    with open(build / "build.flock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # say why the first request is slow instead of sitting silent
            print(f"gemmarun: waiting for another process to finish building the kernels in {build}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Variants this process is compiling or waiting on another process to compile: the server's
# /health shows them, since a fresh build makes the first request take up to a minute.
_building: set[str] = set()


def status() -> dict:
    """What the kernels are doing, read without building anything: {"building": [variant, ...]}."""
    return {"building": sorted(_building)}


@cache
def module(name: str):
    """The compiled extension of one variant (built on first use), or None if it cannot be built.
    Any variant this CPU runs can be loaded next to the one in use (the tests compare them)."""
    if name not in VARIANTS or name not in available():
        raise ConfigError(f"kernel variant {name!r} does not run on this CPU (it runs {', '.join(available())})")
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir(name)
        _building.add(name)
        with _build_lock(build):
            if not list(build.glob("*.so")):
                print(f"gemmarun: compiling the {name} kernels (once, about a minute)", file=sys.stderr, flush=True)
            return load(
                name=f"gemmarun_{name}",
                sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3", *_FLAGS[name], f"-DGEMMARUN_ISA_{name.upper()}", f"-DGEMMARUN_NS=gemmarun_{name}", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as e:  # no compiler or headers: the portable path computes the same products in float32
        warnings.warn(
            f"the {name} kernels could not be built ({type(e).__name__}: {str(e)[:200]}); using the slower portable path", stacklevel=2
        )
        return None
    finally:
        _building.discard(name)


@lru_cache(maxsize=1)
def _module():
    """The extension in use, or None (GEMMARUN_NO_KERNELS=1, or no compiler)."""
    name = chosen()
    return module(name) if name is not None else None


def variant() -> str | None:
    """The name of the kernel variant in use ("avx2", "generic", ...), or None when the portable
    PyTorch path runs (GEMMARUN_NO_KERNELS=1, or the kernels could not be built)."""
    m = _module()
    return m.variant() if m is not None else None


def _entry(name: str):
    if torch.compiler.is_compiling():  # torch.compile cannot trace into the extension: it compiles the portable path
        return None
    m = _module()
    return getattr(m, name) if m is not None else None


def qlinear_kernel():
    """qlinear(x, [q], [scales], [mins], [group], [zero], [bits]) -> [x @ W.T] (see src/qlinear.cpp), or None."""
    return _entry("qlinear")


def dense_linear_kernel():
    """dense_linear(x, w) -> x @ w.T for dense float32 or bfloat16 w, in x's dtype (see src/dense.cpp), or None."""
    return _entry("dense_linear")


def rms_norm_kernel():
    """rms_norm(x, w, eps, residual=None) -> [residual +] x * rsqrt(mean(x^2) + eps) * (1 + w) in float32, or None."""
    return _entry("rms_norm")


def attention_kernel():
    """decode_attention(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap) -> (B, H * D), or None."""
    return _entry("decode_attention")


def geglu_kernel():
    """geglu(gate, up) -> gelu_tanh(gate) * up in float32, or None."""
    return _entry("geglu")


def decode_stack_class():
    """DecodeStack(layers, eps): every decoder layer of a decoding step in one call (see src/decode.cpp), or None."""
    return _entry("DecodeStack")


def decode_stack_module():
    """The extension whose DecodeStack, DecodeLayer and Matrices build the C++ decode loop (see
    gemmarun/backend.py), or None."""
    if torch.compiler.is_compiling():
        return None
    return _module()


def int4_search_kernel():
    """int4_search(w, importance, group) -> (scales, mins), float32 (N, K // group) (see src/quantize.cpp), or None."""
    return _entry("int4_search")
