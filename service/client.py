"""``pose-client``: send images, folders or videos to the pose service over gRPC or HTTP.

The importable part is a small async API the benchmarks reuse: ``connect(target)`` gives a
``GrpcPoseClient`` (``host:port`` or ``grpc://host:port``) or an ``HttpPoseClient``
(``http(s)://...``), both with ``estimate()``, ``stream()`` and ``model_info()``. Results are plain
dicts in the HTTP API's shape (``persons`` with ``bbox``, ``bbox_score``, ``score``, ``keypoints``
as ``[x, y, raw score]`` and optional ``sigmas``; ``image``; ``timing_ms``) plus ``frame_id`` and
``index``, so JSON lines look the same whichever transport made them.

The command writes one JSON line per image or frame (``--output``, default stdout) and, with
``--render DIR``, the frames with the poses drawn. Inputs: an image file, a folder of images
(unary calls, ``--concurrency`` at a time; ``--stream`` sends them as video frames), ``-`` for an
image on stdin, or a video (MJPEG, animated GIF/WebP; MP4 and other containers with PyAV: see
``service.client_media``). Video frames go through ``StreamEstimate`` (over HTTP: ``--window``
requests in flight, answers in order).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import httpx

from service.client_media import (
    Frame,
    folder_frames,
    in_thread,
    is_video,
    render_frame,
    short_floats,
    video_frames,
)
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc

API_KEY_ENV = "DISTILPOSE_API_KEY"  # not POSE_*: the server refuses unknown POSE_* variables
_PRECISIONS = {
    "fp32": pose_pb2.PRECISION_FP32,
    "bf16": pose_pb2.PRECISION_BF16,
    "fp16": pose_pb2.PRECISION_FP16,
}


class PoseClientError(Exception):
    """A failed call: ``code`` is the server's machine code (``bad_image``, ``queue_full``, ...),
    ``status`` the gRPC status name or the HTTP status, ``retry_after_s`` set for a full queue."""

    def __init__(
        self, code: str, message: str, status: str | int, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Options:
    """Per-request options; None leaves the server's default."""

    flip_test: bool | None = None
    return_sigmas: bool | None = None
    oks_nms: bool | None = None
    precision: str | None = None
    swap_flip_scores: bool | None = None

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
        """One image: its result dict. Raises ``PoseClientError``."""
        raise NotImplementedError

    def stream(
        self,
        frames: AsyncIterable[Frame] | Iterable[Frame],
        *,
        options: Options | None = None,
        window: int = 8,
        timeout_s: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Frames in, result dicts out in the same order; a failed frame yields a dict with an
        ``error`` ({code, message}) instead of raising. ``window`` bounds HTTP requests in flight
        (over gRPC the server's ``stream_window`` does)."""
        raise NotImplementedError

    async def model_info(self) -> dict[str, Any]:
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


async def _estimates(
    client: PoseClient,
    frames: AsyncIterable[Frame],
    *,
    options: Options | None,
    timeout_s: float | None,
    window: int,
) -> AsyncGenerator[tuple[Frame, dict[str, Any]], None]:
    """``client.estimate`` on every frame, at most ``window`` calls in flight, each frame with its
    result in input order (a failed call's result holds its ``error``). The calls still in flight
    are cancelled when the generator is closed early (callers use ``contextlib.aclosing`` so that
    this happens at once)."""

    async def one(frame: Frame) -> dict[str, Any]:
        try:
            return await client.estimate(frame, options=options, timeout_s=timeout_s)
        except PoseClientError as exc:
            return {"frame_id": frame.frame_id, "error": {"code": exc.code, "message": exc.message}}

    pending: deque[tuple[Frame, asyncio.Task[dict[str, Any]]]] = deque()
    try:
        async for frame in frames:
            pending.append((frame, asyncio.create_task(one(frame))))
            if len(pending) >= max(1, window):
                done, task = pending.popleft()
                yield done, await task
        while pending:
            done, task = pending.popleft()
            yield done, await task
    finally:
        for _, task in pending:
            task.cancel()


# --------------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------------


def _grpc_error(exc: grpc.aio.AioRpcError) -> PoseClientError:
    """The server sends details as ``code: message``; gRPC's own errors have no code."""
    details = exc.details() or ""
    head, sep, rest = details.partition(": ")
    if sep and head.replace("_", "").isalpha() and head.islower():
        code, message = head, rest
    else:
        code, message = exc.code().name.lower(), details
    trailers = dict(exc.trailing_metadata() or ())
    retry = trailers.get("retry-after")
    return PoseClientError(code, message, exc.code().name, float(retry) if retry else None)


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
        persons.append(entry)
    out["persons"] = persons
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
            request.precision = _PRECISIONS[value]
        else:
            setattr(request, name, value)
    return request


class GrpcPoseClient(PoseClient):
    """``pose.v1.PoseService`` over one channel.

    Args:
        target: ``host:port`` (a ``grpc://`` prefix is dropped).
        api_key: sent as ``authorization: Bearer KEY``.
        max_message_bytes: largest message either way.
    """

    def __init__(
        self, target: str, *, api_key: str | None = None, max_message_bytes: int = 32 << 20
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

    async def estimate(
        self,
        frame: Frame | bytes,
        *,
        options: Options | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One image through ``Estimate``."""
        request = frame_to_request(_as_frame(frame), options)
        try:
            response = await self.stub.Estimate(request, timeout=timeout_s, metadata=self.metadata)
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
    ) -> AsyncIterator[dict[str, Any]]:
        """Frames through ``StreamEstimate``; the server paces the sender (its window)."""

        async def requests() -> AsyncIterator[Any]:
            async for frame in _aiter_frames(frames):
                yield frame_to_request(frame, options)

        call = self.stub.StreamEstimate(requests(), timeout=timeout_s, metadata=self.metadata)
        try:
            async for response in call:
                yield response_to_dict(response)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(exc) from exc
        finally:
            call.cancel()

    async def model_info(self) -> dict[str, Any]:
        """``GetModelInfo`` as a dict (``details`` holds the pipeline's own description)."""
        from google.protobuf.json_format import MessageToDict

        try:
            info = await self.stub.GetModelInfo(
                pose_pb2.GetModelInfoRequest(), metadata=self.metadata
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
        self.http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout_s, transport=transport
        )

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
        response = await self.http.post(
            "/v1/pose",
            content=frame.image,
            params=params,
            headers={"content-type": "application/octet-stream"},
            timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
        )
        body = response.json() if response.content else {}
        if response.status_code != 200:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            retry = response.headers.get("retry-after")
            raise PoseClientError(
                str(error.get("code", "http_error")),
                str(error.get("message", response.text)),
                response.status_code,
                float(retry) if retry else None,
            )
        keep = ("persons", "image", "timing_ms")
        return {"frame_id": frame.frame_id, **{k: body[k] for k in keep if k in body}}

    async def stream(
        self,
        frames: AsyncIterable[Frame] | Iterable[Frame],
        *,
        options: Options | None = None,
        window: int = 8,
        timeout_s: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Frames as concurrent requests, at most ``window`` in flight, answers in order."""

        answers = _estimates(
            self, _aiter_frames(frames), options=options, timeout_s=timeout_s, window=window
        )
        async with contextlib.aclosing(answers):
            index = 0  # answers come in input order: a frame's index is its answer's position
            async for _, result in answers:
                yield {**result, "index": index}
                index += 1

    async def model_info(self) -> dict[str, Any]:
        """``GET /v1/models``: the model description with the server's limits."""
        response = await self.http.get("/v1/models")
        if response.status_code != 200:
            raise PoseClientError("http_error", response.text, response.status_code)
        body = response.json()
        return {**body.get("model", {}), "server": body.get("server", {})}

    async def close(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()


def connect(target: str, *, api_key: str | None = None, timeout_s: float = 60.0) -> PoseClient:
    """A client for ``target``: ``http(s)://...`` is HTTP, ``host:port`` or ``grpc://`` gRPC."""
    if target.startswith(("http://", "https://")):
        return HttpPoseClient(target, api_key=api_key, timeout_s=timeout_s)
    return GrpcPoseClient(target, api_key=api_key)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pose-client",
        description="Send images, folders or videos to the pose service; write JSON lines.",
    )
    parser.add_argument("inputs", nargs="*", help="image, folder, video (MJPEG, GIF, ...), or -")
    parser.add_argument(
        "--target", default="localhost:50051", help="host:port (gRPC) or http(s)://host:port"
    )
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"or ${API_KEY_ENV}")
    parser.add_argument("-o", "--output", help="JSON lines file (default: stdout)")
    parser.add_argument("--render", type=Path, help="write frames with the poses drawn here")
    parser.add_argument("--min-score", type=float, default=0.3, help="keypoints drawn from this")
    parser.add_argument("--boxes", help="JSON list of [x, y, w, h(, score)] for every image")
    parser.add_argument("--no-flip", action="store_true", help="flip_test off")
    parser.add_argument("--sigmas", action="store_true", help="return per-keypoint sigmas")
    parser.add_argument("--oks-nms", action="store_true", help="OKS-NMS over detector persons")
    parser.add_argument("--precision", choices=sorted(_PRECISIONS), help="on CUDA")
    parser.add_argument("--stream", action="store_true", help="send a folder as video frames")
    parser.add_argument(
        "--frame-format", choices=("jpeg", "png", "raw"), default="jpeg", help="decoded frames as"
    )
    parser.add_argument("--window", type=int, default=8, help="HTTP frames in flight per video")
    parser.add_argument("--concurrency", type=int, default=4, help="images in flight per folder")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--info", action="store_true", help="print the served model and exit")
    return parser


@dataclass
class _Run:
    """State of one command run: where results go and how many failed."""

    client: PoseClient
    args: argparse.Namespace
    out: TextIO
    info: dict[str, Any] = field(default_factory=dict)
    results: int = 0
    errors: int = 0

    def write(self, source: str, frame: Frame, result: dict[str, Any]) -> None:
        self.results += 1
        if "error" in result:
            self.errors += 1
        if isinstance(self.client, GrpcPoseClient):
            result = short_floats(result)
        self.out.write(json.dumps({"source": source, **result}) + "\n")
        self.out.flush()
        if self.args.render is not None and "error" not in result:
            render_frame(frame, result, self.info, self.args.render, self.args.min_score)


async def _images(run: _Run, source: str, frames: Iterator[Frame], options: Options) -> None:
    """Unary calls, ``--concurrency`` at a time, written in input order."""

    answers = _estimates(
        run.client,
        in_thread(frames),
        options=options,
        timeout_s=run.args.timeout,
        window=run.args.concurrency,
    )
    async with contextlib.aclosing(answers):
        async for frame, result in answers:
            run.write(source, frame, result)


async def _video(run: _Run, source: str, frames: Iterator[Frame], options: Options) -> None:
    """One stream of frames; the frames in flight are kept only to render them."""
    sent: deque[Frame] = deque()

    async def remembered() -> AsyncIterator[Frame]:
        async for frame in in_thread(frames):
            sent.append(frame)
            yield frame

    results = run.client.stream(remembered(), options=options, window=run.args.window)
    async for result in results:
        run.write(source, sent.popleft(), result)


async def _main(args: argparse.Namespace) -> int:
    options = Options(
        flip_test=False if args.no_flip else None,
        return_sigmas=True if args.sigmas else None,
        oks_nms=True if args.oks_nms else None,
        precision=args.precision,
    )
    boxes = json.loads(args.boxes) if args.boxes else None
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    async with connect(args.target, api_key=args.api_key, timeout_s=args.timeout) as client:
        run = _Run(client, args, out)
        if args.info or args.render is not None:
            run.info = await client.model_info()
        if args.info:
            out.write(json.dumps(short_floats(run.info), indent=2) + "\n")
            return 0
        if args.render is not None:
            args.render.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        for name in args.inputs:
            path = Path(name)
            if name == "-":
                frames = iter([Frame(image=sys.stdin.buffer.read(), frame_id="stdin", boxes=boxes)])
                await _images(run, name, frames, options)
            elif path.is_dir() and args.stream:
                await _video(run, name, folder_frames(path), options)
            elif path.is_dir():
                await _images(run, name, folder_frames(path), options)
            elif is_video(path):
                await _video(run, name, video_frames(path, args.frame_format), options)
            else:
                frame = Frame(image=path.read_bytes(), frame_id=path.name, boxes=boxes)
                await _images(run, name, iter([frame]), options)
        elapsed = time.monotonic() - started
    if out is not sys.stdout:
        out.close()
    rate = run.results / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(
        f"pose-client: {run.results} results ({run.errors} failed) in {elapsed:.2f} s, "
        f"{rate:.1f}/s\n"
    )
    return 1 if run.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pose-client``."""
    args = _parser().parse_args(argv)
    if not args.inputs and not args.info:
        _parser().error("give an image, a folder, a video or -, or --info")
    try:
        return asyncio.run(_main(args))
    except (PoseClientError, RuntimeError, OSError, json.JSONDecodeError) as exc:
        sys.stderr.write(f"pose-client: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
