"""HTTP transport: a FastAPI app of thin routes over the shared ``Engine``.

``create_app(engine, settings)`` builds the app; ``service.__main__`` serves it with uvicorn on the
same event loop as the engine and the gRPC server. Each route parses its input
(``service.rest_inputs``), awaits ``Engine.infer`` once per image (so the images of a batch request
batch with everything else in flight), and maps the result or the error. While a request waits, the
client's connection is watched: a disconnect cancels its engine jobs, which the engine then drops
before they reach the pipeline.

Keypoint scores are DistilPose's raw values (they may fall below 0 or above 1). Every number of a
response is finite: a non-finite one would be a server bug and gives 500, never invalid JSON.

Errors are ``{"error": {"code": ..., "message": ...}}``: 400 undecodable image, bad base64, bad
JSON, bad boxes; 401 missing or wrong API key; 413 body over ``max_body_bytes`` (refused by
Content-Length before reading, or as soon as a streamed body passes it), image over
``max_image_pixels`` or too many images; 415 unsupported media type; 422 schema violations; 429 +
Retry-After queue full; 503 not ready or draining; 504 past the request deadline.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.interfaces import ImageResult
from service import render
from service.engine import Engine, EngineError, PoseRequest, PoseResponse, QueueFullError
from service.images import ImageError, decode_image
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import Metrics
from service.rest_inputs import InputReader, PoseOptionsIn, PoseQuery, RenderQuery, openapi_body
from service.rest_middleware import (
    ApiError,
    BodyLimitMiddleware,
    RequestContextMiddleware,
    error_response,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

# Pose requests, counted in pose_requests_total.
API_PATHS = ("/v1/pose", "/pose", "/v1/pose/render", "/v1/pose/batch")
# Past the request deadline, how long a route waits for the engine's own DeadlineExceededError
# before it gives up on the job itself.
_DEADLINE_SLACK_S = 0.25
_ERROR_DOCS = {
    400: "undecodable image, bad base64 or JSON, invalid boxes",
    401: "missing or wrong API key",
    413: "body, image or batch too large",
    415: "unsupported media type",
    422: "schema violation",
    429: "queue full; retry after Retry-After seconds",
    503: "not ready, or draining",
    504: "request deadline exceeded",
}


class PersonOut(BaseModel):
    """One person. Keypoint scores are the model's raw values (DistilPose: may leave [0, 1])."""

    bbox: list[float] = Field(..., description="[x, y, w, h] in pixels")
    bbox_score: float
    score: float = Field(..., description="bbox_score x mean(keypoint scores > 0.2)")
    keypoints: list[list[float]] = Field(..., description="K x [x, y, raw score]")
    sigmas: list[list[float]] | None = Field(None, description="K x [sx, sy] in px, when asked")


class ImageSizeOut(BaseModel):
    """Size of the image as decoded (after the EXIF orientation)."""

    width: int
    height: int


class PoseOut(BaseModel):
    """The answer for one image: persons in caller-box order, else by descending score."""

    persons: list[PersonOut]
    image: ImageSizeOut
    keypoint_names: list[str]
    skeleton: list[list[int]]
    model: dict[str, Any]
    timing_ms: dict[str, float]


class BatchOut(BaseModel):
    """One result per image, in request order."""

    results: list[PoseOut]


