"""The async client API: ``connect(target)`` gives a ``GrpcPoseClient`` (``host:port`` or
``grpc://host:port``) or an ``HttpPoseClient`` (``http(s)://...``), both with ``estimate()``,
``estimate_many()``, ``stream()`` and ``model_info()``.

Results are plain dicts in the HTTP API's shape (``persons`` with ``bbox``, ``bbox_score``,
``score``, ``keypoints`` as ``[x, y, raw score]`` and optional ``sigmas``; ``image``;
``timing_ms``) plus ``frame_id`` and ``index``, so results look the same whichever transport made
them. Every failure is a ``PoseClientError`` with the server's machine code, including the ones no
server answered (``unavailable``, ``deadline_exceeded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx

from service.client.media import Frame, one_line
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc

PRECISIONS = {
    "fp32": pose_pb2.PRECISION_FP32,
    "bf16": pose_pb2.PRECISION_BF16,
    "fp16": pose_pb2.PRECISION_FP16,
}
# Codes that concern one image, not the connection: a run over many images goes on after them.
# Anything else (unavailable, unauthenticated, a wrong URL, ...) would fail every image alike.
FRAME_ERROR_CODES = frozenset(
    {
        "bad_image",
        "too_many_pixels",
        "unsupported_media_type",
        "bad_boxes",
        "body_too_large",
        "invalid_request",
        "resource_exhausted",  # gRPC's own: a message over the size limit
        "deadline_exceeded",
        "queue_full",
        "internal",
    }
)


class PoseClientError(Exception):
    """A failed call: ``code`` is the server's machine code (``bad_image``, ``queue_full``, ...) or
    ``unavailable``/``deadline_exceeded`` when no answer came; ``status`` the gRPC status name, the
    HTTP status, or 0 when no HTTP answer came; ``retry_after_s`` set for a full queue."""

    def __init__(
        self, code: str, message: str, status: str | int, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def per_frame(self) -> bool:
        """Whether the failure concerns the one image sent (others may still succeed)."""
        return self.code in FRAME_ERROR_CODES

    def as_dict(self) -> dict[str, Any]:
        """``{code, message(, retry_after_s)}``, as a stream reports a failed frame."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after_s:
            out["retry_after_s"] = self.retry_after_s
        return out


@dataclass(frozen=True)
class Options:
    """Per-request options; None leaves the server's default."""

    flip_test: bool | None = None
    return_sigmas: bool | None = None
    oks_nms: bool | None = None
    precision: str | None = None
    swap_flip_scores: bool | None = None
    # Tracking (gRPC streams only): read from the stream's first frame.
    track: bool | None = None
    detect_every: int | None = None

    def given(self) -> dict[str, Any]:
        """The options that are set."""
        return {k: v for k, v in vars(self).items() if v is not None}


