"""The serving engine: the one object both transports (HTTP and gRPC) submit pose requests to.

A small dynamic batcher with Triton's three knobs (``max_batch_size``, ``max_delay_ms`` and
``max_queue_size``) in front of a pool of worker threads, one per device string, each owning its own
pipeline instance (and, on CUDA, its own stream). Workers pull from one shared queue, so the load
balances itself; one worker at a time forms a batch so that concurrent jobs coalesce.

The contract, each part tested in ``tests/test_engine*.py``:

- every admitted job gets exactly one outcome (all futures are settled on the event-loop thread,
  and only when not already done);
- a job whose awaiting task is cancelled (HTTP disconnect, gRPC cancel) is dropped before it reaches
  the pipeline;
- a per-request deadline gives ``DeadlineExceededError`` at the deadline, never a late answer, and a
  job already past its deadline is not run;
- a failing batch fails only its own jobs (``InferenceError`` with the cause chained); a CUDA
  out-of-memory error splits the batch in halves and retries them, recursively, before failing
  anything;
- ``start()`` builds the pipelines and warms them up in their worker threads before ``ready`` turns
  true; ``stop()`` refuses new work, lets admitted work finish within a grace period, then fails
  what is left with ``EngineStoppedError``.

Encoded images are decoded by ``decoder`` in a thread pool before they are queued, so decoding never
blocks the event loop; jobs being decoded count toward ``max_queue_size`` so that overload is
refused before any work is spent on it. With ``gpu_decode`` on one CUDA device the pool only reads
headers (``probe``, which also enforces the pixel limit): a JPEG the device decodes as the CPU
would is queued encoded and its worker decodes the whole batch's JPEGs with nvJPEG in one call
(``service.workers``); everything else is decoded in the pool as before. The engine imports no
transport (fastapi, grpc) and no metrics library: metrics arrive through an ``EngineObserver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import torch

from model.interfaces import BatchStats, ImageResult, ModelDescription, PipelineItem
from service.batching import AdmissionFigures, BatchQueue, Job, JobState
from service.engine_api import (
    EngineConfig,
    EngineObserver,
    NoopObserver,
    PoseRequest,
    PoseResponse,
    infer_all,
)
from service.errors import (
    ClientClosedError,
    DeadlineExceededError,
    EngineError,
    EngineStoppedError,
    InferenceError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
)
from service.gpu_decode import EncodedJpeg, ImageHeader
from service.validation import (
    RequestLimits,
    check_boxes_in_image,
    check_image,
    check_options,
    parse_boxes,
)
from service.workers import DeviceDecoder, Pipeline, WorkerPool, plan_decoding

__all__ = [
    "ClientClosedError",
    "DeadlineExceededError",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "EngineStoppedError",
    "InferenceError",
    "InvalidRequestError",
    "NoopObserver",
    "NotReadyError",
    "Pipeline",
    "PoseRequest",
    "PoseResponse",
    "QueueFullError",
    "RequestLimits",
]

logger = logging.getLogger(__name__)
# The image of a job whose upload is still being decoded (shared: never written, only replaced).
_NOT_DECODED = torch.empty(0, dtype=torch.uint8)


def _timed_decode(
    decoder: Callable[[bytes], torch.Tensor],
    data: bytes,
    probe: Callable[[bytes], ImageHeader] | None = None,
) -> tuple[torch.Tensor | EncodedJpeg, float]:
    """Decode in a pool thread (or, given a probe, leave a JPEG the device decodes encoded) and
    say how long it took."""
    t0 = time.monotonic()
    if probe is not None:
        header = probe(data)
        if header.device_decodable:
            return EncodedJpeg.from_upload(data, header), time.monotonic() - t0
    image = decoder(data)
    return image, time.monotonic() - t0


class Engine:
    """Dynamic batcher and worker pool behind both transports.

    Args:
        pipeline_factory: Builds one pipeline for a device string; called in that device's worker
            thread during ``start()``.
        devices: One worker per entry, e.g. ``["cpu"]``, ``["cuda:0", "cuda:1"]``.
        config: Batching and lifecycle knobs.
        decoder: Encoded bytes -> (3, H, W) uint8 RGB tensor, run in the decode pool; its
            exceptions (``service.errors.ImageError``) reach the caller unchanged. Without one,
            requests must carry decoded tensors.
        small_decoder: Encoded bytes -> the image if it is small, else None
            (``service.uploads.decode_if_small``): run on the event loop after admission, since
            handing a thumbnail to the pool costs more than decoding it. Not used when JPEGs
            are decoded on the device.
        probe: Encoded bytes -> ``ImageHeader`` without decoding (``service.gpu_decode.probe_image``
            with the pixel limit); needed by ``config.gpu_decode``, run in the decode pool, its
            exceptions reach the caller unchanged.
        device_decoder: The workers' batched JPEG decoder; by default
            ``service.gpu_decode.decode_jpegs`` (nvJPEG), used only when every worker is on one CUDA
            device. One given here is used on every worker, whatever its device (tests).
        observer: Metrics hooks.

    Raises:
        ValueError: No device, or ``config.gpu_decode`` without a decoder and a probe.
    """

    def __init__(
        self,
        pipeline_factory: Callable[[str], Pipeline],
        devices: Sequence[str],
        config: EngineConfig,
        *,
        decoder: Callable[[bytes], torch.Tensor] | None = None,
        small_decoder: Callable[[bytes], torch.Tensor | None] | None = None,
        probe: Callable[[bytes], ImageHeader] | None = None,
        device_decoder: DeviceDecoder | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        if not devices:
            raise ValueError("at least one device is needed")
        self._config = config
        self._decoder = decoder
        self._small_decoder = small_decoder
        decoding = plan_decoding(
            devices,
            gpu_decode=config.gpu_decode,
            decoder=decoder,
            probe=probe,
            device_decoder=device_decoder,
            warmup=config.warmup,
        )
        self._probe = probe if decoding is not None else None
        self._observer: EngineObserver = observer if observer is not None else NoopObserver()
        self._queue = BatchQueue(
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_delay_ms / 1000.0,
            max_queue_size=config.max_queue_size,
            on_depth=lambda depth: self._observe(self._observer.on_queue_depth, depth),
        )
        self._workers = WorkerPool(
            devices,
            pipeline_factory,
            self._queue,
            warmup=config.warmup,
            on_taken=self._taken,
            on_success=self._succeeded,
            on_failure=self._failed,
            decoding=decoding,
            on_rejected=lambda job, exc: self._post(job, exc=exc),
            calibration_budget_s=config.calibration_budget_s,
        )
        # Event-loop-only state.
        self._live: set[Job] = set()  # admitted jobs whose future is not settled yet
        self._image_bytes = 0  # decoded pixels held by live jobs (``max_inflight_image_bytes``)
        self._idle = asyncio.Event()  # set while _live is empty
        self._idle.set()
        self._wake_scheduled = False
        self._decode_pool: ThreadPoolExecutor | None = None
        self._started = False
        self._ready = False
        self._draining = False
        self._stopped = False

    @property
    def ready(self) -> bool:
        """Started, every worker built and warmed up, and not draining."""
        return self._ready and not self._draining

    @property
    def draining(self) -> bool:
        """``stop()`` was called (or ``start()`` failed): new requests are refused."""
        return self._draining

    @property
    def decodes_on_device(self) -> bool:
        """Whether qualifying JPEGs are decoded by the workers on their device (``gpu_decode``
        in effect) rather than in the decode pool."""
        return self._probe is not None

    @property
    def config(self) -> EngineConfig:
        """The knobs this engine runs with."""
        return self._config

    async def start(self) -> None:
        """Build one pipeline per device in its worker thread, warm it up, then turn ready.

        Raises:
            Exception: Whatever a pipeline factory or warm-up raised (all workers are stopped
                first).
        """
        if self._started or self._stopped:
            raise RuntimeError("Engine.start() may be called once, before stop()")
        self._started = True
        self._decode_pool = ThreadPoolExecutor(
            max_workers=self._config.decode_workers, thread_name_prefix="pose-decode"
        )
        try:
            await self._workers.start()
        except BaseException:
            self._draining = True
            await self._shut_down()
            raise
        self._ready = True
        logger.info(
            "engine ready: workers on %s, JPEGs decoded %s, %s",
            self._workers.devices,
            "on the device" if self.decodes_on_device else "in the CPU pool",
            self._config,
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new work, let admitted jobs finish within ``grace_s``, then fail the rest.

        Jobs still unanswered when the grace period ends get ``EngineStoppedError``; a batch still
        running then is left to finish in its thread, its answers discarded. Idempotent.

        Args:
            grace_s: Seconds to wait for admitted jobs; ``config.drain_grace_s`` when None.
        """
        if self._stopped:
            return
        self._draining = True
        grace = self._config.drain_grace_s if grace_s is None else grace_s
        if self._live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
        left = list(self._live)
        if left:
            logger.warning("drain grace of %.1f s expired: failing %d job(s)", grace, len(left))
        for job in left:
            self._finish(job, exc=EngineStoppedError("the server is shutting down"))
        await self._shut_down()

    async def _shut_down(self) -> None:
        self._queue.close()
        await asyncio.to_thread(self._workers.join)
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._stopped = True
        self._ready = False

    def queue_depth(self) -> int:
        """Jobs admitted and not yet running (being decoded or queued)."""
        return self._queue.depth()

    def admission_figures(self) -> AdmissionFigures | None:
        """What admission by time reads now (``BatchQueue.admission_figures``); None before any
        batch has run."""
        return self._queue.admission_figures(len(self._workers))

    def model_info(self) -> ModelDescription:
        """``describe()`` of the first worker's pipeline.

        Raises:
            NotReadyError: Before the pipelines are built.
        """
        pipeline = self._workers.pipelines[0]
        if pipeline is None:
            raise NotReadyError("the engine is not started")
        return pipeline.describe()

    async def infer(self, request: PoseRequest) -> PoseResponse:
        """Run one image through the batcher.

        If the awaiting task is cancelled, the job is dropped before it reaches the pipeline.

        Raises:
            NotReadyError: Not started, warming up, draining or stopped.
            QueueFullError: ``max_queue_size`` jobs are already waiting.
            DeadlineExceededError: ``request.deadline`` passed before the answer.
            EngineStoppedError: The drain grace period expired first.
            InferenceError: The batch failed.
            InvalidRequestError: The decoder or probe refused the bytes (unchanged), or the
                image, boxes or options are invalid (``service.validation``: checked here, once,
                so that one bad request cannot fail a batch; a front-end process checks its own
                requests, ``PoseRequest.checked``).
        """
        return await self.submit(request)

    async def _infer(self, request: PoseRequest) -> PoseResponse:
        """``infer``'s work; the engine's own sub-requests (``infer_many``, a split request) come
        here directly, so that a caller wrapping ``infer`` sees only its own calls."""
        return await self.submit(request)

    def submit(self, request: PoseRequest) -> asyncio.Future[PoseResponse]:
        """``infer`` without a coroutine, for callers that handle many jobs at once (the engine
        process's server): the checks and admission happen now, the answer settles the returned
        future. Cancelling the future drops the job (before compute, unless already running).

        Raises:
            The admission errors of ``infer`` (not ready, queue full, invalid request, deadline
            already passed), at once; the others settle the future.
        """
        if not self.ready:
            raise NotReadyError("draining" if self._draining else "the engine is not ready")
        loop = asyncio.get_running_loop()
        t_submit = time.monotonic()
        if request.deadline is not None and request.deadline <= t_submit:
            raise DeadlineExceededError("the deadline passed before the request was queued")

        checked = request.checked
        if checked:  # by a front-end process (``PoseRequest.checked``)
            boxes = request.boxes
        else:
            limits = self._config.limits
            boxes = None if request.boxes is None else parse_boxes(request.boxes, limits)
            check_options(request.options)
        if boxes is not None and boxes.shape[0] > self._config.max_boxes_per_job:
            return asyncio.ensure_future(self._infer_split(request, boxes, t_submit))
        data: bytes | None = None
        image = request.image
        if isinstance(image, torch.Tensor):
            if not checked:
                check_image(image)
                if boxes is not None:
                    check_boxes_in_image(boxes, int(image.shape[2]), int(image.shape[1]))
        elif isinstance(image, bytes | bytearray | memoryview):
            if self._decoder is None:
                raise TypeError("this engine has no decoder: pass a decoded image tensor")
            data = bytes(image)
            image = _NOT_DECODED  # replaced once decoded
        else:
            raise TypeError(f"image must be bytes or a tensor, got {type(image).__name__}")
        item = PipelineItem(image=image, boxes=boxes, options=request.options)
        job = Job(
            item=item,
            future=loop.create_future(),
            loop=loop,
            deadline=request.deadline,
            t_submit=t_submit,
            state=JobState.DECODING if data is not None else JobState.QUEUED,
            return_image=request.return_image,
            source=request.source,
            eager=request.eager,
        )
        retry = self._queue.admit(
            job, workers=len(self._workers), max_wait_s=self._config.max_queue_wait_s, wake=False
        )
        if retry is not None:
            raise QueueFullError(
                f"overloaded: {self._queue.depth()} jobs waiting; this one would not be answered "
                "in time",
                retry_after_s=retry,
            )
        self._live.add(job)
        self._idle.clear()
        self._wake_soon(loop)
        if data is None and not self._hold_image(job, int(image.nbytes)):
            error = self._too_many_image_bytes(job)
            self._finish(job)
            raise error
        # The caller went away (the future was cancelled): free the slot, keep it from workers.
        job.future.add_done_callback(lambda done: self._finish(job) if done.cancelled() else None)
        if request.deadline is not None:
            job.timer = loop.call_at(loop.time() + (request.deadline - t_submit), self._expire, job)
        if data is not None and not self._decode_small(job, data):
            assert self._decoder is not None and self._decode_pool is not None
            decode_future = loop.run_in_executor(
                self._decode_pool, _timed_decode, self._decoder, data, self._probe
            )
            job.decode_future = decode_future
            decode_future.add_done_callback(lambda f: self._decoded(job, f))
        return cast("asyncio.Future[PoseResponse]", job.future)

    def _wake_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the workers once at the end of this event-loop iteration, for every job queued
        during it (a burst of requests wakes a waiting worker once, not once per job)."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        self._queue.wake()

    async def _infer_split(
        self, request: PoseRequest, boxes: torch.Tensor, t_submit: float
    ) -> PoseResponse:
        """A request with more boxes than ``max_boxes_per_job``: decoded once, then run as jobs
        of at most that many boxes each, so that it shares the workers with everyone else
        instead of holding one for all its crops; the persons come back in the caller's order.
        """
        image = request.image
        if not isinstance(image, torch.Tensor):
            if self._decoder is None or self._decode_pool is None:
                raise TypeError("this engine has no decoder: pass a decoded image tensor")
            if self._queue.depth() >= self._queue.max_queue_size:
                raise QueueFullError(
                    f"queue full ({self._queue.max_queue_size} jobs waiting)",
                    retry_after_s=self._queue.retry_after_s(len(self._workers)),
                )
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self._decode_pool, self._decoder, bytes(image))
        check_image(image)
        check_boxes_in_image(boxes, int(image.shape[2]), int(image.shape[1]))
        step = self._config.max_boxes_per_job
        parts = [
            dataclasses.replace(request, image=image, boxes=boxes[i : i + step])
            for i in range(0, boxes.shape[0], step)
        ]
        answers = await self.infer_many(parts)
        first = answers[0]
        persons = [person for answer in answers for person in answer.result.persons]
        timing = {key: max(a.timing_ms[key] for a in answers) for key in first.timing_ms}
        timing["total"] = (time.monotonic() - t_submit) * 1000.0
        result = ImageResult(width=first.result.width, height=first.result.height, persons=persons)
        return PoseResponse(result=result, timing_ms=timing, image=first.image)

    async def infer_many(
        self,
        requests: Sequence[PoseRequest],
        *,
        abandoned: Callable[[], Awaitable[Any]] | None = None,
    ) -> list[PoseResponse]:
        """Run several images, each as its own job (they batch with everything else); all the
        answers in order or the first error (``service.engine_api.infer_all``).

        Raises:
            ClientClosedError: ``abandoned`` completed first.
            EngineError: The first job's error (see ``infer``).
        """
        return await infer_all(self._infer, requests, abandoned)

    def _decode_small(self, job: Job, data: bytes) -> bool:
        """Decode a small image here, on the event loop, and queue the job (or fail it); False
        (nothing done) for an image that is not small, or when the device decodes JPEGs."""
        if self._small_decoder is None or self._probe is not None:
            return False
        done: asyncio.Future[tuple[torch.Tensor | EncodedJpeg, float]]
        done = asyncio.get_running_loop().create_future()
        t0 = time.monotonic()
        try:
            image = self._small_decoder(data)
        except Exception as exc:  # the decoder's ImageError, as from the pool
            done.set_exception(exc)
        else:
            if image is None:
                return False
            done.set_result((image, time.monotonic() - t0))
        self._decoded(job, done)
        return True

    def _decoded(
        self, job: Job, decode_future: asyncio.Future[tuple[torch.Tensor | EncodedJpeg, float]]
    ) -> None:
        """Decode-pool completion, on the event loop: queue the image (or the JPEG for the
        worker's device decoder), or fail the job."""
        if decode_future.cancelled():
            self._finish(job, exc=EngineStoppedError("the server is shutting down"))
            return
        exc = decode_future.exception()  # retrieved even when unwanted: no "never retrieved" log
        if job.future.done():
            return  # cancelled, expired or stopped meanwhile; already released
        if exc is not None:
            self._finish(job, exc=exc)  # the decoder's ImageError, unchanged
            return
        image, job.decode_s = decode_future.result()
        try:
            if isinstance(image, EncodedJpeg):
                size = (image.width, image.height)
                job.jpeg = image
            else:
                check_image(image)
                size = (int(image.shape[2]), int(image.shape[1]))
                job.item.image = image
            if job.item.boxes is not None:
                check_boxes_in_image(job.item.boxes, *size)
        except InvalidRequestError as bad:
            self._finish(job, exc=bad)
            return
        if not self._hold_image(job, size[0] * size[1] * 3):
            self._finish(job, exc=self._too_many_image_bytes(job))
            return
        self._queue.enqueue(job, wake=False)
        self._wake_soon(job.loop)

    def _hold_image(self, job: Job, nbytes: int) -> bool:
        """Count ``job``'s decoded pixels against ``max_inflight_image_bytes`` (event loop)."""
        limit = self._config.max_inflight_image_bytes
        if limit is not None and self._image_bytes + nbytes > limit and self._image_bytes > 0:
            return False  # (an image alone is always let through: max_image_pixels bounds it)
        self._image_bytes += nbytes
        job.image_bytes = nbytes
        return True

    def _too_many_image_bytes(self, job: Job) -> QueueFullError:
        return QueueFullError(
            f"{self._image_bytes} bytes of images in flight; the limit is "
            f"{self._config.max_inflight_image_bytes}",
            retry_after_s=self._queue.retry_after_s(len(self._workers)),
        )

    def _expire(self, job: Job) -> None:
        self._finish(job, exc=DeadlineExceededError("the deadline passed before the answer"))

    def _finish(
        self,
        job: Job,
        result: PoseResponse | None = None,
        exc: BaseException | None = None,
    ) -> None:
        """Settle ``job`` once, on the event loop: release it, resolve its future, forget it.

        A job settled already is left as it is (this is the one place futures are resolved, so
        nothing is answered twice). With neither ``result`` nor ``exc`` (the caller cancelled) only
        the bookkeeping is done.
        """
        self._queue.release(job)
        if not job.future.done():
            if exc is not None:
                job.future.set_exception(exc)
            elif result is not None:
                job.future.set_result(result)
        if job.timer is not None:
            job.timer.cancel()
        if job.decode_future is not None and not job.decode_future.done():
            job.decode_future.cancel()
        self._image_bytes -= job.image_bytes
        job.image_bytes = 0
        self._live.discard(job)
        if not self._live:
            self._idle.set()

    def _post(
        self, job: Job, result: PoseResponse | None = None, exc: BaseException | None = None
    ) -> None:
        """From a worker thread: settle ``job`` on its event loop."""
        try:
            job.loop.call_soon_threadsafe(self._finish, job, result, exc)
        except RuntimeError:
            logger.debug("event loop closed; dropping an outcome")

    def _taken(self, batch: list[Job], expired: list[Job]) -> None:
        """Worker thread: a batch left the queue; ``expired`` were past their deadline."""
        for job in expired:
            self._post(job, exc=DeadlineExceededError("the deadline passed in the queue"))
        self._observe(self._observer.on_queue_waits, [job.queue_s for job in batch])

    def _succeeded(
        self, jobs: list[Job], results: list[ImageResult], stats: BatchStats, seconds: float
    ) -> None:
        """Worker thread: answer every job of a pipeline call."""
        self._queue.finished(jobs)
        self._observe(self._observer.on_batch, stats, len(jobs))
        now = time.monotonic()
        answers = []
        for job, result in zip(jobs, results, strict=True):
            timing = {
                "queue": job.queue_s * 1000.0,
                "decode": job.decode_s * 1000.0,
                "detect": stats.detect_seconds * 1000.0,
                "pose": stats.pose_seconds * 1000.0,
                "total": (now - job.t_submit) * 1000.0,
            }
            image = job.item.image.cpu() if job.return_image else None
            answers.append((job, PoseResponse(result=result, timing_ms=timing, image=image)))
        # One hand-over to the event loop per batch, not per job (each wakes the loop).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, PoseResponse]]] = {}
        for job, response in answers:
            by_loop.setdefault(job.loop, []).append((job, response))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._finish_answered, settled)
            except RuntimeError:
                logger.debug("event loop closed; dropping %d outcomes", len(settled))

    def _finish_answered(self, settled: list[tuple[Job, PoseResponse]]) -> None:
        for job, response in settled:
            self._finish(job, result=response)

    def _failed(self, jobs: list[Job], cause: Exception) -> None:
        """Worker thread: fail the jobs of a failed pipeline call, and only those."""
        self._queue.finished(jobs)
        for job in jobs:
            # One error per job, never shared: each caller's traceback is its own.
            err = InferenceError(
                f"inference failed for a batch of {len(jobs)}: {type(cause).__name__}: {cause}"
            )
            err.__cause__ = cause
            self._post(job, exc=err)

    @staticmethod
    def _observe(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("engine observer hook %s failed", getattr(hook, "__name__", hook))
