"""The ASGI app: OpenAI's endpoints, health, metrics and the chat page, on Starlette.

``create_app`` returns a Starlette app that runs under any ASGI server and mounts into a FastAPI or
Starlette app (``parent.mount("/llm", create_app(...))``). The decode thread starts with the app, not in
a lifespan handler, because a mounted app never receives lifespan events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgekit.errors import EdgekitError, UsageError
from edgekit.runtimes.model import Model, load
from edgekit.serve.engine import Job, Scheduler
from edgekit.serve.generate import Limits, chat_shapes, completion_shapes, new_job, one_line, respond
from edgekit.serve.http_io import ClientGoneError, check_api_key, error_response, read_json
from edgekit.serve.metrics import Metrics
from edgekit.serve.model_facts import ModelFacts, model_facts
from edgekit.serve.openai_schema import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from edgekit.serve.options import ServeOptions
from edgekit.serve.responses import Reply

STATIC = Path(__file__).parent / "static"
# The chat page loads nothing from elsewhere: no CDN, no fonts, so it works on a box with no internet.
PAGE_POLICY = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'self'"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


@dataclass
class ServerState:
    """What the endpoints share: the model, its scheduler, the counters, and the options."""

    model: Model
    facts: ModelFacts
    options: ServeOptions
    owns_model: bool
    metrics: Metrics = field(default_factory=Metrics)
    scheduler: Scheduler = field(init=False)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.model, self.options.max_concurrency, self.options.max_queue, self._record)
        self.limits = Limits(self.model.context_length, self.options.max_tokens, self.options.timeout_s)

    def close(self) -> None:
        """Stop the decode thread, and close the model if the app loaded it."""
        self.scheduler.close()
        if self.owns_model:
            self.model.close()

    def check_model(self, name: str) -> None:
        """404 unless ``name`` is this server's model id."""
        if name != self.facts.model_id:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.facts.model_id}`.",
                           param="model", code="model_not_found")  # fmt: skip

    def _record(self, job: Job) -> None:
        end = job.finished_at or time.perf_counter()
        ttft = None if job.first_piece_at is None else job.first_piece_at - job.submitted
        decode = None if job.first_piece_at is None else end - job.first_piece_at
        prompt = len(job.ids) if job.pieces is not None else 0  # a job cancelled before its turn read nothing
        self.metrics.record_generation(prompt, job.completion_tokens, ttft, decode, end - job.submitted)


def create_app(model_or_package: Model | str | os.PathLike[str], **options: Any) -> Starlette:
    """The ASGI app serving ``model_or_package`` (a loaded ``Model``, or a package folder to load).

    ``options`` are the fields of ``ServeOptions`` (``api_key``, ``max_concurrency``, ``max_tokens``,
    ``timeout_s``, ``max_body_bytes``, ``cors_origins``, ``model_name``, ``target``, ...). A package is
    loaded with ``edgekit.load(package, target)`` and closed with the app; a ``Model`` passed in stays
    the caller's. ``app.state.edgekit.close()`` stops the decode thread (the app's shutdown does it too).
    """
    unknown = sorted(set(options) - set(ServeOptions.__dataclass_fields__))
    if unknown:
        known = ", ".join(ServeOptions.__dataclass_fields__)
        raise UsageError(f"create_app got unknown options: {', '.join(unknown)}", fix=f"use: {known}")
    settings = ServeOptions(**options)
    if isinstance(model_or_package, Model):
        model, owns = model_or_package, False
    else:
        model, owns = load(model_or_package, settings.target), True
    state = ServerState(model, model_facts(model, settings.model_name, settings.target), settings, owns)
    middleware = [Middleware(CountRequests, metrics=state.metrics)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(state.close)  # joins the decode thread: off the event loop

    app = Starlette(
        routes=_routes(state),
        middleware=middleware,
        exception_handlers={APIError: _error, HTTPException: _error, ClientGoneError: _error, Exception: _error},
        lifespan=lifespan,
    )
    app.state.edgekit = state
    return app


def _routes(state: ServerState) -> list[Route]:
    options = state.options

    async def chat_completions(request: Request) -> Response:
        """POST /v1/chat/completions: answer a conversation under the model's chat template."""
        body = await read_json(request, options.max_body_bytes, check_api_key(request, options.api_key))
        chat = parse_request(ChatCompletionRequest, body)
        state.check_model(chat.model)
        messages = [message.as_template_message() for message in chat.messages]
        ids = await asyncio.to_thread(_encode_chat, state.model, messages)
        job = new_job(ids, chat, state.limits, state.facts.eos_ids, "messages")
        reply = Reply.new("chatcmpl", state.facts.model_id, state.facts.fingerprint)
        shapes = chat_shapes(reply, chat.include_usage())
        return await respond(request, state.scheduler, job, state.limits, shapes, bool(chat.stream))

    async def completions(request: Request) -> Response:
        """POST /v1/completions: continue a raw prompt."""
        body = await read_json(request, options.max_body_bytes, check_api_key(request, options.api_key))
        completion = parse_request(CompletionRequest, body)
        state.check_model(completion.model)
        ids = await asyncio.to_thread(state.model.tokenizer.encode, completion.prompt)
        job = new_job(ids, completion, state.limits, state.facts.eos_ids, "prompt")
        reply = Reply.new("cmpl", state.facts.model_id, state.facts.fingerprint)
        shapes = completion_shapes(reply, completion.include_usage())
        return await respond(request, state.scheduler, job, state.limits, shapes, bool(completion.stream))

    async def models(request: Request) -> Response:
        """GET /v1/models: the one model served."""
        _authorize(request, options.api_key)
        return JSONResponse({"object": "list", "data": [state.facts.model_object()]})

    async def model(request: Request) -> Response:
        """GET /v1/models/{name}: the model, if that is its name."""
        _authorize(request, options.api_key)
        state.check_model(request.path_params["name"])
        return JSONResponse(state.facts.model_object())

    async def health(request: Request) -> Response:
        """GET /health: up, what runs, and how busy (no key needed, for load balancers)."""
        facts = state.facts
        return JSONResponse({"status": "ok", "model": facts.model_id, "variant": facts.variant,
                             "provider": facts.provider, "active": state.scheduler.active_count,
                             "queued": state.scheduler.queue_length})  # fmt: skip

    async def metrics(request: Request) -> Response:
        """GET /metrics: Prometheus text."""
        _authorize(request, options.api_key)
        text = state.metrics.render(_gauges(state))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return routes + (_chat_page_routes() if options.chat_page else [])


def _chat_page_routes() -> list[Route]:
    """The chat page at ``/`` and its two files."""
    return [Route(path, _static(name), methods=["GET"]) for path, name in
            (("/", "index.html"), ("/chat.js", "chat.js"), ("/chat.css", "chat.css"))]  # fmt: skip


def _gauges(state: ServerState) -> dict[str, tuple[str, float]]:
    return {
        "edgekit_queue_length": ("Requests waiting for a generation slot.", state.scheduler.queue_length),
        "edgekit_active_requests": ("Requests generating now.", state.scheduler.active_count),
        "edgekit_max_concurrency": ("Generation slots.", state.options.max_concurrency),
    }


def _encode_chat(model: Model, messages: list[dict[str, str]]) -> list[int]:
    try:
        prompt = model.apply_chat_template(messages)
    except EdgekitError as exc:  # no template, or the template refused this conversation
        raise APIError(400, exc.problem, param="messages", code="invalid_value") from None
    return model.tokenizer.encode(prompt, add_bos=False)  # templates write their own BOS


def _authorize(request: Request, api_key: str | None) -> None:
    refusal = check_api_key(request, api_key)
    if refusal is not None:
        raise refusal


def _static(name: str) -> Any:
    types = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8"}  # fmt: skip
    path = STATIC / name

    async def serve_file(request: Request) -> Response:
        headers = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                   "Cache-Control": "no-cache"}  # fmt: skip
        return FileResponse(path, media_type=types[path.suffix], headers=headers)

    return serve_file


async def _error(request: Request, exc: Exception) -> Response:
    """Every error as OpenAI's error body; nothing of a traceback reaches the client."""
    if isinstance(exc, APIError):
        return error_response(exc)
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))
    if isinstance(exc, UsageError):  # the runtime refused the request itself (a prompt it cannot take)
        return error_response(APIError(400, exc.problem, code="invalid_value"))
    if isinstance(exc, ClientGoneError):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the log does
    # Starlette re-raises after this, so the traceback still reaches the server's log.
    return error_response(APIError(500, f"The server failed: {one_line(exc)}", type="server_error"))


class CountRequests:
    """ASGI middleware: counts each request by endpoint and status for ``/metrics``."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root) :] or "/" if root and path.startswith(root) else path  # mounted under a prefix
        endpoint = path if path in ENDPOINTS else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
        status = {"code": 500}

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(endpoint, status["code"])
