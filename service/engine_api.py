"""What callers of the engine pass and get: its configuration, a request, a response, and the
observer hooks metrics arrive through. ``service.engine`` re-exports all of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from model.interfaces import BatchStats, ImageResult, ModelDescription, PoseOptions
from service.errors import ClientClosedError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_BOX_COORD",
    "WATCH_ABANDONED_AFTER_S",
    "EngineConfig",
    "EngineHandle",
    "EngineObserver",
    "NoopObserver",
    "PoseRequest",
    "PoseResponse",
    "RequestLimits",
    "infer_all",
]


# A box coordinate or size beyond this many pixels is refused: far past any image the pixel limit
# allows, and small enough that the affine crop maths stays finite in float32.
MAX_BOX_COORD = 1e7


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for.

    Attributes:
        max_boxes: Most caller boxes per image.
        min_box_size_px: Smallest caller box width and height, in pixels.
    """

    max_boxes: int = 100
    min_box_size_px: float = 2.0

    def __post_init__(self) -> None:
        if self.max_boxes < 0:
            raise ValueError(f"max_boxes must be >= 0, got {self.max_boxes}")
        if not 0 < self.min_box_size_px <= MAX_BOX_COORD:
            raise ValueError(f"min_box_size_px must be in (0, 1e7], got {self.min_box_size_px}")


@dataclass(frozen=True)
class EngineConfig:
    """Batching and lifecycle knobs (``service.settings.Settings`` fills them from ``POSE_*``).

    Attributes:
        max_batch_size: Most images in one pipeline call (the detector and pose stages batch
            inside it).
        max_delay_ms: How long the first job of a batch waits for more to arrive; 0 takes what is
            queued and goes.
        max_queue_size: Most jobs admitted and not yet running (being decoded or queued); beyond it
            ``infer`` raises ``QueueFullError`` at once. Admission is also by time: once the
            workers' throughput is measured, a job that would pass its deadline waiting (or wait
            longer than ``max_queue_wait_ms``) is refused at once with a retry hint.
        decode_workers: Threads decoding encoded images.
        warmup: Run ``pipeline.warmup()`` in ``start()`` before reporting ready.
        drain_grace_s: Default grace period of ``stop()``.
        gpu_decode: Decode the JPEGs that qualify (``service.gpu_decode.probe_image``) on the
            workers' CUDA device, batched, instead of in the decode pool; no effect unless every
            worker is on one CUDA device. Off by default until the benchmark says it wins.
        limits: What one request may ask for (boxes per image, smallest box).
        max_queue_wait_ms: Longest expected queue wait admitted (None: the deadline decides).
        max_inflight_image_bytes: Most bytes of decoded pixels held by admitted jobs (queued or
            running); an image that does not fit is refused (429) as soon as its size is known,
            so a burst of large images cannot fill memory however the queue is sized. Decoding
            itself is bounded by ``decode_workers`` (one image per thread). None: no bound.
        max_boxes_per_job: A request with more caller boxes is run as several jobs of at most
            this many boxes (decoded once), so that one request cannot hold a worker for all its
            crops while every other client waits.
        calibration_budget_s: Seconds each worker may spend after warm-up timing forwards of
            1, 2, 3, 4, 6, ... crops, the cost curve the batcher sizes batches from
            (``service.workers.calibrate``); 0 skips it (batches are then sized by
            ``max_batch_size`` alone until live batches fill the curve).
    """

    max_batch_size: int = 16
    max_delay_ms: float = 2.0
    max_queue_size: int = 128
    decode_workers: int = 2
    warmup: bool = True
    drain_grace_s: float = 30.0
    gpu_decode: bool = False
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_queue_wait_ms: float | None = None
    max_inflight_image_bytes: int | None = None
    max_boxes_per_job: int = 16
    calibration_budget_s: float = 15.0

    @property
    def max_queue_wait_s(self) -> float | None:
        """``max_queue_wait_ms`` in seconds (None, or 0: no bound but the deadline)."""
        return self.max_queue_wait_ms / 1000.0 if self.max_queue_wait_ms else None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {self.decode_workers}")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        if self.max_boxes_per_job < 1:
            raise ValueError(f"max_boxes_per_job must be >= 1, got {self.max_boxes_per_job}")
        if self.calibration_budget_s < 0:
            raise ValueError(f"calibration_budget_s must be >= 0, got {self.calibration_budget_s}")


@dataclass
class PoseRequest:
    """One image to run.

    Attributes:
        image: Encoded bytes (decoded in the engine's decode pool by ``decoder``) or a decoded
            (3, H, W) uint8 RGB tensor.
        boxes: [x, y, w, h(, score)] person boxes in pixels as parsed (rows of numbers, or an
            (M, 4|5) tensor), or None to detect; validated by the engine
            (``service.validation``) unless ``checked``.
        options: Per-request pose options.
        deadline: ``time.monotonic()`` seconds after which the answer is no longer wanted.
        return_image: Put the decoded image in the answer (to draw on it): the image is decoded
            after admission, in the engine's pool, like any other.
        source: Who sent it (an API key, a connection, a stream); batches are formed
            round-robin over sources.
        eager: Do not hold this job for a batch to fill while nothing but eager jobs is queued:
            set by ``service.tracking`` on a tracked stream's frames, whose sender waits for the
            answer (``service.batching``).
        checked: Every check of ``service.validation`` has passed already, in a front-end process
            of this service running the same code with the same limits: ``boxes`` is
            ``parse_boxes``'s (M, 5) float32 tensor (or None), and a decoded ``image`` was
            checked, with the boxes against it. The engine process sets it for its front ends'
            jobs so as not to repeat the checks (``service.engine_server``); nothing a client
            sends can set it.
    """

    image: bytes | torch.Tensor
    boxes: Any = None
    options: PoseOptions = field(default_factory=PoseOptions)
    deadline: float | None = None
    return_image: bool = False
    source: str = ""
    eager: bool = False
    checked: bool = False


