"""The engine's batch queue: a bounded, thread-safe queue of jobs, batches sized by measured cost.

``service.engine.Engine`` admits jobs on the event loop; its worker threads take batches from here.
The policy starts from Triton's dynamic batcher: a batch is due when ``max_batch_size`` jobs are
queued, or when the oldest queued job has waited ``max_delay_s`` (only the first job of a batch
waits; 0 takes what is queued and goes), or at once when every queued job is ``eager``: a tracked
stream's frame, whose next frame waits for its answer, so that waiting would only add latency to a
lone stream (frames of other streams still batch with it whenever they are queued together).
A worker waiting for its batch to fill is woken when the batch is due, not by every job that
leaves it short: each wake-up costs a thread switch and the GIL, once per job for jobs that
arrive one by one.

Work is counted in crops (a job's caller boxes; for an image the detector reads, the persons it
finds plus the detector's own cost in crop-equivalents, both measured), not images. A worker with
a calibrated ``CostCurve`` (``service.workers.calibrate``: its pipeline's measured seconds per crop
by call size, refined by every batch it runs) also makes a batch due, and stops filling it, at the
size its curve says pays: the smallest whose cost per crop is within a few per cent of the best
measured, or the best itself while a backlog of such batches is queued, so that a CPU where big
batches cost more per crop runs small ones and a GPU grows them while they still pay. A batch is
filled fairly over the jobs' sources (API keys, connections, streams): the next job is always the
oldest of the source served fewest crops, so a busy source (a stream, a client in a loop, one with
many boxes per image) cannot keep a source with one job waiting beyond one batch. Jobs being
decoded hold a slot too, so ``max_queue_size`` bounds all work admitted and not yet running, and
overload is refused before any of it is spent.

Every job moves ``DECODING -> QUEUED -> RUNNING -> DONE`` (or straight to ``DONE``) under one
lock; a job in ``DONE`` is never handed to a pipeline: that is how cancelled and expired jobs are
dropped.
No asyncio here: settling futures is the engine's business.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from model.interfaces import BatchStats, PipelineItem
from service.gpu_decode import EncodedJpeg

__all__ = [
    "CURVE_SIZES",
    "AdmissionFigures",
    "BatchQueue",
    "CostCurve",
    "Job",
    "JobState",
    "refusal_s",
    "sweep_sizes",
    "work_of",
]

# Retry hint bounds (seconds) for a refused job, and the hint used before any batch has run.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 30.0
RETRY_DEFAULT_S = 1.0
# Weight of the newest batch in the throughput, batch-time and cost-curve estimates.
_RATE_EWMA_ALPHA = 0.2
# Admission by time asks for this much headroom over the estimated finish.
_ADMIT_MARGIN = 1.5
# Call sizes (crops) the cost curve keeps a figure for, about 1.5x apart (1, 2, 3, 4, 6, 8, 12,
# ...): a batch refines the figure of the size nearest to it on a log scale.
CURVE_SIZES: tuple[int, ...] = tuple(
    sorted({1, *(p for k in range(1, 21) for p in (2**k, 3 * 2 ** (k - 1)))})
)
# A bigger batch pays when it costs at least this much less per crop than every smaller one.
_PAYS = 0.02
# With little queued, the smallest batch within this much of the best cost per crop is taken:
# latency for a throughput loss of at most this much.
_TOLERANCE = 0.05
# With this many best-size batches' worth of work queued, the best size itself is taken.
_BACKLOG_BATCHES = 2.0
# Every this many batches one is formed at a size next to the best (up and down in turn), so that
# the curve follows a device whose costs change (other load on a shared CPU moves the best size).
_PROBE_EVERY = 8


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - _RATE_EWMA_ALPHA) * old + _RATE_EWMA_ALPHA * sample


def _nearest_size(work: float) -> int:
    """The ``CURVE_SIZES`` entry nearest to ``work`` on a log scale."""
    if work <= CURVE_SIZES[0]:
        return CURVE_SIZES[0]
    i = bisect.bisect_left(CURVE_SIZES, work)
    if i >= len(CURVE_SIZES):
        return CURVE_SIZES[-1]
    low, high = CURVE_SIZES[i - 1], CURVE_SIZES[i]
    return low if math.log(work / low) <= math.log(high / work) else high


class CostCurve:
    """One worker's measured seconds per crop of a pose forward (and its share of the call), by
    forward size in crops.

    Calibrated at warm-up (``service.workers.calibrate``) and refined by every batch the worker
    runs: each entry of ``CURVE_SIZES`` keeps an EWMA of the seconds per crop of the forwards
    nearest to it. A batch is formed for a size (``plan``) and its crops run in forwards of at
    most that size (the worker sets the pipeline's chunk), so a batch of more crops (one job
    bigger than the size) measures that size too. Every ``_PROBE_EVERY`` batches one is planned
    at a neighbouring size, so that the curve keeps up with changing costs. Owned by one worker
    thread (it plans, runs and observes its batches): not locked.
    """

    def __init__(self) -> None:
        self._per_crop: dict[int, float] = {}  # CURVE_SIZES entry -> seconds per crop
        self.planned: int | None = None  # the size of the batch formed last (None: no bound)
        self._batches = 0
        self._probe_up = True
        # What the figures say, worked out when one changes (once per batch), not each time a
        # batch is sized (three times per batch, on the worker's per-batch path): the best size,
        # the largest size measured, and the smallest within ``_TOLERANCE`` of the lowest cost.
        self._best: int | None = None
        self._largest = 0
        self._near_best = 0

    def _changed(self) -> None:
        figures = self._per_crop
        lowest = min(figures.values())

        def smallest_within(share: float) -> int:
            return min(s for s, v in figures.items() if v <= lowest * (1 + share))

        self._best = smallest_within(_PAYS)
        self._largest = max(figures)
        self._near_best = smallest_within(_TOLERANCE)

    def seed(self, size: int, seconds_per_crop: float) -> None:
        """Set the figure of ``size`` (a ``CURVE_SIZES`` entry) from a calibration."""
        self._per_crop[_nearest_size(size)] = seconds_per_crop
        self._changed()

    def observe(self, work: float, seconds: float) -> None:
        """Feed a call of ``work`` crops that took ``seconds``, run in forwards of at most the
        ``planned`` size, into the figure nearest to its forward size."""
        if work <= 0 or seconds <= 0:
            return
        forward = work if self.planned is None else min(work, self.planned)
        size = _nearest_size(forward)
        self._per_crop[size] = _ewma(self._per_crop.get(size), seconds / work)
        self._changed()

    def plan(self, queued: float) -> int | None:
        """The size of the batch about to be formed from ``queued`` crops: ``batch_size``, or
        every ``_PROBE_EVERY`` batches a size next to the best (up when that much is queued,
        and down, in turn). Remembered as ``planned`` for ``observe`` and the worker's chunk."""
        size = self.batch_size(queued)
        best = self._best
        self._batches += 1
        if best is not None and self._batches % _PROBE_EVERY == 0:
            i = CURVE_SIZES.index(best)
            up, self._probe_up = self._probe_up, not self._probe_up
            if up and i + 1 < len(CURVE_SIZES) and queued >= CURVE_SIZES[i + 1]:
                size = CURVE_SIZES[i + 1]
            elif not up and i > 0:
                size = CURVE_SIZES[i - 1]
        self.planned = size
        return size

    def figures(self) -> dict[int, float]:
        """Seconds per crop by call size, for the sizes measured."""
        return dict(sorted(self._per_crop.items()))

    def best_size(self) -> int | None:
        """The smallest size within ``_PAYS`` of the lowest cost per crop measured (the best
        throughput); None before anything is measured."""
        return self._best

    def batch_size(self, queued: float) -> int | None:
        """Most crops the next batch should hold, given ``queued`` crops waiting.

        The best size is the smallest within ``_PAYS`` of the lowest cost per crop measured. With
        a backlog (``_BACKLOG_BATCHES`` best-size batches queued) that is the answer; with less,
        the smallest size within ``_TOLERANCE`` of it, for latency. When the best is also the
        largest size measured and more is queued, the next size up is tried: batches keep
        growing while they still pay, and each size tried is then measured.

        Returns:
            Crops, or None before anything is measured (no bound from the curve).
        """
        best = self._best
        if best is None:
            return None
        if best == self._largest and queued > best:
            bigger = CURVE_SIZES.index(best) + 1
            return CURVE_SIZES[bigger] if bigger < len(CURVE_SIZES) else best
        if queued >= _BACKLOG_BATCHES * best:
            return best
        return self._near_best


