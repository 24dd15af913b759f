"""Every refusal and failure of the service, with a machine code, and the one table of statuses.

Whatever layer finds the problem (upload decoding, request validation, the engine, a transport)
raises an ``EngineError`` subclass carrying a machine-readable ``code``. ``STATUS_OF_CODE`` maps
each code to its HTTP status and its gRPC status (by name, so that this module imports no
transport); every transport answers from that table, so a new transport writes no table of its own.

The answer a client sees: HTTP ``{"error": {"code", "message"}}`` with the status; gRPC the status
with the message as details and ``error-code`` trailing metadata. A refusal that the client may
retry (``queue_full``, ``unavailable``, ``shutting_down``) carries ``retry_after_s``.
"""

from __future__ import annotations

from typing import NamedTuple


class Status(NamedTuple):
    """What one error code becomes on each transport."""

    http: int
    grpc: str  # a ``grpc.StatusCode`` member name


# code -> statuses. Codes are stable API: clients branch on them.
STATUS_OF_CODE: dict[str, Status] = {
    # the request itself: fix it, do not retry
    "invalid_request": Status(422, "INVALID_ARGUMENT"),  # a field missing, of the wrong type, ...
    "bad_request": Status(400, "INVALID_ARGUMENT"),
    "bad_json": Status(400, "INVALID_ARGUMENT"),
    "bad_base64": Status(400, "INVALID_ARGUMENT"),
    "bad_image": Status(400, "INVALID_ARGUMENT"),
    "bad_boxes": Status(400, "INVALID_ARGUMENT"),
    "bad_options": Status(400, "INVALID_ARGUMENT"),
    "too_many_pixels": Status(413, "INVALID_ARGUMENT"),
    "too_many_images": Status(413, "INVALID_ARGUMENT"),
    "video_too_long": Status(413, "INVALID_ARGUMENT"),  # over max_video_frames / max_video_seconds
    "body_too_large": Status(413, "RESOURCE_EXHAUSTED"),
    "body_timeout": Status(408, "DEADLINE_EXCEEDED"),  # the body did not arrive in time
    "headers_too_large": Status(431, "INVALID_ARGUMENT"),
    "unsupported_media_type": Status(415, "INVALID_ARGUMENT"),
    "unauthenticated": Status(401, "UNAUTHENTICATED"),
    # the service's state: retry later
    "queue_full": Status(429, "RESOURCE_EXHAUSTED"),
    "unavailable": Status(503, "UNAVAILABLE"),
    "shutting_down": Status(503, "UNAVAILABLE"),
    "deadline_exceeded": Status(504, "DEADLINE_EXCEEDED"),
    # the client went away: nobody reads the answer (nginx's 499)
    "client_closed": Status(499, "CANCELLED"),
    "internal": Status(500, "INTERNAL"),
}

RETRY_AFTER_UNAVAILABLE_S = 1.0


def status_of(code: str) -> Status:
    """The statuses of ``code``; an unknown code is an internal error."""
    return STATUS_OF_CODE.get(code, STATUS_OF_CODE["internal"])


class EngineError(Exception):
    """Base of every error with a machine code.

    Attributes:
        code: A key of ``STATUS_OF_CODE``.
        message: What went wrong, for a person.
        retry_after_s: When a retry may succeed (refusals because of load or state), else None.
    """

    code: str = "internal"
    retry_after_s: float | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def status(self) -> Status:
        """The HTTP and gRPC statuses of this error."""
        return status_of(self.code)


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as sent (a 4xx; gRPC INVALID_ARGUMENT and friends).

    ``InvalidRequestError("bad_boxes", "box 2 lies outside the image")``.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in STATUS_OF_CODE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message, code=code)


# Upload decoding raises the same class; the name reads better there.
ImageError = InvalidRequestError


class QueueFullError(EngineError):
    """Overloaded: HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED with retry metadata."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(EngineError):
    """Not started, still warming up, draining or stopped: HTTP 503, gRPC UNAVAILABLE."""

    code = "unavailable"
    retry_after_s = RETRY_AFTER_UNAVAILABLE_S


class EngineStoppedError(EngineError):
    """The drain grace period expired before this job ran: HTTP 503, gRPC UNAVAILABLE."""

    code = "shutting_down"
    retry_after_s = RETRY_AFTER_UNAVAILABLE_S


class DeadlineExceededError(EngineError):
    """The request's deadline passed before its answer: HTTP 504, gRPC DEADLINE_EXCEEDED."""

    code = "deadline_exceeded"


class ClientClosedError(EngineError):
    """The client went away before its answer (logged at info, counted as 499)."""

    code = "client_closed"


class UnauthenticatedError(EngineError):
    """No valid API key: HTTP 401, gRPC UNAUTHENTICATED."""

    code = "unauthenticated"


class InferenceError(EngineError):
    """The batch holding this job failed; the pipeline's exception is the ``__cause__``."""

    code = "internal"


# code -> the class that carries it, where one code has its own class (the rest are
# ``InvalidRequestError``s). ``error_from_wire`` rebuilds an error sent between processes.
_CLASS_OF_CODE: dict[str, type[EngineError]] = {
    "queue_full": QueueFullError,
    "unavailable": NotReadyError,
    "shutting_down": EngineStoppedError,
    "deadline_exceeded": DeadlineExceededError,
    "client_closed": ClientClosedError,
    "unauthenticated": UnauthenticatedError,
    "internal": InferenceError,
}


def error_to_wire(exc: BaseException) -> tuple[str, str, float | None]:
    """``(code, message, retry_after_s)`` of any exception; one that is not an ``EngineError`` is
    an internal error (its type and text kept in the message, for the log)."""
    if isinstance(exc, EngineError):
        return exc.code, exc.message, exc.retry_after_s
    return "internal", f"{type(exc).__name__}: {exc}", None


def error_from_wire(code: str, message: str, retry_after_s: float | None) -> EngineError:
    """The error ``error_to_wire`` described, as the class the transports map (same code,
    message and retry hint)."""
    cls = _CLASS_OF_CODE.get(code)
    if cls is QueueFullError:
        return QueueFullError(message, retry_after_s=retry_after_s or 1.0)
    if cls is not None:
        error = cls(message)
    elif code in STATUS_OF_CODE:
        error = InvalidRequestError(code, message)
    else:
        error = InferenceError(message)
    if retry_after_s is not None:
        error.retry_after_s = retry_after_s
    return error
