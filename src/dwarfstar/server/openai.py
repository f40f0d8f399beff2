"""OpenAI ``/v1/chat/completions`` and ``/v1/completions``: bodies in, answers and chunks out.

Chat streams send a first chunk with the role, then ``reasoning_content`` and ``content``
deltas, each tool call as soon as its name is known (id, name, empty arguments) followed by
argument deltas, a last chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage`` asks, and ``data: [DONE]``.

Log-probabilities (chat ``logprobs``/``top_logprobs``, completions ``logprobs: N``) are the
engine's, one entry per sampled token whose text is shown: the content's tokens in chat, the
reasoning's and the content's in a raw completion. Each goes out with the first text that
follows its sampling (``Shown``), so a stream's chunk lists the tokens of its delta.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dwarfstar.chat.request import from_openai
from dwarfstar.engine.events import (
    ContentDelta,
    Finished,
    Malformed,
    ReasoningDelta,
    TokenLogprob,
    TokenSampled,
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


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """How many alternatives each token lists (None: no log-probabilities), as OpenAI checks it
    (the schema bounds ``top_logprobs`` to 0..20)."""
    top = body.get("top_logprobs")
    if top is not None and body.get("logprobs") is not True:
        raise ApiError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
    return (top or 0) if body.get("logprobs") else None


class Shown:
    """The sampled tokens a client is told about: those in one of ``parts`` (see
    ``TokenSampled.part``), each held until text is shown after it, so a token whose text never
    shows (cut by a stop string, the blank line before a tool call) is left out."""

    def __init__(self, parts: Iterable[str]) -> None:
        self.parts = frozenset(parts)
        self.held: list[TokenSampled] = []

    def see(self, event: Any, shown_text: str) -> list[TokenSampled]:
        """The tokens that go out with ``event``, which shows ``shown_text``."""
        if isinstance(event, TokenSampled):
            if event.part in self.parts:
                self.held.append(event)
            return []
        if not shown_text:
            return []
        tokens, self.held = self.held, []
        return tokens


def _chat_entry(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": entry.text, "logprob": entry.logprob, "bytes": list(entry.raw)}


def _chat_choice_logprobs(tokens: list[TokenSampled]) -> dict[str, Any]:
    content = [
        {**_chat_entry(token.logprob), "top_logprobs": [_chat_entry(top) for top in token.top_logprobs]}
        for token in tokens
        if token.logprob is not None
    ]
    return {"content": content, "refusal": None}


def _chat_shown_text(event: Any) -> str:
    return event.text if isinstance(event, ContentDelta | Malformed) else ""


async def chat_completions(service: Service, request: Request, body: dict[str, Any]) -> Any:
    model = check_model(service, body.get("model"))
    _unsupported(body)
    with mapping_errors():
        conversation = from_openai(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    logprobs = _chat_logprobs(body)
    params = sampling(service, body, max_tokens, body.get("stop"), logprobs)
    trace = {"api": "chat.completions", "request": body}
    run = await start(service, request, conversation, params, trace)
    response_id = new_id("chatcmpl-")
    if not body.get("stream"):
        events, finished = await run.finish(tokens=logprobs is not None)
        choice_logprobs = None
        if logprobs is not None:
            shown = Shown(["content"])
            choice_logprobs = _chat_choice_logprobs(
                [token for event in events for token in shown.see(event, _chat_shown_text(event))]
            )
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
                        "logprobs": choice_logprobs,
                    }
                ],
                "usage": usage(finished.usage),
            }
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = _chat_chunks(run, response_id, model, include_usage, logprobs is not None)
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


async def _chat_chunks(
    run: Run, response_id: str, model: str, include_usage: bool, logprobs: bool
) -> AsyncIterator[bytes]:
    created = now()
    shown = Shown(["content"])

    def chunk(
        delta: dict[str, Any], finish_reason: str | None = None, tokens: list[TokenSampled] | None = None
    ) -> bytes:
        choice_logprobs = None if tokens is None else _chat_choice_logprobs(tokens)
        choice = {"index": 0, "delta": delta, "logprobs": choice_logprobs, "finish_reason": finish_reason}
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
        async for event in run.events(tokens=logprobs):
            tokens = shown.see(event, _chat_shown_text(event))
            if event is KEEPALIVE:
                yield KEEPALIVE_COMMENT
            elif isinstance(event, ReasoningDelta):
                yield chunk({"reasoning_content": event.text})
            elif isinstance(event, ContentDelta | Malformed) and event.text:
                yield chunk({"content": event.text}, tokens=tokens if logprobs else None)
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
    logprobs = body.get("logprobs")  # 0..20 (the schema); OpenAI allows 5 at most
    params = sampling(service, body, body.get("max_tokens", 16), body.get("stop"), logprobs)
    run = await start(service, request, prompt, params, {"api": "completions", "request": body})
    response_id = new_id("cmpl-")
    if not body.get("stream"):
        events, finished = await run.finish(tokens=logprobs is not None)
        choice_logprobs = None
        if logprobs is not None:
            shown = Shown(["reasoning", "content"])
            choice_logprobs = TextLogprobs().add(
                [token for event in events for token in shown.see(event, _text_of(event))]
            )
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
                        "logprobs": choice_logprobs,
                    }
                ],
                "usage": usage(finished.usage),
            }
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return StreamingResponse(
        _completion_chunks(run, response_id, model, include_usage, logprobs is not None),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


class TextLogprobs:
    """A completion's ``logprobs`` object, built up chunk by chunk: ``text_offset`` counts the
    characters of the tokens reported before (in the whole answer, across chunks)."""

    def __init__(self) -> None:
        self.offset = 0

    def add(self, tokens: list[TokenSampled]) -> dict[str, Any]:
        tokens = [token for token in tokens if token.logprob is not None]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token.text)
        return {
            "tokens": [token.logprob.text for token in tokens],
            "token_logprobs": [token.logprob.logprob for token in tokens],
            "top_logprobs": [{top.text: top.logprob for top in token.top_logprobs} for token in tokens],
            "text_offset": offsets,
        }


def _text_of(event: Any) -> str:
    """The visible text an event adds to a raw completion (reasoning is text there too)."""
    if isinstance(event, ReasoningDelta | ContentDelta | Malformed):
        return event.text
    return ""


async def _completion_chunks(
    run: Run, response_id: str, model: str, include_usage: bool, logprobs: bool
) -> AsyncIterator[bytes]:
    created = now()
    shown, text_logprobs = Shown(["reasoning", "content"]), TextLogprobs()

    def chunk(
        text: str, finish_reason: str | None = None, tokens: list[TokenSampled] | None = None, **extra: Any
    ) -> bytes:
        choice_logprobs = text_logprobs.add(tokens) if logprobs and tokens is not None else None
        choices = [{"index": 0, "text": text, "logprobs": choice_logprobs, "finish_reason": finish_reason}]
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
        async for event in run.events(tokens=logprobs):
            tokens = shown.see(event, _text_of(event))
            if event is KEEPALIVE:
                yield KEEPALIVE_COMMENT
            elif text := _text_of(event):
                yield chunk(text, tokens=tokens)
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
