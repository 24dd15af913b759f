"""Fakes and fixtures for the engine tests (``test_engine.py``, ``test_engine_lifecycle.py``; the
fixtures are registered in ``tests/service/conftest.py``).

Synchronisation is by events: the fake pipeline blocks on ``Recorder.gate`` and records every batch
it was handed (``Recorder.attempts``), so that "queued", "running" and "never ran" are facts, not
timings. The ``loop_errors`` fixture fails a test whose event loop logged an error (a future
settled twice, an exception never retrieved).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import torch

from model.interfaces import BatchStats, ImageResult, ModelDescription, Person, PipelineItem
from service.engine import Engine, EngineConfig, NoopObserver, PoseRequest, PoseResponse
from service.errors import ImageError
from tests.service.descriptions import fake_description

WAIT_S = 30.0  # upper bound for any wait in the fakes: a failing test fails, it does not hang


def image_for(job_id: int) -> torch.Tensor:
    """A (3, 2, 4) uint8 image carrying ``job_id`` in its first two pixels."""
    image = torch.zeros((3, 2, 4), dtype=torch.uint8)
    image[0, 0, 0] = job_id % 256
    image[0, 0, 1] = job_id // 256
    return image


def id_of(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


def answered_id(response: PoseResponse) -> int:
    return int(response.result.persons[0].bbox[0])


class Recorder:
    """Shared by every fake pipeline of one engine: the fakes' knobs and what they were given."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.attempts: list[list[int]] = []  # ids of every batch handed to run(), in order
        self.instances: list[int] = []  # id() of the pipeline that got each attempt
        self.built: list[str] = []
        self.gate: threading.Event | None = None  # run() blocks until it is set
        self.hold: list[int] | None = None  # when given, only a batch of exactly these blocks
        self.warmup_gate: threading.Event | None = None
        self.warming = threading.Event()
        self.fail_ids: set[int] = set()  # a batch holding one of these raises RuntimeError
        self.oom_ids: set[int] = set()  # a batch holding one of these raises CUDA OOM
        self.oom_above: int | None = None  # a batch larger than this raises CUDA OOM
        self.detect_s = 0.25
        self.pose_s = 0.5

    def wait_attempts(self, count: int) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.attempts) >= count, WAIT_S)

    def flat(self) -> list[int]:
        return [i for batch in self.attempts for i in batch]


class FakePipeline:
    def __init__(self, recorder: Recorder, device: str) -> None:
        self.rec = recorder
        self.device = torch.device(device)
        with recorder.cv:
            recorder.built.append(threading.current_thread().name)

    def warmup(self) -> None:
        self.rec.warming.set()
        if self.rec.warmup_gate is not None:
            assert self.rec.warmup_gate.wait(WAIT_S)

    def describe(self) -> ModelDescription:
        return fake_description("fake", weights_sha256=str(id(self)))

    def run(self, items: list[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        ids = [id_of(item.image) for item in items]
        with self.rec.cv:
            self.rec.attempts.append(ids)
            self.rec.instances.append(id(self))
            self.rec.cv.notify_all()
        if self.rec.gate is not None and self.rec.hold in (None, ids):
            assert self.rec.gate.wait(WAIT_S)
        if self.rec.fail_ids & set(ids):
            raise RuntimeError(f"boom in {ids}")
        too_big = self.rec.oom_above is not None and len(ids) > self.rec.oom_above
        if too_big or self.rec.oom_ids & set(ids):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        results = [
            ImageResult(
                width=int(item.image.shape[2]),
                height=int(item.image.shape[1]),
                persons=[
                    Person(bbox=(float(i), 0.0, 1.0, 1.0), bbox_score=1.0, score=1.0, keypoints=[])
                ],
            )
            for i, item in zip(ids, items, strict=True)
        ]
        stats = BatchStats(
            detect_images=len(ids),
            detect_seconds=self.rec.detect_s,
            pose_crops=len(ids),
            pose_seconds=self.rec.pose_s,
            persons_per_image=[1] * len(ids),
        )
        return results, stats


class FakeDecoder:
    """bytes b"img:<id>" -> image_for(id); b"bad" -> a fixed ImageError; can be held on a gate."""

    def __init__(self) -> None:
        self.gate: threading.Event | None = None
        self.started = threading.Semaphore(0)
        self.threads: list[int] = []
        self.error = ImageError("bad_image", "not an image")

    def __call__(self, data: bytes) -> torch.Tensor:
        self.threads.append(threading.get_ident())
        self.started.release()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S)
        if data == b"bad":
            raise self.error
        return image_for(int(data.removeprefix(b"img:")))


class RecordingObserver(NoopObserver):
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.waits: list[float] = []
        self.batches: list[tuple[BatchStats, int]] = []

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def on_queue_waits(self, seconds: Sequence[float]) -> None:
        self.waits.extend(seconds)

    def on_batch(self, stats: BatchStats, images: int) -> None:
        self.batches.append((stats, images))


MakeEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture(name="loop_errors")
async def loop_errors_fixture() -> AsyncIterator[list[dict[str, Any]]]:
    """Errors the event loop would have logged; must stay empty."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    gc.collect()  # "exception was never retrieved" is reported when a future is collected
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not errors, errors


@pytest.fixture(name="make_engine")
async def make_engine_fixture(loop_errors: list[dict[str, Any]]) -> AsyncIterator[MakeEngine]:
    """Build (and by default start) engines over fakes; stops them at the end of the test."""
    made: list[tuple[Engine, Recorder, FakeDecoder]] = []

    async def make(
        recorder: Recorder,
        *,
        devices: tuple[str, ...] = ("cpu",),
        decoder: FakeDecoder | None = None,
        observer: RecordingObserver | None = None,
        start: bool = True,
        **config: Any,
    ) -> Engine:
        decoder = decoder if decoder is not None else FakeDecoder()
        engine = Engine(
            lambda device: FakePipeline(recorder, device),
            devices,
            EngineConfig(**{"max_delay_ms": 0.0, **config}),
            decoder=decoder,
            observer=observer,
        )
        made.append((engine, recorder, decoder))
        if start:
            await engine.start()
        return engine

    yield make
    for engine, recorder, decoder in made:
        for gate in (recorder.gate, recorder.warmup_gate, decoder.gate):
            if gate is not None:
                gate.set()
        await engine.stop(grace_s=WAIT_S)


def submit(engine: Engine, job_id: int, **kwargs: Any) -> asyncio.Task[PoseResponse]:
    return asyncio.create_task(engine.infer(PoseRequest(image=image_for(job_id), **kwargs)))


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate`` holds (bounded)."""
    end = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        await asyncio.sleep(0.001)


async def running_first(
    engine: Engine, rec: Recorder, job_id: int = 0
) -> asyncio.Task[PoseResponse]:
    """Close a fresh gate, submit ``job_id`` and return once the fake is held running it."""
    rec.gate = threading.Event()
    before = len(rec.attempts)
    task = submit(engine, job_id)
    await asyncio.to_thread(rec.wait_attempts, before + 1)
    assert rec.attempts[before] == [job_id]
    return task