class AdmissionFigures(NamedTuple):
    """What admission by time reads (``BatchQueue.admission_figures``).

    Attributes:
        wait_s: The expected wait of a job admitted now (the crops ahead of it at the workers'
            measured rate).
        batch_s: How long a batch takes (EWMA).
        s_per_crop: The wait one more crop of work adds (the inverse of the workers' rate).
        boxless_crops: The crops an image without caller boxes counts for (EWMA).
    """

    wait_s: float
    batch_s: float
    s_per_crop: float
    boxless_crops: float


def work_of(boxes: torch.Tensor | None, boxless_crops: float) -> float:
    """Crops of a job: its caller boxes (rows of ``parse_boxes``), else what an image without
    boxes has cost (``boxless_crops``)."""
    if isinstance(boxes, torch.Tensor) and boxes.dim() == 2:
        return float(max(1, boxes.shape[0]))  # (0 boxes: still a call's share of overhead)
    return boxless_crops


def refusal_s(
    now: float, deadline: float | None, wait: float, batch_s: float, max_wait_s: float | None
) -> float | None:
    """Admission by time, the rule: a job submitted at ``now`` with ``wait`` seconds of work
    ahead of it and its own batch of ``batch_s`` is refused when it would finish (with a margin
    for what the estimate misses) past its ``deadline``, or wait beyond ``max_wait_s``.

    Returns:
        None to admit; else the seconds after which a retry may be admitted (the wait, clamped
        to [RETRY_MIN_S, RETRY_MAX_S]). With nothing ahead it admits whatever the estimate
        says: a refusal is for queueing, and only admitted work refreshes a stale estimate.
    """
    if wait <= 0:
        return None
    late = deadline is not None and now + (wait + batch_s) * _ADMIT_MARGIN > deadline
    if late or (max_wait_s is not None and wait > max_wait_s):
        return min(RETRY_MAX_S, max(RETRY_MIN_S, wait))
    return None


