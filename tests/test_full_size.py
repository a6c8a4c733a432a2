"""Loading at the exact gemma-2-2b shape (random weights, saved sharded): count and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gemmarun.model.config import PRESETS
from gemmarun.tools.random_checkpoint import write_random_checkpoint

PROBE = r"""
import json, resource, sys, time
import torch
from pathlib import Path
from gemmarun.weights.loader import load_folder_weights
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
config, model = load_folder_weights(Path(sys.argv[1]), torch.bfloat16, torch.device("cpu"))
secs = time.perf_counter() - t
n = sum(p.numel() for p in model.parameters())
with torch.inference_mode():
    logits = model(torch.tensor([[2, 651, 6037]]), torch.arange(3)[None], select=torch.tensor([2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"params": n, "base_kb": base, "peak_kb": peak, "secs": secs, "finite": bool(logits.isfinite().all())}))
"""


@pytest.mark.slow
def test_gemma2_2b_shape_loads_with_exact_count_and_bounded_memory(tmp_path):
    config = PRESETS["gemma-2-2b"]
    folder = write_random_checkpoint(config, tmp_path / "gemma-2-2b-random", dtype=torch.bfloat16)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["params"] == 2_614_341_888 == config.num_parameters()
    assert r["finite"]
    weights_kb = r["params"] * 2 / 1024
    # Memory-mapped bf16 tensors are used in place: no second copy of the weights.
    assert (r["peak_kb"] - r["base_kb"]) < 1.15 * weights_kb, r
