"""A kernel build in progress is visible: kernels.status() names the variant while it compiles,
and the server's /health says so (a fresh server's first request waits on that build)."""

from __future__ import annotations

import torch.utils.cpp_extension
from fastapi.testclient import TestClient

import gemmarun
from gemmarun import kernels
from gemmarun.generation.engine import Engine
from gemmarun.server import Server


def test_status_names_the_variant_while_it_builds(monkeypatch, tmp_path, checkpoint):
    monkeypatch.setenv("GEMMARUN_CACHE", str(tmp_path))  # an empty cache: this build starts from nothing
    lm = gemmarun.load(checkpoint("gemma2", seed=1))
    seen = {}
    with Engine(lm, max_batch=1) as engine:
        app = TestClient(Server(lm, engine).app)

        def slow_build(**kwargs):  # stands in for the compiler: look at the server while it "runs"
            seen["status"] = kernels.status()
            seen["health"] = app.get("/health").json()
            return "built"

        monkeypatch.setattr(torch.utils.cpp_extension, "load", slow_build)
        assert kernels.module.__wrapped__("generic") == "built"  # the uncached build function
        assert seen["status"] == {"building": ["generic"]}
        assert seen["health"]["status"] == "ok" and seen["health"]["kernels_building"] == ["generic"]
        assert kernels.status() == {"building": []} and app.get("/health").json()["kernels_building"] == []
