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
import hashlib
import hmac
import importlib.resources
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, swagger_ui_default_parameters
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.interfaces import ImageResult
from service import render
from service.engine import PoseRequest, PoseResponse
from service.engine_api import EngineHandle
from service.errors import ClientClosedError, EngineError, InferenceError, UnauthenticatedError
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import Metrics
from service.rest_inputs import (
    BatchQuery,
    InputReader,
    PoseQuery,
    RenderQuery,
    openapi_body,
    parse_query,
)
from service.rest_middleware import (
    BodyLimitMiddleware,
    DirectRoutes,
    Endpoint,
    ExceptionHandler,
    RequestContextMiddleware,
    error_response,
    header_of,
    http_error_response,
    internal_error_response,
)
from service.rest_video import VIDEO_PATH, video_router
from service.settings import Settings

logger = logging.getLogger(__name__)

# Pose requests, counted in pose_requests_total.
API_PATHS = ("/v1/pose", "/pose", "/v1/pose/render", "/v1/pose/batch", VIDEO_PATH)
_ERROR_DOCS = {
    400: "undecodable image, bad base64 or JSON, invalid boxes",
    401: "missing or wrong API key",
    408: "the body did not arrive in time",
    413: "body, image or batch too large",
    415: "unsupported media type",
    422: "schema violation",
    429: "queue full; retry after Retry-After seconds",
    431: "request headers too large",
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
    # Absent with ?model_info=false.
    keypoint_names: list[str] | None = None
    skeleton: list[list[int]] | None = None
    model: dict[str, Any] | None = None
    timing_ms: dict[str, float]


class BatchOut(BaseModel):
    """One result per image, in request order."""

    results: list[PoseOut]


def create_app(
    engine: EngineHandle,
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    served_by: str | None = None,
) -> FastAPI:
    """Build the HTTP app over ``engine``.

    Args:
        engine: the shared engine; the caller starts and stops it.
        settings: limits, defaults and API keys.
        metrics: the process's metrics (the object the engine observes); a fresh private
            registry when None.
        served_by: this front-end process's name, sent back as ``x-served-by`` (several front
            ends).

    Returns:
        The FastAPI app; ``app.state.metrics`` holds its ``Metrics``.
    """
    metrics = metrics if metrics is not None else Metrics()
    metrics.bind_engine(engine)
    api = _PoseApi(engine, settings)
    reader = InputReader(settings)
    # No slash redirects: a redirect would be built from the client's Host header.
    app = _PoseApp(
        title="DistilPose pose service",
        version="1",
        description=__doc__,
        redirect_slashes=False,
        docs_url=None,  # served by _install_docs from local files, not from a CDN
        redoc_url=None,
    )
    app.state.metrics = metrics
    _install_docs(app)
    for error_class, handler in _ERROR_HANDLERS.items():
        app.add_exception_handler(error_class, handler)
    # A bug in a route inside the app: Starlette's error middleware answers with this, then
    # re-raises to RequestContextMiddleware (in front of the app), which logs it.
    app.add_exception_handler(Exception, _unexpected_error)
    require_key = _key_check(settings.api_keys)
    # The pose routes' functions, called by DirectRoutes (filled below, where they are defined).
    direct: dict[str, Endpoint] = {}
    # In front of the whole app (``_PoseApp``), outermost first: request ids, logs and metrics
    # see every answer, 413s included; the pose routes are answered without FastAPI's layers.
    app.front = RequestContextMiddleware(
        BodyLimitMiddleware(
            DirectRoutes(
                app.inner,
                endpoints=direct,
                authorize=None if require_key is None else partial(_authorize, require_key),
                handlers=_ERROR_HANDLERS,
                app=app,
            ),
            max_body_bytes=settings.max_body_bytes,
            body_timeout_s=settings.http_body_timeout_s,
            max_header_bytes=settings.http_max_header_bytes,
        ),
        metrics=metrics,
        metric_paths=API_PATHS,
        served_by=served_by,
        access_log=settings.access_log,
    )
    auth = [] if require_key is None else [Depends(require_key)]
    errors: dict[int | str, dict[str, Any]] = {
        code: {"description": text} for code, text in _ERROR_DOCS.items()
    }

    async def pose(request: Request) -> Response:
        """Estimate the poses in one image: a raw image body, multipart or JSON."""
        started = time.monotonic()
        query = parse_query(PoseQuery, request)
        job = await reader.read_single(request, query)
        (response,) = await api.run(request, [job])
        return api.json(api.result_dict(response, started, model_info=query.model_info))

    for path in ("/v1/pose", "/pose"):
        direct[path] = pose
        app.post(
            path,
            dependencies=auth,
            response_model=None,
            responses={200: {"model": PoseOut}, **errors},
            openapi_extra=openapi_body(batch=False, query=PoseQuery),
            include_in_schema=path == "/v1/pose",
            summary="Estimate poses",
        )(pose)

    @app.post(
        "/v1/pose/render",
        dependencies=auth,
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, **errors},
        openapi_extra=openapi_body(batch=False, query=RenderQuery),
        summary="Draw the poses on the image",
    )
    async def pose_render(request: Request) -> Response:
        """The image with boxes and skeletons drawn: PNG, or JPEG when ``Accept`` prefers it."""
        query = parse_query(RenderQuery, request)
        job = await reader.read_single(request, query)
        job.return_image = True  # decoded in the engine's pool, after admission
        (response,) = await api.run(request, [job])
        assert response.image is not None
        info = api.model_info()
        fmt: Literal["png", "jpeg"] = "jpeg" if _wants_jpeg(request) else "png"
        canvas = await asyncio.to_thread(
            render.draw_poses,
            response.image,
            response.result,
            info["keypoint_names"],
            info["skeleton"],
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
        openapi_extra=openapi_body(batch=True, query=BatchQuery),
        summary="Estimate poses in several images",
    )
    async def pose_batch(request: Request) -> Response:
        """Several images (multipart ``image`` parts or a JSON list), one result each, in order;
        the first failing image fails the request and cancels the others."""
        started = time.monotonic()
        query = parse_query(BatchQuery, request)
        jobs = await reader.read_batch(request, query)
        responses = await api.run(request, jobs)
        results = [api.result_dict(r, started, model_info=query.model_info) for r in responses]
        return api.json({"results": results})

    direct["/v1/pose/batch"] = pose_batch

    app.include_router(video_router(api, settings, dependencies=auth, responses=errors))

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


