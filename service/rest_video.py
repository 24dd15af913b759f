"""HTTP video files: ``POST /v1/pose/video``, one NDJSON line per frame, streamed as they are done.

The body is a whole video file (MP4, WebM, MKV/MOV, MJPEG, animated GIF), decoded with PyAV (the
``video`` extra; without it the route answers 415 and says what to install). The options are query
parameters: the pose options of ``/v1/pose``, and ``track``, ``detect_every``, ``smoothing``
(``min_cutoff``, ``beta``, ``d_cutoff``) as in a gRPC ``StreamEstimate`` (``service.tracking``;
the video's own frame times drive the smoothing).

Limits: ``max_body_bytes`` (the file), ``max_image_pixels`` (each frame), ``max_video_frames`` and
``max_video_seconds``. A file whose header already says it is over a limit is refused before any
frame is run (413 ``video_too_long`` / ``too_many_pixels``); one whose header does not say
(MJPEG, GIF, a header that lies) is stopped as soon as it passes, with a last line carrying the
``error``. An undecodable file is a 400 when its first frame cannot be decoded, else a last error
line. Decoding runs one frame at a time in a thread, at most ``stream_window`` frames ahead of the
answers, and stops when the client goes away.

Each line: ``{"index", "timestamp_ms", "persons", "image", "timing_ms"}`` (persons as in
``/v1/pose``), plus ``"track_id"`` on every person and ``"detector_ran"`` when ``track`` is on; a
frame that failed on its own is ``{"index", "timestamp_ms", "error": {"code", "message"}}`` and the
stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from service.engine import PoseRequest, PoseResponse
from service.errors import (
    EngineError,
    EngineStoppedError,
    ImageError,
    InvalidRequestError,
    NotReadyError,
)
from service.rest_inputs import InputReader, PoseOptionsIn, media_type
from service.tracking import MAX_DETECT_EVERY, Smoothing, TrackedFrame, TrackOptions, start_tracker

if TYPE_CHECKING:
    from service.settings import Settings

VIDEO_PATH = "/v1/pose/video"
VIDEO_MEDIA_TYPES = (
    "video/mp4",
    "video/webm",
    "video/x-matroska",
    "video/quicktime",
    "video/x-motion-jpeg",
    "image/gif",
    "application/octet-stream",
)
# Also taken: no Content-Type, and curl's default for --data-binary.
_LENIENT_MEDIA_TYPES = ("", "application/x-www-form-urlencoded", "video/mjpeg", "video/x-mjpeg")


class VideoQuery(PoseOptionsIn):
    """Query parameters of ``/v1/pose/video``: the pose options and the stream's tracking."""

    track: bool = Field(False, description="give every person a track_id, stable across frames")
    detect_every: int = Field(
        0,
        ge=0,
        le=MAX_DETECT_EVERY,
        description="with track: run the detector on every N-th frame (0, 1: every frame); "
        "between, boxes from the previous frame's keypoints",
    )
    smoothing: bool = Field(False, description="with track: One Euro filtering of the keypoints")
    min_cutoff: float | None = Field(None, gt=0, le=1e6, description="One Euro, Hz (1.0)")
    beta: float | None = Field(None, ge=0, le=1e6, description="One Euro, per px/s (0.01)")
    d_cutoff: float | None = Field(None, gt=0, le=1e6, description="One Euro, Hz (1.0)")


