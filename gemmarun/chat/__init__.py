"""Chat: the prompt template, a session that keeps its KV cache across turns, and the REPL.

from gemmarun.chat import ChatSession
"""

from .repl import run_repl
from .session import ChatSession
from .template import render_messages

__all__ = ["ChatSession", "render_messages", "run_repl"]
