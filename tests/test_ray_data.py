"""Ray Data and sharded eval on a local cluster: a batch of 200 prompts through an actor pool of two
engines equals the same lines run in one process (greedy), an interrupted Ray batch resumes to the
same file, and eval sharded over two workers scores bit-identically to one process."""

from __future__ import annotations

import json

import pytest
import torch
from test_batch import batch_lines, normalized, write_lines

import gemmarun
from gemmarun.batch import run_batch
from gemmarun.evaluate import Request, Scorer, evaluate


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=11)


@pytest.fixture(scope="module")
def lm(folder):
    return gemmarun.load(folder)


def test_ray_data_batch_equals_one_process_and_resumes(ray_cluster, lm, folder, tmp_path):
    from gemmarun.distributed.data import run_batch_on_ray

    write_lines(tmp_path / "in.jsonl", batch_lines(200))
    run_batch(lm, tmp_path / "in.jsonl", tmp_path / "local.jsonl", max_batch=8, progress=False)
    kw = dict(workers=2, threads=1, max_batch=8, progress=False)
    s = run_batch_on_ray({"source": str(folder)}, tmp_path / "in.jsonl", tmp_path / "ray.jsonl", **kw)
    assert (s.total, s.completed, s.failed) == (200, 200, 0)
    assert normalized(tmp_path / "ray.jsonl") == normalized(tmp_path / "local.jsonl")
    # Interrupted after 70 lines, mid-line: the resumed Ray job completes the same file.
    whole = (tmp_path / "ray.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(whole[:70]) + whole[70][:30], encoding="utf-8")
    s = run_batch_on_ray({"source": str(folder)}, tmp_path / "in.jsonl", tmp_path / "cut.jsonl", **kw)
    assert (s.skipped, s.completed) == (70, 130)
    assert normalized(tmp_path / "cut.jsonl") == normalized(tmp_path / "ray.jsonl")


PIQA = [
    {"goal": f"{goal} number {i}", "sol1": a, "sol2": b, "label": i % 2}
    for i, (goal, a, b) in enumerate(
        [("How do I dry wet shoes?", "Stuff them with newspaper.", "Put them in the freezer."),
         ("To cut a tomato thin,", "use a dull spoon.", "use a sharp serrated knife."),
         ("Keep bread fresh", "in a closed bag.", "in the rain.")] * 6
    )
]  # fmt: skip


def test_eval_sharded_over_two_workers_equals_one_process(ray_cluster, lm, folder, tmp_path):
    from gemmarun.distributed.eval import ray_scorer

    data = tmp_path / "piqa"
    data.mkdir()
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIQA), encoding="utf-8")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIQA[:4]), encoding="utf-8")
    sharded = ray_scorer(lm, {"source": str(folder)}, workers=2, threads=1)
    # The reference runs on the workers' one thread: kernels split long reductions across threads,
    # so another count rounds differently (in the last bits); bit-identity is per thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare(lm, sharded, data)
    finally:
        torch.set_num_threads(threads)


def _compare(lm, sharded, data) -> None:
    for shots in (0, 1):  # one shot: every context shares the shot's prefix, so cuts are rarer
        alone = evaluate(lm, "piqa", shots=shots, data=data, progress=False)
        spread = evaluate(lm, "piqa", shots=shots, data=data, progress=False, scorer=sharded)
        assert spread.metrics == alone.metrics and spread.items == alone.items == 18
    # Request by request, bit for bit, with the work really split.
    requests = [Request(f"Question {i}: {r['goal']} Answer:", " " + r["sol1"]) for i, r in enumerate(PIQA)]
    assert sharded.loglikelihood(requests) == Scorer(lm).loglikelihood(requests)
    assert len(sharded.shard_sizes) == 2 and min(sharded.shard_sizes) > 0
    prompts = [f"Once upon a time {'very ' * (i % 5)}{i}" for i in range(20)]
    assert sharded.generate(prompts, ["\n"], 6) == Scorer(lm).generate(prompts, ["\n"], 6)
    assert len(sharded.shard_sizes) == 2 and min(sharded.shard_sizes) > 0
