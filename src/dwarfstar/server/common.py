"""What every endpoint shares: errors, the service state, running a job, SSE framing, sampling.

An endpoint maps its body to an engine prompt and sampling, ``start``s a job (which waits in
the worker's queue, then plans the generation: a context overflow is raised here, before any
response is sent), and then either ``collect``s the finished answer or streams ``events``,
which interleaves keep-alive markers while nothing new arrives (a long prefill, a queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from dwarfstar.chat.conversation import Conversation
from dwarfstar.chat.request import RequestError
from dwarfstar.engine import ContextLengthError, Engine, EngineError, Generation, SamplingParams
from dwarfstar.engine.events import Event, Finished, PrefillProgress, TokenSampled
from dwarfstar.engine.sampling import Sampler, ScriptedSampler
from dwarfstar.server.worker import END, Failed, Job, Started, Worker

MODEL_ID = "deepseek-v4-flash"
# Names that also select the model; the aliases pick thinking off or on (see chat/request.py).
MODEL_ALIASES = ("deepseek-chat", "deepseek-reasoner")
CREATED = 1767225600  # the model list's "created" (the release date of V4)
SCRIPT_HEADER = "x-ds4-script"
KEEPALIVE = object()  # what ``events`` yields when nothing arrived for a while


class ApiError(Exception):
    """An error answered in the endpoint's own API shape (see ``app.error_body``)."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.extra = extra


