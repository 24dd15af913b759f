"""The engine's batch queue: a bounded, thread-safe queue of jobs with Triton's batching policy.

``service.engine.Engine`` admits jobs on the event loop; its worker threads take batches from here.
The policy (Triton's dynamic batcher): a batch is due when ``max_batch_size`` jobs are queued, or
when the oldest queued job has waited ``max_delay_s`` (only the first job of a batch waits; 0 takes
what is queued and goes). Jobs being decoded hold a slot too, so ``max_queue_size`` bounds all work
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
from service.images import EncodedJpeg

__all__ = ["BatchQueue", "Job", "JobState"]

# Retry hint bounds (seconds) for a refused job, and the hint used before any batch has run.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 30.0
RETRY_DEFAULT_S = 1.0
# Weight of the newest batch in the images-per-second estimate behind the retry hint.
_RATE_EWMA_ALPHA = 0.2


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
        # One consumer forms a batch at a time, so that concurrent jobs coalesce instead of
        # spreading one by one over idle workers.
        self._form_lock = threading.Lock()

    def depth(self) -> int:
        """Jobs admitted and not yet running (being decoded or queued)."""
        with self._cv:
            return self._reserved

    def admit(self, job: Job) -> bool:
        """Take a slot for ``job`` (state ``DECODING`` or ``QUEUED``; a queued job is queued now).

        Returns:
            False, taking nothing, when ``max_queue_size`` slots are taken.
        """
        with self._cv:
            if self._reserved >= self.max_queue_size:
                return False
            self._reserved += 1
            if job.state is JobState.QUEUED:
                self._append_locked(job)
            self._on_depth(self._reserved)
            return True

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
                # Only the oldest job waits; recomputed each time, as it may have been cancelled.
                remaining = self._queue[0].t_queued + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            now = time.monotonic()
            batch: list[Job] = []
            expired: list[Job] = []
            while self._queue and len(batch) < self.max_batch_size:
                job = self._queue.popleft()
                self._reserved -= 1
                if job.deadline is not None and job.deadline <= now:
                    job.state = JobState.DONE
                    expired.append(job)
                    continue
                job.state = JobState.RUNNING
                job.queue_s = now - job.t_queued
                batch.append(job)
            self._on_depth(self._reserved)
            return batch, expired

    def record_batch(self, images: int, seconds: float) -> None:
        """Feed one successful batch into the throughput estimate."""
        sample = images / max(seconds, 1e-6)
        with self._cv:
            old = self._rate
            self._rate = (
                sample if old is None else (1 - _RATE_EWMA_ALPHA) * old + _RATE_EWMA_ALPHA * sample
            )

    def retry_after_s(self, workers: int) -> float:
        """Seconds until the queue has likely drained: (depth + 1) / observed throughput.

        ``RETRY_DEFAULT_S`` before any batch has run; clamped to [RETRY_MIN_S, RETRY_MAX_S].
        """
        with self._cv:
            if self._rate is None or self._rate <= 0:
                return RETRY_DEFAULT_S
            estimate = (self._reserved + 1) / (self._rate * max(workers, 1))
            return min(RETRY_MAX_S, max(RETRY_MIN_S, estimate))
