"""The engine's worker pool: one thread per device string, each with its own pipeline.

Each worker builds its pipeline with ``pipeline_factory(device)`` and warms it up in its own thread
(on CUDA with that device current and a CUDA stream of its own, so that workers on one GPU overlap),
then takes batches from the shared ``BatchQueue`` until it is closed. A batch is one
``pipeline.run`` call; a CUDA out-of-memory error splits it in halves that are run in turn,
recursively, so that only a single image that still does not fit fails.

Batch sizes come from each worker's own measurements (``calibrate``): after the warm-up, a pipeline
with a crop-chunk knob (``max_crops_per_batch``, network inputs per pose forward) is timed on calls
of one forward of growing size (``service.batching.sweep_sizes``) until bigger forwards stop
paying; those figures seed the worker's ``CostCurve``, which every batch it runs then refines
(probing the sizes next to the best now and then) and from which the queue sizes its batches. The
worker sets the pipeline's chunk for each batch to the size the batch was formed for (never above
the configured one), so a batch is one forward of the size its curve chose, and a job with more
boxes runs in forwards of that size. On this project's 2-core CPU, when it is quiet, a forward of
4 inputs costs less per input than one of 8 or more (cache-bound), so the worker runs small
batches; when other processes load it, bigger forwards pay again, and the probes find it; on a
GPU the sweep and the batches keep growing while bigger forwards still pay. A pipeline without the
knob (a test fake) is not calibrated, and its batches are sized by ``max_batch_size`` alone.

With device decoding on (``DeviceDecoding``; ``EngineConfig.gpu_decode`` on one CUDA device), JPEGs
arrive encoded (``Job.jpeg``) and the worker decodes them all in one call on its device, in its
stream, just before ``pipeline.run``. A failing call is split in halves, recursively (a CUDA
out-of-memory error the same way); a single file the device decoder still refuses is decoded by the
CPU decoder, whose ``ImageError`` fails that job alone, so an upload gets the same answer or the
same error on either route.

Outcomes go back through callbacks, called on the worker thread; ``service.engine.Engine`` turns
them into answers and errors on its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from model.interfaces import BatchStats, ImageResult, ModelDescription, PipelineItem, PoseOptions
from service.batching import CURVE_SIZES, BatchQueue, CostCurve, Job, sweep_sizes
from service.errors import ImageError
from service.gpu_decode import EncodedJpeg, ImageHeader, decode_jpegs, sample_jpeg

__all__ = [
    "DeviceDecoder",
    "DeviceDecoding",
    "Pipeline",
    "WorkerPool",
    "calibrate",
    "is_oom",
    "plan_decoding",
]

# (JPEG files as 1-D uint8 CPU tensors, device) -> (3, H, W) uint8 RGB tensors on the device, in
# order; all or nothing (``service.gpu_decode.decode_jpegs``).
DeviceDecoder = Callable[[Sequence[torch.Tensor], torch.device], list[torch.Tensor]]

logger = logging.getLogger(__name__)

# How long closing waits for a worker still inside a pipeline call.
_JOIN_TIMEOUT_S = 10.0
# Measuring time after which the warm-up's cost sweep tries no bigger size.
CALIBRATION_BUDGET_S = 15.0
# The calibration's image: (H, W) of a typical upload; its boxes are person-shaped.
_CALIBRATION_IMAGE_HW = (480, 640)


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

    def describe(self) -> ModelDescription:
        """JSON-able description of the model, weights, detector and device."""
        ...


@dataclass(frozen=True)
class DeviceDecoding:
    """How workers decode the JPEGs queued encoded (``Job.jpeg``).

    Attributes:
        decode: the batched device decoder.
        fallback: the CPU decoder (encoded bytes -> (3, H, W) uint8 RGB), for a file the device
            decoder refuses on its own; its exceptions reach that job's caller unchanged.
        warmup: a JPEG each worker decodes once while starting (nvJPEG builds its state on the
            first call), or None.
    """

    decode: DeviceDecoder
    fallback: Callable[[bytes], torch.Tensor]
    warmup: bytes | None = None


def plan_decoding(
    devices: Sequence[str],
    *,
    gpu_decode: bool,
    decoder: Callable[[bytes], torch.Tensor] | None,
    probe: Callable[[bytes], ImageHeader] | None,
    device_decoder: DeviceDecoder | None,
    warmup: bool,
) -> DeviceDecoding | None:
    """Whether the workers decode JPEGs on their device, and with what.

    With the default decoder (torchvision's nvJPEG), only when every worker is on one CUDA device:
    CPU workers decode on the CPU pool as without ``gpu_decode``, and torchvision's one
    process-wide nvJPEG decoder is rebuilt (the old one leaked) whenever the device changes. An
    explicit ``device_decoder`` is used on every worker, whatever its device (tests run the route
    on the CPU with ``decode_jpegs``, which decodes there with libjpeg-turbo).

    Raises:
        ValueError: ``gpu_decode`` without a CPU decoder and a probe.
    """
    if not gpu_decode:
        return None
    if decoder is None or probe is None:
        raise ValueError("gpu_decode needs a decoder (the CPU fallback) and a probe")
    if device_decoder is None:
        parsed = [torch.device(d) for d in devices]
        indices = {0 if d.index is None else d.index for d in parsed if d.type == "cuda"}
        if len(indices) != 1 or any(d.type != "cuda" for d in parsed):
            logger.warning(
                "gpu_decode is on but the workers are not all on one CUDA device (%s): JPEGs are "
                "decoded on the CPU decode pool",
                ",".join(devices),
            )
            return None
        device_decoder = decode_jpegs
    return DeviceDecoding(
        decode=device_decoder, fallback=decoder, warmup=sample_jpeg() if warmup else None
    )


# What a device's allocation failures say when they are not torch's OutOfMemoryError: torch's own
# message (some kernels raise a plain RuntimeError), the CUDA runtime's, cuBLAS's and cuDNN's, and
# torchvision's nvJPEG checks ("Failed to attach device buffer: 5"; 5 is nvJPEG's
# NVJPEG_STATUS_ALLOCATOR_FAILURE: nvJPEG allocates outside torch's cache, so emptying the cache
# and splitting helps it too).
_OOM_MESSAGE = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED"
    r"|CUDNN_STATUS_\w*ALLOC\w*FAILED"
    r"|^Failed to (?:create|attach|initialize|decode|transfer)[^:\n]*: 5$",
    re.MULTILINE,
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device's out-of-memory error (``_OOM_MESSAGE``)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and _OOM_MESSAGE.search(str(exc)) is not None


def calibrate(
    pipeline: Pipeline,
    *,
    budget_s: float = CALIBRATION_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> CostCurve | None:
    """Measure ``pipeline``'s cost per crop by forward size and seed a cost curve with it.

    Each call is one image with ``n`` person boxes, flip test on (``2n`` network inputs) and
    ``max_crops_per_batch`` set to ``2n``, so that it is one forward of ``2n`` inputs. ``n`` grows
    over ``CURVE_SIZES`` up to the configured ``max_crops_per_batch`` (``sweep_sizes``), which is
    restored at the end: the worker sets the chunk for each batch (``WorkerPool``).

    Returns:
        The seeded curve, or None for a pipeline without an int ``max_crops_per_batch`` (nothing
        is run then).
    """
    configured = _chunk_knob(pipeline)
    if configured is None:
        return None
    height, width = _CALIBRATION_IMAGE_HW
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    options = PoseOptions(flip_test=True)

    def measure(crops: int) -> float:
        pipeline.max_crops_per_batch = 2 * crops  # type: ignore[attr-defined]
        boxes = _calibration_boxes(crops, width, height)
        item = PipelineItem(image=image, boxes=boxes, options=options)
        t0 = clock()
        pipeline.run([item])  # returns host results: the device is done
        return clock() - t0

    sizes = [n for n in CURVE_SIZES if 2 * n <= max(2, configured)]
    try:
        per_crop = sweep_sizes(measure, sizes, budget_s=budget_s)
    finally:
        pipeline.max_crops_per_batch = configured  # type: ignore[attr-defined]
    curve = CostCurve()
    for crops, seconds in per_crop.items():
        curve.seed(crops, seconds)
    logger.info(
        "cost per crop on %s by forward size (crops: ms): %s; best %s crops",
        pipeline.device,
        ", ".join(f"{n}: {1000 * s:.1f}" for n, s in per_crop.items()),
        curve.best_size(),
    )
    return curve


def _chunk_knob(pipeline: Pipeline) -> int | None:
    """The pipeline's configured ``max_crops_per_batch`` (network inputs per forward), if any."""
    configured = getattr(pipeline, "max_crops_per_batch", None)
    if not isinstance(configured, int) or isinstance(configured, bool) or configured < 1:
        return None
    return configured


def _calibration_boxes(count: int, width: int, height: int) -> torch.Tensor:
    """``count`` person-shaped [x, y, w, h, score] boxes spread over a ``width`` x ``height``
    image: (count, 5) float32."""
    i = torch.arange(count, dtype=torch.float32)
    w, h = width / 4, height / 2
    x = (i * 37) % (width - w)
    y = (i * 23) % (height - h)
    return torch.stack((x, y, torch.full_like(i, w), torch.full_like(i, h), torch.ones_like(i)), 1)


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
        decoding: Decode the jobs queued encoded on the worker's device; None: none are.
        on_rejected: ``(job, exception)``: the CPU decoder refused a file the device decoder
            refused (the exception goes to the caller unchanged); needed with ``decoding``.
        calibration_budget_s: Measuring time of each worker's cost sweep (``calibrate``) after
            its warm-up; 0 turns calibration off (batches sized by ``max_batch_size`` alone).
        clock: Seconds for the calibration and batch timings (tests give a fake one).
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
        decoding: DeviceDecoding | None = None,
        on_rejected: Callable[[Job, Exception], None] | None = None,
        calibration_budget_s: float = CALIBRATION_BUDGET_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if decoding is not None and on_rejected is None:
            raise ValueError("device decoding needs on_rejected")
        self.devices = [str(d) for d in devices]
        self._factory = pipeline_factory
        self._queue = queue
        self._warmup = warmup
        self._on_taken = on_taken
        self._on_success = on_success
        self._on_failure = on_failure
        self._decoding = decoding
        self._on_rejected = on_rejected
        self._calibration_budget_s = calibration_budget_s
        self._clock = clock
        self.pipelines: list[Pipeline | None] = [None] * len(self.devices)
        # Each worker's cost curve (None: not calibrated), read by its thread alone.
        self.curves: list[CostCurve | None] = [None] * len(self.devices)
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
                    if self._decoding is not None and self._decoding.warmup is not None:
                        jpeg = torch.frombuffer(bytearray(self._decoding.warmup), dtype=torch.uint8)
                        self._decoding.decode([jpeg], _indexed(pipeline.device))
                    if self._warmup and self._calibration_budget_s > 0:
                        self.curves[index] = calibrate(
                            pipeline, budget_s=self._calibration_budget_s, clock=self._clock
                        )
                    self.pipelines[index] = pipeline
                    loop.call_soon_threadsafe(_settle_started, started, None)
                    reported = True
                    cuda = pipeline.device.type == "cuda"
                    curve = self.curves[index]
                    configured = _chunk_knob(pipeline)
                    while (taken := self._queue.next_batch(curve)) is not None:
                        batch, expired = taken
                        self._on_taken(batch, expired)
                        if curve is not None and configured is not None:
                            # Forwards of at most the size the batch was formed for (with flip
                            # test, two inputs a crop), so that a job bigger than it runs at it.
                            size = curve.planned or configured
                            chunk = min(configured, 2 * size)
                            pipeline.max_crops_per_batch = chunk  # type: ignore[attr-defined]
                        try:
                            self._execute(pipeline, index, cuda, batch)
                        except Exception as exc:  # a bug in a callback must not kill the worker
                            logger.exception("worker on %s: unexpected error", device)
                            self._on_failure(batch, exc)
                        finally:
                            self._queue.finished(batch)
        except BaseException as exc:
            if reported:
                logger.exception("worker on %s died", device)
                return
            logger.exception("worker on %s failed to start", device)
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(_settle_started, started, exc)

    def _execute(self, pipeline: Pipeline, index: int, cuda: bool, jobs: list[Job]) -> None:
        """Run ``jobs`` as one pipeline call; on CUDA OOM run the halves instead, recursively."""
        device = self.devices[index]
        jobs = self._queue.still_running(jobs)  # cancelled or expired meanwhile: not run
        if not jobs:
            return
        t0 = self._clock()
        if any(job.jpeg is not None for job in jobs):
            jobs = self._queue.still_running(self._decode(pipeline.device, cuda, jobs))
            if not jobs:
                return
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
            self._execute(pipeline, index, cuda, jobs[:half])
            self._execute(pipeline, index, cuda, jobs[half:])
            return
        seconds = self._clock() - t0
        self._queue.record(jobs, stats, seconds, worker=index, curve=self.curves[index])
        self._on_success(jobs, results, stats, seconds)

    def _decode(self, device: torch.device, cuda: bool, jobs: list[Job]) -> list[Job]:
        """Decode the JPEGs of ``jobs`` on ``device``; returns the jobs ready to run (those whose
        file was refused are failed already)."""
        pending = [job for job in jobs if job.jpeg is not None]
        t0 = time.monotonic()
        refused = self._decode_split(_indexed(device), cuda, pending)
        spent = time.monotonic() - t0  # the batch's decoding, as detect and pose are the batch's
        for job in pending:
            job.decode_s += spent
        return [job for job in jobs if job not in refused]

    def _decode_split(self, device: torch.device, cuda: bool, jobs: list[Job]) -> set[Job]:
        """One device-decoder call over ``jobs``; when it fails, the halves, recursively; a single
        file still refused goes to the CPU decoder. Returns the jobs refused (already failed)."""
        assert self._decoding is not None
        jpegs = [_jpeg_of(job) for job in jobs]
        try:
            images = self._decoding.decode([jpeg.data for jpeg in jpegs], device)
            _check_decoded(jpegs, images)
        except Exception as exc:
            oom, why = is_oom(exc), f"{type(exc).__name__}: {exc}"
        else:
            for job, image in zip(jobs, images, strict=True):
                job.item.image, job.jpeg = image, None
            return set()
        # Split outside the except block, so that the traceback's frames are freed first.
        if len(jobs) > 1:
            logger.info("device decode of %d JPEGs failed (%s); splitting", len(jobs), why)
            if oom and cuda:
                torch.cuda.empty_cache()
            half = len(jobs) // 2
            first = self._decode_split(device, cuda, jobs[:half])
            return first | self._decode_split(device, cuda, jobs[half:])
        return self._decode_on_cpu(jobs[0], jpegs[0], why)

    def _decode_on_cpu(self, job: Job, jpeg: EncodedJpeg, why: str) -> set[Job]:
        """The CPU decoder's verdict on a file the device decoder refused alone."""
        assert self._decoding is not None and self._on_rejected is not None
        logger.info(  # not a warning: any client can send a corrupt file
            "device decoder refused a %dx%d JPEG (%s); decoding it on the CPU",
            jpeg.width,
            jpeg.height,
            why,
        )
        try:
            image = self._decoding.fallback(jpeg.raw)
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ImageError("bad_image", f"decoded to {tuple(image.shape)} {image.dtype}")
        except Exception as exc:
            self._on_rejected(job, exc)
            return {job}
        job.item.image, job.jpeg = image, None
        return set()


def _jpeg_of(job: Job) -> EncodedJpeg:
    assert job.jpeg is not None
    return job.jpeg


def _check_decoded(jpegs: list[EncodedJpeg], images: list[torch.Tensor]) -> None:
    """Refuse a device decoder's answer that is not one (3, H, W) uint8 image per header."""
    if len(images) != len(jpegs):
        raise RuntimeError(f"{len(images)} images decoded from {len(jpegs)} files")
    for jpeg, image in zip(jpegs, images, strict=True):
        if image.dtype != torch.uint8 or tuple(image.shape) != (3, jpeg.height, jpeg.width):
            raise RuntimeError(
                f"decoded {tuple(image.shape)} {image.dtype} from a {jpeg.width}x{jpeg.height} JPEG"
            )


def _indexed(device: torch.device) -> torch.device:
    """A CUDA device with its index (the thread's current one when none is given), so that
    torchvision's nvJPEG decoder sees one device, never "cuda" and "cuda:0" in turn."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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
