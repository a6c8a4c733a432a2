"""The CLI's one top-level error path: every user mistake the issue lists is one `error:` line on
stderr and a non-zero exit, never a traceback; --debug / GEMMARUN_DEBUG shows the traceback; Ctrl-C
exits 130 quietly. Most cases run main() in-process (the failures come before or during the load);
the ones that depend on the process itself (argv bytes, a closed stdin) run it as a subprocess."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gemmarun import cli
from gemmarun.cli import parser as cli_parser  # the parser binds each command function when built
from gemmarun.errors import CheckpointError
from gemmarun.quant import hugepages


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("gemma2", seed=5)


def _main(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _stdin(monkeypatch, data: bytes | None) -> None:
    if data is None:
        monkeypatch.setattr(sys, "stdin", None)
    else:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "-n", "2", "--device", "cuda", "hi"], "'cuda' is not available"),
        (["generate", "-n", "2", "--device", "nonsense", "hi"], "unknown device 'nonsense'"),
        (["generate", "-n", "2", "--device", "meta", "hi"], "'meta' holds no data"),
        (["generate", "-n", "2", "--seed", str(2**70), "hi"], "64-bit"),
        (["generate", "-n", "2", "bad \udcff byte"], "not valid UTF-8"),
        (["generate", "-n", "2", "--threads", "0", "hi"], "--threads must be >= 1"),
        (["eval", "--task", ""], "names no task"),
        (["eval", "--task", " , "], "names no task"),
        (["eval", "--task", "nope"], "unknown task 'nope'"),
        (["eval", "--task", "piqa", "--output", "/no/such/folder/x.json"], "does not exist"),
        (["eval", "--task", "piqa", "--output", "."], "is a folder"),
        (["serve", "--port", "-1"], "--port must be from 0 to 65535"),
        (["serve", "--port", "99999"], "--port must be from 0 to 65535"),
        (["serve", "--api-key", ""], "--api-key is empty"),
        (["serve", "--max-batch", "0"], "--max-batch must be >= 1"),
        (["bench", "--threads", "0"], "--threads must be >= 1"),
        (["bench", "--decode", "0"], "--decode must be >= 1"),
    ],
)
def test_user_mistakes_are_one_line_and_non_zero(folder, capsys, argv, message):
    if argv[0] in ("generate", "eval", "serve"):
        argv = [*argv, "--model", str(folder)]
    code, err = _main(capsys, *argv)
    assert code != 0
    assert message in _one_error_line(err)


def test_a_bad_hugepages_switch_is_one_line(folder, capsys, monkeypatch):
    """GEMMARUN_HUGEPAGES is checked at every load, a dense checkpoint's included."""
    monkeypatch.setenv("GEMMARUN_HUGEPAGES", "yes")
    hugepages._madvise.cache_clear()
    try:
        code, err = _main(capsys, "generate", "-m", str(folder), "-n", "2", "hi")
    finally:
        monkeypatch.delenv("GEMMARUN_HUGEPAGES")
        hugepages._madvise.cache_clear()
    assert code != 0 and "GEMMARUN_HUGEPAGES='yes'" in _one_error_line(err)


def test_invalid_utf8_on_stdin_and_a_closed_stdin(folder, capsys, monkeypatch):
    _stdin(monkeypatch, b"caf\xe9 au lait")
    code, err = _main(capsys, "generate", "-m", str(folder), "-n", "2")
    assert code == 2 and "stdin is not valid UTF-8" in _one_error_line(err)
    for command in ("generate", "chat"):
        _stdin(monkeypatch, None)
        code, err = _main(capsys, command, "-m", str(folder), "-n", "2")
        assert code == 1 and "stdin is closed" in _one_error_line(err)
    _stdin(monkeypatch, b"hello\n\xff\xfe\n")  # chat reads line by line: the second line fails
    code, err = _main(capsys, "chat", "-m", str(folder), "-n", "2")
    assert code == 2 and "not valid utf-8" in _one_error_line(err)


def test_a_piped_chat_message_over_the_context_exits_non_zero(folder, capsys, monkeypatch):
    _stdin(monkeypatch, ("word " * 2000 + "\n").encode())
    code, err = _main(capsys, "chat", "-m", str(folder), "-n", "2")
    assert code == 2 and "exceeds the context" in _one_error_line(err)


