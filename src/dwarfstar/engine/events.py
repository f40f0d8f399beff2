"""What a generation tells its consumer, in order: prefill progress, then tokens and parser events,
then one ``Finished``.

The parser events (reasoning and content deltas, tool-call start, argument deltas and end,
malformed output) are ``dwarfstar.chat.parser``'s, re-exported here so that a consumer of the
engine imports every event from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from dwarfstar.chat.parser import (
    ContentDelta,
    Event,
    Malformed,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]

__all__ = [
    "ContentDelta",
    "Event",
    "FinishReason",
    "Finished",
    "Malformed",
    "PrefillProgress",
    "ReasoningDelta",
    "TokenLogprob",
    "TokenSampled",
    "ToolCallArgumentsDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "Usage",
]


@dataclass(frozen=True, slots=True)
class PrefillProgress(Event):
    """After each prefill chunk: ``done`` of the ``total`` prompt tokens that need computing."""

    done: int
    total: int
    type: ClassVar[str] = "prefill_progress"


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token and its log-probability (natural log, see ``sampling.token_logprobs``).

    ``text`` is the token alone decoded (a partial UTF-8 character shows as U+FFFD); ``raw``
    holds its exact bytes.
    """

    id: int
    text: str
    raw: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenSampled(Event):
    """One sampled token (EOS excluded) and the text it completes (whole characters only).

    The text is the raw model output: visible text comes through the parser events, which
    follow it and also hide stop strings and DSML. ``part`` says where the parser put the
    token: in the ``reasoning``, the answer's ``content``, or ``markup`` (a think tag, DSML, a
    token that crossed from one part to another). ``logprob`` and ``top_logprobs`` (most likely
    first) are there when ``SamplingParams.logprobs`` asks for them.
    """

    id: int
    text: str
    part: Literal["reasoning", "content", "markup"] = "content"
    logprob: TokenLogprob | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    type: ClassVar[str] = "token"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    reused_tokens: int  # prompt tokens the session already held (the server's cached_tokens)
    generated_tokens: int  # sampled tokens, EOS included
    prefill_seconds: float
    decode_seconds: float

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens that were prefilled."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tps(self) -> float:
        return self.computed_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Finished(Event):
    """The last event. ``message`` is the parsed assistant message (OpenAI-shaped, see
    ``OutputParser``); ``text`` is everything the model sampled, EOS excluded, before stop
    strings were cut (the exact DSML of its tool calls included)."""

    reason: FinishReason
    usage: Usage
    message: dict[str, Any]
    text: str
    type: ClassVar[str] = "finished"
