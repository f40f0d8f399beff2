"""The conversation every API request becomes before it is rendered.

Messages are plain dicts in the form DeepSeek's official V4 encoder takes, so that its test
vectors feed the renderer unchanged:

- ``{"role": "system", "content": str, "tools"?: [OpenAI tool], "response_format"?: dict}``
  (the tools and the response format sit on the system message);
- ``{"role": "user", "content": str}``;
- ``{"role": "assistant", "content": str | None, "reasoning_content"?: str,
  "tool_calls"?: [{"id": str, "type": "function", "function": {"name": str, "arguments": str}}]}``
  (``arguments`` is a JSON string);
- ``{"role": "tool", "tool_call_id": str, "content": str | [content block]}``;
- ``{"role": "developer", "content": str}`` and ``{"role": "latest_reminder", "content": str}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Message = dict[str, Any]
ThinkingMode = Literal["chat", "thinking"]
ReasoningEffort = Literal["high", "max"]


@dataclass
class Conversation:
    """Messages plus how the model should answer them.

    ``reasoning_effort`` is ``"max"`` for Think Max; ``"high"`` and ``None`` render the same
    (normal thinking). ``drop_thinking`` strips reasoning from turns before the last user
    turn (the official default); the API always leaves it on. ``continue_final_message``
    makes a trailing assistant message a prefill: the prompt ends inside that message (no end
    of sentence after it), so the model continues it rather than starting a new turn.
    ``forced_tool_call`` makes the answer a tool call (``tool_choice`` required or a named
    function): True, a call of any offered tool; a name, a call of that function. The engine
    writes the opening of the call itself when the answer proper begins.
    """

    messages: list[Message]
    thinking_mode: ThinkingMode = "thinking"
    reasoning_effort: ReasoningEffort | None = None
    drop_thinking: bool = True
    continue_final_message: bool = False
    forced_tool_call: bool | str = False

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The OpenAI-shaped tools offered to the model (those on system or developer messages)."""
        return [
            tool
            for message in self.messages
            if message.get("role") in ("system", "developer")
            for tool in message.get("tools") or []
        ]

    @property
    def drops_reasoning(self) -> bool:
        """Whether the reasoning of turns before the last user message is left out of the prompt
        (thinking mode, ``drop_thinking``, no tools offered: the renderer's rule), so that the
        next turn's prompt will leave this one at its closing ``<think>``."""
        return self.thinking_mode == "thinking" and self.drop_thinking and not self.tools
