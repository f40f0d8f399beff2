"""The FastAPI application: routes, the API key, the body limit, CORS and errors in each API's shape.

The path decides the API (``/v1/messages…`` is Anthropic, everything else OpenAI): bodies are
never guessed from their fields, and so are errors. The server holds no model logic: each
endpoint maps its body to a ``Conversation`` (``dwarfstar.chat.request``) and engine events to
the wire; the worker thread (``worker.py``) owns the engine.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dwarfstar.server import anthropic, openai, responses
from dwarfstar.server.common import CREATED, MODEL_ID, ApiError, Service
from dwarfstar.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    MessagesRequest,
    ResponsesRequest,
)

OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    499: "invalid_request_error",
    500: "server_error",
}
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    499: "invalid_request_error",
    500: "api_error",
}
PUBLIC_PATHS = ("/health",)


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(path: str, error: ApiError) -> dict[str, Any]:
    """An error as the API of ``path`` writes one."""
    if is_anthropic(path):
        detail = {"type": ANTHROPIC_ERROR_TYPES.get(error.status, "api_error"), "message": error.message}
        return {"type": "error", "error": {**detail, **error.extra}}
    detail = {
        "message": error.message,
        "type": OPENAI_ERROR_TYPES.get(error.status, "server_error"),
        "param": error.param,
        "code": error.code,
    }
    return {"error": {**detail, **error.extra}}


def error_response(path: str, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status)


def _validation_message(error: dict[str, Any]) -> tuple[str, str]:
    """The field a pydantic error is about (``messages[0].content``) and what is wrong."""
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif any(c in part for c in "[]-") or part[:1].isupper() or part in ("str", "int", "float", "bool"):
            break  # a union member's tag, not a field
        else:
            path += f".{part}" if path else part
    return path, error["msg"]


async def _checked_body(request: Request, model: type[BaseModel]) -> dict[str, Any]:
    """The body as JSON (whatever the content type says), its fields' types checked by ``model``."""
    try:
        data = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        model.model_validate(data)
    except ValidationError as err:
        field, problem = _validation_message(err.errors()[0])
        raise ApiError(400, f"{field}: {problem}" if field else problem, param=field or None) from None
    return data


