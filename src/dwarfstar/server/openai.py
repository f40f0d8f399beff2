"""OpenAI ``/v1/chat/completions`` and ``/v1/completions``: bodies in, answers and chunks out.

Chat streams send a first chunk with the role, then ``reasoning_content`` and ``content``
deltas, each tool call as soon as its name is known (id, name, empty arguments) followed by
argument deltas, a last chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage`` asks, and ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dwarfstar.chat.request import from_openai
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
    now,
    sampling,
    sse,
    start,
)

FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}


def usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.generated_tokens,
        "total_tokens": usage.prompt_tokens + usage.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.reused_tokens},
    }


def _unsupported(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n: only one choice per request is supported", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs: log probabilities are not supported by this server", param="logprobs")


async def chat_completions(service: Service, request: Request, body: dict[str, Any]) -> Any:
    model = check_model(service, body.get("model"))
    _unsupported(body)
    with mapping_errors():
        conversation = from_openai(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = sampling(service, body, max_tokens, body.get("stop"))
    trace = {"api": "chat.completions", "request": body}
    run = await start(service, request, conversation, params, trace)
    response_id = new_id("chatcmpl-")
    if not body.get("stream"):
        _, finished = await run.finish()
        message = {"role": "assistant", "content": finished.message["content"]}
        if finished.message.get("reasoning_content"):
            message["reasoning_content"] = finished.message["reasoning_content"]
        if finished.message.get("tool_calls"):
            message["tool_calls"] = finished.message["tool_calls"]
        return JSONResponse(
            {
                "id": response_id,
                "object": "chat.completion",
                "created": now(),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": FINISH_REASONS[finished.reason],
                        "logprobs": None,
                    }
                ],
                "usage": usage(finished.usage),
            }
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = _chat_chunks(run, response_id, model, include_usage)
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


async def _chat_chunks(run: Run, response_id: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    created = now()

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse(
            {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
        )

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in run.events():
            if event is KEEPALIVE:
                yield KEEPALIVE_COMMENT
            elif isinstance(event, ReasoningDelta):
                yield chunk({"reasoning_content": event.text})
            elif isinstance(event, ContentDelta | Malformed) and event.text:
                yield chunk({"content": event.text})
            elif isinstance(event, ToolCallStart):
                call = {"index": event.index, "id": event.id, "type": "function"}
                yield chunk({"tool_calls": [{**call, "function": {"name": event.name, "arguments": ""}}]})
            elif isinstance(event, ToolCallArgumentsDelta):
                yield chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
            elif isinstance(event, Finished):
                yield chunk({}, FINISH_REASONS[event.reason])
                if include_usage:
                    yield sse(
                        {
                            "id": response_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage(event.usage),
                        }
                    )
    except ApiError as err:
        yield sse({"error": {"message": err.message, "type": "server_error", "param": None, "code": None}})
    yield b"data: [DONE]\n\n"


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(type(token) is int for token in prompt):
        return prompt
    raise ApiError(
        400, "prompt must be a string or an array of token ids (one prompt per request)", param="prompt"
    )


async def completions(service: Service, request: Request, body: dict[str, Any]) -> Any:
    """A raw prompt, tokenized as written (special tokens included), answered as text."""
    model = check_model(service, body.get("model"))
    _unsupported(body)
    if body.get("echo"):
        raise ApiError(400, "echo: echoing the prompt is not supported", param="echo")
    if body.get("suffix"):
        raise ApiError(400, "suffix: fill-in-the-middle is not supported", param="suffix")
    prompt = _prompt(body)
    params = sampling(service, body, body.get("max_tokens", 16), body.get("stop"))
    run = await start(service, request, prompt, params, {"api": "completions", "request": body})
    response_id = new_id("cmpl-")
    if not body.get("stream"):
        events, finished = await run.finish()
        return JSONResponse(
            {
                "id": response_id,
                "object": "text_completion",
                "created": now(),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(_text_of(event) for event in events),
                        "finish_reason": FINISH_REASONS[finished.reason],
                        "logprobs": None,
                    }
                ],
                "usage": usage(finished.usage),
            }
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(
        _completion_chunks(run, response_id, model, include_usage),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


def _text_of(event: Any) -> str:
    """The visible text an event adds to a raw completion (reasoning is text there too)."""
    if isinstance(event, ReasoningDelta | ContentDelta | Malformed):
        return event.text
    return ""


async def _completion_chunks(
    run: Run, response_id: str, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    created = now()

    def chunk(text: str, finish_reason: str | None = None, **extra: Any) -> bytes:
        choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        return sse(
            {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
        )

    try:
        async for event in run.events():
            if event is KEEPALIVE:
                yield KEEPALIVE_COMMENT
            elif text := _text_of(event):
                yield chunk(text)
            elif isinstance(event, Finished):
                yield chunk("", FINISH_REASONS[event.reason])
                if include_usage:
                    yield sse(
                        {
                            "id": response_id,
                            "object": "text_completion",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage(event.usage),
                        }
                    )
    except ApiError as err:
        yield sse({"error": {"message": err.message, "type": "server_error", "param": None, "code": None}})
    yield b"data: [DONE]\n\n"
