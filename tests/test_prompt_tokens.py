"""Prompts to token ids: special tokens come from the template's markup only, never from a request.

``render_parts`` marks which text is the template's and which came from the request;
``Tokenizer.encode_parts`` must give the ids of the whole prompt when the request holds no
special strings, and keep every special string in the request's text as plain text.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from chat_data import OFFICIAL_CASES, RENDER_VECTORS, official_case

from dwarfstar.chat.render import render_message_parts, render_parts
from dwarfstar.chat.request import from_anthropic, from_openai, parse_request
from dwarfstar.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
VECTORS = RENDER_VECTORS
CLIENTS = [
    entry
    for entry in json.loads((DATA / "clients/index.json").read_text(encoding="utf-8"))
    if entry["path"] != "/v1/responses"  # not a request shape DwarfStar reads yet
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def joined(parts: list[tuple[str, bool]]) -> str:
    return "".join(text for text, _ in parts)


def added_ids_outside_markup(tokenizer: Tokenizer, parts: list[tuple[str, bool]], ids: list[int]) -> list:
    """The added-token ids whose bytes lie (even partly) outside the markup parts.

    Walks the token bytes along the prompt's bytes, so it also checks that the ids spell the
    prompt exactly.
    """
    markup = set()
    offset = 0
    for text, is_markup in parts:
        size = len(text.encode())
        if is_markup:
            markup.update(range(offset, offset + size))
        offset += size
    added = set(tokenizer.special_ids.values())
    spelled = b""
    outside = []
    for token_id in ids:
        piece = tokenizer.token_bytes(token_id)
        span = range(len(spelled), len(spelled) + len(piece))
        if token_id in added and not set(span) <= markup:
            outside.append((token_id, span.start))
        spelled += piece
    assert spelled == joined(parts).encode(), "the ids do not spell the prompt"
    return outside


@pytest.mark.parametrize("vector", VECTORS, ids=[f"vector{i}" for i in range(len(VECTORS))])
def test_parts_are_the_prompt_and_tokenize_like_the_whole_text(tokenizer, vector):
    parts = render_message_parts(
        vector["messages"],
        thinking_mode=vector["thinking_mode"],
        reasoning_effort=vector["reasoning_effort"],
        drop_thinking=vector["drop_thinking"],
    )
    assert joined(parts) == vector["expected"]
    ids = tokenizer.encode_parts(parts)
    if any(token in text for text, is_markup in parts if not is_markup for token in tokenizer.special_ids):
        # A few vectors put special strings in messages on purpose: those stay text.
        assert added_ids_outside_markup(tokenizer, parts, ids) == []
        assert ids != tokenizer.encode(vector["expected"])
    else:
        assert ids == tokenizer.encode(vector["expected"])
    assert all(text for text, _ in parts)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(parts))  # adjacent parts of one kind merge


@pytest.mark.parametrize("case, thinking_mode", OFFICIAL_CASES)
def test_official_cases_tokenize_like_the_whole_text(tokenizer, case, thinking_mode):
    messages, expected = official_case(case)
    parts = render_message_parts(messages, thinking_mode=thinking_mode)
    assert joined(parts) == expected
    assert tokenizer.encode_parts(parts) == tokenizer.encode(expected)


# Every field of a conversation that carries request text into the prompt.
FIELDS = (
    "system",
    "tool.name",
    "tool.description",
    "tool.parameter",
    "tool.parameter_description",
    "response_format",
    "developer",
    "user",
    "assistant",
    "reasoning",
    "call.name",
    "call.key",
    "call.string",
    "call.value",
    "call.raw",
    "tool_result",
    "tool_result.block",
    "tool_result.block_type",
    "latest_reminder",
)


def conversation_with(field: str, payload: str) -> list[dict]:
    """A conversation using every role and field, ``payload`` in ``field`` and plain words elsewhere."""

    def value(name: str) -> str:
        return payload if name == field else f"plain {name}"

    tool = {
        "type": "function",
        "function": {
            "name": value("tool.name"),
            "description": value("tool.description"),
            "parameters": {
                "type": "object",
                "properties": {
                    value("tool.parameter"): {
                        "type": "string",
                        "description": value("tool.parameter_description"),
                    }
                },
            },
        },
    }
    arguments = json.dumps({value("call.key"): value("call.string"), "n": [value("call.value")]})
    return [
        {
            "role": "system",
            "content": value("system"),
            "tools": [tool],
            "response_format": {"type": "json_schema", "json_schema": {"name": value("response_format")}},
        },
        {"role": "developer", "content": value("developer")},
        {"role": "user", "content": value("user")},
        {
            "role": "assistant",
            "content": value("assistant"),
            "reasoning_content": value("reasoning"),
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": value("call.name"), "arguments": arguments},
                },
                {"id": "c2", "type": "function", "function": {"name": "f", "arguments": value("call.raw")}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": value("tool_result")},
        {
            "role": "tool",
            "tool_call_id": "c2",
            "content": [
                {"type": "text", "text": value("tool_result.block")},
                {"type": value("tool_result.block_type")},
            ],
        },
        {"role": "latest_reminder", "content": value("latest_reminder")},
        {"role": "user", "content": "go on"},
    ]


@pytest.fixture(scope="module")
def payload(tokenizer) -> str:
    """Every added token of the vocabulary (control and user-defined), a letter apart."""
    return "x" + "x".join(tokenizer.special_ids) + "x"


@pytest.mark.parametrize("field", FIELDS)
def test_no_special_string_in_request_text_becomes_a_control_token(tokenizer, payload, field):
    parts = render_message_parts(conversation_with(field, payload), thinking_mode="thinking")
    benign = render_message_parts(conversation_with(field, f"plain {field}"), thinking_mode="thinking")
    assert payload in joined(parts) and not any(payload in text for text, is_markup in parts if is_markup)

    ids = tokenizer.encode_parts(parts)
    assert added_ids_outside_markup(tokenizer, parts, ids) == []
    added = set(tokenizer.special_ids.values())
    # The template's own tokens are all still there: the same control ids as without the payload.
    assert [i for i in ids if i in added] == [i for i in tokenizer.encode_parts(benign) if i in added]
    # The whole-text tokenization is what this guards against: it turns the payload into control ids.
    whole = tokenizer.encode(joined(parts))
    assert len(added_ids_outside_markup(tokenizer, parts, whole)) == len(tokenizer.special_ids)


@pytest.mark.parametrize("entry", CLIENTS, ids=[entry["fixture"] for entry in CLIENTS])
def test_recorded_client_requests_carry_no_control_token_in_their_text(tokenizer, entry):
    body = parse_request((DATA / "clients" / entry["fixture"]).read_bytes())
    conversation = from_anthropic(body) if entry["path"] == "/v1/messages" else from_openai(body)
    parts = render_parts(conversation)
    ids = tokenizer.encode_parts(parts)
    assert added_ids_outside_markup(tokenizer, parts, ids) == []
    # Some markup was recognised: the prompt opens with BOS and ends opening the answer.
    assert ids[0] == tokenizer.bos_id and ids[-2:] == tokenizer.encode("<｜Assistant｜><think>")
