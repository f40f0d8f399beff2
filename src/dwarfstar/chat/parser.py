"""Incremental parser for what DeepSeek V4 generates: reasoning, content and DSML tool calls.

The engine feeds the generated text in pieces of any size as it is sampled; the parser answers
with events a server can forward at once (reasoning and content deltas, tool calls with their
arguments growing piece by piece) and, at the end, the whole assistant message.

On every completion that DeepSeek's official parser (``parse_message_from_completion_text`` in
the V4 encoder) accepts, the message is the one it returns: reasoning is the text before the
first ``</think>``; content is the text before ``\\n\\n<｜DSML｜tool_calls>``, untrimmed; a
``string="true"`` parameter becomes a JSON string of its raw text (no entity unescaping, since
the official renderer writes strings raw), a ``string="false"`` one is inserted verbatim; the
arguments read ``{"key": value, "key2": value2}``. (Two accidents of its regular expressions
are not copied: it reads on past an EOS inside a parameter, and takes ``<\n/｜DSML｜parameter``
for a closing tag. Sampling produces neither.)

Where the official parser raises, this one recovers instead, like antirez's ds4 server:

- DSML inside the thinking block is reasoning text, not a tool call; a leading ``<think>`` is
  dropped.
- A tool-calls block may open without the blank line before it, a parameter may lack
  ``string=`` (it is then a string), and any whitespace may separate the tags.
- A stray ``</think>`` in the content is dropped.
- A block that is malformed, never closed, or followed by anything but whitespace is not a
  tool call: a ``Malformed`` event reports it, every tool call is dropped, and its text from
  the opening tag to the end goes to the content verbatim, so nothing the model wrote is lost.
  So does any other DSML tag in the content. A thinking block never closed is reported too.

Generation ends at the EOS token; text after it is ignored.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from dwarfstar.chat.tokens import (
    DSML,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
)


class Event:
    """One thing a streaming client can be told as soon as the parser knows it."""

    __slots__ = ()
    type: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True, slots=True)
class ReasoningDelta(Event):
    text: str
    type: ClassVar[str] = "reasoning_delta"


@dataclass(frozen=True, slots=True)
class ContentDelta(Event):
    """Visible answer text; never holds DSML, ``</think>`` or EOS."""

    text: str
    type: ClassVar[str] = "content_delta"


@dataclass(frozen=True, slots=True)
class ToolCallStart(Event):
    index: int
    id: str
    name: str
    type: ClassVar[str] = "tool_call_start"


@dataclass(frozen=True, slots=True)
class ToolCallArgumentsDelta(Event):
    """A piece of the call's ``arguments`` JSON text; the pieces join to the final string."""

    index: int
    text: str
    type: ClassVar[str] = "tool_call_arguments_delta"


@dataclass(frozen=True, slots=True)
class ToolCallEnd(Event):
    index: int
    type: ClassVar[str] = "tool_call_end"


@dataclass(frozen=True, slots=True)
class Malformed(Event):
    """The output broke the format: every tool call is void and ``text`` ends the content.

    Emitted once, when generation ends. ``text`` is the model's raw text from the bad block to
    the end (it may hold DSML); it is empty for a thinking block that was never closed.
    """

    error: str
    text: str
    type: ClassVar[str] = "malformed"


@dataclass(frozen=True, slots=True)
class Done(Event):
    """The last event: the whole assistant message, OpenAI-shaped."""

    message: dict[str, Any]
    type: ClassVar[str] = "done"


class _State(enum.Enum):
    THINK_START = enum.auto()  # a leading <think> may still come
    REASONING = enum.auto()
    CONTENT = enum.auto()
    OPENING = enum.auto()  # a DSML tag in the content: is it <｜DSML｜tool_calls>?
    EXPECT = enum.auto()  # whitespace, then one of the tags in _expect
    INVOKE = enum.auto()  # after <｜DSML｜invoke, until its first parameter or its end
    PARAM_HEADER = enum.auto()  # after <｜DSML｜parameter, until its name and type are known
    PARAM_VALUE = enum.auto()
    AFTER = enum.auto()  # the block is closed; only whitespace may follow
    RAW = enum.auto()  # the block failed: everything left is content text


_INVOKE_END = INVOKE_CLOSE[:-1]  # the official parser looks for the tag before its '>'
_PARAM_END = PARAMETER_CLOSE[:-1]
_NAME_ATTR = 'name="'
_BAD_INVOKE = f'bad {INVOKE_OPEN} tag: want {INVOKE_OPEN} name="...">'
_BAD_PARAMETER = f'bad {PARAMETER_OPEN} tag: want {PARAMETER_OPEN} name="..." string="true|false">'

