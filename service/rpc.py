"""gRPC transport: a thin grpc.aio servicer of ``pose.v1.PoseService`` over the shared ``Engine``.

Parses requests into ``PoseRequest``, awaits ``Engine.infer``, maps ``ImageResult`` to protobuf and
engine errors to gRPC status codes. Beside it run the standard ``grpc.health.v1`` service (SERVING
only between ``set_serving(True)`` after warm-up and ``set_serving(False)`` at drain) and server
reflection, so grpcurl and Kubernetes gRPC probes work; both stay open when API keys are set.

``StreamEstimate`` keeps at most ``settings.stream_window`` frames of a stream in the engine: a slot
is taken before the next frame is read and given back once its answer is written, so a client that
sends faster than the server answers (or reads answers slower) is paused by gRPC flow control
instead of buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from model.interfaces import ImageResult, PoseOptions
from service.engine import (
    DeadlineExceededError,
    Engine,
    EngineError,
    EngineStoppedError,
    InferenceError,
    NotReadyError,
    PoseRequest,
    PoseResponse,
    QueueFullError,
)
from service.images import ImageError, validate_boxes
from service.metrics import Metrics
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc
from service.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pose_pb2.DESCRIPTOR.services_by_name["PoseService"].full_name
_SERVICE_PREFIX = f"/{SERVICE_NAME}/"
_PRECISIONS = {
    pose_pb2.PRECISION_FP32: "fp32",
    pose_pb2.PRECISION_BF16: "bf16",
    pose_pb2.PRECISION_FP16: "fp16",
}
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _StreamUnavailable(Exception):
    """The engine stopped taking work (draining or stopped): the stream ends with UNAVAILABLE."""


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """Map an error raised by parsing or by ``Engine.infer`` to (gRPC status, machine code)."""
    if isinstance(exc, ImageError):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.code
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.code
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, exc.code
    if isinstance(exc, NotReadyError | EngineStoppedError):
        return grpc.StatusCode.UNAVAILABLE, exc.code
    if isinstance(exc, InferenceError | EngineError):
        return grpc.StatusCode.INTERNAL, exc.code
    if isinstance(exc, ValueError):  # the engine's check of tensor shapes
        return grpc.StatusCode.INVALID_ARGUMENT, "bad_request"
    return grpc.StatusCode.INTERNAL, "internal"


def _retry_metadata(exc: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling a refused client when to come back (like HTTP ``Retry-After``)."""
    if not isinstance(exc, QueueFullError):
        return ()
    seconds = max(0.0, float(exc.retry_after_s))
    return (
        ("retry-after", str(max(1, math.ceil(seconds)))),
        ("grpc-retry-pushback-ms", str(int(seconds * 1000))),
    )


def _image_of(request: Any, max_image_pixels: int) -> bytes | torch.Tensor:
    """The encoded bytes of a request, or its raw RGB pixels as a (3, H, W) uint8 tensor."""
    if request.HasField("raw"):
        if request.image:
            raise ImageError("bad_image", "set either image or raw, not both")
        raw = request.raw
        width, height = int(raw.width), int(raw.height)
        if width <= 0 or height <= 0:
            raise ImageError("bad_image", "raw.width and raw.height must be positive")
        if width * height > max_image_pixels:
            raise ImageError(
                "too_many_pixels", f"{width}x{height} is over {max_image_pixels} pixels", 413
            )
        if len(raw.rgb) != width * height * 3:
            raise ImageError(
                "bad_image", f"raw.rgb has {len(raw.rgb)} bytes, expected {width * height * 3}"
            )
        # (H, W, 3) bytes -> a (3, H, W) uint8 view: one copy (frombuffer wants a writable
        # buffer), no transpose on the event loop; the pipeline reads strided tensors.
        pixels = torch.frombuffer(bytearray(raw.rgb), dtype=torch.uint8)
        return pixels.view(height, width, 3).permute(2, 0, 1)
    if not request.image:
        raise ImageError("bad_image", "the request has no image")
    return bytes(request.image)


def _boxes_of(request: Any, max_boxes: int) -> torch.Tensor | None:
    """Caller boxes as validated float32 (M, 5); a box without a score gets 1 (as over HTTP)."""
    if not request.boxes:
        return None
    rows = [
        [box.x, box.y, box.width, box.height] + ([box.score] if box.HasField("score") else [])
        for box in request.boxes
    ]
    return validate_boxes(rows, max_boxes=max_boxes)


def _box(x: float, y: float, w: float, h: float, score: float) -> Any:
    return pose_pb2.Box(x=x, y=y, width=w, height=h, score=score)


def response_to_proto(response: PoseResponse, frame_id: str, index: int) -> Any:
    """Build the ``EstimateResponse`` of one engine answer."""
    result: ImageResult = response.result
    persons = []
    for person in result.persons:
        sigmas = person.sigmas
        keypoints = [
            pose_pb2.Keypoint(x=x, y=y, score=score)
            if sigmas is None
            else pose_pb2.Keypoint(
                x=x, y=y, score=score, sigma_x=sigmas[k][0], sigma_y=sigmas[k][1]
            )
            for k, (x, y, score) in enumerate(person.keypoints)
        ]
        persons.append(
            pose_pb2.Person(
                box=_box(*person.bbox, person.bbox_score), score=person.score, keypoints=keypoints
            )
        )
    return pose_pb2.EstimateResponse(
        frame_id=frame_id,
        persons=persons,
        width=result.width,
        height=result.height,
        timing_ms=response.timing_ms,
        index=index,
    )


