"""The engine's batch queue: a bounded, thread-safe queue of jobs with Triton's batching policy.

``service.engine.Engine`` admits jobs on the event loop; its worker threads take batches from here.
The policy (Triton's dynamic batcher): a batch is due when ``max_batch_size`` jobs are queued, or
when the oldest queued job has waited ``max_delay_s`` (only the first job of a batch waits; 0 takes
what is queued and goes), or at once when every queued job is ``eager``: a tracked stream's frame,
whose next frame waits for its answer, so that waiting would only add latency to a lone stream
(frames of other streams still batch with it whenever they are queued together). A batch is
filled round-robin over the jobs' sources (API keys, connections, streams), so that no source
starves another. Jobs being decoded hold a slot too, so ``max_queue_size`` bounds all work
admitted and not yet running, and overload is refused before any of it is spent.

Every job moves ``DECODING -> QUEUED -> RUNNING -> DONE`` (or straight to ``DONE``) under one
lock; a job in ``DONE`` is never handed to a pipeline: that is how cancelled and expired jobs are
dropped.
No asyncio here: settling futures is the engine's business.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from model.interfaces import PipelineItem
from service.gpu_decode import EncodedJpeg

__all__ = ["BatchQueue", "Job", "JobState"]

# Retry hint bounds (seconds) for a refused job, and the hint used before any batch has run.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 30.0
RETRY_DEFAULT_S = 1.0
# Weight of the newest batch in the throughput and batch-time estimates.
_RATE_EWMA_ALPHA = 0.2
# Admission by time asks for this much headroom over the estimated finish.
_ADMIT_MARGIN = 1.5


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - _RATE_EWMA_ALPHA) * old + _RATE_EWMA_ALPHA * sample


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


class BatchQueue:
    """Bounded job queue shared by the event loop (producers) and the worker threads (consumers).

    Args:
        max_batch_size: Most jobs per batch.
        max_delay_s: How long the oldest queued job waits for a batch to fill.
        max_queue_size: Most jobs in ``DECODING`` or ``QUEUED`` at once.
        on_depth: Called with the new depth whenever it changes, under the lock (so updates arrive
            in order): keep it quick, and do not block in it.
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
        self._queue: deque[Job] = deque()
        self._reserved = 0  # jobs in DECODING or QUEUED
        self._closed = False
        self._rate: float | None = None  # images / s of one worker, EWMA over batches
        self._running: set[Job] = set()  # taken by workers and not finished
        self._batch_s: float | None = None  # seconds of one batch, EWMA
        # One consumer forms a batch at a time, so that concurrent jobs coalesce instead of
        # spreading one by one over idle workers.
        self._form_lock = threading.Lock()

    def depth(self) -> int:
        """Jobs admitted and not yet running (being decoded or queued)."""
        with self._cv:
            return self._reserved

    def admit(self, job: Job, *, workers: int = 1, max_wait_s: float | None = None) -> float | None:
        """Take a slot for ``job`` (state ``DECODING`` or ``QUEUED``; a queued job is queued now).

        Admission is by count (``max_queue_size``) and by time: once the workers' throughput is
        known, a job whose expected wait plus its own service would pass its deadline (or whose
        wait would pass ``max_wait_s``) is refused now rather than admitted into a timeout.

        Returns:
            None when admitted; else, taking nothing, the seconds after which a retry may be
            admitted (clamped to [RETRY_MIN_S, RETRY_MAX_S]).
        """
        with self._cv:
            if self._reserved >= self.max_queue_size:
                return self._retry_locked(workers)
            wait = self._expected_wait_locked(workers)
            # An idle engine admits whatever its estimate says: a refusal is for queueing, and
            # only admitted work refreshes a stale estimate.
            if wait and self._batch_s is not None:
                # Its own batch runs after the wait; a margin for what the estimate misses.
                finish = job.t_submit + (wait + self._batch_s) * _ADMIT_MARGIN
                late = job.deadline is not None and finish > job.deadline
                if late or (max_wait_s is not None and wait > max_wait_s):
                    return min(RETRY_MAX_S, max(RETRY_MIN_S, wait))
            self._reserved += 1
            if job.state is JobState.QUEUED:
                self._append_locked(job)
            self._on_depth(self._reserved)
            return None

    def enqueue(self, job: Job) -> bool:
        """Queue a decoded job. False when it left ``DECODING`` meanwhile (it is then dropped)."""
        with self._cv:
            if job.state is not JobState.DECODING:
                return False
            job.state = JobState.QUEUED
            self._append_locked(job)
            return True

    def _append_locked(self, job: Job) -> None:
        job.t_queued = time.monotonic()
        self._queue.append(job)
        self._cv.notify_all()

    def release(self, job: Job) -> None:
        """Move ``job`` to ``DONE`` from any state, freeing its slot and taking it off the queue."""
        with self._cv:
            if job.state is JobState.QUEUED:
                self._queue.remove(job)
            if job.state in (JobState.QUEUED, JobState.DECODING):
                self._reserved -= 1
                self._on_depth(self._reserved)
            job.state = JobState.DONE

    def still_running(self, jobs: list[Job]) -> list[Job]:
        """The jobs of a taken batch not settled since (cancelled or expired while it ran)."""
        with self._cv:
            return [job for job in jobs if job.state is JobState.RUNNING]

    def close(self) -> None:
        """Wake every consumer; ``next_batch`` returns None from now on."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def next_batch(self) -> tuple[list[Job], list[Job]] | None:
        """Block until a batch is due and take it (consumer side).

        Returns:
            ``(batch, expired)``: jobs now ``RUNNING``, and jobs found past their deadline, now
            ``DONE`` and for the caller to fail. None once closed.
        """
        with self._form_lock, self._cv:
            while True:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                if len(self._queue) >= self.max_batch_size or self.max_delay_s <= 0:
                    break
                if all(job.eager for job in self._queue):
                    break  # nothing else is queued: waiting would only delay a stream's frame
                # Only the oldest job waits; recomputed each time, as it may have been cancelled.
                remaining = self._queue[0].t_queued + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            now = time.monotonic()
            batch: list[Job] = []
            expired: list[Job] = []
            for job in self._take_fair_locked():
                self._reserved -= 1
                if job.deadline is not None and job.deadline <= now:
                    job.state = JobState.DONE
                    expired.append(job)
                    continue
                job.state = JobState.RUNNING
                job.queue_s = now - job.t_queued
                batch.append(job)
            self._running.update(batch)
            self._on_depth(self._reserved)
            return batch, expired

    def _take_fair_locked(self) -> list[Job]:
        """Up to ``max_batch_size`` jobs off the queue, round-robin over their sources.

        Each pass takes the oldest queued job of every source, in the order of those jobs, so
        a source with many jobs queued (a busy stream, a client in a loop) cannot keep a source
        with one job waiting beyond one batch. Within a source, jobs keep their order.
        """
        if len({job.source for job in self._queue}) <= 1:  # the common case: plain FIFO
            count = min(self.max_batch_size, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]
        taken: list[Job] = []
        while self._queue and len(taken) < self.max_batch_size:
            seen: set[str] = set()
            for job in list(self._queue):
                if len(taken) >= self.max_batch_size:
                    break
                if job.source not in seen:
                    seen.add(job.source)
                    taken.append(job)
                    self._queue.remove(job)
        return taken

    def finished(self, jobs: list[Job]) -> None:
        """Taken ``jobs`` are over (answered, failed or dropped); idempotent. Called before their
        answers are posted, so that a caller answered sees the queue without its job."""
        with self._cv:
            self._running.difference_update(jobs)

    def record_batch(self, images: int, seconds: float) -> None:
        """Feed one successful batch into the throughput estimate."""
        sample = images / max(seconds, 1e-6)
        with self._cv:
            self._rate = _ewma(self._rate, sample)
            self._batch_s = _ewma(self._batch_s, seconds)

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

    def _expected_wait_locked(self, workers: int) -> float | None:
        """Seconds before a job admitted now starts: the images ahead of it (queued, decoding and
        running) at the observed throughput; None before any batch has run."""
        if self._rate is None or self._rate <= 0:
            return None
        return (self._reserved + len(self._running)) / (self._rate * max(workers, 1))
