"""gemmarun: a fast, exact runtime for Gemma 2 and Gemma 3 text models."""

from .errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    GemmarunError,
    InvalidParameterError,
    ModelNotFoundError,
)
from .generation.constraints import Constraint
from .generation.sampling import SamplingParams
from .generation.sequence import GenerationResult
from .generation.speculative import SpeculativeConfig
from .lm import LanguageModel, TextGenerationPipeline, load, pipeline
from .model.config import PRESETS, GemmaConfig

__version__ = "0.1.0"

__all__ = [
    "GemmaConfig", "PRESETS", "LanguageModel", "TextGenerationPipeline", "GenerationResult", "SamplingParams",
    "Constraint", "load", "pipeline", "GemmarunError", "CheckpointError", "ConfigError", "ContextLengthError",
    "InvalidParameterError", "ModelNotFoundError", "SpeculativeConfig",
]  # fmt: skip
