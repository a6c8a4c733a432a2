"""The AVX2 kernels (quantised matmul, decode attention, RMSNorm, GeGLU, int4 rounding search), compiled once on first use and cached; None where unavailable."""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / n for n in ("bindings.cpp", "qlinear.cpp", "attention.cpp", "elementwise.cpp", "decode.cpp", "quantize.cpp")]
HEADERS = [HERE / n for n in ("simd.h", "kernels.h")]


def _build_dir() -> Path:
    from ..weights.source import cache_dir

    # One folder per torch version and source, so an upgrade never loads a stale binary.
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS)).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-{digest}"
    d = cache_dir() / "kernels" / tag
    d.mkdir(parents=True, exist_ok=True)
    return d


@lru_cache(maxsize=1)
def _module():
    """The compiled extension, or None (no AVX2, no compiler, or GEMMARUN_NO_KERNELS=1)."""
    if os.environ.get("GEMMARUN_NO_KERNELS") == "1":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir()
        if not list(build.glob("*.so")):
            print("gemmarun: compiling the AVX2 kernels (once, about a minute)", file=sys.stderr, flush=True)
        module = load(
            name="gemmarun_avx2",
            sources=[str(s) for s in SOURCES],
            # -fopenmp: at::parallel_for is inline and runs serially without it; libgomp.so.1 is
            # the runtime torch itself ships, so the process keeps one thread pool.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as e:  # no compiler or headers: the portable path computes the same products in float32
        warnings.warn(f"the AVX2 kernel could not be built ({type(e).__name__}: {str(e)[:200]}); using the slower portable path")
        return None
    return module


def _entry(name: str):
    if torch.compiler.is_compiling():  # torch.compile cannot trace into the extension: it compiles the portable path
        return None
    m = _module()
    return getattr(m, name) if m is not None else None


def qlinear_kernel():
    """qlinear(x, [q], [scales], [mins], [group], [zero], [bits]) -> [x @ W.T] (see qlinear.cpp), or None."""
    return _entry("qlinear")


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
    """DecodeStack(layers, eps): every decoder layer of a decoding step in one call (see decode.cpp), or None."""
    return _entry("DecodeStack")


def int4_search_kernel():
    """int4_search(w, importance, group) -> (scales, mins), float32 (N, K // group) (see quantize.cpp), or None."""
    return _entry("int4_search")