class _PoseApp(FastAPI):
    """FastAPI behind this service's own ASGI layers (``front``): an HTTP request goes through
    them first, and only a request that ``DirectRoutes`` does not answer reaches FastAPI's own
    stack (``inner``). A pose request then skips five layers that each cost a coroutine call
    and more per request (FastAPI's telemetry check and its exception-telemetry and body-limit
    middleware, Starlette's error middleware and app entry): ``service.rest_middleware`` does
    their work for it (the last-resort 500, the body limit). Lifespan and websocket scopes go
    straight to FastAPI."""

    front: Any = None  # set by create_app: RequestContext(BodyLimit(DirectRoutes(inner)))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        front = self.front
        if front is not None and scope["type"] == "http":
            await front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def inner(self, scope: Any, receive: Any, send: Any) -> None:
        """FastAPI itself, with its middleware, router and exception handlers."""
        await super().__call__(scope, receive, send)


class _PoseApi:
    """What the routes share: running engine jobs and building the JSON answers."""

    def __init__(self, engine: EngineHandle, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._model_info: dict[str, Any] | None = None

    async def run(self, request: Request, jobs: Sequence[PoseRequest]) -> list[PoseResponse]:
        """Every job as its own engine job; a client disconnect cancels the pending ones."""
        source = _source_of(request)
        for job in jobs:
            job.source = source
        return await self.engine.infer_many(jobs, abandoned=partial(_wait_disconnect, request))

    def model_info(self) -> dict[str, Any]:
        """The engine's model description (cached once known; 503 before the engine started)."""
        if self._model_info is None:
            self._model_info = _jsonable(self.engine.model_info().to_dict())
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

    def result_dict(
        self, response: PoseResponse, started: float, *, model_info: bool = True
    ) -> dict[str, Any]:
        """The JSON answer for one image (without the model's names, skeleton and description
        when ``model_info`` is false)."""
        timing = dict(response.timing_ms)
        timing["request"] = (time.monotonic() - started) * 1000.0
        answer: dict[str, Any] = {
            "persons": _persons(response.result),
            "image": {"width": response.result.width, "height": response.result.height},
        }
        if model_info:
            info = self.model_info()
            answer["keypoint_names"] = info["keypoint_names"]
            answer["skeleton"] = info["skeleton"]
            answer["model"] = {
                k: v for k, v in info.items() if k not in ("keypoint_names", "skeleton")
            }
        answer["timing_ms"] = timing
        return answer

    @staticmethod
    def json(content: Any) -> Response:
        """A JSON response (orjson: a tenth of the standard encoder's time). Non-finite numbers
        never get here: ``_persons`` refuses them (orjson would write null)."""
        return Response(orjson.dumps(content), media_type="application/json")


def _persons(result: ImageResult) -> list[dict[str, Any]]:
    """The persons as JSON.

    Raises:
        InferenceError: A number is NaN or infinite (a bug upstream: 500, not bad JSON); one sum
            over each person's numbers finds it (a sum of finite numbers this small is finite).
    """
    out = []
    total = 0.0
    for person in result.persons:
        entry: dict[str, Any] = {
            "bbox": list(person.bbox),
            "bbox_score": person.bbox_score,
            "score": person.score,
            "keypoints": [list(point) for point in person.keypoints],
        }
        total += sum(person.bbox) + person.bbox_score + person.score
        total += sum(map(sum, person.keypoints))
        if person.sigmas is not None:
            entry["sigmas"] = [list(sigma) for sigma in person.sigmas]
            total += sum(map(sum, person.sigmas))
        out.append(entry)
    if not math.isfinite(total):
        error = InferenceError("the result held a non-finite number")
        logger.error("non-finite number in a response", exc_info=error)
        raise error
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


def _source_of(request: Request) -> str:
    """Who is asking, for fair batching: the API key's digest when one is sent, else the
    connection."""
    scope = request.scope  # (one scan of the raw headers each, not Starlette's Headers)
    key = header_of(scope, b"x-api-key") or (header_of(scope, b"authorization") or "")[7:]
    if key:
        return "key:" + hashlib.sha256(key.strip().encode()).hexdigest()[:16]
    client = request.client
    return f"http:{client.host}:{client.port}" if client else "http"


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


# API docs.
_DOCS_ASSETS = "/docs/assets"


def _install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` from files in the ``fastapi-offline`` package.

    FastAPI's own pages load their scripts, styles, favicon and fonts from CDNs, so they are blank
    offline or behind a strict proxy; these reference nothing outside this server.
    """
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.mount(_DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{_DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{_DOCS_ASSETS}/favicon.png",
            # No badge that sends the schema to validator.swagger.io.
            swagger_ui_parameters={**swagger_ui_default_parameters, "validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{_DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{_DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


# Errors.
_CODE_OF_STATUS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
_MAX_DETAILS = 10
_DETAIL_CHARS = 200


async def _engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return http_error_response(exc, getattr(request.state, "request_id", "?"))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    """The last-resort 500 of ``RequestContextMiddleware``, for a route inside the app."""
    return internal_error_response(getattr(request.state, "request_id", "?"))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # Bounded whatever was sent: the first few entries, each cut short, and the count.
    details = [
        {
            "loc": [str(part)[:_DETAIL_CHARS] for part in e.get("loc", ())][:8],
            "msg": str(e.get("msg", ""))[:_DETAIL_CHARS],
        }
        for e in errors[:_MAX_DETAILS]
    ]
    message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
    if len(errors) > _MAX_DETAILS:
        message += f" (and {len(errors) - _MAX_DETAILS} more)"
    return error_response(422, "invalid_request", message or "invalid request", None, details)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return http_error_response(ClientClosedError("the client went away mid-request"))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_OF_STATUS.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


# Every error as ``{"error": {"code", "message"}}`` with its status: the app's exception handlers,
# and ``DirectRoutes``' too.
_ERROR_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    EngineError: _engine_error,
    ClientDisconnect: _client_gone,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
}


# Module-level because the route annotations are strings (``from __future__ import annotations``)
# that FastAPI resolves in this module's globals.
_BEARER = HTTPBearer(auto_error=False, description="an API key as a bearer token")
_API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


def _key_check(keys: Sequence[str]) -> Callable[..., Awaitable[None]] | None:
    """None without keys; else the routes' dependency, which wants ``Authorization: Bearer KEY``
    or ``X-API-Key: KEY``."""
    if not keys:
        return None
    accepted = [key.encode() for key in keys]

    async def require_key(
        token: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        api_key: Annotated[str | None, Depends(_API_KEY_HEADER)],
    ) -> None:
        given = api_key or (token.credentials if token is not None else "")
        # Compare with every key in constant time, so timing tells nothing about a near match.
        matches = [hmac.compare_digest(given.encode(), key) for key in accepted]
        if not given or not any(matches):
            raise UnauthenticatedError(
                "a valid API key is required (Authorization: Bearer KEY, or X-API-Key: KEY)"
            )

    return require_key


async def _authorize(require_key: Callable[..., Awaitable[None]], request: Request) -> None:
    """What FastAPI runs for the dependency ``require_key``, for ``DirectRoutes``."""
    await require_key(await _BEARER(request), await _API_KEY_HEADER(request))
