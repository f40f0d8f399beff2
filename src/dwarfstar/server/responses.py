"""OpenAI ``/v1/responses`` as Codex CLI uses it.

Output items come in the order the model writes them: ``reasoning`` (its text as one summary
part, which is what Codex shows), ``message`` (one ``output_text`` part) and one
``function_call`` per tool call. A stream carries the full lifecycle, every event with a
``sequence_number``: ``response.created``, ``response.in_progress``, for each item
``output_item.added``, its part and text (or arguments) deltas and ``done`` events,
``output_item.done``, and last ``response.completed``, ``response.incomplete`` (the answer hit
``max_output_tokens`` or the context) or ``response.failed``.

A response's conversation is kept in memory (the latest few hundred) unless ``store`` is false,
so a later request can continue it with ``previous_response_id``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dwarfstar.chat.conversation import Conversation
from dwarfstar.chat.request import from_responses
from dwarfstar.engine.events import (
    ContentDelta,
    Finished,
    Malformed,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
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
    now,
    sampling,
    sse,
    start,
)


def usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.reused_tokens},
        "output_tokens": usage.generated_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.generated_tokens,
    }


async def responses(service: Service, request: Request, body: dict[str, Any]) -> Any:
    model = check_model(service, body.get("model"))
    history = None
    previous = body.get("previous_response_id")
    if previous is not None:
        history = service.responses.get(previous)
        if history is None:
            raise ApiError(
                404,
                f"previous_response_id: response {previous!r} is not held by this server "
                "(it keeps the latest few hundred, in memory); send the whole input instead",
                param="previous_response_id",
            )
    with mapping_errors():
        conversation = from_responses(body, history)
    params = sampling(service, body, body.get("max_output_tokens"))
    run = await start(service, request, conversation, params, {"api": "responses", "request": body})
    response = _Response(service, body, conversation, new_id("resp_"), model)
    if not body.get("stream"):
        _, finished = await run.finish()
        return JSONResponse(response.complete(finished, _items(finished.message)))
    return StreamingResponse(response.stream(run), media_type="text/event-stream", headers=SSE_HEADERS)


def _items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The output items of a finished answer."""
    items = []
    if message.get("reasoning_content"):
        items.append(_reasoning_item(new_id("rs_"), message["reasoning_content"]))
    if message.get("content") or not message.get("tool_calls"):
        items.append(_message_item(new_id("msg_"), message.get("content") or "", "completed"))
    for call in message.get("tool_calls") or []:
        function = call["function"]
        items.append(
            _call_item(new_id("fc_"), call["id"], function["name"], function["arguments"], "completed")
        )
    return items


def _reasoning_item(item_id: str, text: str | None) -> dict[str, Any]:
    summary = [] if text is None else [{"type": "summary_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": summary}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = (
        [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class _Response:
    """One response object: its fields, its stream's events and sequence numbers."""

    def __init__(
        self, service: Service, body: dict[str, Any], conversation: Conversation, response_id: str, model: str
    ) -> None:
        self.service = service
        self.body = body
        self.conversation = conversation
        self.id = response_id
        self.model = model
        self.created_at = now()
        self.sequence = 0

    def object(
        self, status: str, output: list[dict[str, Any]], finished: Finished | None = None
    ) -> dict[str, Any]:
        body = self.body
        incomplete = finished is not None and finished.reason == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "store": body.get("store", True),
            "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p"),
            "truncation": "disabled",
            "usage": usage(finished.usage) if finished is not None else None,
            "metadata": body.get("metadata") or {},
        }

    def complete(self, finished: Finished, output: list[dict[str, Any]]) -> dict[str, Any]:
        if self.body.get("store", True) is not False:
            history = [m for m in self.conversation.messages if m["role"] != "system"]
            self.service.remember_response(self.id, [*history, finished.message])
        return self.object("incomplete" if finished.reason == "length" else "completed", output, finished)

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, kind)

    async def stream(self, run: Run) -> AsyncIterator[bytes]:
        yield self.event("response.created", response=self.object("in_progress", []))
        yield self.event("response.in_progress", response=self.object("in_progress", []))
        items = _StreamedItems(self)
        try:
            async for event in run.events():
                if event is KEEPALIVE:
                    yield KEEPALIVE_COMMENT
                    continue
                for out in items.feed(event):
                    yield out
                if isinstance(event, Finished):
                    for out in items.close():
                        yield out
                    response = self.complete(event, items.output)
                    kind = (
                        "response.incomplete" if response["status"] == "incomplete" else "response.completed"
                    )
                    yield self.event(kind, response=response)
        except ApiError as err:
            for out in items.close():
                yield out
            failed = self.object("failed", items.output)
            failed["error"] = {"code": "server_error", "message": err.message}
            yield self.event("response.failed", response=failed)


