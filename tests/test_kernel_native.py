"""The ISA layers' primitives against the generic layer, in the PyTorch-free program tests/native/:
built with g++ for each x86 variant (run where the CPU has the flags), for AVX-512 also against
SIMDe's portable AVX-512 intrinsics so that layer runs on CPUs without it, and with the AArch64
cross compiler for NEON, run under qemu-aarch64-static (.ci/run installs libsimde-dev,
g++-aarch64-linux-gnu and qemu-user-static)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from gemmarun.kernels import _FLAGS, available

SOURCE = Path(__file__).parent / "native" / "primitives_test.cpp"
# -O1: the program instantiates the whole matmul core twice; -O2 doubles the build for no coverage
BASE = ["-std=c++17", "-O1", "-Wall", "-Wno-aggressive-loop-optimizations", "-Wno-array-bounds"]
EMULATED_AVX512 = Path(__file__).parent / "native" / "avx512_emulated.h"


def _build_and_run(compiler: str, flags: list[str], out: Path, run_with: list[str] | None) -> None:
    """Compile the program; then run it (under `run_with`, e.g. qemu) unless run_with is None."""
    build = subprocess.run([compiler, *BASE, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    if run_with is None:
        return
    run = subprocess.run([*run_with, str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.parametrize("variant", ["generic", "avx2", "avx512"])
def test_x86_layer_matches_generic(variant, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    if platform.machine().lower() not in ("x86_64", "amd64") and variant != "generic":
        pytest.skip(f"{variant} is an x86 layer; this is {platform.machine()}")
    define = [f"-DGEMMARUN_ISA_{variant.upper()}"] if variant != "generic" else []
    runs = variant in available()
    # Compiled either way (g++ takes -mavx512f on any host); run only where the CPU has the flags.
    _build_and_run("g++", [*_FLAGS[variant], *define], tmp_path / variant, [] if runs else None)
    if not runs:
        pytest.skip(f"compiled; not run: this CPU lacks the {variant} flags (it runs {', '.join(available())})")


def _has_header(header: str) -> bool:
    probe = ["g++", "-x", "c++", "-E", "-o", "/dev/null", "-"]
    return subprocess.run(probe, input=f"#include <{header}>\n", capture_output=True, text=True).returncode == 0


def test_avx512_layer_matches_generic_emulated(tmp_path):
    """The AVX-512 layer's code run on AVX2 through SIMDe (tests/native/avx512_emulated.h): its
    logic checked on every x86 machine, where the native build above runs only on AVX-512 ones."""
    if shutil.which("g++") is None or "avx2" not in available():
        pytest.skip("needs g++ and an AVX2 CPU (SIMDe's 512-bit values are two AVX2 halves here)")
    if not _has_header("simde/x86/avx512.h"):
        pytest.skip("needs SIMDe's headers (apt-get install libsimde-dev)")
    flags = [*_FLAGS["avx2"], "-Wno-psabi", "-DGEMMARUN_ISA_AVX512", "-include", str(EMULATED_AVX512)]
    _build_and_run("g++", flags, tmp_path / "avx512_emulated", [])


def test_neon_layer_matches_generic_under_qemu(tmp_path):
    cross, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64-static")
    if cross is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64-static (apt-get install g++-aarch64-linux-gnu qemu-user-static)")
    _build_and_run(cross, ["-static", "-DGEMMARUN_ISA_NEON"], tmp_path / "neon", [qemu])
