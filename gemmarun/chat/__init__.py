"""Chat: the prompt template, a session that keeps its KV cache across turns, and the REPL.

from gemmarun.chat import ChatSession
"""

from .repl import run_repl
from .session import ChatSession
from .template import ChatPrompt, render_messages, render_prompt

__all__ = ["ChatPrompt", "ChatSession", "render_messages", "render_prompt", "run_repl"]
