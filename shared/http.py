"""HTTP plumbing shared by the services: one error format, bearer auth, body limits, and
cancelling work whose client has gone away.

Every 4xx body is a ``shared.schemas.ErrorResponse`` naming the field to blame.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.schemas import MAX_DETAIL_CHARS, MAX_PATH_CHARS, ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

T = TypeVar("T")
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


class ServiceError(Exception):
    """A refused request: HTTP status, the field to blame, a code for programs, a message for people."""

    def __init__(
        self, status: int, field: str | None, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.field, self.code, self.message = status, field, code, message
        self.retry_after = retry_after
        """Seconds after which asking again may succeed (sent as ``Retry-After``): an overloaded server."""


def error_response(status: int, field: str | None, code: str, message: str, headers=None) -> JSONResponse:
    # Both can quote the client's input (a field path names the unknown keys it sent), so are clipped to
    # what ErrorDetail allows: a refusal that failed its own validation would be a 500.
    field = None if field is None else _clip(field, MAX_PATH_CHARS)
    detail = ErrorDetail(field=field, message=_clip(message, MAX_DETAIL_CHARS), code=code)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _field_path(location: tuple[Any, ...]) -> str | None:
    # FastAPI prefixes body fields with "body"; the client knows the body as the top level.
    parts = [str(part) for part in location]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(
                400, "body", "invalid_json", f"the body is not valid JSON: {first.get('msg')}"
            )
        field = _field_path(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid value")
        more = len(error.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        return error_response(422, field, "validation_error", f"{field}: {message}")

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, error: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        return error_response(error.status, error.field, error.code, error.message, headers=headers)

    # Starlette's HTTPException, which FastAPI's own subclasses; the router raises it for 404 and 405.
    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        field = "body" if error.status_code == 400 else None
        return error_response(error.status_code, field, code, str(error.detail), headers=error.headers)


class BearerAuth:
    """With a key set, requires ``Authorization: Bearer <key>`` outside OPEN_PATHS, checked on the headers
    before any of the body is read: a client without the key cannot make the server read (or hold) a large
    body. On ``query_key_paths`` the key may come as ``?api_key=<key>`` instead, for clients that call a
    configured URL but send no headers of their own (OpenRLHF's remote reward model client)."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, query_key_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key is not None else None
        self.query_key_paths = query_key_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.expected is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        given = QueryParams(scope["query_string"]).get("api_key")
        in_query = scope["path"] in self.query_key_paths and given is not None
        if (scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), self.expected)) or (
            in_query and secrets.compare_digest(given.encode(), self.expected)
        ):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "Authorization", "unauthorized", "a valid 'Authorization: Bearer <key>' is required"
        )
        await response(scope, receive, send)


class UnexpectedErrors:
    """An exception no handler took answers 500 in the JSON error format, its traceback logged.

    Answered here, not by Starlette's last resort, which re-raises after answering and so makes the server
    close the connection, failing the client's other requests on it. An exception after the response has
    started cannot be answered any more, and is re-raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            if started:
                raise
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            response = error_response(
                500, None, "internal_error", "the server failed on this request; its log has the details"
            )
            await response(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over a limit with 413, by Content-Length or while they stream in."""

    def __init__(self, app: ASGIApp, default_limit: int, limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits = limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0
        exceeded = started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def refusing_send(message: Message) -> None:
            nonlocal started, refused
            # A body without Content-Length (chunked) passes the limit inside the app, and FastAPI turns a
            # body it failed to read into a 400 of its own: past the limit, the client is told why instead.
            if started or not exceeded:
                started = started or message["type"] == "http.response.start"
                await send(message)
            elif not refused:
                refused = True
                await self._refuse(scope, receive, send, limit)

        try:
            await self.app(scope, counting_receive, refusing_send)
        except _TooLarge:
            if started:
                raise
            if not refused:
                await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(413, "body", "too_large", f"the request body is larger than {limit} bytes")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class Instrument:
    """Counts requests by route and status, and times them, in the service's own metrics.

    Pure ASGI rather than ``@app.middleware``, whose wrapper changes how the app sees a disconnect.
    """

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # The router records the matched route in the scope; unmatched paths share one label.
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(path, str(status)).inc()
            self.latency.labels(path).observe(loop.time() - start)


async def cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` until it finishes or the client disconnects; on disconnect, cancel it (which frees
    the generation slots it holds) and answer 499, nginx's code for a closed client request."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        # The body has been read by now, so the next message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ServiceError(499, None, "client_disconnected", "the client closed the connection")
