"""What a benchmark ran on: the CPU, gemmarun's kernel variant and llama.cpp's build features, printed
with every figure because speed depends on all three."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def kernel_variant() -> str:
    """gemmarun's kernel variant in use, or what runs instead."""
    from .. import kernels

    return kernels.variant() or "none (portable PyTorch path)"


def llama_cpp_features() -> str | None:
    """llama.cpp's system info line (the CPU features it was built with), or None without llama-cpp-python.
    Asked in a subprocess, as the benchmark runs llama.cpp, so its backend never loads into this process."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "unknown (llama_print_system_info timed out)"
    return out.stdout.strip() or f"unknown ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no output'})"


def describe(engines: set[str]) -> str:
    """One markdown line per fact: CPU, gemmarun's kernels and prefill paths, and llama.cpp's features
    when it is measured."""
    from ..kernels import cpu_model
    from ..quant.prefill import describe as prefill

    lines = [f"CPU: {cpu_model()}; gemmarun kernels: {kernel_variant()}; {prefill()}"]
    if "llama.cpp" in engines and (info := llama_cpp_features()) is not None:
        lines.append(f"llama.cpp: {info}")
    return "\n".join(lines)
