"""Every Prometheus metric of the service, in one place, with names fixed for dashboards.

One ``Metrics`` object per server process (per app in tests) owns a private
``CollectorRegistry``, so several apps can live in one process without clashing. It is the
engine's ``EngineObserver`` (queue depth and wait, per-stage batch sizes and compute seconds,
persons per image); the transports record their requests through ``observe_request``. Time waiting
in the queue (``pose_queue_wait_seconds``) is kept apart from time computing
(``pose_inference_seconds``).

| name | type | labels | what |
| --- | --- | --- | --- |
| pose_requests_total | counter | transport, code | finished requests (HTTP status / gRPC code) |
| pose_request_duration_seconds | histogram | transport | request latency, arrival to answer |
| pose_queue_wait_seconds | histogram | | time an image waited for its batch |
| pose_batch_size | histogram | stage | images per engine/detect batch, crops per pose batch |
| pose_inference_seconds | histogram | stage | compute seconds of one batch per stage |
| pose_queue_depth | gauge | | images waiting now |
| pose_persons_per_image | histogram | | persons found per image |
| pose_model_info | info (1) | detector, device, input_size, model, weights_sha256 | |
| pose_gpu_memory_{allocated,reserved,total}_bytes | gauge | device | CUDA memory (CUDA only) |

plus the standard ``process_*``, ``python_gc_*`` and ``python_info`` collectors.

With several processes (front ends and one engine process, ``service.processes``) every process
writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess
mode; the parent sets it before starting them) and any front end's ``/metrics`` sums them: one
exposition for the whole service, the engine's queue and batch metrics included. There,
``pose_model_info`` is a gauge set by the engine process (the classic text format exposes an
info metric as this very gauge), the GPU memory gauges are read after each batch instead of at
scrape time, and the per-process ``process_*``/``python_*`` collectors are left out (each
would describe only the process that happened to answer the scrape).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from model.interfaces import BatchStats, ModelDescription

# The classic text format every Prometheus server reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WAIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_COMPUTE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_PERSON_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


class Metrics:
    """The service's metrics in a private registry; also the engine's observer.

    Args:
        registry: where to register; a fresh private registry when None.
        process_collectors: also register the process, platform and GC collectors.
        multiprocess: one of the service's several processes: samples go to the files of
            ``PROMETHEUS_MULTIPROC_DIR`` (set before prometheus_client was imported) and
            ``render`` sums every process's.

    Raises:
        ValueError: ``multiprocess`` without ``PROMETHEUS_MULTIPROC_DIR``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        process_collectors: bool = True,
        multiprocess: bool = False,
    ) -> None:
        self.multiprocess = multiprocess
        if multiprocess and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise ValueError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR")
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "pose_requests",
            "Finished pose requests by transport and result code.",
            ["transport", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "pose_request_duration_seconds",
            "Request latency from arrival to answer.",
            ["transport"],
            buckets=_LATENCY_BUCKETS_S,
            registry=reg,
        )
        self._request_children: dict[tuple[str, str | int], tuple[Any, Any]] = {}
        self.queue_wait = Histogram(
            "pose_queue_wait_seconds",
            "Time an image waited in the queue before its batch started.",
            buckets=_WAIT_BUCKETS_S,
            registry=reg,
        )
        self.batch_size = Histogram(
            "pose_batch_size",
            "Batch size per stage: images per engine batch (engine) and per detect batch, "
            "person crops per pose batch.",
            ["stage"],
            buckets=_SIZE_BUCKETS,
            registry=reg,
        )
        self.inference = Histogram(
            "pose_inference_seconds",
            "Compute seconds of one batch per stage.",
            ["stage"],
            buckets=_COMPUTE_BUCKETS_S,
            registry=reg,
        )
        self.queue_depth = Gauge(
            "pose_queue_depth",
            "Images waiting in the queue.",
            registry=reg,
            multiprocess_mode="livesum",  # set by the engine process only
        )
        self.persons_per_image = Histogram(
            "pose_persons_per_image",
            "Persons returned per image.",
            buckets=_PERSON_BUCKETS,
            registry=reg,
        )
        # labels() costs more than an observation: the per-stage children, once.
        self._stage_children = (
            {stage: self.batch_size.labels(stage=stage) for stage in ("engine", "detect", "pose")},
            {stage: self.inference.labels(stage=stage) for stage in ("detect", "pose")},
        )
        self._model_info: Callable[[], ModelDescription] | None = None
        self._model_published = False
        if multiprocess:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)
            self._model_gauge = Gauge(
                "pose_model_info",
                "The served pose model.",
                list(_MODEL_LABELS),
                registry=reg,
                multiprocess_mode="livemax",
            )
            self._gpu_memory = {
                name: Gauge(
                    f"pose_gpu_memory_{name}_bytes",
                    text,
                    ["device"],
                    registry=reg,
                    multiprocess_mode="livemax",
                )
                for name, text in _GPU_MEMORY_HELP.items()
            }
            return
        self._exposed = reg
        reg.register(_GpuMemoryCollector())
        if process_collectors:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)

    def bind_engine(self, engine: Any) -> None:
        """Read the queue depth and the served model from ``engine`` at scrape time (in one
        process; with several, the engine process publishes both itself)."""
        if self.multiprocess:
            return
        depth = getattr(engine, "queue_depth", None)  # an engine client has none: not its queue
        if depth is not None:
            self.queue_depth.set_function(lambda: float(depth()))
        self._model_info = engine.model_info

    def render(self) -> bytes:
        """The Prometheus text exposition: of everything registered, or of every process."""
        if not self.multiprocess and not self._model_published and self._model_info is not None:
            with contextlib.suppress(Exception):  # not started yet: nothing to say
                self.publish_model(self._model_info())
        return generate_latest(self._exposed)

    def publish_model(self, info: ModelDescription) -> None:
        """``pose_model_info{...} 1`` (once)."""
        if self._model_published:
            return
        labels = {
            "detector": info.detector or "",
            "device": info.device,
            "input_size": "x".join(str(v) for v in info.input_size),
            "model": info.model,
            "weights_sha256": info.weights_sha256 or "",
        }
        if self.multiprocess:
            self._model_gauge.labels(**labels).set(1)
        else:
            Info("pose_model", "The served pose model.", registry=self.registry).info(labels)
        self._model_published = True

    # Transports.
    def observe_request(self, transport: str, code: str | int, seconds: float) -> None:
        """Count one finished request ("http" with its status, "grpc" with its code name)."""
        children = self._request_children.get((transport, code))
        if children is None:  # labels() costs more than the counting: once per label pair
            children = (
                self.requests.labels(transport=transport, code=str(code)),
                self.request_duration.labels(transport=transport),
            )
            self._request_children[(transport, code)] = children
        children[0].inc()
        children[1].observe(max(seconds, 0.0))

    # EngineObserver.
    def on_queue_depth(self, depth: int) -> None:
        """The queue now holds ``depth`` jobs."""
        self.queue_depth.set(depth)

    def on_queue_waits(self, seconds: Sequence[float]) -> None:
        """The jobs of one batch left the queue after ``seconds`` each."""
        observe_all(self.queue_wait, [max(s, 0.0) for s in seconds])

    def on_batch(self, stats: BatchStats, images: int) -> None:
        """A pipeline batch of ``images`` images finished."""
        sizes, seconds = self._stage_children
        sizes["engine"].observe(images)
        if stats.detect_images > 0:
            sizes["detect"].observe(stats.detect_images)
            seconds["detect"].observe(max(stats.detect_seconds, 0.0))
        if stats.pose_crops > 0:
            sizes["pose"].observe(stats.pose_crops)
            seconds["pose"].observe(max(stats.pose_seconds, 0.0))
        observe_all(self.persons_per_image, stats.persons_per_image)
        if self.multiprocess and torch.cuda.is_initialized():  # (implies available; 2 us less)
            for device, values in _gpu_memory().items():
                for name, value in values.items():
                    self._gpu_memory[name].labels(device=device).set(value)