def model_info_to_proto(info: dict[str, Any], settings: Settings) -> Any:
    """Build ``ModelInfo`` from ``Engine.model_info()`` (pipeline ``describe()``) and settings.

    Defaults, devices and limits come from the settings: they are what a request gets.
    """
    input_size = info.get("input_size") or (0, 0)
    message = pose_pb2.ModelInfo(
        model=str(info.get("model") or info.get("name") or ""),
        weights_sha256=str(info.get("weights_sha256") or ""),
        input_width=int(input_size[0]),
        input_height=int(input_size[1]),
        keypoint_names=[str(name) for name in info.get("keypoint_names") or ()],
        skeleton=[pose_pb2.Edge(a=int(a), b=int(b)) for a, b in info.get("skeleton") or ()],
        detector=str(info.get("detector") or ""),
        devices=settings.devices(),
        default_flip_test=settings.flip_test,
        default_precision=settings.precision,
        stream_window=settings.stream_window,
        max_boxes=settings.max_boxes,
        max_message_bytes=settings.grpc_max_message_bytes,
        max_image_pixels=settings.max_image_pixels,
    )
    # A JSON round trip turns tuples, paths and other non-JSON values into what Struct accepts.
    message.details.update(json.loads(json.dumps(info, default=str)))
    return message


class PoseServicer(pose_pb2_grpc.PoseServiceServicer):  # type: ignore[misc]
    """``pose.v1.PoseService`` over one engine."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics

    def _observe(self, code: grpc.StatusCode, t0: float) -> None:
        """Count one finished call or stream frame in ``pose_requests_total{transport="grpc"}``."""
        if self._metrics is not None:
            self._metrics.observe_request("grpc", code.name, time.monotonic() - t0)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """Engine deadline (``time.monotonic()``): the client's, capped by the request timeout."""
        budget_s = self._settings.request_timeout_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            budget_s = min(budget_s, max(0.0, remaining))
        return time.monotonic() + budget_s

    def _pose_request(self, request: Any, deadline: float) -> PoseRequest:
        settings = self._settings
        options = PoseOptions(
            flip_test=request.flip_test if request.HasField("flip_test") else settings.flip_test,
            return_sigmas=request.return_sigmas,
            oks_nms=request.oks_nms,
            precision=_PRECISIONS.get(request.precision, settings.precision),  # type: ignore[arg-type]
            swap_flip_scores=request.swap_flip_scores,
        )
        return PoseRequest(
            image=_image_of(request, settings.max_image_pixels),
            boxes=_boxes_of(request, settings.max_boxes),
            options=options,
            deadline=deadline,
        )

    async def Estimate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One image in, one ``EstimateResponse`` out; failures are gRPC statuses."""
        t0 = time.monotonic()
        code = grpc.StatusCode.CANCELLED  # unless it gets further: the client went away
        try:
            try:
                response = await self._engine.infer(
                    self._pose_request(request, self._deadline(context))
                )
            except Exception as exc:
                code, reason = _status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    logger.exception("Estimate failed")
                await context.abort(
                    code, f"{reason}: {exc}", trailing_metadata=_retry_metadata(exc)
                )
            code = grpc.StatusCode.OK
            return response_to_proto(response, request.frame_id, 0)
        finally:
            remaining = context.time_remaining()
            if code == grpc.StatusCode.CANCELLED and remaining is not None and remaining <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED  # gRPC cancelled us at the deadline
            self._observe(code, t0)

    async def _frame(self, request: Any, index: int, deadline: float) -> Any:
        """One stream frame: its response, or a response carrying the error; never raises for a
        bad frame. Raises ``_StreamUnavailable`` when the engine no longer takes work."""
        t0 = time.monotonic()
        try:
            response = await self._engine.infer(self._pose_request(request, deadline))
        except (NotReadyError, EngineStoppedError) as exc:
            self._observe(grpc.StatusCode.UNAVAILABLE, t0)
            raise _StreamUnavailable(f"{exc.code}: {exc}") from exc
        except Exception as exc:
            code, reason = _status_of(exc)
            self._observe(code, t0)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("StreamEstimate frame %d failed", index)
            error = pose_pb2.Error(
                code=reason,
                message=str(exc),
                grpc_code=code.value[0],
                retry_after_s=getattr(exc, "retry_after_s", 0.0) or 0.0,
            )
            return pose_pb2.EstimateResponse(frame_id=request.frame_id, error=error, index=index)
        self._observe(grpc.StatusCode.OK, t0)
        return response_to_proto(response, request.frame_id, index)

    async def _read_frames(
        self,
        requests: AsyncIterable[Any],
        context: grpc.aio.ServicerContext,
        slots: asyncio.Semaphore,
        pending: asyncio.Queue[asyncio.Task[Any] | None],
    ) -> None:
        """Read frames while a window slot is free; queue their engine tasks in request order."""
        iterator = aiter(requests)
        index = 0
        try:
            while True:
                await slots.acquire()  # the window is full: stop reading (flow control)
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    slots.release()
                    return
                deadline = self._deadline(context)
                pending.put_nowait(asyncio.create_task(self._frame(request, index, deadline)))
                index += 1
        finally:
            pending.put_nowait(None)

    async def StreamEstimate(
        self, request_iterator: AsyncIterable[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Frames in, answers out in request order, at most ``stream_window`` in flight."""
        window = max(1, int(self._settings.stream_window))
        slots = asyncio.Semaphore(window)
        # Bounded: at most `window` tasks (each holds a slot until written) plus the end marker.
        pending: asyncio.Queue[asyncio.Task[Any] | None] = asyncio.Queue(maxsize=window + 1)
        reader = asyncio.create_task(self._read_frames(request_iterator, context, slots, pending))
        current: asyncio.Task[Any] | None = None
        try:
            while (current := await pending.get()) is not None:
                try:
                    response = await current
                except _StreamUnavailable as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                yield response
                slots.release()
            await reader  # re-raises a failure of the request stream
        finally:
            # Cancelled stream (or abort): drop every frame that has not been answered. Cancelling
            # a task awaiting Engine.infer drops its job before it reaches the pipeline.
            reader.cancel()
            tasks = [current] if current is not None else []
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    tasks.append(task)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """What is served and the server's limits."""
        try:
            info = self._engine.model_info()
        except Exception as exc:
            code, reason = _status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"{reason}: {exc}")
        return model_info_to_proto(info, self._settings)


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1.Health`` whose status is set synchronously by ``set(serving)``.

    Knows the overall service ``""`` and ``pose.v1.PoseService``; both start NOT_SERVING.
    """

    def __init__(self) -> None:
        self._status = {"": _NOT_SERVING, SERVICE_NAME: _NOT_SERVING}
        self._changed = asyncio.Event()

    def set(self, serving: bool) -> None:
        """Mark every known service SERVING or NOT_SERVING and wake the watchers."""
        status = _SERVING if serving else _NOT_SERVING
        for name in self._status:
            self._status[name] = status
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The current status, or NOT_FOUND for an unknown service."""
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """The current status, then every change, until the client goes away."""
        last = None
        while True:
            changed = self._changed
            status = self._status.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()