class _StreamedItems:
    """The output items of a stream as they grow: one open at a time."""

    def __init__(self, response: _Response) -> None:
        self.response = response
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.text = ""

    @property
    def index(self) -> int:
        return len(self.output) - 1

    def feed(self, event: Any) -> list[bytes]:
        out: list[bytes] = []
        ev = self.response.event
        if isinstance(event, ReasoningDelta):
            if self._opening("reasoning", out):
                item = _reasoning_item(new_id("rs_"), None)
                out += self._add(item)
                part = {"type": "summary_text", "text": ""}
                out.append(self._part_event("response.reasoning_summary_part.added", part))
            self.text += event.text
            out.append(
                ev(
                    "response.reasoning_summary_text.delta",
                    item_id=self.open["id"],
                    output_index=self.index,
                    summary_index=0,
                    delta=event.text,
                )
            )
        elif isinstance(event, ContentDelta | Malformed) and event.text:
            if self._opening("message", out):
                out += self._add(_message_item(new_id("msg_"), None, "in_progress"))
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                out.append(self._part_event("response.content_part.added", part))
            self.text += event.text
            out.append(
                ev(
                    "response.output_text.delta",
                    item_id=self.open["id"],
                    output_index=self.index,
                    content_index=0,
                    delta=event.text,
                    logprobs=[],
                )
            )
        elif isinstance(event, ToolCallStart):
            out += self.close()
            out += self._add(_call_item(new_id("fc_"), event.id, event.name, "", "in_progress"))
        elif isinstance(event, ToolCallArgumentsDelta) and self.open is not None:
            self.text += event.text
            out.append(
                ev(
                    "response.function_call_arguments.delta",
                    item_id=self.open["id"],
                    output_index=self.index,
                    delta=event.text,
                )
            )
        elif isinstance(event, ToolCallEnd):
            out += self.close()
        return out

    def _opening(self, kind: str, out: list[bytes]) -> bool:
        """True when an item of ``kind`` must be opened (closing another one first)."""
        if self.open is not None and self.open["type"] == kind:
            return False
        out += self.close()
        return True

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        self.output.append(item)
        self.open = item
        self.text = ""
        return [self.response.event("response.output_item.added", output_index=self.index, item=item)]

    def _part_event(self, kind: str, part: dict[str, Any]) -> bytes:
        index = "summary_index" if part["type"] == "summary_text" else "content_index"
        return self.response.event(
            kind, item_id=self.open["id"], output_index=self.index, **{index: 0}, part=part
        )

    def close(self) -> list[bytes]:
        """Finish the open item: its ``done`` events, then ``output_item.done``."""
        item = self.open
        if item is None:
            return []
        ev = self.response.event
        out = []
        where = {"item_id": item["id"], "output_index": self.index}
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": self.text}
            out.append(ev("response.reasoning_summary_text.done", **where, summary_index=0, text=self.text))
            out.append(ev("response.reasoning_summary_part.done", **where, summary_index=0, part=part))
            item["summary"] = [part]
        elif item["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            out.append(ev("response.output_text.done", **where, content_index=0, text=self.text, logprobs=[]))
            out.append(ev("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
            item["status"] = "completed"
        else:
            item["arguments"] = self.text
            item["status"] = "completed"
            out.append(
                ev("response.function_call_arguments.done", **where, name=item["name"], arguments=self.text)
            )
        out.append(ev("response.output_item.done", output_index=self.index, item=item))
        self.open = None
        self.text = ""
        return out