def create_app(engine: Engine, settings: Settings, *, metrics: Metrics | None = None) -> FastAPI:
    """Build the HTTP app over ``engine``.

    Args:
        engine: the shared engine; the caller starts and stops it.
        settings: limits, defaults and API keys.
        metrics: the process's metrics (the object the engine observes); a fresh private
            registry when None.

    Returns:
        The FastAPI app; ``app.state.metrics`` holds its ``Metrics``.
    """
    metrics = metrics if metrics is not None else Metrics()
    metrics.bind_engine(engine)
    api = _PoseApi(engine, settings)
    reader = InputReader(settings)
    app = FastAPI(title="DistilPose pose service", version="1", description=__doc__)
    app.state.metrics = metrics
    _install_error_handlers(app)
    # Added last = outermost: request ids, logs and metrics see every answer, 413s included.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, metric_paths=API_PATHS)
    auth = _auth_dependencies(settings.api_keys)
    errors: dict[int | str, dict[str, Any]] = {
        code: {"description": text} for code, text in _ERROR_DOCS.items()
    }

    async def pose(request: Request, query: Annotated[PoseQuery, Query()]) -> Response:
        """Estimate the poses in one image: a raw image body, multipart or JSON."""
        started = time.monotonic()
        job = await reader.read_single(request, query)
        (response,) = await api.run(request, [job])
        return api.json(api.result_dict(response, started))

    for path in ("/v1/pose", "/pose"):
        app.post(
            path,
            dependencies=auth,
            response_model=None,
            responses={200: {"model": PoseOut}, **errors},
            openapi_extra=openapi_body(batch=False),
            include_in_schema=path == "/v1/pose",
            summary="Estimate poses",
        )(pose)

    @app.post(
        "/v1/pose/render",
        dependencies=auth,
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, **errors},
        openapi_extra=openapi_body(batch=False),
        summary="Draw the poses on the image",
    )
    async def pose_render(request: Request, query: Annotated[RenderQuery, Query()]) -> Response:
        """The image with boxes and skeletons drawn: PNG, or JPEG when ``Accept`` prefers it."""
        job = await reader.read_single(request, query)
        assert isinstance(job.image, bytes)
        limit = settings.max_image_pixels
        job.image = await asyncio.to_thread(decode_image, job.image, max_pixels=limit)
        (response,) = await api.run(request, [job])
        info = api.model_info()
        fmt: Literal["png", "jpeg"] = "jpeg" if _wants_jpeg(request) else "png"
        canvas = await asyncio.to_thread(
            render.draw_poses,
            job.image,
            response.result,
            info.get("keypoint_names", ()),
            info.get("skeleton", ()),
            min_score=query.min_score,
        )
        return Response(
            await asyncio.to_thread(render.encode, canvas, fmt), media_type=f"image/{fmt}"
        )

    @app.post(
        "/v1/pose/batch",
        dependencies=auth,
        response_model=None,
        responses={200: {"model": BatchOut}, **errors},
        openapi_extra=openapi_body(batch=True),
        summary="Estimate poses in several images",
    )
    async def pose_batch(request: Request, query: Annotated[PoseOptionsIn, Query()]) -> Response:
        """Several images (multipart ``image`` parts or a JSON list), one result each, in order;
        the first failing image fails the request and cancels the others."""
        started = time.monotonic()
        jobs = await reader.read_batch(request, query)
        responses = await api.run(request, jobs)
        return api.json({"results": [api.result_dict(r, started) for r in responses]})

    @app.get("/v1/models", dependencies=auth, responses={503: errors[503]}, summary="Served model")
    async def models() -> Response:
        """The served model (name, weights sha256, input size, keypoints, skeleton, detector,
        device) and the server's defaults and limits."""
        return api.json({"model": api.model_info(), "server": api.server_info()})

    @app.get("/livez", summary="Liveness")
    async def livez() -> dict[str, str]:
        """200 while the process runs."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness", responses={503: {"description": "not ready"}})
    async def readyz() -> JSONResponse:
        """200 once warmed up and while not draining, else 503."""
        if engine.ready:
            return JSONResponse({"status": "ready"})
        state = "draining" if engine.draining else "starting"
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(await asyncio.to_thread(metrics.render), media_type=METRICS_CONTENT_TYPE)

    return app


class _PoseApi:
    """What the routes share: running engine jobs and building the JSON answers."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._model_info: dict[str, Any] | None = None

    async def run(self, request: Request, jobs: Sequence[PoseRequest]) -> list[PoseResponse]:
        """Run every job as its own engine job: all the answers, or the first error.

        A client disconnect, the deadline or the first failure cancels the jobs still pending (the
        engine drops them before the pipeline).
        """
        tasks = [asyncio.create_task(self.engine.infer(job)) for job in jobs]
        watcher = asyncio.create_task(_wait_disconnect(request))
        deadline = min((job.deadline for job in jobs if job.deadline is not None), default=None)
        pending = set(tasks)
        try:
            while pending:
                timeout = None
                if deadline is not None:
                    timeout = max(0.0, deadline + _DEADLINE_SLACK_S - time.monotonic())
                done, _ = await asyncio.wait(
                    pending | {watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    raise ApiError(504, "deadline_exceeded", "the request deadline passed")
                if watcher in done:
                    raise ApiError(499, "client_closed", "the client disconnected")
                for task in done:
                    pending.discard(task)
                    error = task.exception()
                    if error is not None:
                        raise error
            return [task.result() for task in tasks]
        finally:
            watcher.cancel()
            for task in pending:
                task.cancel()
            await asyncio.gather(watcher, *pending, return_exceptions=True)

    def model_info(self) -> dict[str, Any]:
        """The engine's model description (cached once known; 503 before the engine started)."""
        if self._model_info is None:
            self._model_info = _jsonable(self.engine.model_info())
        return self._model_info

    def server_info(self) -> dict[str, Any]:
        """Defaults and limits a client may want to know."""
        s = self.settings
        return {
            "defaults": {"flip_test": s.flip_test, "precision": s.precision},
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_image_pixels": s.max_image_pixels,
                "max_boxes": s.max_boxes,
                "max_images_per_request": s.max_images_per_request,
                "request_timeout_ms": s.request_timeout_ms,
            },
            "auth": bool(s.api_keys),
        }

    def result_dict(self, response: PoseResponse, started: float) -> dict[str, Any]:
        """The JSON answer for one image."""
        info = self.model_info()
        timing = dict(response.timing_ms)
        timing["request"] = (time.monotonic() - started) * 1000.0
        return {
            "persons": _persons(response.result),
            "image": {"width": response.result.width, "height": response.result.height},
            "keypoint_names": list(info.get("keypoint_names", ())),
            "skeleton": [list(pair) for pair in info.get("skeleton", ())],
            "model": {k: v for k, v in info.items() if k not in ("keypoint_names", "skeleton")},
            "timing_ms": timing,
        }

    @staticmethod
    def json(content: Any) -> Response:
        """A JSON response that refuses NaN and infinities (a bug upstream: 500, not bad JSON)."""
        try:
            body = json.dumps(content, allow_nan=False, separators=(",", ":"))
        except ValueError as exc:
            logger.error("non-finite number in a response", exc_info=exc)
            raise ApiError(500, "internal", "the result held a non-finite number") from exc
        return Response(body.encode(), media_type="application/json")


def _persons(result: ImageResult) -> list[dict[str, Any]]:
    out = []
    for person in result.persons:
        entry: dict[str, Any] = {
            "bbox": list(person.bbox),
            "bbox_score": person.bbox_score,
            "score": person.score,
            "keypoints": [list(point) for point in person.keypoints],
        }
        if person.sigmas is not None:
            entry["sigmas"] = [list(sigma) for sigma in person.sigmas]
        out.append(entry)
    return out


def _jsonable(value: Any) -> Any:
    """A model description as plain JSON: tuples -> lists, non-finite floats -> None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


async def _wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body is read already, so receive() only waits)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _wants_jpeg(request: Request) -> bool:
    """Whether ``Accept`` prefers image/jpeg to image/png (PNG when equal or unsaid)."""
    quality = {"image/png": 0.0, "image/jpeg": 0.0}
    for entry in request.headers.get("accept", "").split(","):
        media, _, params = entry.strip().partition(";")
        media = {"image/jpg": "image/jpeg"}.get(media.strip().lower(), media.strip().lower())
        if media not in quality:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media] = max(quality[media], q)
    return quality["image/jpeg"] > quality["image/png"]


# Errors.
_STATUS_OF_ENGINE_CODE = {
    "queue_full": 429,
    "unavailable": 503,
    "shutting_down": 503,
    "deadline_exceeded": 504,
    "internal": 500,
}
_CODE_OF_STATUS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


def _install_error_handlers(app: FastAPI) -> None:
    """Map every error to ``{"error": {"code", "message"}}`` with its status."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def image_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ImageError)
        return error_response(exc.status, exc.code, exc.message)

    async def engine_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError)
        status = _STATUS_OF_ENGINE_CODE.get(exc.code, 500)
        headers = {}
        if isinstance(exc, QueueFullError):
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
        elif status == 503:
            headers["retry-after"] = "1"
        message = str(exc)
        if status == 500:
            request_id = getattr(request.state, "request_id", "?")
            logger.error("inference failed", exc_info=exc, extra={"request_id": request_id})
            message = f"inference failed (request id {request_id})"
        return error_response(status, exc.code, message, headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = [
            {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
        return error_response(422, "invalid_request", message or "invalid request", None, details)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _CODE_OF_STATUS.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ImageError, image_error)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


# Module-level because the route annotations are strings (``from __future__ import annotations``)
# that FastAPI resolves in this module's globals.
_BEARER = HTTPBearer(auto_error=False, description="an API key as a bearer token")
_API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


def _auth_dependencies(keys: Sequence[str]) -> list[Any]:
    """None without keys; else one that wants ``Authorization: Bearer KEY`` or ``X-API-Key``."""
    if not keys:
        return []
    accepted = [key.encode() for key in keys]

    async def require_key(
        token: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        api_key: Annotated[str | None, Depends(_API_KEY_HEADER)],
    ) -> None:
        given = api_key or (token.credentials if token is not None else "")
        # Compare with every key in constant time, so timing tells nothing about a near match.
        matches = [hmac.compare_digest(given.encode(), key) for key in accepted]
        if not given or not any(matches):
            raise ApiError(
                401,
                "unauthenticated",
                "a valid API key is required (Authorization: Bearer KEY, or X-API-Key: KEY)",
                headers={"www-authenticate": "Bearer"},
            )

    return [Depends(require_key)]
