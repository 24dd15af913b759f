"""Shared by the gRPC and client tests: a fake pipeline and a real server on a localhost port.

``FakePipeline`` runs through the real ``Engine``; it answers one person per caller box (or one
whole-image person), with keypoints derived from the image so that answers tell frames apart, and it
can be held (``gate``) to pile work up in the engine. ``serving`` starts the real engine and the
real ``GrpcServer`` on port 0 and yields a generated stub on a channel to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
import uvicorn
from PIL import Image

from model.interfaces import BatchStats, ImageResult, ModelDescription, Person, PipelineItem
from service.engine import Engine
from service.pb.pose.v1 import pose_pb2_grpc
from service.rest import create_app
from service.rpc import GrpcServer, create_grpc_server
from service.settings import Settings
from service.uploads import decode_image
from tests.service.descriptions import fake_description

# How long a held pipeline waits for its gate before giving up (keeps a broken test from hanging).
GATE_TIMEOUT_S = 20.0


class FakePipeline:
    """A deterministic stand-in for ``TopDownPipeline`` (thread-safe counters for the tests).

    Args:
        gate: when given, every ``run`` waits for it to be set.
        fail_on_width: images of this width make the batch raise (an ``InferenceError``).
    """

    def __init__(self, gate: threading.Event | None = None, fail_on_width: int = -1) -> None:
        self.device = torch.device("cpu")
        self.gate = gate
        self.fail_on_width = fail_on_width
        self.lock = threading.Lock()
        self.images_run = 0  # images that reached run()
        self.running = 0  # images inside run() now
        self.started = threading.Event()  # set when a run() begins

    def warmup(self) -> None:
        """Nothing to warm."""

    def describe(self) -> ModelDescription:
        """What ``TopDownPipeline.describe()`` reports, with fake values."""
        return fake_description("fake", weights_sha256="0" * 64)

    def run(self, items: list[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        """One person per box (or the whole image); keypoint k at (x + k, y + mean pixel), score k/8
        (float32-exact, as a real model's numbers are)."""
        with self.lock:
            self.images_run += len(items)
            self.running += len(items)
        self.started.set()
        try:
            if self.gate is not None and not self.gate.wait(GATE_TIMEOUT_S):
                raise RuntimeError("gate never opened")
            results = [self._one(item) for item in items]
        finally:
            with self.lock:
                self.running -= len(items)
        stats = BatchStats(
            pose_crops=sum(len(r.persons) for r in results),
            persons_per_image=[len(r.persons) for r in results],
        )
        return results, stats

    def _one(self, item: PipelineItem) -> ImageResult:
        _, height, width = item.image.shape
        if width == self.fail_on_width:
            raise RuntimeError("the fake pipeline fails on this width")
        mean = float(item.image.float().mean())
        boxes = item.boxes if item.boxes is not None else torch.tensor([[0, 0, width, height, 1.0]])
        persons = []
        for row in boxes.tolist():
            x, y, w, h = row[:4]
            score = row[4] if len(row) > 4 else 1.0
            keypoints = [(x + k, y + mean, k / 8.0) for k in range(17)]
            sigmas = [(1.0 + k, 2.0) for k in range(17)] if item.options.return_sigmas else None
            flip = 1.0 if item.options.flip_test else 0.0
            persons.append(
                Person(
                    bbox=(x, y, w, h),
                    bbox_score=score,
                    score=score * 0.5 + flip,  # tells the tests which flip_test was used
                    keypoints=keypoints,
                    sigmas=sigmas,
                )
            )
        return ImageResult(width=width, height=height, persons=persons)


def png_bytes(width: int, height: int, value: int = 128) -> bytes:
    """A flat grey PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def settings_for(**overrides: Any) -> Settings:
    """Test settings: localhost, any free port, small limits unless overridden."""
    values: dict[str, Any] = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0}
    values.update(overrides)
    return Settings(**values)


def engine_for(pipeline: Any, settings: Settings, *, max_delay_ms: float = 0.0) -> Engine:
    """The real engine over ``pipeline`` with the settings' batching knobs."""
    config = settings.engine_config(max_delay_ms=max_delay_ms, decode_workers=1, warmup=True)
    decoder = functools.partial(decode_image, max_pixels=settings.max_image_pixels)
    return Engine(lambda device: pipeline, ["cpu"], config, decoder=decoder)


@dataclass
class Served:
    """A running server and a client on it."""

    engine: Engine
    server: GrpcServer
    settings: Settings
    channel: grpc.aio.Channel
    stub: Any
    pipeline: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """``host:port`` of the server."""
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP server (``serving(..., http=True)``)."""
        return f"http://127.0.0.1:{self.extra['http_port']}"


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handling (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def http_serving(engine: Engine, settings: Settings) -> AsyncIterator[int]:
    """``service.rest.create_app`` over ``engine`` on a real uvicorn server; yields its port."""
    config = uvicorn.Config(
        create_app(engine, settings),
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)
    try:
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serving(
    pipeline: Any | None = None,
    *,
    start_engine: bool = True,
    engine: Any = None,
    http: bool = False,
    **overrides: Any,
) -> AsyncIterator[Served]:
    """Start the engine (unless told not to) and a gRPC server on a free port; stop both after.

    Args:
        pipeline: defaults to a ``FakePipeline``.
        start_engine: start the engine and mark the server SERVING, as the composition root does.
        engine: use this engine instead of building one over ``pipeline``.
        http: also serve the HTTP app over the same engine (``Served.http_url``).
        **overrides: ``Settings`` fields.
    """
    pipeline = pipeline if pipeline is not None else FakePipeline()
    settings = settings_for(**overrides)
    engine = engine if engine is not None else engine_for(pipeline, settings)
    server = create_grpc_server(engine, settings)
    await server.start()
    if start_engine:
        await engine.start()
        await server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        async with contextlib.AsyncExitStack() as stack:
            served = Served(
                engine=engine,
                server=server,
                settings=settings,
                channel=channel,
                stub=pose_pb2_grpc.PoseServiceStub(channel),
                pipeline=pipeline,
            )
            if http:
                served.extra["http_port"] = await stack.enter_async_context(
                    http_serving(engine, settings)
                )
            yield served
    finally:
        if isinstance(pipeline, FakePipeline) and pipeline.gate is not None:
            pipeline.gate.set()
        await channel.close()
        await server.stop(0)
        await engine.stop(0)