def sweep_sizes(
    measure: Callable[[int], float], sizes: Sequence[int], *, budget_s: float, repeats: int = 2
) -> dict[int, float]:
    """Seconds per crop of calls of growing size, until bigger ones stop paying.

    Each size is run ``1 + repeats`` times (the first untimed: a new shape allocates and picks
    kernels) and keeps its fastest run, the one least disturbed by other load. The sweep stops
    after two sizes in a row that do not pay (``_PAYS`` below the best so far), at the end of
    ``sizes``, or once ``budget_s`` seconds were spent measuring; then the three cheapest sizes
    are timed once more each, in turn, so that one lucky run cannot pick the size alone.

    Args:
        measure: runs one call of that many crops and returns its seconds.
        sizes: the sizes to try, growing.
        budget_s: measuring time after which no further size is tried.
        repeats: timed runs per size.

    Returns:
        Seconds per crop of each size tried.
    """
    runs: dict[int, list[float]] = {}
    spent, best, misses = 0.0, math.inf, 0
    for size in sizes:
        times = [measure(size) for _ in range(1 + repeats)]
        spent += sum(times)
        runs[size] = times[1:]
        per_crop = min(runs[size]) / size
        if per_crop < best * (1 - _PAYS):
            best, misses = per_crop, 0
        else:
            misses += 1
        if misses >= 2 or spent >= budget_s:
            break
    cheapest = sorted(runs, key=lambda s: min(runs[s]) / s)[:3]
    if len(cheapest) > 1:
        for size in cheapest:
            runs[size].append(measure(size))
    return {size: min(times) / size for size, times in runs.items()}


