"""gemmarun: a fast, exact runtime for Gemma 2 and Gemma 3 text models."""

from .errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    GemmarunError,
    InvalidParameterError,
    ModelNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "GemmaConfig", "PRESETS", "LanguageModel", "TextGenerationPipeline", "GenerationResult", "SamplingParams",
    "Constraint", "load", "pipeline", "GemmarunError", "CheckpointError", "ConfigError", "ContextLengthError",
    "InvalidParameterError", "ModelNotFoundError", "SpeculativeConfig",
]  # fmt: skip

# The names that need torch load on first use (PEP 562), so `import gemmarun.cli` is instant and a
# Ctrl-C while torch imports reaches the CLI's handler instead of printing a traceback.
_LAZY = {
    "SamplingParams": "generation.sampling", "GenerationResult": "generation.sequence", "LanguageModel": "lm",
    "TextGenerationPipeline": "lm", "load": "lm", "pipeline": "lm", "PRESETS": "model.config", "GemmaConfig": "model.config",
    "Constraint": "generation.constraints", "SpeculativeConfig": "generation.speculative",
}  # fmt: skip


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a subpackage used as an attribute (gemmarun.model.gemma) without its own import
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'gemmarun' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
