"""The incremental output parser: DeepSeek's vectors, piece-size independence, recovery rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.chat.parser import (
    ContentDelta,
    Done,
    Event,
    Malformed,
    OutputParser,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    parse_completion,
)
from dwarfstar.chat.tokens import DSML, EOS, THINK_CLOSE

VECTORS_PATH = Path(__file__).parents[1] / "data/chat/parse_vectors.jsonl"
VECTORS = [json.loads(line) for line in VECTORS_PATH.read_text(encoding="utf-8").splitlines()]
CALL_ID = re.compile(r"call_[0-9a-f]{32}")

D = DSML
OPEN = f"\n\n<{D}tool_calls>\n"
CLOSE = f"</{D}tool_calls>"


def invoke(name: str, *params: tuple[str, str, str]) -> str:
    body = "".join(f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>\n' for k, s, v in params)
    return f'<{D}invoke name="{name}">\n{body}</{D}invoke>\n'


def run(text: str, thinking: bool = True, pieces: list[int] | None = None) -> list[Event]:
    """Feeds ``text`` whole, or cut after each size in ``pieces`` (cycled), and checks the events."""
    parser = OutputParser(thinking)
    events: list[Event] = []
    sizes, at, i = pieces or [len(text) or 1], 0, 0
    while at < len(text):
        events += parser.feed(text[at : at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    events += parser.finish()
    check_events(events)
    return events


def check_events(events: list[Event]) -> None:
    """The contract between the event stream and the final message."""
    *stream, done = events
    assert isinstance(done, Done) and not any(isinstance(e, Done) for e in stream)
    message = done.message
    assert all(
        e.text for e in stream if isinstance(e, (ContentDelta, ReasoningDelta, ToolCallArgumentsDelta))
    )

    content_parts = [e for e in stream if isinstance(e, (ContentDelta, Malformed))]
    assert "".join(e.text for e in content_parts) == message["content"]
    for e in stream:
        if isinstance(e, ContentDelta):
            assert DSML not in e.text and THINK_CLOSE not in e.text and EOS not in e.text
    reasoning = "".join(e.text for e in stream if isinstance(e, ReasoningDelta))
    assert reasoning == message["reasoning_content"]

    malformed = [e for e in stream if isinstance(e, Malformed)]
    assert len(malformed) <= 1
    if malformed:
        assert stream[-1] is malformed[0], "Malformed comes last, when generation ends"
        assert message["error"] == malformed[0].error and message["tool_calls"] == []
        return
    assert "error" not in message
    starts = [e for e in stream if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(message["tool_calls"])))
    for start, call in zip(starts, message["tool_calls"], strict=True):
        assert call["id"] == start.id and call["function"]["name"] == start.name
        assert call["type"] == "function"
        first = stream.index(start)
        deltas = [e for e in stream if isinstance(e, ToolCallArgumentsDelta) and e.index == start.index]
        assert all(stream.index(d) > first for d in deltas)
        assert "".join(d.text for d in deltas) == call["function"]["arguments"]
        ends = [i for i, e in enumerate(stream) if isinstance(e, ToolCallEnd) and e.index == start.index]
        assert len(ends) == 1 and all(stream.index(d) < ends[0] for d in deltas)


def without_ids(message: dict) -> dict:
    calls = [{k: v for k, v in call.items() if k != "id"} for call in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def message_of(events: list[Event]) -> dict:
    return events[-1].message


# DeepSeek's reference parser on its own outputs.


@pytest.mark.parametrize("case", VECTORS, ids=[f"vector{i}" for i in range(len(VECTORS))])
def test_vector_whole(case):
    message = message_of(run(case["completion"], case["thinking_mode"] == "thinking"))
    assert without_ids(message) == case["expected"]
    ids = [call["id"] for call in message["tool_calls"]]
    assert all(CALL_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


def test_vectors_one_character_at_a_time():
    for case in VECTORS:
        events = run(case["completion"], case["thinking_mode"] == "thinking", pieces=[1])
        assert without_ids(message_of(events)) == case["expected"]


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(VECTORS), pieces=st.lists(st.integers(1, 12), min_size=1, max_size=30))
def test_vectors_in_random_pieces(case, pieces):
    events = run(case["completion"], case["thinking_mode"] == "thinking", pieces)
    assert without_ids(message_of(events)) == case["expected"]


# Any text, cut anywhere: the same message, and the event contract holds.

ATOMS = [
    "a", " ", "\n", "\n\n", "<", ">", '"', "&lt;", "é", "\\", "<think>", THINK_CLOSE, EOS, D,
    OPEN, CLOSE, f"<{D}invoke", f'<{D}invoke name="f">', f"</{D}invoke>", f"<{D}parameter",
    f'<{D}parameter name="k" string="true">', f'<{D}parameter name="n" string="false">',
    f"</{D}parameter>", ' name="k"', ' string="true">', '">',
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(st.one_of(st.sampled_from(ATOMS), st.text(max_size=4)), max_size=25),
    thinking=st.booleans(),
    pieces=st.lists(st.integers(1, 9), min_size=1, max_size=20),
)
def test_any_text_is_parsed_the_same_in_any_pieces(parts, thinking, pieces):
    text = "".join(parts)
    whole = message_of(run(text, thinking))
    assert without_ids(message_of(run(text, thinking, pieces))) == without_ids(whole)


@settings(max_examples=200, deadline=None)
@given(text=st.text(), pieces=st.lists(st.integers(1, 9), min_size=1, max_size=20))
def test_plain_text_is_content_verbatim(text, pieces):
    text = text.replace(D, "").replace(THINK_CLOSE, "").replace(EOS, "")
    message = message_of(run(text, thinking=False, pieces=pieces))
    assert message == {"role": "assistant", "content": text, "reasoning_content": "", "tool_calls": []}


@settings(max_examples=200, deadline=None)
@given(
    value=st.text().filter(lambda v: f"</{D}parameter" not in v and EOS not in v),
    pieces=st.lists(st.integers(1, 9), min_size=1, max_size=20),
)
def test_string_parameter_comes_back_exactly(value, pieces):
    text = f"{THINK_CLOSE}{OPEN}{invoke('f', ('v', 'true', value))}{CLOSE}{EOS}"
    (call,) = message_of(run(text, pieces=pieces))["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"v": value}


# The rules, one by one.


def test_arguments_follow_the_official_spelling():
    call = invoke("f", ("s", "true", 'a &lt; b\t"q"'), ("j", "false", '{"x":  [1,2]}'))
    text = OPEN + call + CLOSE
    (call,) = message_of(run(text, thinking=False))["tool_calls"]
    # Raw JSON values are inserted untouched; string values are not entity-unescaped.
    assert call["function"]["arguments"] == '{"s": "a &lt; b\\t\\"q\\"", "j": {"x":  [1,2]}}'


def test_content_is_not_trimmed():
    text = f"{THINK_CLOSE}  Sure.  {OPEN}{invoke('f')}{CLOSE}{EOS}"
    message = message_of(run(text))
    assert message["content"] == "  Sure.  " and message["tool_calls"][0]["function"]["arguments"] == "{}"


def test_dsml_inside_thinking_is_reasoning():
    thought = f"maybe:{OPEN}{invoke('f', ('a', 'true', '1'))}{CLOSE}"
    message = message_of(run(f"{thought}{THINK_CLOSE}No tool needed.{EOS}"))
    assert message["reasoning_content"] == thought
    assert message["content"] == "No tool needed." and message["tool_calls"] == []


def test_leading_think_tag_and_stray_think_close_are_dropped():
    message = message_of(run(f"<think>hmm{THINK_CLOSE}a{THINK_CLOSE}b"))
    assert (message["reasoning_content"], message["content"]) == ("hmm", "ab")
    assert message_of(run(f"{THINK_CLOSE}hello", thinking=False))["content"] == "hello"


def test_loose_block_is_accepted():
    text = (
        f'Sure<{D}tool_calls><{D}invoke  name="f"> <{D}parameter name="a">x y</{D}parameter>'
        f'\n\n<{D}parameter name="b" string="false">2</{D}parameter></{D}invoke>{CLOSE}\n'
    )
    message = message_of(run(text, thinking=False))
    assert message["content"] == "Sure" and "error" not in message
    assert message["tool_calls"][0]["function"]["arguments"] == '{"a": "x y", "b": 2}'


def test_several_calls_get_their_own_index_and_id():
    text = f"{THINK_CLOSE}{OPEN}{invoke('f', ('a', 'false', '1'))}{invoke('g')}{CLOSE}{EOS}"
    events = run(text, pieces=[3])
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "f"), (1, "g")]
    assert starts[0].id != starts[1].id


def test_generation_stops_at_eos():
    parser = OutputParser(thinking=False)
    assert parser.feed("Hi<｜end▁of") == [ContentDelta("Hi")]
    assert not parser.stopped
    assert parser.feed("▁sentence｜>ignored") == [] and parser.stopped
    assert parser.feed(f"more{OPEN}") == []
    assert parser.finish()[-1].message["content"] == "Hi"


def test_possible_tag_starts_are_held_back_until_known():
    parser = OutputParser(thinking=True)
    assert parser.feed("think</thi") == [ReasoningDelta("think")]
    assert parser.feed("nk>Hello\n\n<｜DS") == [ContentDelta("Hello")]
    assert parser.feed("ML") == []
    events = parser.feed("｜tool_calls>\n")
    assert not any(isinstance(e, ContentDelta) for e in events)
    parser = OutputParser(thinking=False)
    assert parser.feed("a\n\n<") == [ContentDelta("a")]
    assert parser.feed("b") == [ContentDelta("\n\n<b")]


def test_tool_call_is_streamed_as_it_is_generated():
    parser = OutputParser(thinking=False)
    parser.feed(f'{OPEN}<{D}invoke name="run">\n<{D}parameter name="cmd" string="true">ls -')
    events = parser.feed("la </")
    assert events == [ToolCallArgumentsDelta(0, "la ")]
    events = parser.feed(f"{D}parameter>\n</{D}invoke>\n")
    assert events == [ToolCallArgumentsDelta(0, '"'), ToolCallArgumentsDelta(0, "}"), ToolCallEnd(0)]


MALFORMED = {
    "unterminated": (f"{OPEN}{invoke('f', ('a', 'true', 'x'))}", "never closed"),
    "eos_inside": (f'{OPEN}<{D}invoke name="f">\n{EOS}tail', "never closed"),
    "junk_between_tags": (f"{OPEN}junk{invoke('f')}{CLOSE}", "expected"),
    "duplicate_parameter": (f"{OPEN}{invoke('f', ('a', 'true', '1'), ('a', 'true', '2'))}{CLOSE}", "twice"),
    "text_after_block": (f"{OPEN}{invoke('f')}{CLOSE}\nand then", "after"),
    "orphan_invoke": (f"\n\n{invoke('f')}", "outside a tool_calls block"),
    "bad_invoke_name": (f"{OPEN}<{D}invoke nam='f'>\n</{D}invoke>\n{CLOSE}", f"bad <{D}invoke"),
    "bad_parameter_type": (
        f'{OPEN}<{D}invoke name="f">\n<{D}parameter name="a" string="yes">1</{D}parameter>\n'
        f"</{D}invoke>{CLOSE}",
        f"bad <{D}parameter",
    ),
}


@pytest.mark.parametrize("block, error", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_block_is_flagged_and_kept_as_content(block, error):
    raw = block.split(EOS)[0]
    for pieces in (None, [1], [5]):
        events = run(f"why{THINK_CLOSE}Text.{block}", pieces=pieces)
        message = message_of(events)
        assert error in message["error"]
        assert message["content"] == "Text." + raw and message["reasoning_content"] == "why"
        assert message["tool_calls"] == []
        assert events[-2] == Malformed(message["error"], raw)


def test_whitespace_after_the_block_is_fine():
    message = message_of(run(f"{THINK_CLOSE}{OPEN}{invoke('f')}{CLOSE}\n \n{EOS}"))
    assert "error" not in message and len(message["tool_calls"]) == 1


def test_empty_block_has_no_calls():
    message = message_of(run(f"{THINK_CLOSE}Hi{OPEN}{CLOSE}{EOS}"))
    assert message == {"role": "assistant", "content": "Hi", "reasoning_content": "", "tool_calls": []}


def test_unclosed_thinking_is_flagged_and_kept_as_reasoning():
    events = run("still thinking <｜DSML｜ about it")
    message = message_of(events)
    assert message["reasoning_content"] == "still thinking <｜DSML｜ about it"
    assert message["content"] == "" and THINK_CLOSE in message["error"]
    assert events[-2] == Malformed(message["error"], "")


def test_empty_generation():
    assert message_of(run("", thinking=False)) == parse_completion(EOS, thinking=False)
    assert "error" not in parse_completion("", thinking=False)
    assert "error" in parse_completion("", thinking=True)


def test_parser_is_single_use():
    parser = OutputParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_events_as_dicts():
    assert ToolCallStart(0, "call_1", "f").as_dict() == {
        "type": "tool_call_start",
        "index": 0,
        "id": "call_1",
        "name": "f",
    }
    assert Done({"role": "assistant"}).as_dict() == {"type": "done", "message": {"role": "assistant"}}
