"""A multi-turn chat with one live session: the conversation state ``ds4``'s interactive mode drives.

Every answer, its reasoning included, stays in the transcript (``drop_thinking`` off), so the
next turn's prompt extends exactly what the session holds and only the new turn is prefilled.
Changing the system prompt or the thinking mode changes the rendered history, which then
costs one prefill from the first difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from dwarfstar.chat.conversation import Conversation, Message
from dwarfstar.engine.engine import Engine, Generation
from dwarfstar.engine.events import Event, Finished
from dwarfstar.engine.sampling import Sampler, SamplingParams

ThinkingChoice = Literal["nothink", "think", "think-max"]
_MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls")


class Chat:
    def __init__(self, engine: Engine, system: str | None = None, thinking: ThinkingChoice = "think") -> None:
        self.engine = engine
        self.system = system
        self.thinking: ThinkingChoice = thinking
        self.messages: list[Message] = []
        self.session = engine.new_session()

    def conversation(self, messages: list[Message] | None = None) -> Conversation:
        """The conversation as it would be rendered now (``messages`` by default the transcript)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return Conversation(
            system + (self.messages if messages is None else messages),
            thinking_mode="chat" if self.thinking == "nothink" else "thinking",
            reasoning_effort="max" if self.thinking == "think-max" else None,
            drop_thinking=False,
        )

    def send(
        self, text: str, sampling: SamplingParams | None = None, sampler: Sampler | None = None
    ) -> Generation:
        """Plan the answer to a user message (raises ``ContextLengthError`` when it does not fit).

        Iterate ``reply(generation)`` to run it; the answer joins the transcript when it
        finishes, also when cancelled (what was written is kept; a turn cancelled before its
        first token is dropped).
        """
        user = {"role": "user", "content": text}
        generation = self.engine.generate(
            self.conversation([*self.messages, user]), sampling, session=self.session, sampler=sampler
        )
        self.messages.append(user)
        return generation

    def reply(self, generation: Generation) -> Iterator[Event]:
        for event in generation:
            if isinstance(event, Finished):
                if event.reason == "cancelled" and event.usage.generated_tokens == 0:
                    self.messages.pop()
                else:
                    self.messages.append({key: event.message[key] for key in _MESSAGE_KEYS})
            yield event

    def clear(self) -> None:
        """Forget the transcript (the session keeps its state until a prompt diverges from it)."""
        self.messages = []
