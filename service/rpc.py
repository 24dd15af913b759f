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
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from model.interfaces import ImageResult, ModelDescription, Person, PoseOptions
from service.engine import PoseRequest, PoseResponse
from service.engine_api import EngineHandle
from service.errors import (
    EngineError,
    EngineStoppedError,
    ImageError,
    InvalidRequestError,
    NotReadyError,
)
from service.metrics import Metrics
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc
from service.settings import Settings
from service.tracking import Smoothing, TrackedFrame, Tracker, TrackOptions, start_tracker

logger = logging.getLogger(__name__)

SERVICE_NAME: str = pose_pb2.DESCRIPTOR.services_by_name["PoseService"].full_name
_SERVICE_PREFIX = f"/{SERVICE_NAME}/"
_CALL_DEADLINE_SLACK_S = 0.1
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
    """(gRPC status, machine code) of an error raised by parsing or by the engine, from the one
    table in ``service.errors``; anything else is INTERNAL."""
    if isinstance(exc, EngineError):
        return grpc.StatusCode[exc.status.grpc], exc.code
    return grpc.StatusCode.INTERNAL, "internal"


def _retry_metadata(exc: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata: the error code, and when a refused client may come back (like HTTP
    ``Retry-After``)."""
    code = exc.code if isinstance(exc, EngineError) else "internal"
    metadata: tuple[tuple[str, str], ...] = (("error-code", code),)
    retry = exc.retry_after_s if isinstance(exc, EngineError) else None
    if retry is None:
        return metadata
    seconds = max(0.0, float(retry))
    return (
        *metadata,
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
                "too_many_pixels", f"{width}x{height} is over {max_image_pixels} pixels"
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


def _boxes_of(request: Any) -> list[list[float]] | None:
    """Caller boxes as rows (the engine validates them); a box without a score gets 1."""
    if not request.boxes:
        return None
    return [
        [box.x, box.y, box.width, box.height] + ([box.score] if box.HasField("score") else [])
        for box in request.boxes
    ]


def _precision_of(value: int, default: str) -> Any:
    """The request's precision; an enum value this server does not know is passed on as text,
    for the engine to refuse (``bad_options``), never silently replaced by the default."""
    if value == pose_pb2.PRECISION_UNSPECIFIED:
        return default
    return _PRECISIONS.get(value, f"enum value {value}")  # type: ignore[call-overload]


# An answer's persons are written as protobuf wire bytes by numpy, all at once, and parsed by
# protobuf in one call (``EstimateResponse.FromString``), instead of one message per person and
# per keypoint built field by field in Python (issue 16: 42 against 29 us for three persons).
# Each person is one record of a structured dtype, tags and lengths included: the ``persons``
# field's tag and length are written before it, its ``track_id`` after it.
_PERSONS_TAG = b"\x12"  # EstimateResponse.persons (2), length-delimited
_TRACK_ID_TAG = b"\x20"  # Person.track_id (4), varint


def _float_fields(names: Sequence[str]) -> list[tuple[str, str]]:
    """(tag byte, little-endian float32) for each field name."""
    fields: list[tuple[str, str]] = []
    for name in names:
        fields += [(f"{name}_tag", "u1"), (name, "<f4")]
    return fields


_BOX_FIELDS = (("x", 1), ("y", 2), ("width", 3), ("height", 4), ("box_score", 5))
_KEYPOINT_FIELDS = (("x", 1), ("y", 2), ("score", 3), ("sigma_x", 4), ("sigma_y", 5))
# Person.box (field 1) with every Box field, then Person.score (field 2); packed, no padding.
_HEAD = np.dtype(
    [
        ("box_tag", "u1"),
        ("box_length", "u1"),
        *_float_fields([name for name, _ in _BOX_FIELDS]),
        *_float_fields(["score"]),
    ]
)


def _keypoint_dtype(sigmas: bool) -> np.dtype[Any]:
    """One Person.keypoints (field 3) entry: tag, length, then the Keypoint's float fields."""
    names = [name for name, _ in _KEYPOINT_FIELDS[: 5 if sigmas else 3]]
    return np.dtype([("tag", "u1"), ("length", "u1"), *_float_fields(names)])


def _tag(number: int, wire_type: int) -> int:
    return number << 3 | wire_type


@functools.lru_cache(maxsize=16)
def _person_record(keypoints: int, sigmas: bool) -> tuple[bytes, np.dtype[Any]]:
    """One person record with every tag and length written and every value zero, and its dtype
    (``np.frombuffer(bytearray(record * count), dtype)`` is ``count`` writable records; copying
    a structured array itself costs 20 times more)."""
    point = _keypoint_dtype(sigmas)
    dtype = np.dtype([("head", _HEAD), ("keypoints", point, (keypoints,))])
    records = np.zeros(1, dtype)
    head = records["head"]
    head["box_tag"] = _tag(1, 2)
    head["box_length"] = _HEAD.itemsize - 2 - 5  # the five Box fields, not the tag or score
    for name, number in _BOX_FIELDS:
        head[f"{name}_tag"] = _tag(number, 5)
    head["score_tag"] = _tag(2, 5)
    points = records["keypoints"]
    points["tag"] = _tag(3, 2)
    points["length"] = point.itemsize - 2
    for name, number in _KEYPOINT_FIELDS[: 5 if sigmas else 3]:
        points[f"{name}_tag"] = _tag(number, 5)
    return records.tobytes(), dtype


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _persons_wire(persons: Sequence[Person], track_ids: Sequence[int] | None = None) -> bytes:
    """``EstimateResponse.persons`` as wire bytes (``track_ids``: each person's ``track_id``)."""
    if not persons:
        return b""
    keypoints = len(persons[0].keypoints)
    sigmas = persons[0].sigmas is not None
    if any(
        len(p.keypoints) != keypoints or (p.sigmas is not None) != sigmas for p in persons
    ):  # (no model answers so; correct anyway)
        return b"".join(
            _persons_wire([p], None if track_ids is None else [track_ids[i]])
            for i, p in enumerate(persons)
        )
    count = len(persons)
    record, dtype = _person_record(keypoints, sigmas)
    records = np.frombuffer(bytearray(record * count), dtype)
    chain = itertools.chain.from_iterable
    with np.errstate(over="ignore"):  # a value past float32 is written as inf, as protobuf does
        head = np.fromiter(
            chain((*p.bbox, p.bbox_score, p.score) for p in persons), np.float32, 6 * count
        ).reshape(count, 6)
        points = np.fromiter(
            chain(chain(p.keypoints for p in persons)), np.float32, 3 * keypoints * count
        ).reshape(count, keypoints, 3)
        spread = (
            np.fromiter(
                chain(chain(p.sigmas or () for p in persons)), np.float32, 2 * keypoints * count
            ).reshape(count, keypoints, 2)
            if sigmas
            else None
        )
    fields = records["head"]
    for column, name in enumerate(("x", "y", "width", "height", "box_score", "score")):
        fields[name] = head[:, column]
    written = records["keypoints"]
    for column, name in enumerate(("x", "y", "score")):
        written[name] = points[:, :, column]
    if spread is not None:
        written["sigma_x"] = spread[:, :, 0]
        written["sigma_y"] = spread[:, :, 1]
    raw = records.tobytes()
    step = dtype.itemsize
    if track_ids is None:
        prefix = _PERSONS_TAG + _varint(step)
        return b"".join(prefix + raw[i : i + step] for i in range(0, len(raw), step))
    parts = []
    for i in range(count):
        tail = _TRACK_ID_TAG + _varint(track_ids[i])
        parts += [_PERSONS_TAG, _varint(step + len(tail)), raw[i * step : (i + 1) * step], tail]
    return b"".join(parts)


def response_to_proto(
    response: PoseResponse, frame_id: str, index: int, tracked: TrackedFrame | None = None
) -> Any:
    """Build the ``EstimateResponse`` of one engine answer (of a tracked stream's frame: with
    ``track_id`` and ``detector_ran``)."""
    result: ImageResult = response.result
    track_ids = None if tracked is None else tracked.track_ids
    message = pose_pb2.EstimateResponse.FromString(_persons_wire(result.persons, track_ids))
    message.frame_id = frame_id
    message.width = result.width
    message.height = result.height
    message.timing_ms.update(response.timing_ms)
    message.index = index
    message.detector_ran = tracked is not None and tracked.detector_ran
    return message


def tracker_of(request: Any, engine: EngineHandle, settings: Settings) -> Tracker:
    """The tracker a stream's first request asks for (``track``, ``detect_every``, ``smoothing``).

    Raises:
        InvalidRequestError: ``bad_options``: a value out of range.
    """
    smoothing = None
    if request.HasField("smoothing"):
        given = request.smoothing
        names = ("min_cutoff", "beta", "d_cutoff", "fps")
        smoothing = Smoothing(**{n: getattr(given, n) for n in names if given.HasField(n)})
    options = TrackOptions(detect_every=request.detect_every, smoothing=smoothing)
    return start_tracker(engine, options, settings)


def model_info_to_proto(info: ModelDescription, settings: Settings) -> Any:
    """Build ``ModelInfo`` from ``Engine.model_info()`` and the settings.

    Defaults, devices and limits come from the settings: they are what a request gets.
    """
    message = pose_pb2.ModelInfo(
        model=info.model,
        weights_sha256=info.weights_sha256 or "",
        input_width=int(info.input_size[0]),
        input_height=int(info.input_size[1]),
        keypoint_names=list(info.keypoint_names),
        skeleton=[pose_pb2.Edge(a=int(a), b=int(b)) for a, b in info.skeleton],
        detector=info.detector or "",
        devices=settings.devices(),
        default_flip_test=settings.flip_test,
        default_precision=settings.precision,
        stream_window=settings.stream_window,
        max_boxes=settings.max_boxes,
        max_message_bytes=settings.grpc_max_message_bytes,
        max_image_pixels=settings.max_image_pixels,
    )
    # A JSON round trip turns non-finite floats and other non-JSON values into what Struct takes.
    message.details.update(json.loads(json.dumps(info.to_dict(), default=str)))
    return message


class PoseServicer(pose_pb2_grpc.PoseServiceServicer):  # type: ignore[misc]
    """``pose.v1.PoseService`` over one engine."""

    def __init__(
        self, engine: EngineHandle, settings: Settings, metrics: Metrics | None = None
    ) -> None:
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
        if remaining is not None and remaining < budget_s:
            # The call's own deadline binds: gRPC ends the call then (DEADLINE_EXCEEDED, and the
            # cancellation drops its jobs); the engine's timer is only the backstop, so that a
            # stream is not answered frame by frame with errors racing the call's end.
            budget_s = max(0.0, remaining) + _CALL_DEADLINE_SLACK_S
        return time.monotonic() + budget_s

    def _pose_request(self, request: Any, deadline: float, source: str = "") -> PoseRequest:
        settings = self._settings
        options = PoseOptions(
            flip_test=request.flip_test if request.HasField("flip_test") else settings.flip_test,
            return_sigmas=request.return_sigmas,
            oks_nms=request.oks_nms,
            precision=_precision_of(request.precision, settings.precision),
            swap_flip_scores=request.swap_flip_scores,
        )
        return PoseRequest(
            image=_image_of(request, settings.max_image_pixels),
            boxes=_boxes_of(request),
            options=options,
            deadline=deadline,
            source=source,
        )

    async def Estimate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """One image in, one ``EstimateResponse`` out; failures are gRPC statuses."""
        t0 = time.monotonic()
        code = grpc.StatusCode.CANCELLED  # unless it gets further: the client went away
        try:
            try:
                if request.track:
                    raise InvalidRequestError("bad_options", "track needs StreamEstimate")
                response = await self._engine.infer(
                    self._pose_request(request, self._deadline(context), _source_of(context))
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

    async def _frame(
        self,
        request: Any,
        index: int,
        deadline: float,
        source: str = "",
        tracker: Tracker | None = None,
    ) -> Any:
        """One stream frame: its response, or a response carrying the error; never raises for a
        bad frame. Raises ``_StreamUnavailable`` when the engine no longer takes work. A tracked
        frame goes to its ``tracker`` (at once, before any await: frames reach it in order)."""
        t0 = time.monotonic()
        tracked = None
        try:
            pose_request = self._pose_request(request, deadline, source)
            if tracker is None:
                response = await self._engine.infer(pose_request)
            else:
                stamp = request.timestamp_ms if request.HasField("timestamp_ms") else None
                tracked = await tracker.submit(pose_request, index=index, timestamp_ms=stamp)
                response = tracked.response
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
        return response_to_proto(response, request.frame_id, index, tracked)

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
        source = f"stream:{id(iterator)}"  # each stream is its own source of work
        tracker: Tracker | None = None
        try:
            while True:
                await slots.acquire()  # the window is full: stop reading (flow control)
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    slots.release()
                    return
                deadline = self._deadline(context)
                if index == 0 and request.track:  # the first frame sets the stream's tracking
                    tracker = tracker_of(request, self._engine, self._settings)
                frame = self._frame(request, index, deadline, source, tracker)
                pending.put_nowait(asyncio.create_task(frame))
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
            try:
                await reader  # re-raises a failure of the request stream
            except InvalidRequestError as exc:  # the first frame's tracking options
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.code}: {exc}")
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


def _source_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for fair batching: the API key's digest when one is sent, else the peer."""
    key = _api_key_of(context.invocation_metadata())
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return str(context.peer())


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

    def __init__(
        self,
        engine: EngineHandle,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._reuse_port = reuse_port
        self._health = health_aio.HealthServicer()
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
        await self.set_serving(False)
        max_bytes = int(settings.grpc_max_message_bytes)
        interceptors = [ApiKeyInterceptor(settings.api_keys)] if settings.api_keys else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                # Off unless several front-end processes share the port on purpose: two
                # services must not share one by accident.
                ("grpc.so_reuseport", int(self._reuse_port)),
                # Connection bounds: streams per connection, idle and age limits, and keepalive
                # enforcement (a client pinging more often is sent GOAWAY).
                ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
                ("grpc.max_connection_idle_ms", _ms(settings.grpc_max_connection_idle_s)),
                ("grpc.max_connection_age_ms", _ms(settings.grpc_max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", _ms(settings.drain_grace_s)),
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    _ms(settings.grpc_keepalive_min_interval_s),
                ),
                ("grpc.http2.max_ping_strikes", 2),
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

    async def set_serving(self, serving: bool) -> None:
        """grpc.health.v1 status of the whole server ("") and of ``pose.v1.PoseService``:
        SERVING after warm-up, NOT_SERVING while draining."""
        status = _SERVING if serving else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then stop: running calls get ``grace_s`` seconds, new ones are refused."""
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def create_grpc_server(
    engine: EngineHandle,
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    reuse_port: bool = False,
) -> GrpcServer:
    """Build (not start) the gRPC server over ``engine``; the composition root starts it.

    Args:
        engine: the engine shared with the HTTP transport.
        settings: the service settings.
        metrics: where to count calls and stream frames (``transport="grpc"``), if anywhere.
        reuse_port: bind with SO_REUSEPORT (front-end processes sharing the port).
    """
    return GrpcServer(engine, settings, metrics, reuse_port=reuse_port)