@dataclass
class Service:
    """What the endpoints need: the engine (read only: its tokenizer and context), the worker
    that owns it, and the server's settings."""

    engine: Engine
    worker: Worker
    max_tokens: int | None = None  # the cap on one answer, None: the context
    keepalive_seconds: float = 5.0
    allow_scripted_output: bool = False
    responses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # id -> conversation
    max_stored_responses: int = 256
    aliases: tuple[str, ...] = ()  # more names the model answers to (ds4 serve --alias)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (MODEL_ID, *MODEL_ALIASES, *self.aliases)

    def remember_response(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        """Keep a response's conversation for ``previous_response_id``, the oldest dropped first."""
        self.responses[response_id] = messages
        while len(self.responses) > self.max_stored_responses:
            self.responses.pop(next(iter(self.responses)))


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def check_model(service: Service, model: Any) -> str:
    """The model name to echo back; an unknown one is a 404."""
    if model is None:
        return MODEL_ID
    if model not in service.model_names:
        raise ApiError(
            404,
            f"model {model!r} does not exist; this server runs {MODEL_ID!r} "
            f"(also answers to {', '.join(service.model_names[1:])}; ds4 serve --alias NAME adds names)",
            code="model_not_found",
            param="model",
        )
    return model


def sampling(
    service: Service,
    body: dict[str, Any],
    max_tokens: int | None,
    stop: Any = None,
    logprobs: int | None = None,
) -> SamplingParams:
    """The engine's sampling for a body's common fields; the server's cap bounds ``max_tokens``.

    ``logprobs``: how many alternatives each token's log-probabilities list (None: none)."""
    if isinstance(stop, str):
        stop = [stop]
    cap = service.max_tokens
    if cap is not None:
        max_tokens = cap if max_tokens is None else min(max_tokens, cap)
    defaults = SamplingParams()
    values = {
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "min_p": body.get("min_p"),
        "seed": body.get("seed"),
    }
    try:
        return SamplingParams(
            **{key: getattr(defaults, key) if value is None else value for key, value in values.items()},
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
            logprobs=logprobs,
        )
    except ValueError as err:
        raise ApiError(400, str(err)) from None


def sampler(service: Service, request: Request, params: SamplingParams) -> Sampler | None:
    """A scripted sampler when the server allows it and the request carries a script (tests)."""
    script = request.headers.get(SCRIPT_HEADER)
    if script is None or not service.allow_scripted_output:
        return None
    try:
        text = json.loads(script)
    except ValueError:
        text = None
    if not isinstance(text, str):
        raise ApiError(400, f"{SCRIPT_HEADER} must be a JSON string")
    tokenizer = service.engine.tokenizer
    return ScriptedSampler(tokenizer.encode(text), tokenizer.eos_id, params)


async def start(
    service: Service,
    request: Request,
    prompt: Conversation | str | list[int],
    params: SamplingParams,
    trace: dict[str, Any],
) -> Run:
    """Queue the answer to ``prompt`` and wait until the worker has planned it.

    Raises ``ApiError`` when the prompt does not fit the context (400,
    ``context_length_exceeded``) or is empty. The client going away cancels the job.
    """
    chosen = sampler(service, request, params)

    def plan(engine: Engine) -> Generation:
        return engine.generate(prompt, params, sampler=chosen)

    job = Job(plan, asyncio.get_running_loop(), trace)
    run = Run(job, service.keepalive_seconds, asyncio.create_task(_cancel_on_disconnect(request, job)))
    service.worker.submit(job)
    try:
        first = await run.next()
        while first is KEEPALIVE:
            first = await run.next()
    except BaseException:
        run.close()
        raise
    if isinstance(first, Started):
        run.generation = first.generation
        return run
    run.ended = first is END
    run.close()
    if isinstance(first, Failed):
        raise _failure(first.error)
    raise ApiError(499, "the client closed the request")  # END before Started: cancelled in the queue


def _failure(error: Exception) -> ApiError:
    if isinstance(error, ContextLengthError):
        return ApiError(
            400,
            f"this request is {error.prompt_tokens} tokens but the context holds {error.ctx} "
            "(leave at least one token for the answer, or start the server with a larger --ctx)",
            code="context_length_exceeded",
            n_prompt_tokens=error.prompt_tokens,
            n_ctx=error.ctx,
        )
    if isinstance(error, EngineError):
        return ApiError(400, str(error))
    return ApiError(500, f"generation failed: {type(error).__name__}")


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away (its body is read already), then cancel its job."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


@dataclass(eq=False)
class Run:
    """A started job as its endpoint sees it."""

    job: Job
    keepalive_seconds: float
    watcher: asyncio.Task
    generation: Generation | None = None
    ended: bool = False

    async def next(self, timeout: float | None = None) -> Any:
        """The next queue item, or ``KEEPALIVE`` after ``timeout`` (``keepalive_seconds``) of silence."""
        try:
            return await asyncio.wait_for(
                self.job.items.get(), self.keepalive_seconds if timeout is None else timeout
            )
        except TimeoutError:
            return KEEPALIVE

    async def events(self, tokens: bool = False) -> AsyncIterator[Any]:
        """The events a client sees, with ``KEEPALIVE`` markers after ``keepalive_seconds`` in
        which none came (prefill progress and raw tokens are not shown, so they do not count).
        ``tokens``: pass the ``TokenSampled`` events on too (for their log-probabilities).
        A failure mid-run is raised as ``ApiError``."""
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        try:
            while True:
                left = quiet_since + self.keepalive_seconds - loop.time()
                item = await self.next(max(left, 0.0))
                if item is END:
                    break
                if isinstance(item, Failed):
                    raise _failure(item.error)
                if item is not KEEPALIVE and not isinstance(item, PrefillProgress | TokenSampled):
                    quiet_since = loop.time()
                    yield item
                    continue
                if tokens and isinstance(item, TokenSampled):
                    yield item
                if loop.time() - quiet_since >= self.keepalive_seconds:
                    quiet_since = loop.time()
                    yield KEEPALIVE
            self.ended = True
        finally:
            self.close()

    async def finish(self, tokens: bool = False) -> tuple[list[Event], Finished]:
        """Run to the end (non-streaming): every event (``tokens``: sampled tokens too), and the last one."""
        events = [event async for event in self.events(tokens) if event is not KEEPALIVE]
        finished = events[-1] if events else None
        if not isinstance(finished, Finished):
            raise ApiError(500, "generation ended without an answer")
        return events, finished

    def close(self) -> None:
        """Stop watching the client, and stop the job if it still runs (the stream was dropped)."""
        self.watcher.cancel()
        if not self.ended:
            self.job.cancel()


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: an optional ``event:`` line and one ``data:`` line of JSON."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


KEEPALIVE_COMMENT = b": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffers a stream


def stop_sequence(finished: Finished, stops: list[str] | None) -> str | None:
    """Which stop string ended the answer, if one did (the engine reports only ``stop``)."""
    if finished.reason != "stop" or not stops:
        return None
    hits = [(finished.text.find(stop), stop) for stop in stops if stop and stop in finished.text]
    return min(hits)[1] if hits else None


@contextlib.contextmanager
def mapping_errors() -> Any:
    """Turn a mapper's ``RequestError`` (a field at fault) into a 400 ``ApiError``."""
    try:
        yield
    except (RequestError, ValueError) as err:
        raise ApiError(400, str(err)) from None
