"""The engine's outcomes and lifecycle, against a fake pipeline: cancellation, deadlines, failing
batches, CUDA OOM split-and-retry, start-up readiness, drain on stop, and one outcome per job under
churn. (Fakes and fixtures: ``tests/service/engine_fakes.py``.)
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest
import torch

from service.engine import (
    DeadlineExceededError,
    Engine,
    EngineConfig,
    EngineStoppedError,
    InferenceError,
    NotReadyError,
    PoseRequest,
    PoseResponse,
    QueueFullError,
)
from tests.service.engine_fakes import (
    WAIT_S,
    FakeDecoder,
    FakePipeline,
    MakeEngine,
    Recorder,
    RecordingObserver,
    answered_id,
    image_for,
    running_first,
    submit,
    wait_until,
)


async def test_cancelled_job_never_reaches_the_pipeline(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec, max_batch_size=8)
    first = await running_first(engine, rec)
    doomed, kept = submit(engine, 1), submit(engine, 2)
    await wait_until(lambda: engine.queue_depth() == 2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert engine.queue_depth() == 1
    assert rec.gate is not None
    rec.gate.set()
    await asyncio.gather(first, kept)
    assert rec.attempts == [[0], [2]]


async def test_job_cancelled_while_decoding_is_dropped(make_engine: MakeEngine) -> None:
    rec = Recorder()
    decoder = FakeDecoder()
    decoder.gate = threading.Event()
    engine = await make_engine(rec, decoder=decoder)
    task = asyncio.create_task(engine.infer(PoseRequest(image=b"img:4")))
    await asyncio.to_thread(decoder.started.acquire)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.queue_depth() == 0
    decoder.gate.set()
    assert answered_id(await engine.infer(PoseRequest(image=b"img:5"))) == 5
    assert rec.attempts == [[5]]


async def test_past_deadline_is_refused_without_running(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec)
    with pytest.raises(DeadlineExceededError) as raised:
        await engine.infer(PoseRequest(image=image_for(1), deadline=time.monotonic() - 1.0))
    assert raised.value.code == "deadline_exceeded"
    assert rec.attempts == []
    assert engine.queue_depth() == 0


async def test_deadline_passing_in_the_queue_fails_the_job_unrun(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec)
    first = await running_first(engine, rec)
    late = submit(engine, 1, deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceededError):
        await late  # the worker is still held: the deadline timer answers
    assert engine.queue_depth() == 0
    assert rec.gate is not None
    rec.gate.set()
    await first
    assert rec.attempts == [[0]]


async def test_deadline_while_running_answers_an_error_not_late(make_engine: MakeEngine) -> None:
    rec = Recorder()
    rec.gate = threading.Event()
    engine = await make_engine(rec)
    task = submit(engine, 0, deadline=time.monotonic() + 0.5)
    await asyncio.to_thread(rec.wait_attempts, 1)  # running before its deadline
    with pytest.raises(DeadlineExceededError):
        await task  # while the fake is still inside run()
    assert rec.attempts == [[0]]
    rec.gate.set()  # the late result is discarded (loop_errors checks nothing is set twice)
    assert answered_id(await submit(engine, 1)) == 1


async def test_worker_fails_a_job_found_past_its_deadline(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec)
    first = await running_first(engine, rec)
    deadline = time.monotonic() + 0.3
    late = submit(engine, 1, deadline=deadline)
    await wait_until(lambda: engine.queue_depth() == 1)
    # Hold the event loop (so its deadline timer cannot fire) until the worker has taken job 1,
    # which is then already past its deadline.
    while time.monotonic() <= deadline:
        time.sleep(0.01)
    assert rec.gate is not None
    rec.gate.set()
    end = time.monotonic() + WAIT_S
    while engine.queue_depth() and time.monotonic() < end:
        time.sleep(0.001)
    with pytest.raises(DeadlineExceededError):
        await late
    await first
    assert rec.attempts == [[0]]


async def test_failing_batch_fails_only_its_own_jobs(make_engine: MakeEngine) -> None:
    rec = Recorder()
    rec.fail_ids = {1}
    engine = await make_engine(rec, max_batch_size=2)
    first = await running_first(engine, rec)
    rest = [submit(engine, i) for i in range(1, 5)]
    await wait_until(lambda: engine.queue_depth() == 4)
    assert rec.gate is not None
    rec.gate.set()
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert rec.attempts == [[0], [1, 2], [3, 4]]
    for failed in outcomes[1:3]:
        assert isinstance(failed, InferenceError)
        assert failed.code == "internal"
        assert isinstance(failed.__cause__, RuntimeError)
        assert "boom" in str(failed.__cause__)
    assert outcomes[1] is not outcomes[2]
    answered = [o for o in outcomes if isinstance(o, PoseResponse)]
    assert [answered_id(r) for r in answered] == [0, 3, 4]


async def test_oom_splits_the_batch_and_retries_the_halves(make_engine: MakeEngine) -> None:
    rec = Recorder()
    rec.oom_above = 2
    observer = RecordingObserver()
    engine = await make_engine(rec, observer=observer, max_batch_size=8, max_delay_ms=600_000.0)
    responses = await asyncio.gather(*(submit(engine, i) for i in range(8)))
    assert [answered_id(r) for r in responses] == list(range(8))
    assert rec.attempts == [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 3],
        [0, 1],
        [2, 3],
        [4, 5, 6, 7],
        [4, 5],
        [6, 7],
    ]
    assert [images for _, images in observer.batches] == [2, 2, 2, 2]


async def test_oom_on_a_single_image_fails_it_alone(make_engine: MakeEngine) -> None:
    rec = Recorder()
    rec.oom_ids = {5}
    engine = await make_engine(rec, max_batch_size=8, max_delay_ms=600_000.0)
    outcomes = await asyncio.gather(*(submit(engine, i) for i in range(8)), return_exceptions=True)
    failed = outcomes[5]
    assert isinstance(failed, InferenceError)
    assert isinstance(failed.__cause__, torch.cuda.OutOfMemoryError)
    answered = [o for o in outcomes if isinstance(o, PoseResponse)]
    assert [answered_id(r) for r in answered] == [0, 1, 2, 3, 4, 6, 7]
    assert [5] in rec.attempts and [4] in rec.attempts


async def test_job_cancelled_during_an_oom_retry_is_not_retried(make_engine: MakeEngine) -> None:
    rec = Recorder()
    rec.oom_above = 2
    rec.gate, rec.hold = threading.Event(), [0, 1]  # hold the first half of the retry
    engine = await make_engine(rec, max_batch_size=4, max_delay_ms=600_000.0)
    tasks = [submit(engine, i) for i in range(4)]
    await asyncio.to_thread(rec.wait_attempts, 2)
    assert rec.attempts == [[0, 1, 2, 3], [0, 1]]
    tasks[3].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[3]
    rec.gate.set()
    assert [answered_id(r) for r in await asyncio.gather(*tasks[:3])] == [0, 1, 2]
    assert rec.attempts == [[0, 1, 2, 3], [0, 1], [2]]


async def test_not_ready_until_every_pipeline_is_warm(make_engine: MakeEngine) -> None:
    rec = Recorder()
    rec.warmup_gate = threading.Event()
    engine = await make_engine(rec, start=False)
    starting = asyncio.create_task(engine.start())
    await asyncio.to_thread(rec.warming.wait, WAIT_S)
    assert not engine.ready
    with pytest.raises(NotReadyError) as refused:
        await engine.infer(PoseRequest(image=image_for(1)))
    assert refused.value.code == "unavailable"
    with pytest.raises(NotReadyError):
        engine.model_info()
    rec.warmup_gate.set()
    await starting
    assert engine.ready
    assert engine.model_info().model == "fake"
    assert answered_id(await submit(engine, 1)) == 1


async def test_start_failure_raises_and_stays_unready(loop_errors: list[dict[str, Any]]) -> None:
    def broken(device: str) -> FakePipeline:
        raise FileNotFoundError("no weights")

    engine = Engine(broken, ["cpu", "cpu"], EngineConfig())
    with pytest.raises(FileNotFoundError):
        await engine.start()
    assert not engine.ready
    with pytest.raises(NotReadyError):
        await engine.infer(PoseRequest(image=image_for(1)))
    await engine.stop()
    with pytest.raises(RuntimeError):
        await engine.start()


async def test_stop_finishes_admitted_jobs_within_the_grace(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec, max_batch_size=8)
    first = await running_first(engine, rec)
    queued = [submit(engine, 1), submit(engine, 2)]
    await wait_until(lambda: engine.queue_depth() == 2)
    stopping = asyncio.create_task(engine.stop(grace_s=WAIT_S))
    await wait_until(lambda: engine.draining)
    assert not engine.ready
    with pytest.raises(NotReadyError):
        await engine.infer(PoseRequest(image=image_for(3)))
    assert rec.gate is not None
    rec.gate.set()
    responses = await asyncio.gather(first, *queued)
    assert [answered_id(r) for r in responses] == [0, 1, 2]
    await stopping
    assert rec.attempts == [[0], [1, 2]]


async def test_stop_fails_what_is_left_after_the_grace(make_engine: MakeEngine) -> None:
    rec = Recorder()
    decoder = FakeDecoder()
    engine = await make_engine(rec, decoder=decoder)
    running = await running_first(engine, rec)
    queued = submit(engine, 1)
    decoder.gate = threading.Event()
    decoding = asyncio.create_task(engine.infer(PoseRequest(image=b"img:2")))
    await wait_until(lambda: engine.queue_depth() == 2)
    stopping = asyncio.create_task(engine.stop(grace_s=0.05))
    outcomes = await asyncio.gather(running, queued, decoding, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, EngineStoppedError)
        assert outcome.code == "shutting_down"
    assert rec.gate is not None
    rec.gate.set()  # the running batch ends; its answer is discarded
    decoder.gate.set()
    await stopping
    assert rec.attempts == [[0]]
    assert engine.queue_depth() == 0
    with pytest.raises(NotReadyError):
        await engine.infer(PoseRequest(image=image_for(3)))


async def test_every_job_gets_exactly_one_outcome_under_churn(make_engine: MakeEngine) -> None:
    """Rounds of many submitters against two workers, a small queue, failing batches, cancellations
    and deadlines; each job gets exactly one outcome.

    Each round holds both workers on the gate while a wave is submitted, which makes "queued" a
    fact instead of a timing: with both workers inside ``run()``, a job that is in neither held
    batch is still queued or decoding. Some of those are cancelled, and must never reach the
    pipeline; every deadline job admitted and not cancelled must get ``DeadlineExceededError``
    while the workers are still held (the timer answers it, queued or running). Then the gate
    opens, a few more random jobs are cancelled mid-flight, and the round settles.
    """
    rounds, wave, deadline_s = 5, 60, 0.05
    rng = random.Random(0)
    rec = Recorder()
    rec.fail_ids = {i for i in range(rounds * wave) if i % 37 == 5}
    rec.detect_s = 0.0
    engine = await make_engine(
        rec,
        decoder=FakeDecoder(),
        devices=("cpu", "cpu"),
        max_batch_size=4,
        max_delay_ms=1.0,
        max_queue_size=32,
    )
    submitted = [0]  # of the current round

    async def one(i: int) -> tuple[int, str]:
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
        image: bytes | torch.Tensor = f"img:{i}".encode() if i % 2 else image_for(i)
        deadline = time.monotonic() + deadline_s if i % 7 == 0 else None
        submitted[0] += 1  # infer admits or refuses before it first awaits
        try:
            response = await engine.infer(PoseRequest(image=image, deadline=deadline))
        except (QueueFullError, DeadlineExceededError, InferenceError) as exc:
            return i, exc.code
        assert answered_id(response) == i
        return i, "ok"

    codes: dict[str, int] = {}
    cancelled_while_queued: set[int] = set()
    for r in range(rounds):
        ids = range(r * wave, (r + 1) * wave)
        rec.gate = threading.Event()
        before, submitted[0] = len(rec.attempts), 0
        tasks = {i: asyncio.create_task(one(i)) for i in ids}
        await wait_until(lambda n=before + 2: submitted[0] == wave and len(rec.attempts) == n)
        # Both workers are held in run(): nothing more leaves the queue until the gate opens.
        held = {i for batch in rec.attempts[before:] for i in batch}
        waiting = [i for i in ids if i not in held and not tasks[i].done()]
        doomed = set(rng.sample(waiting, min(6, len(waiting)))) | set(rng.sample(sorted(held), 2))
        for i in doomed:
            tasks[i].cancel()
        cancelled_while_queued |= doomed - held
        # Every deadline passes while the workers are still held; the timers must answer.
        await asyncio.sleep(deadline_s * 2)
        for _ in range(20):
            await asyncio.sleep(0)
        for i in ids:
            if i % 7 == 0 and i not in doomed:
                assert tasks[i].done(), f"deadline job {i} unanswered past its deadline"
                assert tasks[i].result()[1] in ("deadline_exceeded", "queue_full")
        rec.gate.set()
        for i in rng.sample(list(ids), 4):  # free-running churn: these may or may not have run
            doomed.add(i)
            tasks[i].cancel()
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        for i, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                assert i in doomed
                continue
            assert not isinstance(outcome, BaseException), outcome
            assert outcome[0] == i
            codes[outcome[1]] = codes.get(outcome[1], 0) + 1
            if outcome[1] == "internal":
                assert any(i in batch and rec.fail_ids & set(batch) for batch in rec.attempts)
        assert engine.queue_depth() == 0

    # Every kind of outcome happened, deadlines included.
    assert codes.get("ok", 0) > 0 and codes.get("queue_full", 0) > 0, codes
    assert codes.get("deadline_exceeded", 0) > 0, codes
    assert cancelled_while_queued
    ran = rec.flat()
    assert len(ran) == len(set(ran))  # nothing ran twice (no OOM here)
    assert not cancelled_while_queued & set(ran), "a job cancelled while queued ran"