def test_broken_files_and_folders(folder, capsys, tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"na\xefve")
    code, err = _main(capsys, "perplexity", "-m", str(folder), str(text))
    assert code == 2 and "is not UTF-8 text" in _one_error_line(err)

    bad = shutil.copytree(folder, tmp_path / "ck")
    (bad / "config.json").write_bytes(b"\xff{")
    code, err = _main(capsys, "generate", "-m", str(bad), "-n", "2", "hi")
    assert code != 0 and "config.json" in _one_error_line(err)

    (bad / "config.json").unlink()
    (bad / "config.json").mkdir()  # root reads every file, so a folder stands in for an unreadable one
    code, err = _main(capsys, "generate", "-m", str(bad), "-n", "2", "hi")
    assert code != 0 and "config.json" in _one_error_line(err)


def test_eval_data_that_is_not_json_or_has_the_wrong_fields(folder, capsys, tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\nnot json\n')
    code, err = _main(capsys, "eval", "-m", str(folder), "--task", "piqa", "--data", str(data), "-q")
    assert code != 0 and "line 2" in _one_error_line(err)
    data.write_text(json.dumps({"goal": 3, "sol1": None, "sol2": [], "label": "x"}) + "\n")
    code, err = _main(capsys, "eval", "-m", str(folder), "--task", "piqa", "--data", str(data), "-q")
    assert code != 0 and "record 1" in _one_error_line(err)


class _Interrupting:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, args):
        raise self.exc


def test_each_exception_kind_becomes_one_line(capsys, monkeypatch):
    cases = [
        (CheckpointError("the file is truncated"), 1, "the file is truncated"),
        (PermissionError(13, "Permission denied", "/x/model.safetensors"), 1, "/x/model.safetensors: Permission denied"),
        (json.JSONDecodeError("Expecting value", "x", 0), 2, "invalid JSON"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "not valid utf-8"),
        (ZeroDivisionError("oops"), 1, "rerun with --debug"),
    ]
    for exc, status, message in cases:
        monkeypatch.setattr(cli_parser, "cmd_models", _Interrupting(exc))
        code, err = _main(capsys, "models")
        assert code == status and message in _one_error_line(err)
    monkeypatch.setattr(cli_parser, "cmd_models", _Interrupting(KeyboardInterrupt()))
    code, err = _main(capsys, "models")
    assert code == 130 and err.strip() == ""


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(cli_parser, "cmd_models", _Interrupting(CheckpointError("corrupt")))
    with pytest.raises(CheckpointError):
        cli.main(["--debug", "models"])
    monkeypatch.setenv("GEMMARUN_DEBUG", "1")
    with pytest.raises(CheckpointError):
        cli.main(["models"])


def test_as_a_process_bytes_in_argv_and_a_closed_stdin(folder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bad = os.fsencode("hi \udcff")  # the byte 0xff, as a shell passes it
    r = subprocess.run([sys.executable, "-m", "gemmarun.cli", "generate", "-m", str(folder), "-n", "2", bad],
                       capture_output=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 2 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "gemmarun.cli", "generate", "-m", str(folder), "-n", "2"],
                       stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=300, pass_fds=())  # fmt: skip
    assert r.returncode == 1 and r.stderr == b"error: the prompt is empty\n"
    r = subprocess.run(f"{sys.executable} -m gemmarun.cli generate -m {folder} -n 2 <&-", shell=True,
                       capture_output=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 1 and b"stdin is closed" in r.stderr and b"Traceback" not in r.stderr


def test_an_unwritable_cache_falls_back_to_the_portable_path(folder, tmp_path):
    # in a process of its own: the kernel module is cached per process, and the others keep theirs
    cache = tmp_path / "a-file"
    cache.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GEMMARUN_CACHE": str(cache / "below"), "GEMMARUN_NO_KERNELS": ""}
    r = subprocess.run([sys.executable, "-m", "gemmarun.cli", "generate", "-m", str(folder), "-n", "2", "hi"],
                       capture_output=True, env=env, timeout=300, text=True)  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "could not be built" in r.stderr and "portable path" in r.stderr


def test_ctrl_c_while_torch_imports_exits_130_quietly(folder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # SIGINT as a terminal's foreground job has it: a runner started in the background (`cmd &` in a
    # script) passes it on ignored, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen([sys.executable, "-m", "gemmarun.cli", "generate", "-m", str(folder), "-n", "2", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    time.sleep(0.5)  # the interpreter is up, torch (a second or more) is importing
    # Ctrl-C until it ends: an interrupt that lands inside a C extension's import can be swallowed
    # there (seen on an idle machine), and a user presses again; every one must end quietly.
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=120)
    # 130, or killed by the signal itself when a later press lands during the exit (a shell shows 130 for both)
    assert proc.returncode in (130, -signal.SIGINT) and b"Traceback" not in err, err.decode()
