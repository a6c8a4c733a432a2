"""What a benchmark ran on: the CPU, gemmarun's kernel variant and llama.cpp's build features, printed
with every figure because speed depends on all three."""
from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    """One markdown line per fact: CPU, gemmarun kernels, and llama.cpp's features when it is measured."""
    lines = [f"CPU: {cpu_model()}; gemmarun kernels: {kernel_variant()}"]
    if "llama.cpp" in engines and (info := llama_cpp_features()) is not None:
        lines.append(f"llama.cpp: {info}")
    return "\n".join(lines)
