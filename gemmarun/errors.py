"""Typed errors: every user mistake surfaces as one of these with a one-line message."""


class GemmarunError(Exception):
    """Base class; the CLI prints `error: <message>` and exits non-zero for these."""


class ModelNotFoundError(GemmarunError):
    """The path or repo id names nothing we can load."""


class CheckpointError(GemmarunError):
    """A checkpoint exists but is incomplete, corrupt or inconsistent with its config."""


class ConfigError(GemmarunError):
    """config.json or GGUF metadata describes a model we do not support."""


class InvalidParameterError(GemmarunError, ValueError):
    """A sampling or generation parameter is out of range."""


class ContextLengthError(GemmarunError, ValueError):
    """The prompt (plus the tokens asked for) does not fit in the context."""
