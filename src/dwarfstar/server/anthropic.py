"""Anthropic ``/v1/messages`` (as Claude Code uses it) and ``/v1/messages/count_tokens``.

A stream is ``message_start``, ``ping``, then content blocks in the order the model writes
them (``thinking`` with a closing ``signature_delta``, ``text``, ``tool_use`` with
``input_json_delta`` pieces), each opened by ``content_block_start`` and closed by
``content_block_stop``, then ``message_delta`` (stop reason, output tokens) and
``message_stop``. Tool ids are the engine's with the ``toolu_`` prefix.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dwarfstar.chat.request import from_anthropic
from dwarfstar.engine.events import (
    ContentDelta,
    Finished,
    Malformed,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallStart,
    Usage,
)
from dwarfstar.server.common import (
    KEEPALIVE,
    KEEPALIVE_COMMENT,
    SSE_HEADERS,
    ApiError,
    Run,
    Service,
    check_model,
    mapping_errors,
    new_id,
    sampling,
    sse,
    start,
    stop_sequence,
)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "cancelled": "end_turn"}


def tool_id(call_id: str) -> str:
    """The engine's ``call_…`` id in Anthropic's ``toolu_…`` form."""
    return "toolu_" + call_id.removeprefix("call_")


def usage(usage: Usage, output_tokens: int | None = None) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens - usage.reused_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.reused_tokens,
        "output_tokens": usage.generated_tokens if output_tokens is None else output_tokens,
    }


def _conversation(body: dict[str, Any]) -> Any:
    with mapping_errors():
        return from_anthropic(body)


async def count_tokens(service: Service, body: dict[str, Any]) -> Any:
    """The prompt's size as the engine would tokenize it (no session is touched)."""
    check_model(service, body.get("model"))
    prompt = service.engine.prompt(_conversation(body))
    tokens = await asyncio.to_thread(prompt.all_tokens)  # a long prompt must not hold up the event loop
    return JSONResponse({"input_tokens": len(tokens)})


async def messages(service: Service, request: Request, body: dict[str, Any]) -> Any:
    model = check_model(service, body.get("model"))
    conversation = _conversation(body)
    stops = body.get("stop_sequences")
    params = sampling(service, body, body.get("max_tokens"), stops)
    run = await start(service, request, conversation, params, {"api": "messages", "request": body})
    message_id = new_id("msg_")
    if not body.get("stream"):
        _, finished = await run.finish()
        return JSONResponse(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": _content(finished.message, message_id),
                "stop_reason": STOP_REASONS[finished.reason]
                if stop_sequence(finished, stops) is None
                else "stop_sequence",
                "stop_sequence": stop_sequence(finished, stops),
                "usage": usage(finished.usage),
            }
        )
    return StreamingResponse(
        _events(run, message_id, model, stops), media_type="text/event-stream", headers=SSE_HEADERS
    )


def _content(message: dict[str, Any], signature: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": signature})
    if message.get("content") or not message.get("tool_calls"):
        blocks.append({"type": "text", "text": message.get("content") or ""})
    for call in message.get("tool_calls") or []:
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_id(call["id"]),
                "name": call["function"]["name"],
                "input": _arguments(call["function"]["arguments"]),
            }
        )
    return blocks


def _arguments(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


async def _events(run: Run, message_id: str, model: str, stops: list[str] | None) -> AsyncIterator[bytes]:
    generation = run.generation
    assert generation is not None
    start_usage = {
        "input_tokens": generation.prompt_tokens - generation.reused_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": generation.reused_tokens,
        "output_tokens": 0,
    }
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    yield sse({"type": "message_start", "message": message}, "message_start")
    yield sse({"type": "ping"}, "ping")
    blocks = _Blocks(message_id)
    try:
        async for event in run.events():
            if event is KEEPALIVE:
                yield KEEPALIVE_COMMENT
            elif isinstance(event, ReasoningDelta):
                for out in blocks.open("thinking"):
                    yield out
                yield blocks.delta({"type": "thinking_delta", "thinking": event.text})
            elif isinstance(event, ContentDelta | Malformed) and event.text:
                for out in blocks.open("text"):
                    yield out
                yield blocks.delta({"type": "text_delta", "text": event.text})
            elif isinstance(event, ToolCallStart):
                for out in blocks.open("tool_use", tool_id(event.id), event.name):
                    yield out
            elif isinstance(event, ToolCallArgumentsDelta):
                yield blocks.delta({"type": "input_json_delta", "partial_json": event.text})
            elif isinstance(event, Finished):
                if not blocks.seen_text_or_tool:
                    for out in blocks.open("text"):
                        yield out
                for out in blocks.close():
                    yield out
                stop = stop_sequence(event, stops)
                reason = "stop_sequence" if stop is not None else STOP_REASONS[event.reason]
                yield sse(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": stop},
                        "usage": usage(event.usage),
                    },
                    "message_delta",
                )
                yield sse({"type": "message_stop"}, "message_stop")
    except ApiError as err:
        yield sse({"type": "error", "error": {"type": "api_error", "message": err.message}}, "error")


class _Blocks:
    """The open content block of a stream, and the SSE events that open and close blocks."""

    def __init__(self, signature: str) -> None:
        self.signature = signature
        self.index = -1
        self.kind: str | None = None
        self.seen_text_or_tool = False

    def open(self, kind: str, call_id: str = "", name: str = "") -> list[bytes]:
        if self.kind == kind and kind != "tool_use":
            return []
        out = self.close()
        self.index += 1
        self.kind = kind
        self.seen_text_or_tool |= kind != "thinking"
        block: dict[str, Any] = {
            "thinking": {"type": "thinking", "thinking": "", "signature": ""},
            "text": {"type": "text", "text": ""},
            "tool_use": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
        }[kind]
        out.append(
            sse(
                {"type": "content_block_start", "index": self.index, "content_block": block},
                "content_block_start",
            )
        )
        return out

    def delta(self, delta: dict[str, Any]) -> bytes:
        return sse(
            {"type": "content_block_delta", "index": self.index, "delta": delta}, "content_block_delta"
        )

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        out = []
        if self.kind == "thinking":
            out.append(self.delta({"type": "signature_delta", "signature": self.signature}))
        out.append(sse({"type": "content_block_stop", "index": self.index}, "content_block_stop"))
        self.kind = None
        return out
