"""Code benchmarks: greedy completions run against the benchmark's tests in a separate process.

With greedy decoding there is one sample per problem, so pass@1 is the fraction of problems
whose program passes (the unbiased pass@k estimator with n = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from .execution import run_programs
from .task import GenerationTask


@dataclass
class CodeTask(GenerationTask):
    timeout: float = 10.0  # seconds per program
    memory_mb: int = 1024

    def program(self, d: dict, completion: str) -> str:
        raise NotImplementedError

    def settings(self):
        return {**super().settings(), "timeout_s": self.timeout, "memory_mb": self.memory_mb}

    def run(self, scorer, loaded, progress=None):
        outs = self.completions(scorer, loaded, progress)
        results = run_programs([self.program(d, o) for d, o in zip(loaded.docs, outs)], self.timeout, self.memory_mb)
        return {"pass@1": sum(r.passed for r in results) / len(results)}


@dataclass
class HumanEval(CodeTask):
    # The Codex paper's stop sequences: the function body ends where top-level code starts.
    stop: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    max_new_tokens: int = 512

    def prompt(self, d):
        return d["prompt"]

    def target(self, d):
        return d["canonical_solution"]  # only used when --shots asks for examples

    def program(self, d, completion):
        return f"{d['prompt']}{completion}\n\n{d['test']}\n\ncheck({d['entry_point']})\n"


@dataclass
class MBPP(CodeTask):
    """The MBPP paper's prompt: the task, its three tests, then the code between [BEGIN] and [DONE]."""

    stop: tuple[str, ...] = ("[DONE]",)
    max_new_tokens: int = 512

    def prompt(self, d):
        tests = "\n".join(d["test_list"])
        return (
            f"You are an expert Python programmer, and here is your task: {d['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
        )

    def target(self, d):
        return f"{d['code']}\n[DONE]"

    def pick_shots(self, members, k, seed):
        # The paper's examples are tasks 2, 3 and 4 of the prompt split.
        paper = [m for m in members if m.get("task_id") in (2, 3, 4)]
        return paper if len(paper) == k == 3 else super().pick_shots(members, k, seed)

    def program(self, d, completion):
        setup = d.get("test_setup_code") or ""
        return f"{setup}\n{completion}\n\n" + "\n".join(d["test_list"]) + "\n"
