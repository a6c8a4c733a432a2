"""Generation: sequence state, sampling, the core (prefill / decoding step / scoring over a
KVCache), the static-batch Generator and the continuous-batching Engine.

    from gemmarun.generation import Engine, Generator, SamplingParams
"""

from .generator import Generator
from .sampling import SamplingParams
from .sequence import GenerationResult, SequenceState, TextEvent

# The engine (its scheduler thread, queues) loads on first use: `import gemmarun` does not need it.
_ENGINE = ("Engine", "EngineBusyError", "EngineClosedError", "Event", "Handle", "Request", "TokenLogprob")


def __getattr__(name: str):
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_ENGINE, "Generator", "SamplingParams", "GenerationResult", "SequenceState", "TextEvent"]