class JobState(enum.Enum):
    """Where a job is. ``DECODING`` and ``QUEUED`` hold a queue slot."""

    DECODING = "decoding"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # settled, or about to be: the pipeline must not see it


@dataclass(eq=False)
class Job:
    """One admitted request.

    ``state`` is guarded by the queue's lock; ``future``, ``timer`` and ``decode_future`` are only
    touched on the event-loop thread. Times are ``time.monotonic()`` seconds. ``jpeg`` is set while
    the image waits, encoded, for its worker's device decoder (``item.image`` is then a
    placeholder); ``decode_s`` adds up the decode pool's and the worker's decoding.
    """

    item: PipelineItem
    future: asyncio.Future[Any]  # of service.engine.PoseResponse
    loop: asyncio.AbstractEventLoop
    deadline: float | None
    t_submit: float
    state: JobState
    t_queued: float = 0.0
    queue_s: float = 0.0
    decode_s: float = 0.0
    timer: asyncio.TimerHandle | None = None
    decode_future: asyncio.Future[tuple[torch.Tensor | EncodedJpeg, float]] | None = None
    jpeg: EncodedJpeg | None = None
    return_image: bool = False  # the answer carries the decoded image (``/v1/pose/render``)
    eager: bool = False  # not held for a batch to fill while only eager jobs are queued
    image_bytes: int = 0  # decoded pixels counted against the engine's in-flight bound
    source: str = ""  # who sent it (API key, connection or stream): batches are fair across them
    work: float = 1.0  # its cost in crops, estimated when admitted (``BatchQueue.admit``)
    seq: int = 0  # its place in the queue's age order (``_Queued.add``)


class _Queued:
    """The jobs in ``QUEUED``, kept so that the batcher's questions cost no scan of them: how
    many and how much work (running sums), whether all are eager (a count of the others), the
    oldest (a deque in age order) and each source's oldest (a deque per source).

    A job leaves by ``drop`` (O(1)): its entries stay in the deques, stale, until they are met at
    a deque's head, and both are rebuilt once more than half of what they hold is stale. A job
    is live while its state is ``QUEUED``; the caller changes the state under the queue's lock
    (jobs never come back to ``QUEUED``). Not locked: the ``BatchQueue``'s lock guards it.
    """

    _COMPACT_MIN = 64  # stale entries below this are never worth a rebuild

    def __init__(self) -> None:
        self.order: deque[Job] = deque()  # age order; may hold stale jobs
        self.by_source: dict[str, deque[Job]] = {}  # the same per source, in age order
        self.count = 0
        self.work = 0.0
        self.patient = 0  # live jobs that are not eager
        self._stale = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self.count

    def add(self, job: Job) -> None:
        job.seq = next(self._seq)
        self.order.append(job)
        queue = self.by_source.get(job.source)
        if queue is None:
            queue = self.by_source[job.source] = deque()
        queue.append(job)
        self.count += 1
        self.work += job.work
        self.patient += not job.eager

    def drop(self, job: Job) -> None:
        """``job`` (live) leaves; the caller moves it out of ``QUEUED``."""
        self.count -= 1
        # Recounted when empty, so that float rounding cannot accumulate.
        self.work = self.work - job.work if self.count else 0.0
        self.patient -= not job.eager
        self._stale += 1
        if self._stale > max(self._COMPACT_MIN, self.count):
            self._compact(skip=job)

    def _compact(self, skip: Job) -> None:
        live = [j for j in self.order if j.state is JobState.QUEUED and j is not skip]
        self.order = deque(live)
        self.by_source = {}
        for job in live:
            self.by_source.setdefault(job.source, deque()).append(job)
        self._stale = 0

    def oldest(self) -> Job:
        """The oldest live job (there must be one)."""
        order = self.order
        while order[0].state is not JobState.QUEUED:
            order.popleft()
            self._stale -= 1
        return order[0]

    def head(self, source: str) -> Job | None:
        """The oldest live job of ``source`` (its stale entries before it are dropped)."""
        queue = self.by_source.get(source)
        while queue:
            if queue[0].state is JobState.QUEUED:
                return queue[0]
            queue.popleft()
        return None

    def take_all(self) -> list[Job]:
        """Every live job, oldest first; the structure is then empty."""
        jobs = [job for job in self.order if job.state is JobState.QUEUED]
        self.order.clear()
        self.by_source.clear()
        self.count, self.work, self.patient, self._stale = 0, 0.0, 0, 0
        return jobs

    def pop_head(self, source: str) -> Job:
        """Take ``source``'s oldest live job (``head`` found it) off the queue."""
        job = self.by_source[source].popleft()
        self.drop(job)
        return job

    def heads(self) -> dict[str, Job]:
        """Each source's oldest live job, by source (sources without one are forgotten)."""
        heads: dict[str, Job] = {}
        for source in list(self.by_source):
            head = self.head(source)
            if head is None:
                del self.by_source[source]
            else:
                heads[source] = head
        return heads


