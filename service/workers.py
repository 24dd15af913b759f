"""The engine's worker pool: one thread per device string, each with its own pipeline.

Each worker builds its pipeline with ``pipeline_factory(device)`` and warms it up in its own thread
(on CUDA with that device current and a CUDA stream of its own, so that workers on one GPU overlap),
then takes batches from the shared ``BatchQueue`` until it is closed. A batch is one
``pipeline.run`` call; a CUDA out-of-memory error splits it in halves that are run in turn,
recursively, so that only a single image that still does not fit fails.

Outcomes go back through callbacks, called on the worker thread; ``service.engine.Engine`` turns
them into answers and errors on its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from model.interfaces import BatchStats, ImageResult, PipelineItem
from service.batching import BatchQueue, Job

__all__ = ["Pipeline", "WorkerPool", "is_oom"]

logger = logging.getLogger(__name__)

# How long closing waits for a worker still inside a pipeline call.
_JOIN_TIMEOUT_S = 10.0


class Pipeline(Protocol):
    """What the engine needs of a pipeline (``model.pipeline.TopDownPipeline`` or a test fake)."""

    @property
    def device(self) -> torch.device:
        """The device the pipeline computes on."""
        ...

    def run(self, items: list[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        """Run a batch: one result per item, in order, and what the stages did."""
        ...

    def warmup(self) -> None:
        """Run a tiny dummy batch through every stage."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the model, weights, detector and device."""
        ...


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA out-of-memory error (some kernels raise a plain RuntimeError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


class WorkerPool:
    """Worker threads over one ``BatchQueue``.

    Args:
        devices: One worker per entry ("cpu", "cuda", "cuda:1", ...; repeats allowed).
        pipeline_factory: Builds a pipeline for a device string, in that device's worker thread.
        queue: Where batches come from.
        warmup: Call ``pipeline.warmup()`` before reporting started.
        on_taken: A batch was taken: the jobs to run (their ``queue_s`` set) and the jobs found
            past their deadline (not to be run).
        on_success: ``(jobs, results, stats, seconds)`` of a pipeline call that succeeded.
        on_failure: ``(jobs, exception)`` of a pipeline call that failed (and is not retried).
    """

    def __init__(
        self,
        devices: Sequence[str],
        pipeline_factory: Callable[[str], Pipeline],
        queue: BatchQueue,
        *,
        warmup: bool,
        on_taken: Callable[[list[Job], list[Job]], None],
        on_success: Callable[[list[Job], list[ImageResult], BatchStats, float], None],
        on_failure: Callable[[list[Job], Exception], None],
    ) -> None:
        self.devices = [str(d) for d in devices]
        self._factory = pipeline_factory
        self._queue = queue
        self._warmup = warmup
        self._on_taken = on_taken
        self._on_success = on_success
        self._on_failure = on_failure
        self.pipelines: list[Pipeline | None] = [None] * len(self.devices)
        self._threads: list[threading.Thread] = []

    def __len__(self) -> int:
        return len(self.devices)

    async def start(self) -> None:
        """Start every worker; return once each has built and warmed up its pipeline.

        Raises:
            Exception: The first error of a factory or warm-up; the queue is then closed and the
                workers joined.
        """
        loop = asyncio.get_running_loop()
        started: list[asyncio.Future[None]] = []
        for index, device in enumerate(self.devices):
            fut: asyncio.Future[None] = loop.create_future()
            started.append(fut)
            thread = threading.Thread(
                target=self._main,
                args=(index, loop, fut),
                name=f"pose-worker-{index}-{device}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        try:
            outcomes = await asyncio.gather(*started, return_exceptions=True)
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            if errors:
                raise errors[0]
        except BaseException:
            self._queue.close()
            await asyncio.to_thread(self.join)
            raise

    def join(self) -> None:
        """Wait for the worker threads to end (after ``queue.close()``), a bounded time each."""
        for thread in self._threads:
            thread.join(timeout=_JOIN_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("%s still inside a pipeline call; abandoning it", thread.name)

    def _main(
        self, index: int, loop: asyncio.AbstractEventLoop, started: asyncio.Future[None]
    ) -> None:
        """Thread body: build, warm up, report, then run batches until the queue is closed."""
        device = self.devices[index]
        reported = False
        try:
            with _device_context(device):
                pipeline = self._factory(device)
                with torch.inference_mode():
                    if self._warmup:
                        pipeline.warmup()
                    self.pipelines[index] = pipeline
                    loop.call_soon_threadsafe(_settle_started, started, None)
                    reported = True
                    cuda = pipeline.device.type == "cuda"
                    while (taken := self._queue.next_batch()) is not None:
                        batch, expired = taken
                        self._on_taken(batch, expired)
                        try:
                            self._execute(pipeline, device, cuda, batch)
                        except Exception as exc:  # a bug in a callback must not kill the worker
                            logger.exception("worker on %s: unexpected error", device)
                            self._on_failure(batch, exc)
        except BaseException as exc:
            if reported:
                logger.exception("worker on %s died", device)
                return
            logger.exception("worker on %s failed to start", device)
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(_settle_started, started, exc)

    def _execute(self, pipeline: Pipeline, device: str, cuda: bool, jobs: list[Job]) -> None:
        """Run ``jobs`` as one pipeline call; on CUDA OOM run the halves instead, recursively."""
        jobs = self._queue.still_running(jobs)  # cancelled or expired meanwhile: not run
        if not jobs:
            return
        t0 = time.monotonic()
        oom = False
        try:
            results, stats = pipeline.run([job.item for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"pipeline returned {len(results)} results for {len(jobs)}")
        except Exception as exc:
            if not (is_oom(exc) and len(jobs) > 1):
                logger.warning("batch of %d failed on %s: %r", len(jobs), device, exc)
                self._on_failure(jobs, exc)
                return
            oom = True
        if oom:
            # Retried outside the except block, so that the failed batch's tensors (held by the
            # exception's traceback) are freed before the halves run.
            logger.warning(
                "out of memory on %s with %d images; retrying as halves", device, len(jobs)
            )
            if cuda:
                torch.cuda.empty_cache()
            half = len(jobs) // 2
            self._execute(pipeline, device, cuda, jobs[:half])
            self._execute(pipeline, device, cuda, jobs[half:])
            return
        self._on_success(jobs, results, stats, time.monotonic() - t0)


@contextlib.contextmanager
def _device_context(device_name: str) -> Iterator[None]:
    """On CUDA: the device as current, and a stream of the worker's own; else nothing."""
    device = torch.device(device_name)
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(stream):
            yield


def _settle_started(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
