"""`gemmarun chat`: the interactive loop over a ChatSession."""

from __future__ import annotations

import sys
from typing import TextIO

from ..errors import ContextLengthError
from .session import ChatSession

HELP = "commands: /reset (forget the conversation), /quit (or end of input)"


def run_repl(lm, session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Interactive chat on a terminal; with piped input, each line is one user message."""
    interactive = stdin.isatty()
    if interactive:
        print(f"gemmarun chat ({lm.source}); {HELP}", file=stderr)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if line == "":  # end of input
            if interactive:
                stdout.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            print("[conversation reset]", file=stderr)
            continue
        if line.startswith("/") and line.split()[0] in ("/help", "/?"):
            print(HELP, file=stderr)
            continue
        try:
            for piece in session.send(line):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n[interrupted]", file=stderr)
        except ContextLengthError as e:
            if not interactive:  # a script's conversation cannot go on as written: stop, non-zero
                raise
            print(f"error: {e}", file=stderr)
            continue
        stdout.write("\n")
        stdout.flush()
