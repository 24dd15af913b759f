"""ASGI middleware of the HTTP transport: request ids, access logs, request metrics, body limit,
and the direct route to the pose endpoints.

All are plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so the ``receive`` channel
reaches the routes untouched and a route can watch it for the client's disconnect.

- ``RequestContextMiddleware`` (outermost): takes a well-formed ``X-Request-ID`` or makes one,
  echoes it on the response, writes one structured log line per request (logger ``service.access``;
  ``Settings.access_log`` turns it off),
  counts pose requests in ``pose_requests_total{transport="http"}``, and is the last resort for an
  unhandled exception (a JSON 500 carrying the request id).
- ``BodyLimitMiddleware``: refuses a body over the limit by its Content-Length before reading any of
  it, and a streamed (chunked) body as soon as it passes the limit; both 413 with
  ``Connection: close`` so that the rest of the upload is not read. A body that does not arrive
  within ``body_timeout_s`` (a slow or stalled client) gets 408, also with ``Connection: close``,
  and request headers over ``max_header_bytes`` get 431.
- ``DirectRoutes`` (innermost): calls the pose endpoints straight from the ASGI scope, past
  FastAPI's router, exception middleware and dependency solving.

The three sit in front of the FastAPI app (``service.rest._PoseApp``), not inside it, so that a
pose request also skips FastAPI's and Starlette's outer layers; every other request goes on
into the app.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import EngineError
from service.metrics import Metrics

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class AccessLog:
    """Writes the ``service.access`` record of each request, for a fraction of ``Logger.info``'s
    cost.

    ``Logger.info`` walks the stack to find its caller and fills each record with the source
    file, thread and process names. Every access record comes from the same line on the same
    thread, so those fields are taken once from a record made the ordinary way (through the
    record factory, if one is set), and each request's record copies them and sets what differs
    (time, message fields; as ``logging.makeLogRecord`` fills a record from a dict). It then goes
    through ``Logger.handle`` like any record: level, filters, handlers and propagation stay the
    logger's. The access line then costs 15.1 us of the event loop per pose request instead of
    23.6 (``bench.http_app``, identity model; 145 us a request in all).
    """

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._template: dict[str, Any] = {}

    def write(self, fields: dict[str, Any]) -> None:
        """One INFO record, message ``request``, with ``fields`` as its extra attributes."""
        log = self._log
        if not log.isEnabledFor(logging.INFO):
            return
        template = self._template
        if template.get("thread") != threading.get_ident():  # (first record, or a new thread)
            template = self._template = self._template_record()
        record = logging.LogRecord.__new__(logging.LogRecord)
        values = record.__dict__
        values.update(template)
        now = time.time()
        values["created"] = now
        values["msecs"] = int((now - int(now)) * 1000) + 0.0
        values["relativeCreated"] = template["relativeCreated"] + (now - template["created"]) * 1e3
        values.update(fields)
        log.handle(record)

    def _template_record(self) -> dict[str, Any]:
        record = self._log.makeRecord(
            self._log.name, logging.INFO, __file__, 0, "request", (), None, func="write"
        )
        values = dict(record.__dict__)
        if "taskName" in values:  # (Python 3.12+: the task is each request's own)
            values["taskName"] = None
        return values


def header_of(scope: Scope, name: bytes) -> str | None:
    """The first value of the request header ``name`` (lower case, as ASGI servers give names),
    or None: one scan of the scope's raw pairs. Starlette's ``Headers(scope=...).get`` decodes
    every name on each lookup, which cost the HTTP front end 5 % of its CPU per pose request."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    details: Any = None,
) -> JSONResponse:
    """``{"error": {"code": ..., "message": ...}}`` with ``status``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))


# Headers an error of a code always carries over HTTP.
_HEADERS_OF_CODE: dict[str, dict[str, str]] = {
    "body_too_large": {"connection": "close"},  # the rest of the upload is not read
    "body_timeout": {"connection": "close"},
    "headers_too_large": {"connection": "close"},
    "unauthenticated": {"www-authenticate": "Bearer"},
}


def internal_error_response(request_id: str) -> JSONResponse:
    """The last-resort 500 of an unhandled exception: its cause stays in the log, under the
    request id the client is given."""
    return error_response(500, "internal", f"internal error (request id {request_id})")


def http_error_response(exc: EngineError, request_id: str = "?") -> JSONResponse:
    """The HTTP answer of any ``EngineError``: its status from ``service.errors``' table, a
    Retry-After for a refusal that may be retried, and the headers its code needs. A 500 hides
    its cause (logged with the request id) from the client."""
    status = exc.status.http
    headers = dict(_HEADERS_OF_CODE.get(exc.code, {}))
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    message = exc.message
    if status == 500:
        logger.error("request failed", exc_info=exc, extra={"request_id": request_id})
        message = f"internal error (request id {request_id})"
    return error_response(status, exc.code, message, headers)


class RequestContextMiddleware:
    """Request id in and out, one access-log line, request metrics, last-resort 500.

    Args:
        app: the wrapped app.
        metrics: where request counts and durations go.
        metric_paths: paths counted as pose requests (health checks and scrapes are not).
        served_by: the front-end process's name, sent as ``x-served-by`` (several front ends).
        access_log: write the access-log line (``Settings.access_log``).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        metric_paths: Collection[str],
        served_by: str | None = None,
        access_log: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = AccessLog(logging.getLogger("service.access")) if access_log else None
        self.metric_paths = frozenset(metric_paths)
        self.served_by = None if served_by is None else served_by.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        given = header_of(scope, b"x-request-id") or ""
        # A random 128-bit id, as uuid4().hex is, at a third of its cost.
        request_id = given if _REQUEST_ID.match(given) else os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0
        served_by = self.served_by

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Appended as raw pairs (no response carries these already): Starlette's
                # MutableHeaders would rebuild the header list for each.
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                if served_by is not None:
                    headers.append((b"x-served-by", served_by))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error", extra={"request_id": request_id})
            if status == 0:
                await internal_error_response(request_id)(scope, receive, send_with_id)
            else:
                status = 500
        finally:
            seconds = time.monotonic() - started
            path = scope.get("path", "")
            if path in self.metric_paths:
                self.metrics.observe_request("http", status or 500, seconds)
            if self.access_log is not None:
                client = scope.get("client")
                self.access_log.write(
                    {
                        "request_id": request_id,
                        "method": scope.get("method", ""),
                        "path": path,
                        "status": status or 500,
                        "duration_ms": round(seconds * 1000.0, 3),
                        "client": client[0] if client else None,
                    }
                )


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` without reading them.

    Args:
        app: the wrapped app.
        max_body_bytes: largest body accepted.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        max_header_bytes: int = 64 * 1024,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_header_bytes = max_header_bytes

    def _too_large(self, size: str) -> EngineError:
        return EngineError(
            f"the request body is {size}; the limit is {self.max_body_bytes} bytes",
            code="body_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # uvicorn bounds a head that arrives in pieces; one that arrives whole is checked here.
        head = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if head > self.max_header_bytes:
            error = EngineError(
                f"the request headers are {head} bytes; the limit is {self.max_header_bytes}",
                code="headers_too_large",
            )
            await http_error_response(error)(scope, receive, send)
            return
        declared = header_of(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                response = error_response(400, "bad_request", "invalid Content-Length")
                await response(scope, receive, send)
                return
            if int(declared) > self.max_body_bytes:
                response = http_error_response(self._too_large(f"{int(declared)} bytes"))
                await response(scope, receive, send)
                return
        received = 0
        deadline: float | None = None  # the whole body must arrive by then
        done = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, done
            if done:  # the body is read: only the disconnect is left to wait for
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.body_timeout_s
            try:
                # (asyncio.timeout, not wait_for: no task per receive)
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                raise EngineError(
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                    code="body_timeout",
                ) from None
            if message["type"] == "http.request":
                done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large(f"over {received} bytes")
            return message

        await self.app(scope, limited_receive, send)


Endpoint = Callable[[Request], Awaitable[Response]]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


class DirectRoutes:
    """POST routes called straight from the ASGI scope, past FastAPI's exception middleware,
    router and dependency solving: about 0.1 ms of a server core per request, a sixth of what a
    small pose request costs the front end (issue 16's profile).

    The routes stay declared on the FastAPI app, so the OpenAPI document is unchanged and any
    other method gets FastAPI's 405. An answer is the same whichever way it is reached: the
    endpoint is the route's own function, ``authorize`` runs what the route's dependency runs,
    and an exception goes to the app's handler for it (else up, to the last-resort 500).

    Args:
        inner: the wrapped app (every request that is not a POST to an endpoint).
        endpoints: path -> the route's function (``Request`` -> ``Response``; it must take no
            FastAPI parameters). Read per request, so it may be filled after this is made.
        authorize: raises the authentication error when the request may not call an endpoint.
        handlers: exception class -> the app's handler.
        app: the application a route's ``request.app`` is (Starlette puts it in the scope
            on the way in; in front of it, this does), or None to leave the scope as it is.
    """

    def __init__(
        self,
        inner: ASGIApp,
        endpoints: Mapping[str, Endpoint],
        authorize: Callable[[Request], Awaitable[None]] | None,
        handlers: Mapping[type[Exception], ExceptionHandler],
        app: ASGIApp | None = None,
    ) -> None:
        self.inner = inner
        self.endpoints = endpoints
        self.authorize = authorize
        self.handlers = handlers
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = (
            self.endpoints.get(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path")
            else None
        )
        if endpoint is None:
            await self.inner(scope, receive, send)
            return
        if self.app is not None:
            scope["app"] = self.app
        request = Request(scope, receive, send)
        try:
            if self.authorize is not None:
                await self.authorize(request)
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler_of(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_of(self, exc: Exception) -> ExceptionHandler | None:
        """The handler of the exception's class or of its nearest base, as Starlette finds it."""
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return None
