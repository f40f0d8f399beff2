"""The engine: sessions with prefix reuse, sampling, and generation as a stream of events.

Imports model, tokenizer and chat; nothing below it imports the engine. The server and the
CLI are two thin faces of it.
"""

from dwarfstar.engine.engine import ContextLengthError, Engine, EngineError, Generation
from dwarfstar.engine.sampling import SamplingParams
from dwarfstar.engine.sessions import LiveSession

__all__ = ["ContextLengthError", "Engine", "EngineError", "Generation", "LiveSession", "SamplingParams"]
