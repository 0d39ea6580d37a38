"""One completion request from prompt ids to an OpenAI response: whole, or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgekit.runtimes.generation import GenerationConfig
from edgekit.serve.engine import GenerationTimeoutError, Job, Outcome, QueueFullError, Scheduler
from edgekit.serve.http_io import until_disconnected
from edgekit.serve.openai_schema import APIError
from edgekit.serve.responses import Reply, Usage, sse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold tokens back


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    context_length: int
    max_tokens: int
    """The most new tokens one request may ask for (and what it gets when it asks for none)."""
    timeout_s: float | None
    """Wall-clock limit of one request, waiting in the queue included."""


def new_job(ids: list[int], request: Any, limits: Limits, eos_ids: frozenset[int], param: str) -> Job:
    """A job for validated ``request`` on prompt ``ids``; 400 when the prompt or ``max_tokens`` do not fit."""
    if len(ids) >= limits.context_length:
        raise APIError(400, f"This model's maximum context length is {limits.context_length} tokens. However, your "
                       f"{param} resulted in {len(ids)} tokens. Please reduce the length of the {param}.",
                       param=param, code="context_length_exceeded")  # fmt: skip
    if not ids:
        raise APIError(400, f"the {param} is empty", param=param, code="invalid_value")
    asked = request.token_limit()
    if asked is not None and asked > limits.max_tokens:
        name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) is not None else "max_tokens"
        raise APIError(400, f"{name} is too large: {asked}. This server allows at most {limits.max_tokens} "
                       "completion tokens per request.", param=name, code="invalid_value")  # fmt: skip
    allowed = min(asked or limits.max_tokens, limits.context_length - len(ids))
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if top_p == 0:  # only the most likely token is left: that is greedy decoding
        temperature, top_p = 0.0, 1.0
    config = GenerationConfig(max_new_tokens=allowed, temperature=temperature, top_p=top_p, seed=request.seed,
                              stop=request.stop)  # fmt: skip
    return Job(ids, config, allowed, eos_ids, asyncio.get_running_loop())


async def respond(request: Request, scheduler: Scheduler, job: Job, limits: Limits, shapes: Shapes,
                  stream: bool) -> Response:  # fmt: skip
    """Run ``job`` and answer: the whole completion, or an event stream of its pieces."""
    try:
        scheduler.submit(job)
    except QueueFullError as exc:
        raise APIError(503, f"The server is busy ({exc}); retry shortly.", type="server_error",
                       code="server_busy", headers={"Retry-After": "1"}) from None  # fmt: skip
    deadline = None if limits.timeout_s is None else time.perf_counter() + limits.timeout_s
    pieces = scheduler.pieces(job, deadline)
    try:
        if not stream:
            text = await until_disconnected(request, _collect(pieces))
            return JSONResponse(shapes.whole(text, outcome_of(job)))
        # Wait for the first piece before answering, so a request that fails or times out early still gets a
        # status code and an error body, not a stream that breaks off.
        first = await until_disconnected(request, _first(pieces))
    except GenerationTimeoutError as exc:
        raise timeout_error(exc) from None
    body = _events(first, pieces, job, shapes, scheduler)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


@dataclass(frozen=True)
class Shapes:
    """How one endpoint shapes its answer: whole, the stream's opening, each piece, and its ending."""

    whole: Callable[[str, Outcome], dict[str, Any]]
    opening: Callable[[], list[dict[str, Any]]]
    piece: Callable[[str], dict[str, Any]]
    ending: Callable[[Outcome], list[dict[str, Any]]]


def chat_shapes(reply: Reply, include_usage: bool) -> Shapes:
    """``chat.completion`` and its chunks: a role delta first, content deltas, a finish chunk, usage."""

    def ending(outcome: Outcome) -> list[dict[str, Any]]:
        last = [reply.chat_chunk({}, outcome.finish_reason, include_usage)]
        return [*last, reply.chat_usage_chunk(usage_of(outcome))] if include_usage else last

    return Shapes(
        whole=lambda text, outcome: reply.chat(text, outcome.finish_reason, usage_of(outcome)),
        opening=lambda: [reply.chat_chunk({"role": "assistant", "content": "", "refusal": None}, None, include_usage)],
        piece=lambda text: reply.chat_chunk({"content": text}, None, include_usage),
        ending=ending,
    )


def completion_shapes(reply: Reply, include_usage: bool) -> Shapes:
    """``text_completion`` and its chunks: text pieces, an empty piece with the finish reason, usage."""

    def ending(outcome: Outcome) -> list[dict[str, Any]]:
        last = [reply.completion("", outcome.finish_reason, None)]
        return [*last, reply.completion_usage_chunk(usage_of(outcome))] if include_usage else last

    return Shapes(
        whole=lambda text, outcome: reply.completion(text, outcome.finish_reason, usage_of(outcome)),
        opening=lambda: [],
        piece=lambda text: reply.completion(text, None, None),
        ending=ending,
    )


async def _first(pieces: AsyncIterator[str]) -> str | None:
    try:
        return await pieces.__anext__()
    except StopAsyncIteration:
        return None


async def _collect(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


async def _events(first: str | None, pieces: AsyncGenerator[str, None], job: Job, shapes: Shapes,
                  scheduler: Scheduler) -> AsyncIterator[bytes]:  # fmt: skip
    """The SSE body; a failure after the first event becomes an ``error`` event (what OpenAI sends)."""
    try:
        for chunk in shapes.opening():
            yield sse(chunk)
        if first is not None:
            yield sse(shapes.piece(first))
            async for piece in pieces:
                yield sse(shapes.piece(piece))
        for chunk in shapes.ending(outcome_of(job)):
            yield sse(chunk)
        yield sse("[DONE]")
    except GenerationTimeoutError as exc:
        yield sse(timeout_error(exc).body())
    except Exception as exc:  # the status line is sent; the client learns of the failure in the stream
        yield sse(APIError(500, f"generation failed: {one_line(exc)}", type="server_error").body())
    finally:
        if job.outcome is None:  # the client went away mid-stream: free the slot now
            scheduler.cancel(job)
        await pieces.aclose()


def outcome_of(job: Job) -> Outcome:
    """How ``job`` ended (a job that produced nothing more ends with ``stop``)."""
    return job.outcome or Outcome("stop", len(job.ids), job.completion_tokens)


def usage_of(outcome: Outcome) -> Usage:
    """OpenAI's token counts of ``outcome``."""
    return Usage(outcome.prompt_tokens, outcome.completion_tokens)


def timeout_error(exc: GenerationTimeoutError) -> APIError:
    """The 504 a request that ran past the server's time limit gets."""
    return APIError(504, f"The request timed out: {exc}.", type="timeout_error", code="timeout")


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (no traceback ever reaches a client)."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return text or type(exc).__name__
