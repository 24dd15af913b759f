"""Batches sized by measured cost, and fair: the cost curve, the warm-up sweep, batch forming in
crops, crop-fair order across sources, admission in crops, and a worker calibrating its pipeline.

Everything runs on fakes whose cost is a function of the forward size and whose clock is advanced
by that cost (``FakeClock``): the decisions are checked, never a wall-clock time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable

import pytest
import torch

from model.interfaces import BatchStats, ImageResult, ModelDescription, Person, PipelineItem
from service.batching import CURVE_SIZES, BatchQueue, CostCurve, Job, JobState, sweep_sizes
from service.workers import WorkerPool, calibrate
from tests.service.descriptions import fake_description


def cpu_like(inputs: int) -> float:
    """Seconds of one forward of ``inputs`` network inputs on a cache-bound CPU: 4 inputs are
    cheapest per input, 2 dearer, 6 and up dearer again."""
    per_input = 0.065 if inputs < 4 else 0.045 + 0.004 * (inputs - 4)
    return inputs * per_input


def gpu_like(inputs: int) -> float:
    """Seconds of one forward on a device with a fixed launch cost: bigger always pays."""
    return 0.01 + 0.0001 * inputs


class FakeClock:
    """A clock that only moves when the fake pipeline computes."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ChunkedPipeline:
    """A pipeline with the real one's chunk knob: every box is one crop, flip test doubles it,
    and the crops of a call run in forwards of ``max_crops_per_batch`` inputs, each advancing the
    clock by ``cost(inputs)``."""

    def __init__(
        self, cost: Callable[[int], float], clock: FakeClock, max_crops_per_batch: int = 256
    ) -> None:
        self.device = torch.device("cpu")
        self.cost = cost
        self.clock = clock
        self.max_crops_per_batch = max_crops_per_batch
        self.forwards: list[int] = []  # inputs of every forward, in order
        self.calls: list[int] = []  # crops of every run() call

    def warmup(self) -> None:
        pass

    def describe(self) -> ModelDescription:
        return fake_description("fake")

    def run(self, items: list[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        crops = sum(_boxes(item) for item in items)
        self.calls.append(crops)
        flip = all(item.options.flip_test for item in items)
        chunk = max(1, self.max_crops_per_batch // (2 if flip else 1))
        left = crops
        while left > 0:
            inputs = min(chunk, left) * (2 if flip else 1)
            self.forwards.append(inputs)
            self.clock.now += self.cost(inputs)
            left -= min(chunk, left)
        results = [
            ImageResult(width=4, height=4, persons=[Person((0, 0, 1, 1), 1.0, 1.0, [])] * _boxes(i))
            for i in items
        ]
        return results, BatchStats(pose_crops=crops, pose_seconds=1.0)


def _boxes(item: PipelineItem) -> int:
    return 1 if item.boxes is None else int(item.boxes.shape[0])


def make_job(boxes: int | None, source: str = "", deadline: float | None = None) -> Job:
    """A queued job with ``boxes`` caller boxes (None: none, the detector's)."""
    loop = asyncio.new_event_loop()
    try:
        item = PipelineItem(
            torch.zeros((3, 4, 4), dtype=torch.uint8),
            None if boxes is None else torch.ones((boxes, 5)),
        )
        future = loop.create_future()
    finally:
        loop.close()
    return Job(item, future, loop, deadline, 100.0, JobState.QUEUED, source=source)


def make_queue(max_batch_size: int = 16) -> BatchQueue:
    return BatchQueue(
        max_batch_size=max_batch_size, max_delay_s=0.0, max_queue_size=100, on_depth=lambda d: None
    )


def take(queue: BatchQueue, curve: CostCurve | None = None) -> list[Job]:
    taken = queue.next_batch(curve)
    assert taken is not None
    return taken[0]


# --- the curve -----------------------------------------------------------------------------------


def test_curve_sizes_are_about_one_and_a_half_apart() -> None:
    assert CURVE_SIZES[:10] == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    assert all(1.3 <= b / a <= 2 for a, b in itertools.pairwise(CURVE_SIZES[1:]))


def test_a_batch_refines_the_figure_nearest_to_its_size() -> None:
    curve = CostCurve()
    curve.observe(5, 5 * 0.1)  # nearer 6 than 4 on a log scale
    curve.observe(6, 6 * 0.2)
    assert curve.figures() == {6: pytest.approx(0.8 * 0.1 + 0.2 * 0.2)}
    curve.observe(0, 1.0)  # nothing to learn from an empty call
    assert list(curve.figures()) == [6]


def test_nothing_measured_sets_no_bound() -> None:
    assert CostCurve().batch_size(100) is None and CostCurve().best_size() is None


def test_where_small_batches_are_cheaper_per_crop_batches_stay_small() -> None:
    curve = CostCurve()
    for size, per_crop in {1: 0.13, 2: 0.09, 3: 0.106}.items():
        curve.seed(size, per_crop)
    assert curve.best_size() == 2
    assert curve.batch_size(1) == 2  # wait (up to max_delay) for a second crop
    assert curve.batch_size(50) == 2  # a backlog: still the cheapest per crop


def test_a_smaller_batch_within_tolerance_is_taken_unless_there_is_a_backlog() -> None:
    curve = CostCurve()
    for size, per_crop in {4: 0.104, 8: 0.100, 12: 0.110}.items():
        curve.seed(size, per_crop)
    assert curve.best_size() == 8
    assert curve.batch_size(6) == 4  # 4% dearer per crop, sooner
    assert curve.batch_size(16) == 8  # two best batches queued: the best throughput


def test_where_bigger_batches_still_pay_they_keep_growing() -> None:
    curve = CostCurve()
    for size in (1, 2, 4, 8, 16):
        curve.seed(size, gpu_like(size) / size)
    assert curve.batch_size(100) == 24  # the largest measured is the best: try the next size
    assert curve.batch_size(10) == 16  # no more queued than that: no need to try
    curve.observe(24, gpu_like(24))
    assert curve.batch_size(100) == 32
    curve.observe(32, 32 * curve.figures()[24])  # no cheaper per crop: growth stops at 24
    assert curve.batch_size(100) == 24


# --- the warm-up sweep ---------------------------------------------------------------------------


def test_the_sweep_stops_two_sizes_after_bigger_ones_stop_paying() -> None:
    seen: list[int] = []
    first = set()

    def measure(crops: int) -> float:
        seen.append(crops)
        seconds = cpu_like(2 * crops)
        if crops not in first:  # a new shape's first run is slow: it must not count
            first.add(crops)
            seconds *= 10
        return seconds

    per_crop = sweep_sizes(measure, CURVE_SIZES, budget_s=1000.0)
    assert list(per_crop) == [1, 2, 3, 4]  # 3 and 4 do not pay: 6 and up are never run
    assert per_crop[2] == pytest.approx(cpu_like(4) / 2)
    assert min(per_crop, key=per_crop.__getitem__) == 2
    assert seen[:12] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert sorted(seen[12:]) == [2, 3, 4]  # the three cheapest, once more each


def test_the_sweep_keeps_growing_while_it_pays_within_its_budget() -> None:
    sizes = [n for n in CURVE_SIZES if n <= 128]
    per_crop = sweep_sizes(lambda n: gpu_like(2 * n), sizes, budget_s=1000.0)
    assert list(per_crop) == sizes  # every size paid
    short = sweep_sizes(lambda n: gpu_like(2 * n), sizes, budget_s=0.2)
    spent_before_last = sum(3 * gpu_like(2 * n) for n in list(short)[:-1])
    assert len(short) < len(sizes) and spent_before_last < 0.2


# --- a worker calibrating its pipeline ----------------------------------------------------------


def test_calibration_measures_one_forward_per_size_and_seeds_the_curve() -> None:
    clock = FakeClock()
    pipeline = ChunkedPipeline(cpu_like, clock, max_crops_per_batch=256)
    curve = calibrate(pipeline, clock=clock)
    assert curve is not None
    assert set(pipeline.forwards) == {2, 4, 6, 8}  # one forward per call, as the sweep asked
    assert pipeline.max_crops_per_batch == 256  # restored: the worker sets it per batch
    assert curve.figures() == pytest.approx({1: 0.13, 2: 0.09, 3: 0.106, 4: 0.122})
    assert curve.best_size() == 2


def test_calibration_grows_to_the_configured_chunk_where_bigger_pays() -> None:
    clock = FakeClock()
    pipeline = ChunkedPipeline(gpu_like, clock, max_crops_per_batch=64)
    curve = calibrate(pipeline, clock=clock)
    assert curve is not None
    assert max(pipeline.forwards) == 64  # never above the configured chunk
    assert curve.best_size() == 32


def test_calibration_stops_at_its_budget() -> None:
    clock = FakeClock()
    pipeline = ChunkedPipeline(gpu_like, clock, max_crops_per_batch=1024)
    calibrate(pipeline, clock=clock, budget_s=0.5)
    assert clock.now < 0.5 + 3 * gpu_like(1024) + 3 * gpu_like(1024)
    assert max(pipeline.forwards) < 1024


def test_a_pipeline_without_the_chunk_knob_is_not_calibrated() -> None:
    class Plain:
        device = torch.device("cpu")

        def run(self, items: list[PipelineItem]) -> None:
            raise AssertionError("not to be run")

    assert calibrate(Plain()) is None  # type: ignore[arg-type]


# --- batch forming in crops ----------------------------------------------------------------------


def test_a_batch_holds_the_crops_the_curve_says_pay() -> None:
    curve = CostCurve()
    for size, per_crop in {1: 0.13, 2: 0.09, 3: 0.106}.items():
        curve.seed(size, per_crop)
    queue = make_queue()
    jobs = [make_job(1) for _ in range(5)]
    for job in jobs:
        queue.admit(job)
    assert take(queue, curve) == jobs[:2]
    assert take(queue, curve) == jobs[2:4]
    assert take(queue) == jobs[4:]  # without a curve: max_batch_size alone


def pay_three_crops() -> CostCurve:
    curve = CostCurve()
    for size, per_crop in {1: 0.13, 2: 0.11, 3: 0.09, 4: 0.1}.items():
        curve.seed(size, per_crop)
    return curve


@pytest.mark.parametrize(("due", "curve"), [(4, None), (3, pay_three_crops())])
def test_a_consumer_filling_a_batch_is_woken_once_it_is_due(
    due: int, curve: CostCurve | None
) -> None:
    """Jobs that leave a batch short (of ``max_batch_size`` jobs, or of the crops the curve
    says pay) do not wake the consumer waiting for it to fill: each wake costs a thread switch
    and the GIL. The job that completes it does, long before the delay."""
    queue = BatchQueue(
        max_batch_size=4, max_delay_s=600.0, max_queue_size=100, on_depth=lambda d: None
    )
    wakes: list[int] = []  # jobs queued at each wake-up call
    notify_all = queue._cv.notify_all

    def counted() -> None:
        wakes.append(len(queue._queue))
        notify_all()

    queue._cv.notify_all = counted  # type: ignore[method-assign]
    taken: list[tuple[list[Job], list[Job]] | None] = []
    consumer = threading.Thread(target=lambda: taken.append(queue.next_batch(curve)), daemon=True)
    consumer.start()
    try:
        jobs = [make_job(1) for _ in range(due)]
        queue.admit(jobs[0])  # wakes the idle consumer, which starts filling a batch
        assert wakes == [1]
        waited = time.monotonic() + 2.0  # until it waits again, now for the batch to fill
        while getattr(queue, "_filling", None) is None and time.monotonic() < waited:
            time.sleep(0.001)
        before = len(wakes)
        for job in jobs[1:-1]:
            queue.admit(job)
        assert len(wakes) == before  # short of due: the consumer sleeps on
        queue.admit(jobs[-1])
        consumer.join(timeout=5.0)
        assert not consumer.is_alive(), "the batch was due and the consumer was not woken"
        assert wakes[before:] == [due]
        assert taken == [(jobs, [])]
    finally:
        queue.close()  # a consumer still waiting returns None
        consumer.join(timeout=5.0)


def test_an_eager_frame_behind_a_cancelled_job_is_not_held_for_the_delay() -> None:
    """The job a consumer was filling a batch for is cancelled, and a tracked stream's frame
    (eager) comes: only eager jobs are queued, so the batch is due at once, as it is for an eager
    job queued alone."""
    queue = BatchQueue(
        max_batch_size=4, max_delay_s=600.0, max_queue_size=100, on_depth=lambda d: None
    )
    taken: list[tuple[list[Job], list[Job]] | None] = []
    consumer = threading.Thread(target=lambda: taken.append(queue.next_batch()), daemon=True)
    consumer.start()
    try:
        waiting = make_job(1)
        queue.admit(waiting)
        waited = time.monotonic() + 2.0  # until it waits for the batch to fill
        while getattr(queue, "_filling", None) is None and time.monotonic() < waited:
            time.sleep(0.001)
        queue.release(waiting)  # its caller went away
        frame = make_job(1)
        frame.eager = True
        queue.admit(frame)
        consumer.join(timeout=5.0)
        assert not consumer.is_alive(), "the eager frame was held for the delay"
        assert taken == [([frame], [])]
    finally:
        queue.close()
        consumer.join(timeout=5.0)


def test_a_job_bigger_than_the_budget_runs_alone_and_images_stay_bounded() -> None:
    curve = CostCurve()
    curve.seed(2, 0.09)
    curve.seed(3, 0.2)
    queue = make_queue(max_batch_size=3)
    big, *small = [make_job(9)] + [make_job(0) for _ in range(5)]
    for job in (big, *small):
        queue.admit(job)
    assert take(queue, curve) == [big]  # at least one job, whatever its size
    # Jobs of no box still count as one call's share each; never more than max_batch_size.
    assert take(queue, curve) == small[:2]
    assert take(queue) == small[2:5]


def test_sources_share_batches_by_crops_not_by_jobs() -> None:
    """A source sending 4-box jobs gets no more crops than one sending 1-box jobs."""
    queue = make_queue(max_batch_size=4)
    heavy = [make_job(4, "heavy") for _ in range(4)]
    light = [make_job(1, "light") for _ in range(4)]
    for pair in zip(heavy, light, strict=True):
        for job in pair:
            queue.admit(job)
    assert take(queue) == [heavy[0], light[0], light[1], light[2]]  # 4 crops each
    # The rest fits one batch: taken whole, in queue order (no source to prefer).
    assert take(queue) == [heavy[1], heavy[2], heavy[3], light[3]]


def test_a_source_that_was_idle_earns_no_credit() -> None:
    """A source joining late starts level with the least served one queued: it alternates with
    the busy source instead of taking every slot until it has caught up."""
    queue = make_queue(max_batch_size=2)
    busy = [make_job(1, "busy") for _ in range(8)]
    for job in busy:
        queue.admit(job)
    assert take(queue) == busy[:2] and take(queue) == busy[2:4]
    late = [make_job(1, "late") for _ in range(3)]
    for job in late:
        queue.admit(job)
    assert take(queue) == [busy[4], late[0]]
    assert take(queue) == [busy[5], late[1]]


# --- admission in crops --------------------------------------------------------------------------


def recorded_queue() -> BatchQueue:
    """A queue whose worker ran four 1-box jobs in 1 s: 4 crops per second."""
    queue = make_queue()
    ran = [make_job(1) for _ in range(4)]
    for job in ran:
        queue.admit(job)
    assert take(queue) == ran
    queue.finished(ran)
    queue.record(ran, BatchStats(pose_crops=4, pose_seconds=1.0), 1.0)
    return queue


class _FixedCrops:
    """A cost curve's two answers the queue asks for, fixed: batches of up to ``crops``."""

    def __init__(self) -> None:
        self.crops: float | None = None

    def batch_size(self, queued: float) -> float | None:
        return self.crops

    def plan(self, queued: float) -> float | None:
        return self.crops


class _ScanningFairQueue:
    """The fairness rule as the queue's documentation states it, by scanning a list (how the
    queue did it before its heap): the reference for the test below."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.queue: list[Job] = []
        self.served: dict[str, float] = {}

    def add(self, job: Job) -> None:
        if job.source not in self.served:
            self.served[job.source] = min(self.served.values(), default=0.0)
        self.queue.append(job)

    def take(self, crops: float | None) -> list[Job]:
        queued = sum(job.work for job in self.queue)
        if len(self.queue) <= self.max_batch_size and (
            crops is None or len(self.queue) == 1 or queued <= crops
        ):
            taken, self.queue, self.served = self.queue, [], {}
            return taken
        taken: list[Job] = []
        work = 0.0
        while self.queue and len(taken) < self.max_batch_size:
            heads: dict[str, Job] = {}
            for job in self.queue:
                heads.setdefault(job.source, job)
            job = min(heads.values(), key=lambda j: self.served[j.source])  # first on ties
            if taken and crops is not None and work + job.work > crops:
                break
            self.queue.remove(job)
            self.served[job.source] += job.work
            taken.append(job)
            work += job.work
        sources = {job.source for job in self.queue}
        self.served = {s: n for s, n in self.served.items() if s in sources}
        return taken


@pytest.mark.parametrize("seed", range(6))
def test_batches_are_formed_as_the_fairness_rule_says(seed: int) -> None:
    """Random admissions (sources, boxes, eager or not), cancellations and batches (with and
    without a crops budget) give the same batches, job for job, as the rule applied by a scan;
    enough cancellations that the queue's stale entries are rebuilt away several times."""
    rng = random.Random(seed)
    batch = rng.choice([4, 16, 64])
    queue = BatchQueue(
        max_batch_size=batch, max_delay_s=0.0, max_queue_size=10_000, on_depth=lambda d: None
    )
    reference = _ScanningFairQueue(batch)
    curve = _FixedCrops()
    sources = [f"s{i}" for i in range(rng.choice([1, 3, 40, 400]))]
    queued: list[Job] = []
    batches = 0
    for _ in range(3000):
        action = rng.random()
        if action < 0.6:
            job = make_job(rng.randint(1, 4), source=rng.choice(sources))
            job.eager = rng.random() < 0.3
            assert queue.admit(job) is None
            reference.add(job)
            queued.append(job)
        elif action < 0.8 and queued:
            job = queued.pop(rng.randrange(len(queued)))
            queue.release(job)
            reference.queue.remove(job)
        elif queued:
            curve.crops = rng.choice([None, 1.0, 5.0, 20.0, 100.0])
            got = take(queue, curve)  # type: ignore[arg-type]
            assert got == reference.take(curve.crops)
            assert all(job.state is JobState.RUNNING for job in got)
            queue.finished(got)
            taken = set(map(id, got))
            queued = [job for job in queued if id(job) not in taken]
            batches += 1
        assert queue.depth() == len(queued) == len(reference.queue)
    assert batches > 100


def test_admission_counts_the_crops_ahead_not_the_jobs() -> None:
    few = recorded_queue()
    assert few.admit(make_job(1)) is None
    # 1 crop ahead at 4 crops/s: (0.25 + 1 s batch) x 1.5 = 1.9 s < 3 s.
    assert few.admit(make_job(1, deadline=100.0 + 3.0)) is None
    many = recorded_queue()
    assert many.admit(make_job(10)) is None  # one job, but 10 crops: 2.5 s of work
    retry = many.admit(make_job(1, deadline=100.0 + 3.0))
    assert retry == pytest.approx(2.5)
    assert many.depth() == 1


def test_an_image_without_boxes_costs_what_the_detector_and_its_persons_cost() -> None:
    queue = make_queue()
    ran = [make_job(None), make_job(None)]
    for job in ran:
        queue.admit(job)
    take(queue)
    # 6 persons found at 0.1 s each, and 0.4 s of detector (4 crop-equivalents): 5 per image.
    stats = BatchStats(detect_images=2, detect_seconds=0.4, pose_crops=6, pose_seconds=0.6)
    queue.record(ran, stats, 1.0)
    job = make_job(None)
    queue.admit(job)
    assert job.work == pytest.approx(0.8 * 1.0 + 0.2 * 5.0)
    assert make_job(3).work == 1.0 and queue.admit(boxed := make_job(3)) is None
    assert boxed.work == 3.0


def test_retry_hints_come_from_the_crop_rate() -> None:
    queue = recorded_queue()
    assert queue.admit(make_job(8)) is None
    assert queue.retry_after_s(workers=1) == pytest.approx(2.0)
    assert queue.retry_after_s(workers=2) == pytest.approx(1.0)  # the other counted at the mean


# --- the worker pool ---------------------------------------------------------------------------


def contended(inputs: int) -> float:
    """The CPU of ``cpu_like`` with other processes on it: every forward pays a fixed cost (its
    threads wait for each other at every layer), so bigger forwards pay again."""
    return 0.3 + 0.05 * inputs


async def test_a_worker_sizes_its_batches_by_its_curve_and_follows_a_changing_device() -> None:
    """Calibrated on a quiet CPU (2 crops per forward is best), then loaded: the live batches
    and the probes next to the best move the batches to bigger forwards, which now pay."""
    clock = FakeClock()
    pipeline = ChunkedPipeline(cpu_like, clock)
    queue = make_queue()
    done: list[tuple[int, float]] = []

    def taken(batch: list[Job], expired: list[Job]) -> None:
        pipeline.cost = contended  # the load arrives once the worker serves

    pool = WorkerPool(
        ["cpu"],
        lambda device: pipeline,  # type: ignore[arg-type, return-value]
        queue,
        warmup=True,
        on_taken=taken,
        on_success=lambda jobs, results, stats, seconds: done.append((len(jobs), seconds)),
        on_failure=lambda jobs, exc: pytest.fail(f"{exc!r}"),
        clock=clock,
    )
    jobs = [make_job(1) for _ in range(60)] + [make_job(5)]
    for job in jobs:  # queued before the worker starts: it finds them all after calibrating
        queue.admit(job)
    await pool.start()
    try:
        end = time.monotonic() + 30
        while len(done) < 1 or sum(n for n, _ in done) < len(jobs):
            assert time.monotonic() < end
            await asyncio.sleep(0.01)
    finally:
        queue.close()
        await asyncio.to_thread(pool.join)
    curve = pool.curves[0]
    assert curve is not None
    served = pipeline.calls[len(pipeline.calls) - len(done) :]
    assert served[0] == 2  # the calibrated best, one forward of 4 inputs
    assert pipeline.forwards[-len(served) - 1 :].count(4) < len(served)
    assert max(served[-4:]) >= 4 and (curve.best_size() or 0) >= 4  # bigger forwards pay
    assert done[0][1] == pytest.approx(contended(4))  # seconds from the worker's clock
    assert pipeline.max_crops_per_batch <= 256