class BatchQueue:
    """Bounded job queue shared by the event loop (producers) and the worker threads (consumers).

    Args:
        max_batch_size: Most jobs per batch.
        max_delay_s: How long the oldest queued job waits for a batch to fill.
        max_queue_size: Most jobs in ``DECODING`` or ``QUEUED`` at once.
        on_depth: Called with the new depth under the lock (so updates arrive in order): when a
            job is admitted (for jobs admitted with ``wake=False``, once at the ``wake()`` that
            follows them), when a batch is taken and when a job is dropped. Keep it quick, and
            do not block in it.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        on_depth: Callable[[int], None],
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._on_depth = on_depth
        # Reentrant so that an on_depth hook may call depth().
        self._cv = threading.Condition(threading.RLock())
        self._queue = _Queued()
        self._reserved = 0  # jobs in DECODING or QUEUED
        self._reserved_work = 0.0  # their crops
        self._closed = False
        self._rates: dict[int, float] = {}  # worker -> crops / s, EWMA over its batches
        self._measured_rate = (0, 0.0)  # (workers measured, their crops / s): read per admission
        self._running: set[Job] = set()  # taken by workers and not finished
        self._running_work = 0.0  # their crops (admission reads it for every job)
        self._batch_s: float | None = None  # seconds of one batch, EWMA
        self._boxless_work = 1.0  # crops of an image without caller boxes, EWMA
        # Crops taken per source with jobs queued: the least served source goes next.
        self._served: dict[str, float] = {}
        # min(self._served.values()): they change only when a batch is taken, which works it out
        # again, and a source that enters starts at it (so it stays the minimum until then).
        self._served_floor = 0.0
        # One consumer forms a batch at a time, so that concurrent jobs coalesce instead of
        # spreading one by one over idle workers.
        self._form_lock = threading.Lock()
        # While that consumer waits for its batch to fill: the crops at which the batch is due
        # (inf: its worker has no curve), so that a job that does not make the batch due does
        # not wake it (``_notify_locked``). None: it waits for any job, or does not wait.
        self._filling: float | None = None

    def depth(self) -> int:
        """Jobs admitted and not yet running (being decoded or queued)."""
        with self._cv:
            return self._reserved

    def admit(
        self,
        job: Job,
        *,
        workers: int = 1,
        max_wait_s: float | None = None,
        wake: bool = True,
    ) -> float | None:
        """Take a slot for ``job`` (state ``DECODING`` or ``QUEUED``; a queued job is queued now).

        Admission is by count (``max_queue_size``) and by time: once the workers' throughput is
        known (in crops per second), a job whose expected wait (the crops ahead of it) plus its
        own service would pass its deadline (or whose wait would pass ``max_wait_s``) is refused
        now rather than admitted into a timeout. With ``wake`` false a queued job does not wake
        the consumers: the caller calls ``wake()`` once for several jobs.

        Returns:
            None when admitted; else, taking nothing, the seconds after which a retry may be
            admitted (clamped to [RETRY_MIN_S, RETRY_MAX_S]).
        """
        with self._cv:
            job.work = self._work_of_locked(job.item)
            if self._reserved >= self.max_queue_size:
                return self._retry_locked(workers)
            wait = self._expected_wait_locked(workers)
            if wait is not None and self._batch_s is not None:
                retry = refusal_s(job.t_submit, job.deadline, wait, self._batch_s, max_wait_s)
                if retry is not None:
                    return retry
            self._reserved += 1
            self._reserved_work += job.work
            if job.state is JobState.QUEUED:
                self._append_locked(job, wake)
            if wake:  # (else reported by the wake() that follows, once for a burst)
                self._on_depth(self._reserved)
            return None

    def _work_of_locked(self, item: PipelineItem) -> float:
        return work_of(item.boxes, self._boxless_work)

    def enqueue(self, job: Job, *, wake: bool = True) -> bool:
        """Queue a decoded job (waking the consumers unless ``wake`` is false). False when it
        left ``DECODING`` meanwhile (it is then dropped)."""
        with self._cv:
            if job.state is not JobState.DECODING:
                return False
            job.state = JobState.QUEUED
            self._append_locked(job, wake)
            return True

    def wake(self) -> None:
        """Wake the consumers for jobs queued with ``wake=False`` (and report the depth)."""
        with self._cv:
            self._on_depth(self._reserved)
            self._notify_locked()

    def _append_locked(self, job: Job, wake: bool = True) -> None:
        job.t_queued = time.monotonic()
        if job.source not in self._served:
            # A source starts level with the least served one queued: idle time earns no credit.
            self._served[job.source] = self._served_floor
        self._queue.add(job)
        if wake:
            self._notify_locked()

    def _notify_locked(self) -> None:
        """Wake the consumers for newly queued jobs, unless the one filling a batch would only
        find it still not due: each wake costs it a thread switch and the GIL, and jobs that
        arrive one by one would pay that once each. It still wakes at the oldest job's delay."""
        target = self._filling
        if target is None or self._due_locked(self._queue.work, target):
            self._cv.notify_all()

    def _due_locked(self, queued: float, crops: float | None) -> bool:
        """Whether the queued jobs (``queued`` crops of work) make a batch now, before any
        delay: ``max_batch_size`` jobs, the ``crops`` of the worker's curve, or nothing but
        eager jobs (waiting would only delay a stream's frame)."""
        return (
            self._queue.count >= self.max_batch_size
            or (crops is not None and queued >= crops)
            or not self._queue.patient
        )

    def release(self, job: Job) -> None:
        """Move ``job`` to ``DONE`` from any state, freeing its slot and taking it off the queue."""
        with self._cv:
            if job.state is JobState.QUEUED:
                self._queue.drop(job)
            if job.state in (JobState.QUEUED, JobState.DECODING):
                self._unreserve_locked(job)
                self._on_depth(self._reserved)
            job.state = JobState.DONE

    def _unreserve_locked(self, job: Job) -> None:
        self._reserved -= 1
        # Recounted when empty, so that float rounding cannot accumulate.
        self._reserved_work = self._reserved_work - job.work if self._reserved else 0.0

    def still_running(self, jobs: list[Job]) -> list[Job]:
        """The jobs of a taken batch not settled since (cancelled or expired while it ran)."""
        with self._cv:
            return [job for job in jobs if job.state is JobState.RUNNING]

    def close(self) -> None:
        """Wake every consumer; ``next_batch`` returns None from now on."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def next_batch(self, curve: CostCurve | None = None) -> tuple[list[Job], list[Job]] | None:
        """Block until a batch is due and take it (consumer side).

        Args:
            curve: the calling worker's cost curve: a batch is due, and stops growing, at the
                crops it says pay (``CostCurve.plan``, which it remembers as ``planned``); None:
                by ``max_batch_size`` alone.

        Returns:
            ``(batch, expired)``: jobs now ``RUNNING``, and jobs found past their deadline, now
            ``DONE`` and for the caller to fail. None once closed.
        """
        with self._form_lock, self._cv:
            while True:
                while not self._queue.count and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                queued = self._queue.work
                crops = curve.batch_size(queued) if curve is not None else None
                if self.max_delay_s <= 0 or self._due_locked(queued, crops):
                    break
                # Only the oldest job waits; recomputed each time, as it may have been cancelled.
                remaining = self._queue.oldest().t_queued + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._filling = math.inf if crops is None else crops
                try:
                    self._cv.wait(remaining)
                finally:
                    self._filling = None
            if curve is not None:
                crops = curve.plan(queued)
            now = time.monotonic()
            batch: list[Job] = []
            expired: list[Job] = []
            for job in self._take_fair_locked(crops, queued):
                self._unreserve_locked(job)
                if job.deadline is not None and job.deadline <= now:
                    job.state = JobState.DONE
                    expired.append(job)
                    continue
                job.state = JobState.RUNNING
                job.queue_s = now - job.t_queued
                batch.append(job)
            self._running.update(batch)
            self._running_work += sum(job.work for job in batch)
            self._on_depth(self._reserved)
            return batch, expired

    def _take_fair_locked(self, crops: float | None, queued: float) -> list[Job]:
        """Up to ``max_batch_size`` jobs, and up to ``crops`` of work (at least one job), off the
        queue, fairly over their sources.

        Each job taken is the oldest queued job of the source served fewest crops so far (a
        source's count starts level with the least served one when it gets a job queued, and is
        forgotten once it has none), ties going to the older job; within a source jobs keep their
        order. With equal jobs this is round-robin; with unequal ones a source of 16-box jobs
        gets no more crops than one of 1-box jobs. ``queued`` is the queue's work. The choice
        costs O(sources + batch x log sources) (a heap of the sources' oldest jobs), not a scan
        of the queue per job taken: a queue of 1,024 jobs of 1,024 sources gave batches of 128
        in 14 ms each that way, with the engine's lock held (``python -m bench.batch_queue``).
        """
        waiting = self._queue
        if waiting.count <= self.max_batch_size and (
            crops is None or waiting.count == 1 or queued <= crops
        ):
            # Everything queued fits: no order to choose (each source's count would be forgotten).
            self._served = {}
            self._served_floor = 0.0
            return waiting.take_all()
        served = self._served
        heap = [(served[source], head.seq, source) for source, head in waiting.heads().items()]
        heapq.heapify(heap)
        taken: list[Job] = []
        work = 0.0
        while heap and len(taken) < self.max_batch_size:
            _, _, source = heap[0]
            job = waiting.head(source)
            assert job is not None
            if taken and crops is not None and work + job.work > crops:
                break
            waiting.pop_head(source)
            job.state = JobState.RUNNING  # (``next_batch`` settles the expired ones)
            served[source] += job.work
            taken.append(job)
            work += job.work
            following = waiting.head(source)
            if following is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (served[source], following.seq, source))
        self._served = {s: served[s] for s in waiting.heads()}
        self._served_floor = min(self._served.values(), default=0.0)
        return taken

    def finished(self, jobs: list[Job]) -> None:
        """Taken ``jobs`` are over (answered, failed or dropped); idempotent. Called before their
        answers are posted, so that a caller answered sees the queue without its job."""
        with self._cv:
            for job in jobs:
                if job in self._running:
                    self._running.remove(job)
                    self._running_work -= job.work
            if not self._running:
                self._running_work = 0.0  # recounted when empty: no float rounding piles up

    def record_batch(self, images: int, seconds: float) -> None:
        """Kept for callers of the image-counting interface: does nothing. Workers record each
        batch, in crops and per worker, with ``record``."""

    def record(
        self,
        jobs: Sequence[Job],
        stats: BatchStats,
        seconds: float,
        *,
        worker: int = 0,
        curve: CostCurve | None = None,
    ) -> None:
        """Feed one successful pipeline call of ``jobs`` into the estimates: the worker's rate
        in crops per second, the batch time, what an image without boxes costs in crops, and the
        worker's cost curve."""
        with self._cv:
            work = self._measured_work_locked(jobs, stats)
            self._rates[worker] = _ewma(self._rates.get(worker), work / max(seconds, 1e-6))
            rates = [r for r in self._rates.values() if r > 0]
            self._measured_rate = (len(rates), sum(rates))
            self._batch_s = _ewma(self._batch_s, seconds)
        if curve is not None:
            curve.observe(work, seconds)

    def _measured_work_locked(self, jobs: Sequence[Job], stats: BatchStats) -> float:
        """Crops a call did: its caller boxes, plus, for its images without boxes, the persons
        found and the detector's seconds in crop-equivalents (at this call's pose cost)."""
        boxes = [job.item.boxes for job in jobs]
        caller = sum(int(b.shape[0]) for b in boxes if isinstance(b, torch.Tensor))
        boxless = sum(1 for b in boxes if not isinstance(b, torch.Tensor))
        if not boxless:
            return float(max(caller, len(jobs)))
        if stats.pose_crops > 0 and stats.pose_seconds > 0:
            per_crop = stats.pose_seconds / stats.pose_crops
            found = max(stats.pose_crops - caller, 0)
            per_image = max(1.0, (found + stats.detect_seconds / per_crop) / boxless)
            self._boxless_work = _ewma(self._boxless_work, per_image)
        return max(caller, len(jobs) - boxless) + boxless * self._boxless_work

    def retry_after_s(self, workers: int) -> float:
        """Seconds until the queue has likely drained: the expected wait of a new job.

        ``RETRY_DEFAULT_S`` before any batch has run; clamped to [RETRY_MIN_S, RETRY_MAX_S].
        """
        with self._cv:
            return self._retry_locked(workers)

    def _retry_locked(self, workers: int) -> float:
        wait = self._expected_wait_locked(workers)
        if wait is None:
            return RETRY_DEFAULT_S
        return min(RETRY_MAX_S, max(RETRY_MIN_S, wait))

    def admission_figures(self, workers: int) -> AdmissionFigures | None:
        """What admission by time reads now (``refusal_s``); None before any batch has run.
        What a front-end process refuses by before decoding (``EngineClient``)."""
        with self._cv:
            rate = self._rate_locked(workers)
            if rate is None or self._batch_s is None:
                return None
            wait = (self._reserved_work + self._running_work) / rate
            return AdmissionFigures(wait, self._batch_s, 1.0 / rate, self._boxless_work)

    def _rate_locked(self, workers: int) -> float | None:
        """Crops per second of all ``workers``; None before any batch has run. Workers not
        measured yet are counted at the mean of those measured."""
        measured, rate = self._measured_rate
        if not measured:
            return None
        return rate * max(workers, measured) / measured

    def _expected_wait_locked(self, workers: int) -> float | None:
        """Seconds before a job admitted now starts: the crops ahead of it (queued, decoding and
        running) at the workers' measured rate; None before any batch has run."""
        rate = self._rate_locked(workers)
        if rate is None:
            return None
        return (self._reserved_work + self._running_work) / rate