class PoseClient:
    """What both transports offer. Use as ``async with connect(target) as client: ...``."""

    async def estimate(
        self,
        frame: Frame | bytes,
        *,
        options: Options | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One image: its result dict (``index`` 0). Raises ``PoseClientError``."""
        raise NotImplementedError

    def stream(
        self,
        frames: AsyncIterable[Frame] | Iterable[Frame],
        *,
        options: Options | None = None,
        window: int = 8,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Frames in, result dicts out in the same order (``index`` counts them); a frame that
        failed on its own (``PoseClientError.per_frame``) yields a dict with an ``error``
        ({code, message}) instead of raising. ``window`` bounds HTTP requests in flight (over gRPC
        the server's ``stream_window`` does)."""
        raise NotImplementedError

    async def estimate_many(
        self,
        frames: AsyncIterable[Frame] | Iterable[Frame],
        *,
        options: Options | None = None,
        window: int = 4,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """``estimate`` on every frame, at most ``window`` calls in flight, results in input
        order; a frame that failed on its own yields a dict with its ``error``, any other failure
        raises. The calls still in flight are cancelled when the generator is closed early (use
        ``contextlib.aclosing`` so that this happens at once)."""

        async def one(frame: Frame) -> dict[str, Any]:
            try:
                return await self.estimate(frame, options=options, timeout_s=timeout_s)
            except PoseClientError as exc:
                if not exc.per_frame:
                    raise
                return {"frame_id": frame.frame_id, "index": 0, "error": exc.as_dict()}

        pending: deque[asyncio.Task[dict[str, Any]]] = deque()
        try:
            async for frame in _aiter_frames(frames):
                pending.append(asyncio.create_task(one(frame)))
                if len(pending) >= max(1, window):
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def model_info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """What the server serves (model, keypoint_names, skeleton, ...)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connection."""

    async def __aenter__(self) -> PoseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _aiter_frames(frames: AsyncIterable[Frame] | Iterable[Frame]) -> AsyncIterator[Frame]:
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    else:
        for frame in frames:
            yield frame


def _as_frame(frame: Frame | bytes) -> Frame:
    return frame if isinstance(frame, Frame) else Frame(image=frame)


def _seconds(value: str | None) -> float | None:
    """A ``retry-after`` value in seconds (an HTTP date or garbage gives None)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------------


def _grpc_error(exc: grpc.aio.AioRpcError) -> PoseClientError:
    """The server sends details as ``code: message``; gRPC's own errors have no code."""
    details = one_line(exc.details() or "", 500)
    head, sep, rest = details.partition(": ")
    if sep and head.replace("_", "").isalpha() and head.islower():
        code, message = head, rest
    else:
        code, message = exc.code().name.lower(), details
    trailers = dict(exc.trailing_metadata() or ())
    return PoseClientError(code, message, exc.code().name, _seconds(trailers.get("retry-after")))


def response_to_dict(response: Any) -> dict[str, Any]:
    """An ``EstimateResponse`` as the HTTP API's result dict (plus frame_id, index, error)."""
    out: dict[str, Any] = {"frame_id": response.frame_id, "index": response.index}
    if response.HasField("error"):
        error = response.error
        out["error"] = {"code": error.code, "message": error.message}
        if error.retry_after_s:
            out["error"]["retry_after_s"] = error.retry_after_s
        return out
    persons = []
    for person in response.persons:
        box = person.box
        entry: dict[str, Any] = {
            "bbox": [box.x, box.y, box.width, box.height],
            "bbox_score": box.score,
            "score": person.score,
            "keypoints": [[k.x, k.y, k.score] for k in person.keypoints],
        }
        if person.keypoints and person.keypoints[0].HasField("sigma_x"):
            entry["sigmas"] = [[k.sigma_x, k.sigma_y] for k in person.keypoints]
        if person.HasField("track_id"):
            entry["track_id"] = person.track_id
        persons.append(entry)
    out["persons"] = persons
    if response.detector_ran or any("track_id" in p for p in persons):
        out["detector_ran"] = response.detector_ran
    out["image"] = {"width": response.width, "height": response.height}
    out["timing_ms"] = dict(response.timing_ms)
    return out


def frame_to_request(frame: Frame, options: Options | None = None) -> Any:
    """A ``Frame`` and its options as an ``EstimateRequest``."""
    request = pose_pb2.EstimateRequest(frame_id=frame.frame_id)
    if frame.raw is not None:
        request.raw.width, request.raw.height, request.raw.rgb = (
            frame.width,
            frame.height,
            frame.raw,
        )
    else:
        request.image = frame.image or b""
    for box in frame.boxes or ():
        message = request.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
        if len(box) > 4:
            message.score = box[4]
    for name, value in (options or Options()).given().items():
        if name == "precision":
            request.precision = PRECISIONS[value]
        else:
            setattr(request, name, value)
    return request


class GrpcPoseClient(PoseClient):
    """``pose.v1.PoseService`` over one channel.

    Args:
        target: ``host:port`` (a ``grpc://`` prefix is dropped).
        api_key: sent as ``authorization: Bearer KEY``.
        timeout_s: default deadline of unary calls (``Estimate``, ``GetModelInfo``); streams have
            none unless given one.
        max_message_bytes: largest message either way.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
        max_message_bytes: int = 32 << 20,
    ) -> None:
        self.channel = grpc.aio.insecure_channel(
            target.removeprefix("grpc://"),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.stub = pose_pb2_grpc.PoseServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    async def estimate(
        self,
        frame: Frame | bytes,
        *,
        options: Options | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One image through ``Estimate``."""
        request = frame_to_request(_as_frame(frame), options)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        try:
            response = await self.stub.Estimate(request, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(exc) from exc
        return response_to_dict(response)

    async def stream(
        self,
        frames: AsyncIterable[Frame] | Iterable[Frame],
        *,
        options: Options | None = None,
        window: int = 8,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Frames through ``StreamEstimate``; the server paces the sender (its window). When the
        frames themselves fail (a video that cannot be decoded further), the frames sent are
        answered first, then that error is raised here."""
        failed: list[Exception] = []

        async def requests() -> AsyncIterator[Any]:
            try:
                async for frame in _aiter_frames(frames):
                    yield frame_to_request(frame, options)
            except Exception as exc:  # grpc would swallow it: keep it, end the stream, re-raise
                failed.append(exc)

        call = self.stub.StreamEstimate(requests(), timeout=timeout_s, metadata=self.metadata)
        try:
            async for response in call:
                yield response_to_dict(response)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(exc) from exc
        finally:
            call.cancel()
        if failed:
            raise failed[0]

    async def model_info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GetModelInfo`` as a dict (``details`` holds the pipeline's own description)."""
        from google.protobuf.json_format import MessageToDict

        timeout = timeout_s if timeout_s is not None else self.timeout_s
        try:
            info = await self.stub.GetModelInfo(
                pose_pb2.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(exc) from exc
        out = MessageToDict(info, preserving_proto_field_name=True)
        out["skeleton"] = [[edge.a, edge.b] for edge in info.skeleton]
        return out

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------


def _http_error(response: httpx.Response) -> PoseClientError:
    """The server's ``{"error": {code, message}}``, or, from anything else (a proxy, a wrong
    URL), ``http_error`` with the status and the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("code"):
        code, message = str(error["code"]), one_line(error.get("message", ""), 500)
    else:
        text = one_line(response.text, 200)
        code = "http_error"
        message = f"HTTP {response.status_code} {response.reason_phrase}" + (
            f": {text}" if text else ""
        )
    retry = _seconds(response.headers.get("retry-after"))
    return PoseClientError(code, message, response.status_code, retry)


class HttpPoseClient(PoseClient):
    """The HTTP API (``POST /v1/pose`` with a raw image body, options as query parameters).

    Args:
        base_url: e.g. ``http://localhost:8000``.
        api_key: sent as ``Authorization: Bearer KEY``.
        timeout_s: default per-request timeout.
        transport: an ``httpx`` transport (``httpx.ASGITransport(app)`` in tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url
        self.http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout_s, transport=transport
        )

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; no answer at all is a ``PoseClientError`` too."""
        try:
            return await self.http.request(method, url, **kwargs)
        except (httpx.ConnectTimeout, httpx.ConnectError) as exc:
            message = f"cannot connect to {self.base_url}: {one_line(exc) or type(exc).__name__}"
            raise PoseClientError("unavailable", message, 0) from exc
        except httpx.TimeoutException as exc:
            message = f"no answer from {self.base_url} in time ({type(exc).__name__})"
            raise PoseClientError("deadline_exceeded", message, 0) from exc
        except httpx.HTTPError as exc:
            message = f"{self.base_url}: {one_line(exc) or type(exc).__name__}"
            raise PoseClientError("unavailable", message, 0) from exc

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        """The body of a 200 answer, which must be a JSON object."""
        if response.status_code != 200:
            raise _http_error(response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            message = f"{response.url} did not answer with a JSON object; is it the pose service?"
            raise PoseClientError("bad_response", message, response.status_code)
        return body

    async def estimate(
        self,
        frame: Frame | bytes,
        *,
        options: Options | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One image through ``POST /v1/pose``."""
        frame = _as_frame(frame)
        if frame.image is None:
            raise PoseClientError("bad_image", "raw pixels need gRPC; send encoded images", 400)
        params = {
            k: str(v).lower() if isinstance(v, bool) else v
            for k, v in (options or Options()).given().items()
        }
        if frame.boxes:
            params["boxes"] = json.dumps([list(box) for box in frame.boxes])
        params["model_info"] = "false"  # names and skeleton come once, from model_info()
        response = await self._request(
            "POST",
            "/v1/pose",
            content=frame.image,
            params=params,
            headers={"content-type": "application/octet-stream"},
            timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
        )
        body = self._json(response)
        keep = ("persons", "image", "timing_ms")
        return {"frame_id": frame.frame_id, "index": 0, **{k: body[k] for k in keep if k in body}}

    async def stream(
        self,
        frames: AsyncIterable[Frame] | Iterable[Frame],
        *,
        options: Options | None = None,
        window: int = 8,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Frames as concurrent requests, at most ``window`` in flight, answers in order."""
        answers = self.estimate_many(frames, options=options, timeout_s=timeout_s, window=window)
        async with contextlib.aclosing(answers):
            index = 0  # answers come in input order: a frame's index is its answer's position
            async for result in answers:
                yield {**result, "index": index}
                index += 1

    async def model_info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /v1/models``: the model description with the server's limits."""
        timeout = timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        body = self._json(await self._request("GET", "/v1/models", timeout=timeout))
        return {**body.get("model", {}), "server": body.get("server", {})}

    async def close(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()


def connect(target: str, *, api_key: str | None = None, timeout_s: float = 60.0) -> PoseClient:
    """A client for ``target``: ``http(s)://...`` is HTTP, ``host:port`` or ``grpc://`` gRPC.

    ``timeout_s`` is the default deadline of every unary call (a stream has none).
    """
    if target.startswith(("http://", "https://")):
        return HttpPoseClient(target, api_key=api_key, timeout_s=timeout_s)
    return GrpcPoseClient(target, api_key=api_key, timeout_s=timeout_s)