def _api_key_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        text = value.decode() if isinstance(value, bytes) else value
        if key == "x-api-key":
            return text.strip()
        if key == "authorization" and text[:7].lower() == "bearer ":
            return text[7:].strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """UNAUTHENTICATED for ``pose.v1`` calls without a configured key; health and reflection open.

    The key comes from metadata ``authorization: Bearer KEY`` or ``x-api-key: KEY``.
    """

    def __init__(self, api_keys: Sequence[str]) -> None:
        self._keys = [key.encode() for key in api_keys]

    def _allowed(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        key = _api_key_of(metadata)
        if key is None:
            return False
        # Compare against every key in constant time so timing tells nothing about which is close.
        return any([hmac.compare_digest(key.encode(), known) for known in self._keys])

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not handler_call_details.method.startswith(_SERVICE_PREFIX)
            or self._allowed(handler_call_details.invocation_metadata)
        ):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")

        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class GrpcServer:
    """The gRPC server of the service: PoseService, health and reflection on one port.

    Args:
        engine: the engine shared with the HTTP transport.
        settings: ``host``, ``grpc_port`` (0 picks a free port), ``api_keys``,
            ``grpc_max_message_bytes``, ``stream_window`` and the request defaults and limits.
        metrics: where to count calls and stream frames, if anywhere.
    """

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (known after ``start``)."""
        if self._port is None:
            raise RuntimeError("the gRPC server is not started")
        return self._port

    async def start(self) -> None:
        """Bind and start serving; health stays NOT_SERVING until ``set_serving(True)``."""
        settings = self._settings
        max_bytes = int(settings.grpc_max_message_bytes)
        interceptors = [ApiKeyInterceptor(settings.api_keys)] if settings.api_keys else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pose_pb2_grpc.add_PoseServiceServicer_to_server(
            PoseServicer(self._engine, settings, self._metrics), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        host = settings.host
        address = (
            f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
        )
        self._port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        logger.info("gRPC listening on %s (port %d)", host, self._port)

    def set_serving(self, serving: bool) -> None:
        """grpc.health.v1 status: SERVING after warm-up, NOT_SERVING while draining."""
        self._health.set(serving)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then stop: running calls get ``grace_s`` seconds, new ones are refused."""
        self._health.set(False)
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()


def create_grpc_server(
    engine: Engine, settings: Settings, *, metrics: Metrics | None = None
) -> GrpcServer:
    """Build (not start) the gRPC server over ``engine``; the composition root starts it.

    Args:
        engine: the engine shared with the HTTP transport.
        settings: the service settings.
        metrics: where to count calls and stream frames (``transport="grpc"``), if anywhere.
    """
    return GrpcServer(engine, settings, metrics)