_INVOKE_HEADER = re.compile(r'\s*name="(.*?)">\s*', re.DOTALL)
_PARAM_HEADER = re.compile(r'\s*name="(.*?)" string="(true|false)">', re.DOTALL)
_PARAM_UNTYPED = re.compile(r'\s*name="([^"]*)">(.*)', re.DOTALL)

# Suffixes of the content that may grow into ``</think>`` or a DSML tag (with the blank line
# and the '<' or '</' that belong to the tag): held back until the next piece tells.
_CONTENT_MARKERS = (THINK_CLOSE,) + tuple(lead + DSML for lead in ("", "<", "</", "\n\n", "\n\n<", "\n\n</"))


def _partial_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def _could_be_name_attr(head: str) -> bool:
    head = head.lstrip()
    return head.startswith(_NAME_ATTR) or _NAME_ATTR.startswith(head)


def _json_string_body(text: str) -> str:
    """``text`` escaped as inside a JSON string; escaping piece by piece equals escaping the whole."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


@dataclass
class _Call:
    id: str
    name: str
    arguments: list[str]
    params: set[str]


class OutputParser:
    """Parses one generation, fed piece by piece.

    ``thinking`` says the prompt ended in ``<think>``, so the text opens with reasoning. Call
    ``feed`` with each new piece of text and ``finish`` once at the end; both return the new
    events, and the last one ``finish`` returns is ``Done`` with the whole message.
    """

    def __init__(self, thinking: bool = True) -> None:
        self._state = _State.THINK_START if thinking else _State.CONTENT
        self._pending = ""  # tail that may be the start of EOS
        self._buf = ""  # text the current state has not consumed yet
        self._events: list[Event] = []
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[_Call] = []
        self._block: list[str] = []  # raw text of the tool-calls block consumed so far
        self._expect: tuple[str, ...] = ()
        self._value_is_string = True
        self._in_json_string = False  # inside a string literal of a string="false" value
        self._json_escape = False
        self._error: str | None = None
        self._finished = False
        self._steps = {
            _State.THINK_START: self._think_start,
            _State.REASONING: self._reasoning_step,
            _State.CONTENT: self._content_step,
            _State.OPENING: self._opening,
            _State.EXPECT: self._expect_step,
            _State.INVOKE: self._invoke,
            _State.PARAM_HEADER: self._param_header,
            _State.PARAM_VALUE: self._param_value,
            _State.AFTER: self._after,
            _State.RAW: self._raw,
        }
        self.stopped = False
        """True once EOS was generated: the message is complete and later text is ignored."""

    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("OutputParser.feed() called after finish()")
        if self.stopped:
            return []
        text = self._pending + text
        eos = text.find(EOS)
        if eos >= 0:
            self._pending = ""
            self._advance(text[:eos])
            self.stopped = True
            self._end()
        else:
            keep = _partial_len(text, (EOS,))
            self._pending = text[len(text) - keep :]
            self._advance(text[: len(text) - keep])
        return self._take_events()

    @property
    def in_structure(self) -> bool:
        """True where the model is writing DSML structure rather than free text.

        Structure is a tag, a tag's attributes, the whitespace between tags, a closing tag
        begun (two characters or more), and the JSON syntax of a ``string="false"`` value outside its string
        literals. Reasoning, content, ``string="true"`` values and JSON string literals are
        free text. The engine samples structure greedily (antirez's ds4 server does too), so
        tool calls stay well formed while their payloads are sampled normally.
        """
        if self._state in (_State.OPENING, _State.EXPECT, _State.INVOKE, _State.PARAM_HEADER):
            return True
        if self._state is _State.PARAM_VALUE:
            closing = len(self._buf) >= 2  # "</" or more of the closing tag is held back
            return closing or not (self._value_is_string or self._in_json_string)
        return False

    @property
    def in_reasoning(self) -> bool:
        """True in the thinking block (before its ``</think>``)."""
        return self._state in (_State.THINK_START, _State.REASONING)

    @property
    def in_answer_text(self) -> bool:
        """True in the answer's free text: past the reasoning and outside any DSML tag (where
        the engine writes a forced tool call's opening)."""
        return self._state is _State.CONTENT

    @property
    def tool_calls_closed(self) -> bool:
        """True once a well-formed tool-calls block is closed: the answer is complete."""
        return self._state is _State.AFTER

    def finish(self) -> list[Event]:
        """Ends the generation (at EOS or wherever it stopped) and returns the last events."""
        if self._finished:
            raise RuntimeError("OutputParser.finish() called twice")
        self._finished = True
        if not self.stopped:
            self._advance(self._pending)
            self._pending = ""
            self._end()
        self._events.append(Done(self._message()))
        return self._take_events()

    # The state machine: each step consumes what it can and says whether to step again.

    def _advance(self, text: str) -> None:
        self._buf += text
        while self._buf and self._steps[self._state]():
            pass

    def _think_start(self) -> bool:
        if self._buf.startswith(THINK_OPEN):
            self._buf = self._buf[len(THINK_OPEN) :]
        elif THINK_OPEN.startswith(self._buf):
            return False
        self._state = _State.REASONING
        return True

    def _reasoning_step(self) -> bool:
        end = self._buf.find(THINK_CLOSE)
        if end >= 0:
            self._emit_reasoning(self._buf[:end])
            self._buf = self._buf[end + len(THINK_CLOSE) :]
            self._state = _State.CONTENT
            return True
        safe = len(self._buf) - _partial_len(self._buf, (THINK_CLOSE,))
        self._emit_reasoning(self._buf[:safe])
        self._buf = self._buf[safe:]
        return False

    def _content_step(self) -> bool:
        buf = self._buf
        dsml = buf.find(DSML)
        think_close = buf.find(THINK_CLOSE)
        if think_close >= 0 and (dsml < 0 or think_close < dsml):
            self._emit_content(buf[:think_close])
            self._buf = buf[think_close + len(THINK_CLOSE) :]
            return True
        if dsml < 0:
            safe = len(buf) - _partial_len(buf, _CONTENT_MARKERS)
            self._emit_content(buf[:safe])
            self._buf = buf[safe:]
            return False
        tag = dsml
        if buf[max(dsml - 2, 0) : dsml] == "</":
            tag -= 2
        elif buf[max(dsml - 1, 0) : dsml] == "<":
            tag -= 1
        start = tag - 2 if buf[max(tag - 2, 0) : tag] == "\n\n" else tag
        self._emit_content(buf[:start])
        self._block = [buf[start:tag]]
        self._buf = buf[tag:]
        self._state = _State.OPENING
        return True

    def _opening(self) -> bool:
        if self._buf.startswith(TOOL_CALLS_OPEN):
            self._take(len(TOOL_CALLS_OPEN))
            self._expect_tags(INVOKE_OPEN, TOOL_CALLS_CLOSE)
        elif TOOL_CALLS_OPEN.startswith(self._buf):
            return False
        else:
            self._fail("DSML tag outside a tool_calls block")
        return True

    def _expect_step(self) -> bool:
        rest = self._buf.lstrip()
        for tag in self._expect:
            if rest.startswith(tag):
                self._take(len(self._buf) - len(rest) + len(tag))
                self._on_tag(tag)
                return True
        if any(tag.startswith(rest) for tag in self._expect):
            return False
        self._fail(f"expected {' or '.join(self._expect)}")
        return True

    def _on_tag(self, tag: str) -> None:
        if tag == INVOKE_OPEN:
            self._state = _State.INVOKE
        elif tag == PARAMETER_OPEN:
            self._state = _State.PARAM_HEADER
        elif tag == PARAMETER_CLOSE:
            self._expect_tags(PARAMETER_OPEN, INVOKE_CLOSE)
        elif tag == INVOKE_CLOSE:
            self._arguments("}")
            self._events.append(ToolCallEnd(len(self._calls) - 1))
            self._expect_tags(INVOKE_OPEN, TOOL_CALLS_CLOSE)
        else:  # TOOL_CALLS_CLOSE
            self._state = _State.AFTER

    def _invoke(self) -> bool:
        ends = [i for i in (self._buf.find(PARAMETER_OPEN), self._buf.find(_INVOKE_END)) if i >= 0]
        if not ends:
            if _could_be_name_attr(self._buf):
                return False
            self._fail(_BAD_INVOKE)
            return True
        header = _INVOKE_HEADER.fullmatch(self._buf, 0, min(ends))
        if header is None:
            self._fail(_BAD_INVOKE)
            return True
        self._take(min(ends))
        call = _Call(id=f"call_{secrets.token_hex(16)}", name=header[1], arguments=[], params=set())
        self._calls.append(call)
        self._events.append(ToolCallStart(len(self._calls) - 1, call.id, call.name))
        self._arguments("{")
        self._expect_tags(PARAMETER_OPEN, INVOKE_CLOSE)
        return True

    def _param_header(self) -> bool:
        end = self._buf.find(_PARAM_END)
        region_end = len(self._buf) if end < 0 else end
        typed = _PARAM_HEADER.match(self._buf, 0, region_end)
        if typed is not None:
            name, is_string = typed[1], typed[2] == "true"
            if self._add_param(name, '"' if is_string else ""):
                self._take(typed.end())
                self._value_is_string = is_string
                self._in_json_string = self._json_escape = False
                self._state = _State.PARAM_VALUE
            return True
        if end < 0:
            if _could_be_name_attr(self._buf):
                return False
            self._fail(_BAD_PARAMETER)
            return True
        # No string="..." attribute: antirez's ds4 reads such a value as a string.
        untyped = _PARAM_UNTYPED.fullmatch(self._buf, 0, end)
        if untyped is None:
            self._fail(_BAD_PARAMETER)
        elif self._add_param(untyped[1], json.dumps(untyped[2], ensure_ascii=False)):
            self._take(end)
            self._expect_tags(PARAMETER_CLOSE)
        return True

    def _add_param(self, name: str, value_start: str) -> bool:
        """Writes ``"name": `` and the start of the value, or fails on a repeated name as the official
        parser does."""
        call = self._calls[-1]
        if name in call.params:
            self._fail(f"parameter {name!r} given twice in a call to {call.name!r}")
            return False
        separator = ", " if call.params else ""
        call.params.add(name)
        self._arguments(f"{separator}{json.dumps(name, ensure_ascii=False)}: {value_start}")
        return True

    def _param_value(self) -> bool:
        end = self._buf.find(_PARAM_END)
        size = len(self._buf) - _partial_len(self._buf, (_PARAM_END,)) if end < 0 else end
        value = self._take(size)
        if self._value_is_string:
            self._arguments(_json_string_body(value))
        else:
            self._track_json_strings(value)
            self._arguments(value)
        if end < 0:
            return False
        if self._value_is_string:
            self._arguments('"')
        self._expect_tags(PARAMETER_CLOSE)
        return True

    def _track_json_strings(self, value: str) -> None:
        """Follows whether a JSON value's text ends inside a string literal."""
        for char in value:
            if self._json_escape:
                self._json_escape = False
            elif self._in_json_string and char == "\\":
                self._json_escape = True
            elif char == '"':
                self._in_json_string = not self._in_json_string

    def _after(self) -> bool:
        if self._buf.strip():
            self._fail(f"text after {TOOL_CALLS_CLOSE}")
            return True
        self._take(len(self._buf))
        return False

    def _raw(self) -> bool:
        self._take(len(self._buf))
        return False

    # Helpers.

    def _end(self) -> None:
        """Generation is over: flush what was held back and report what was left open."""
        if self._state in (_State.THINK_START, _State.REASONING):
            self._emit_reasoning(self._buf)
            self._error = f"thinking block never closed with {THINK_CLOSE}"
        elif self._state is _State.CONTENT:
            self._emit_content(self._buf)
        elif self._state not in (_State.AFTER, _State.RAW):
            self._fail(f"tool_calls block never closed with {TOOL_CALLS_CLOSE}")
        self._buf = ""
        if self._error is not None:
            self._events.append(Malformed(self._error, "".join(self._block)))

    def _fail(self, error: str) -> None:
        """Voids the block: its text so far, and all that follows, is kept raw for the content."""
        self._error = error
        self._state = _State.RAW
        self._take(len(self._buf))

    def _expect_tags(self, *tags: str) -> None:
        self._expect = tags
        self._state = _State.EXPECT

    def _take(self, n: int) -> str:
        """Consumes ``n`` characters of the block, keeping them in case it fails."""
        piece, self._buf = self._buf[:n], self._buf[n:]
        self._block.append(piece)
        return piece

    def _arguments(self, text: str) -> None:
        if text:
            self._calls[-1].arguments.append(text)
            self._events.append(ToolCallArgumentsDelta(len(self._calls) - 1, text))

    def _emit_reasoning(self, text: str) -> None:
        if text:
            self._reasoning.append(text)
            self._events.append(ReasoningDelta(text))

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(text)
            self._events.append(ContentDelta(text))

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _message(self) -> dict[str, Any]:
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": "".join(c.arguments)}}
            for c in self._calls
        ]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self._content),
            "reasoning_content": "".join(self._reasoning),
            "tool_calls": calls,
        }
        if self._error is not None:
            message["content"] += "".join(self._block)
            message["tool_calls"] = []
            message["error"] = self._error
        return message


def parse_completion(text: str, thinking: bool = True) -> dict[str, Any]:
    """The assistant message in one whole generated text (the prompt's continuation)."""
    parser = OutputParser(thinking)
    parser.feed(text)
    done = parser.finish()[-1]
    assert isinstance(done, Done)
    return done.message