def observe_all(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe(a)`` for each of ``amounts``, with each bucket's count and the sum
    written once: in multiprocess mode every write is an update of a memory-mapped file (with a
    lock and a pid check), and a batch's jobs would otherwise pay several each. Reads
    prometheus_client's own bucket bounds and values (``_upper_bounds``, ``_buckets``,
    ``_sum``); a version without them is observed one by one."""
    if not amounts:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    for amount in amounts:
        if amount <= bounds[-1]:  # (as observe: NaN counts in no bucket; the last is +Inf)
            counts[bisect.bisect_left(bounds, amount)] += 1
    total.inc(sum(amounts))
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


_MODEL_LABELS = ("detector", "device", "input_size", "model", "weights_sha256")
_GPU_MEMORY_HELP = {
    "allocated": "CUDA memory held by tensors.",
    "reserved": "CUDA memory reserved by the caching allocator.",
    "total": "CUDA memory of the device.",
}


def _gpu_memory() -> dict[str, dict[str, float]]:
    """device -> {allocated, reserved, total} bytes, for every CUDA device."""
    return {
        f"cuda:{index}": {
            "allocated": float(torch.cuda.memory_allocated(index)),
            "reserved": float(torch.cuda.memory_reserved(index)),
            "total": float(torch.cuda.get_device_properties(index).total_memory),
        }
        for index in range(torch.cuda.device_count())
    }


class _GpuMemoryCollector:
    """CUDA memory per device, read at scrape time; nothing at all without CUDA."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        families = {
            name: GaugeMetricFamily(f"pose_gpu_memory_{name}_bytes", text, labels=["device"])
            for name, text in _GPU_MEMORY_HELP.items()
        }
        for device, values in _gpu_memory().items():
            for name, value in values.items():
                families[name].add_metric([device], value)
        yield from families.values()