class _Video:
    """A video being decoded, one frame per ``next()`` call, in a worker thread.

    Opening reads the header and refuses, before any decoding, what it already shows to be over
    the limits. ``close`` may be called from another thread: it waits for a ``next`` in progress.
    """

    def __init__(self, data: bytes, settings: Settings) -> None:
        import av  # checked by the route first

        self._settings = settings
        self._lock = threading.Lock()
        self._closed = False
        self._count = 0
        try:
            self._container = av.open(io.BytesIO(data), mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise ImageError("bad_image", f"cannot open the video: {_short(exc)}") from exc
        try:
            if not self._container.streams.video:
                raise ImageError("bad_image", "the file has no video stream")
            stream = self._container.streams.video[0]
            self._check_size(stream.codec_context.width, stream.codec_context.height)
            frames = int(stream.frames or 0)
            seconds = None
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif self._container.duration is not None:
                seconds = self._container.duration / 1e6  # AV_TIME_BASE
            if frames > settings.max_video_frames:
                raise self._too_long(f"{frames} frames")
            if seconds is not None and seconds > settings.max_video_seconds:
                raise self._too_long(f"{seconds:.1f} s")
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None
            self._frames = self._container.decode(stream)
        except BaseException:
            self._container.close()
            raise

    def _check_size(self, width: int, height: int) -> None:
        limit = self._settings.max_image_pixels
        if width * height > limit:
            raise ImageError("too_many_pixels", f"frames of {width}x{height} are over {limit} px")

    def _too_long(self, what: str) -> InvalidRequestError:
        s = self._settings
        return InvalidRequestError(
            "video_too_long",
            f"the video is {what} long; the limits are {s.max_video_frames} frames and "
            f"{s.max_video_seconds:g} s",
        )

    def next(self) -> tuple[torch.Tensor, float | None] | None:
        """The next frame as a (3, H, W) uint8 tensor and its time in seconds; None at the end.

        Raises:
            InvalidRequestError: ``video_too_long``, ``too_many_pixels`` or ``bad_image``.
        """
        import av

        with self._lock:
            if self._closed:
                return None
            try:
                frame = next(self._frames, None)
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                raise ImageError("bad_image", f"frame {self._count}: {_short(exc)}") from exc
            if frame is None:
                return None
            if self._count >= self._settings.max_video_frames:
                raise self._too_long(f"over {self._settings.max_video_frames} frames")
            seconds = float(frame.time) if frame.time is not None else None
            if seconds is not None and seconds > self._settings.max_video_seconds:
                raise self._too_long(f"over {self._settings.max_video_seconds:g} s")
            self._check_size(frame.width, frame.height)
            self._count += 1
            pixels = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            return torch.from_numpy(pixels).permute(2, 0, 1), seconds

    def close(self) -> None:
        """Stop decoding and free the decoder (after a ``next`` in progress)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._container.close()


def video_router(
    api: Any, settings: Settings, *, dependencies: list[Any], responses: dict[int | str, Any]
) -> APIRouter:
    """The ``/v1/pose/video`` route over ``api`` (``service.rest._PoseApi``: the engine and the
    JSON answers shared with the other routes)."""
    router = APIRouter()
    reader = InputReader(settings)

    @router.post(
        VIDEO_PATH,
        dependencies=dependencies,
        response_class=StreamingResponse,
        responses={
            200: {"content": {"application/x-ndjson": {}}, "description": "one line per frame"},
            **responses,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    t: {"schema": {"type": "string", "format": "binary"}} for t in VIDEO_MEDIA_TYPES
                },
            }
        },
        summary="Estimate poses in a video file, frame by frame",
    )
    async def pose_video(request: Request, query: Annotated[VideoQuery, Query()]) -> Any:
        """A video file in, NDJSON out: one line per frame, in order, as each is done."""
        ctype = media_type(request)
        if ctype not in VIDEO_MEDIA_TYPES and ctype not in _LENIENT_MEDIA_TYPES:
            raise InvalidRequestError(
                "unsupported_media_type",
                f"unsupported Content-Type {ctype!r} for a video: send the file as "
                f"{', '.join(VIDEO_MEDIA_TYPES)}",
            )
        _require_pyav()
        if not api.engine.ready:
            raise NotReadyError("draining" if api.engine.draining else "the engine is not ready")
        data = await request.body()
        if not data:
            raise ImageError("bad_image", "the video is empty")
        video = await asyncio.to_thread(_Video, data, settings)
        try:
            first = await asyncio.to_thread(video.next)  # an undecodable file is a 400
        except BaseException:
            video.close()
            raise
        run = _runner(api, settings, query, video.fps)
        # The options as /v1/pose reads them (defaults filled in); each frame gets its own
        # deadline when it is sent.
        template = replace(reader.item(b"video", None, _options_of(query)), deadline=None)
        template.source = f"video:{id(video)}"
        lines = _lines(request, video, first, run, template, api, settings)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    return router


Runner = Callable[[PoseRequest, int, float | None], Awaitable[tuple[PoseResponse, Any]]]


def _runner(api: Any, settings: Settings, query: VideoQuery, fps: float | None) -> Runner:
    """How one frame runs: straight to the engine, or through this video's tracker."""
    if not query.track:

        async def plain(request: PoseRequest, index: int, stamp: float | None) -> Any:
            return await api.engine.infer(request), None

        return plain
    smoothing = None
    if query.smoothing:
        given = {
            name: value
            for name in ("min_cutoff", "beta", "d_cutoff")
            if (value := getattr(query, name)) is not None
        }
        smoothing = Smoothing(**given, **({"fps": fps} if fps else {}))
    tracker = start_tracker(
        api.engine, TrackOptions(detect_every=query.detect_every, smoothing=smoothing), settings
    )

    async def tracked(request: PoseRequest, index: int, stamp: float | None) -> Any:
        frame: TrackedFrame = await tracker.submit(request, index=index, timestamp_ms=stamp)
        return frame.response, frame

    return tracked


async def _lines(
    request: Request,
    video: _Video,
    first: tuple[torch.Tensor, float | None] | None,
    run: Runner,
    template: PoseRequest,
    api: Any,
    settings: Settings,
) -> AsyncIterator[bytes]:
    """Decode ahead by up to ``stream_window`` frames, run them, and write their lines in
    order."""
    window = max(1, settings.stream_window)
    timeout_s = settings.request_timeout_ms / 1000.0
    loop = asyncio.get_running_loop()
    pending: deque[tuple[int, float | None, asyncio.Task[Any]]] = deque()
    started = time.monotonic()
    index = 0
    upcoming = first
    ended = first is None
    stop: dict[str, Any] | None = None  # the error line that ends the stream
    try:
        while True:
            while not ended and stop is None and len(pending) < window:
                if upcoming is None:
                    try:
                        upcoming = await asyncio.to_thread(video.next)
                    except EngineError as exc:
                        stop = {"index": index, "error": _error(exc)}
                        break
                    if upcoming is None:
                        ended = True
                        break
                image, seconds = upcoming
                upcoming = None
                stamp = None if seconds is None else seconds * 1000.0
                frame = replace(template, image=image, deadline=time.monotonic() + timeout_s)
                # Created in frame order, so a tracker sees the frames in order.
                pending.append((index, stamp, asyncio.ensure_future(run(frame, index, stamp))))
                index += 1
            if not pending:
                break
            number, stamp, task = pending.popleft()
            try:
                response, tracked = await task
            except (NotReadyError, EngineStoppedError) as exc:
                yield _dumps({"index": number, "timestamp_ms": stamp, "error": _error(exc)})
                return
            except EngineError as exc:
                yield _dumps({"index": number, "timestamp_ms": stamp, "error": _error(exc)})
                continue
            line: dict[str, Any] = {"index": number, "timestamp_ms": stamp}
            line |= api.result_dict(response, started, model_info=False)
            if tracked is not None:
                for person, track_id in zip(line["persons"], tracked.track_ids, strict=True):
                    person["track_id"] = track_id
                line["detector_ran"] = tracked.detector_ran
            yield _dumps(line)
            if await request.is_disconnected():
                return
        if stop is not None:
            yield _dumps(stop)
    finally:
        for _, _, task in pending:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*(task for _, _, task in pending), return_exceptions=True)
        # Not awaited: a decode in progress finishes first (the lock), then the decoder closes.
        loop.run_in_executor(None, video.close)


def _options_of(query: VideoQuery) -> dict[str, Any]:
    return {name: getattr(query, name) for name in PoseOptionsIn.model_fields}


def _error(exc: EngineError) -> dict[str, str]:
    return {"code": exc.code, "message": exc.message}


def _dumps(line: dict[str, Any]) -> bytes:
    return json.dumps(line, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_pyav() -> None:
    """415 when PyAV, the ``video`` extra, is not installed."""
    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise InvalidRequestError(
            "unsupported_media_type",
            "this server cannot decode video: install PyAV (pip install "
            "'distilpose-service[video]'), or send the frames one by one to /v1/pose or gRPC "
            "StreamEstimate",
        ) from exc
