"""OpenAI-compatible HTTP API over the engine."""
from .app import BackgroundServer, Server, serve
