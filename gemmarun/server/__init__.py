"""OpenAI-compatible HTTP API over the engine: requests.py parses and checks request bodies,
responses.py shapes OpenAI's responses and event streams, app.py holds the routes and `serve`."""

from .app import Server, serve

__all__ = ["Server", "serve"]