@dataclass
class PoseResponse:
    """The result of one image and where its time went.

    ``timing_ms`` keys: ``queue`` (waiting for a worker, after decode), ``decode`` (in the pool,
    plus the batch's device decoding for a JPEG decoded on the GPU), ``detect`` and ``pose``
    (compute seconds of the whole batch the image ran in), ``total`` (from ``infer``'s call to the
    answer).
    """

    result: ImageResult
    timing_ms: dict[str, float]
    image: torch.Tensor | None = None  # (3, H, W) uint8 on the CPU, when ``return_image``


class EngineObserver(Protocol):
    """Metrics hooks. Called from the event loop and from worker threads: keep them quick."""

    def on_queue_depth(self, depth: int) -> None:
        """Jobs admitted and not yet running (decoding + queued) changed to ``depth``."""
        ...

    def on_queue_waits(self, seconds: Sequence[float]) -> None:
        """A worker took a batch whose jobs waited ``seconds`` each in the queue."""
        ...

    def on_batch(self, stats: BatchStats, images: int) -> None:
        """A pipeline call over ``images`` images succeeded (per-stage sizes and seconds in stats,
        persons per image in ``stats.persons_per_image``)."""
        ...


class NoopObserver:
    """An observer that records nothing (the default; subclass it to override some hooks)."""

    def on_queue_depth(self, depth: int) -> None:
        """Ignore."""

    def on_queue_waits(self, seconds: Sequence[float]) -> None:
        """Ignore."""

    def on_batch(self, stats: BatchStats, images: int) -> None:
        """Ignore."""


class EngineHandle(Protocol):
    """What the transports call: ``service.engine.Engine`` in one process, or
    ``service.engine_client.EngineClient`` in a front-end process talking to the engine process.
    A transport cannot tell them apart."""

    @property
    def ready(self) -> bool:
        """Serving: started, warmed up, not draining."""
        ...

    @property
    def draining(self) -> bool:
        """New requests are refused (stopping, or the engine is gone)."""
        ...

    def model_info(self) -> ModelDescription:
        """The served model (``NotReadyError`` before it is known)."""
        ...

    async def infer(self, request: PoseRequest) -> PoseResponse:
        """One image through the batcher (see ``Engine.infer`` for the errors)."""
        ...

    async def infer_many(
        self,
        requests: Sequence[PoseRequest],
        *,
        abandoned: Callable[[], Awaitable[Any]] | None = None,
    ) -> list[PoseResponse]:
        """Several images, all answers or the first error (see ``infer_all``)."""
        ...


# A caller that may go away (``abandoned``) is watched from this long after its jobs were
# submitted: most answers of a fast model come sooner, and then cost no watcher task at all.
WATCH_ABANDONED_AFTER_S = 0.02


async def infer_all(
    infer: Callable[[PoseRequest], Awaitable[PoseResponse]],
    requests: Sequence[PoseRequest],
    abandoned: Callable[[], Awaitable[Any]] | None = None,
) -> list[PoseResponse]:
    """Run ``infer`` on each request at once (they batch with everything else).

    All the answers in order, or the first error: the first failure (a refusal, a deadline)
    cancels the calls still pending, whose jobs are then dropped before the pipeline. So does the
    awaitable that ``abandoned()`` returns completing (e.g. the HTTP client disconnecting):
    ``ClientClosedError``. It is started only once the answers have taken
    ``WATCH_ABANDONED_AFTER_S``, so a caller that goes away is noticed that much later at most.

    Raises:
        ClientClosedError: ``abandoned`` completed first.
        EngineError: The first call's error.
    """
    if abandoned is None:
        return await _gather_first_error(infer, requests)
    task = asyncio.current_task()
    assert task is not None
    watcher: asyncio.Future[Any] | None = None
    went_away = False

    def watched(done: asyncio.Future[Any]) -> None:
        nonlocal went_away
        if not done.cancelled():
            done.exception()  # retrieved: a watcher that failed also means the caller is gone
            went_away = True
            task.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(abandoned())
        watcher.add_done_callback(watched)

    timer = asyncio.get_running_loop().call_later(WATCH_ABANDONED_AFTER_S, watch)
    try:
        return await _gather_first_error(infer, requests)
    except asyncio.CancelledError:
        if went_away and task.uncancel() == 0:
            raise ClientClosedError("the client went away before the answer") from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.remove_done_callback(watched)
            watcher.cancel()


async def _gather_first_error(
    infer: Callable[[PoseRequest], Awaitable[PoseResponse]], requests: Sequence[PoseRequest]
) -> list[PoseResponse]:
    """``infer`` on every request concurrently: the answers in order, or the first error after
    cancelling the calls still pending. One request is awaited in the caller's task."""
    if len(requests) == 1:
        return [await infer(requests[0])]
    tasks = [asyncio.ensure_future(infer(request)) for request in requests]
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        return [task.result() for task in tasks]
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
