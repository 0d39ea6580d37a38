"""Reading requests safely: the API key, the body size limit, JSON parsing, and client disconnects."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from edgekit.serve.openai_schema import APIError

# A refused body is still read (and dropped) up to this size: a server that answers before the client has
# sent its body, then closes, makes the kernel reset the connection, and the client never sees the answer.
DRAIN_LIMIT = 64 << 20
BODY_TIMEOUT_S = 30.0
"""The longest a request's body may take to arrive, from the first read of it."""
T = TypeVar("T")


def error_response(error: APIError) -> JSONResponse:
    """OpenAI's error body with the error's status and headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def check_api_key(request: Request, api_key: str | None) -> APIError | None:
    """The 401 to answer when ``api_key`` is set and the request's bearer token is not it, else None."""
    if api_key is None:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="edgekit"'}
    if scheme.lower() != "bearer" or not token.strip():
        return APIError(401, "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
                        "(Authorization: Bearer YOUR_KEY).", headers=challenge)  # fmt: skip
    # compare_digest takes as long for a near miss as for a wild guess, so timing tells nothing of the key.
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge)
    return None


async def read_json(request: Request, max_body_bytes: int, refusal: APIError | None = None) -> Any:
    """The request's JSON body, or ``APIError``: ``refusal`` (given), 413 (too big), 408 (the body took over
    ``BODY_TIMEOUT_S`` to arrive) or 400 (not JSON); ``ClientGoneError`` when the client hung up meanwhile.

    The body is read in pieces and never held past ``max_body_bytes``; a declared ``Content-Length`` over
    the limit is refused before anything is read.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 18):
        raise APIError(400, "the Content-Length header is not a number")
    too_big = declared is not None and int(declared) > max_body_bytes
    if refusal is None and too_big:
        refusal = _too_large(max_body_bytes)
    body = bytearray()
    seen = 0
    chunks = request.stream().__aiter__()
    # One deadline for the whole body: a client sending it a byte at a time (or never) would hold its
    # connection for as long as it liked.
    deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), deadline - asyncio.get_running_loop().time())
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
                raise refusal or APIError(408, f"The request body did not arrive within {BODY_TIMEOUT_S:g} seconds.",
                                          code="request_timeout") from None  # fmt: skip
            seen += len(chunk)
            if refusal is None:
                body += chunk
                if len(body) > max_body_bytes:
                    refusal, body = _too_large(max_body_bytes), bytearray()
            if refusal is not None and seen > DRAIN_LIMIT:
                break
    except ClientDisconnect:  # hung up before the whole body came: nobody to answer
        raise ClientGoneError() from None
    if refusal is not None:
        raise refusal
    return parse_json(bytes(body))


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                    code="request_too_large")  # fmt: skip


def parse_json(body: bytes) -> Any:
    """``body`` as JSON; NaN and Infinity are refused (they are not JSON, and no parameter takes them)."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        problem = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise APIError(400, f"We could not parse the JSON body of your request ({problem}).",
                       code="invalid_json") from None  # fmt: skip


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it when the client hangs up first (then raise ``ClientGoneError``).

    Call only once the body has been read: the next ASGI message is then the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        # Let the cancelled work run its cleanup (it cancels its job) before answering.
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGoneError()
    return task.result()


async def _disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGoneError(Exception):
    """The client closed the connection before its answer was ready."""