def create_app(
    service: Service, api_key: str | None = None, cors: list[str] | None = None, max_body_mb: float = 64
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.worker.close()
        service.engine.close()  # the worker has stopped: the live sessions go to the disk cache

    app = FastAPI(
        title="DwarfStar",
        summary="DeepSeek V4 Flash behind the OpenAI and Anthropic APIs",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request.url.path, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no endpoint {request.method} {request.url.path}"}.get(
            error.status_code, str(error.detail)
        )
        response = error_response(request.url.path, ApiError(error.status_code, message))
        if error.headers:
            response.headers.update(error.headers)
        return response

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> JSONResponse:
        return error_response(request.url.path, ApiError(500, f"internal error: {type(error).__name__}"))

    def model_card() -> dict[str, Any]:
        ctx = service.engine.ctx
        return {
            "id": MODEL_ID,
            "object": "model",
            "created": CREATED,
            "owned_by": "dwarfstar",
            "context_length": ctx,
            "max_model_len": ctx,
            "aliases": list(service.model_names[1:]),
        }

    @app.get("/v1/models", summary="The model this server runs")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", summary="One model")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in service.model_names:
            raise ApiError(
                404,
                f"model {model_id!r} does not exist; this server runs {MODEL_ID!r}",
                code="model_not_found",
            )
        return model_card()

    @app.get("/health", summary="200 once the model is loaded")
    async def health() -> dict[str, Any]:
        worker = service.worker
        return {"status": "ok", "model": MODEL_ID, "busy": worker.busy, "queued": worker.queue_length}

    registry = CollectorRegistry()
    registry.register(_EngineCollector(service))
    requests_total = Counter(
        "ds4_http_requests", "HTTP requests by endpoint", ["endpoint"], registry=registry
    )
    Gauge("ds4_context_tokens", "The context size", registry=registry).set(service.engine.ctx)

    @app.get("/metrics", summary="Prometheus text format", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    bodies: dict[str, type[BaseModel]] = {}  # the request body models, for /openapi.json

    def body(path: str, model: type[BaseModel], summary: str) -> Any:
        """Register ``path``'s POST handler; it gets the JSON body, checked against ``model``."""
        request_body = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
        bodies[model.__name__] = model

        def register(handler: Any) -> Any:
            async def endpoint(request: Request) -> Any:
                requests_total.labels(path).inc()
                return await handler(request, await _checked_body(request, model))

            app.post(path, summary=summary, openapi_extra={"requestBody": request_body})(endpoint)
            return handler

        return register

    @body("/v1/chat/completions", ChatCompletionRequest, "OpenAI chat completions")
    async def chat_completions(request: Request, data: dict[str, Any]) -> Any:
        return await openai.chat_completions(service, request, data)

    @body("/v1/completions", CompletionRequest, "OpenAI completions: a raw prompt")
    async def completions(request: Request, data: dict[str, Any]) -> Any:
        return await openai.completions(service, request, data)

    @body("/v1/responses", ResponsesRequest, "OpenAI Responses, as Codex CLI uses it")
    async def create_response(request: Request, data: dict[str, Any]) -> Any:
        return await responses.responses(service, request, data)

    @body("/v1/messages", MessagesRequest, "Anthropic messages, as Claude Code uses it (also ?beta=true)")
    async def messages(request: Request, data: dict[str, Any]) -> Any:
        return await anthropic.messages(service, request, data)

    @body("/v1/messages/count_tokens", CountTokensRequest, "Anthropic token counting")
    async def count_tokens(request: Request, data: dict[str, Any]) -> Any:
        return await anthropic.count_tokens(service, data)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the request bodies (checked by hand, so any content type is read)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in bodies.items():
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[name] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(_BodyLimit, limit=int(max_body_mb * 1024 * 1024))
    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key)
    if cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    return app


class _EngineCollector(Collector):
    """The worker's totals and queue, read when ``/metrics`` is scraped."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Any:
        worker = self.service.worker
        totals = worker.totals
        counters = (
            ("ds4_generations", "answers run to the end (cancelled included)", totals.requests),
            ("ds4_generations_cancelled", "answers cancelled (client gone)", totals.cancelled),
            ("ds4_generations_failed", "answers that failed in the engine", totals.failed),
            ("ds4_prompt_tokens", "prompt tokens", totals.prompt_tokens),
            ("ds4_reused_tokens", "prompt tokens reused from a live session", totals.reused_tokens),
            ("ds4_generated_tokens", "sampled tokens", totals.generated_tokens),
            ("ds4_prefill_seconds", "time spent in prefill", totals.prefill_seconds),
            ("ds4_decode_seconds", "time spent decoding", totals.decode_seconds),
        )
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value=value)
        computed = totals.prompt_tokens - totals.reused_tokens
        rates = (
            (
                "ds4_prefill_tokens_per_second",
                "prefilled tokens per second, all time",
                computed,
                totals.prefill_seconds,
            ),
            (
                "ds4_decode_tokens_per_second",
                "sampled tokens per second, all time",
                totals.generated_tokens,
                totals.decode_seconds,
            ),
        )
        for name, help_text, tokens, seconds in rates:
            yield GaugeMetricFamily(name, help_text, value=tokens / seconds if seconds > 0 else 0.0)
        yield GaugeMetricFamily(
            "ds4_queue_length", "requests waiting for the worker", value=worker.queue_length
        )
        yield GaugeMetricFamily("ds4_busy", "1 while the worker runs a request", value=int(worker.busy))


class _BodyLimit:
    """413 for a body over the limit, by ``Content-Length`` or as a chunked body grows."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than the server's limit of {self.limit} bytes (--max-body-mb)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(scope["path"], ApiError(413, message))(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message)  # answered by the app's handler, in its API's shape
            return received

        await self.app(scope, limited, send)


class _ApiKey:
    """Every request but ``/health`` and CORS preflights needs the key, compared in constant time."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        authorization = headers.get(b"authorization", b"")
        if given is None and authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        if given is None or not hmac.compare_digest(given, self.key):
            message = "missing API key" if given is None else "invalid API key"
            error = ApiError(
                401,
                f"{message}: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="invalid_api_key",
            )
            return await error_response(scope["path"], error)(scope, receive, send)
        await self.app(scope, receive, send)
