"""Generation: sequence state, sampling, the core (prefill / decoding step / scoring over a
KVCache), the static-batch Generator and the continuous-batching Engine.

    from gemmarun.generation import Engine, Generator, SamplingParams
"""
from .engine import Engine, EngineBusyError, EngineClosedError, Event, Handle, Request, TokenLogprob
from .generator import Generator
from .sampling import SamplingParams
from .sequence import GenerationResult, SequenceState, TextEvent

__all__ = [
    "Engine", "EngineBusyError", "EngineClosedError", "Event", "Handle", "Request", "TokenLogprob", "Generator",
    "SamplingParams", "GenerationResult", "SequenceState", "TextEvent",
]  # fmt: skip
