"""A multi-turn chat with one live session: the conversation state ``ds4``'s interactive mode drives.

Every answer, its reasoning included, stays in the transcript (``drop_thinking`` off), so the
next turn's prompt extends exactly what the session holds and only the new turn is prefilled.
Changing the system prompt or the thinking mode changes the rendered history, which then
costs one prefill from the first difference. ``save``/``load`` keep a chat in a snapshot file
(the decode state with the transcript): loading one continues it with no prefill.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from dwarfstar.chat.conversation import Conversation, Message
from dwarfstar.engine import kvfile
from dwarfstar.engine.engine import Engine, Generation
from dwarfstar.engine.events import Event, Finished
from dwarfstar.engine.kvfile import Snapshot
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

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write the session and the transcript to ``path`` (atomically); returns its size.

        A ValueError when there is nothing to save yet.
        """
        held = self.session.as_snapshot()
        if held is None or not self.messages:
            raise ValueError("nothing to save yet: send a message first")
        chat = {"messages": self.messages, "system": self.system, "thinking": self.thinking}
        extra = {"chat": chat, "tool_calls": dict(self.session.tool_calls)}
        return kvfile.write(
            path, Snapshot(held.state, held.tokens, held.text, held.logits, extra), self.engine.model
        )

    def load(self, path: str | os.PathLike[str]) -> None:
        """Continue the chat saved in ``path``: no prefill, the next turn reuses all of it.

        ``KVFileError`` when the file is not a usable snapshot for this model.
        """
        snapshot = kvfile.read(path, self.engine.model)
        chat = snapshot.extra.get("chat")
        if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
            raise kvfile.KVFileError(f"{Path(path).name} holds no chat transcript")
        self.session.adopt(snapshot)
        self.messages = list(chat["messages"])
        self.system = chat.get("system") or None
        if chat.get("thinking") in ("nothink", "think", "think-max"):
            self.thinking = chat["thinking"]
