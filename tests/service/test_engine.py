"""The engine's batching and admission, against a fake pipeline: coalescing, the delay flush,
queue-full refusal, decoding off the loop, one pipeline per device, observer hooks and timings.
(Fakes and fixtures: ``tests/service/engine_fakes.py``.)
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from model.interfaces import BatchStats, PoseOptions
from service.batching import RETRY_DEFAULT_S, RETRY_MAX_S, RETRY_MIN_S
from service.engine import (
    EngineConfig,
    PoseRequest,
    QueueFullError,
)
from service.errors import ImageError
from tests.service.engine_fakes import (
    WAIT_S,
    FakeDecoder,
    MakeEngine,
    Recorder,
    RecordingObserver,
    answered_id,
    image_for,
    running_first,
    submit,
    wait_until,
)


def test_config_rejects_bad_knobs() -> None:
    for bad in (
        {"max_batch_size": 0},
        {"max_delay_ms": -1.0},
        {"max_queue_size": 0},
        {"decode_workers": 0},
        {"drain_grace_s": -1.0},
    ):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


async def test_coalesces_queued_jobs_up_to_max_batch_size(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec, max_batch_size=4)
    first = await running_first(engine, rec)
    rest = [submit(engine, i) for i in range(1, 10)]
    await wait_until(lambda: engine.queue_depth() == 9)
    assert rec.gate is not None
    rec.gate.set()
    responses = await asyncio.gather(first, *rest)
    assert [answered_id(r) for r in responses] == list(range(10))
    assert rec.attempts == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


async def test_first_job_waits_for_the_batch_to_fill(make_engine: MakeEngine) -> None:
    # The delay is far longer than the test: the batch goes because it is full, not timed out.
    rec = Recorder()
    engine = await make_engine(rec, max_batch_size=3, max_delay_ms=600_000.0)
    first = submit(engine, 0)
    await wait_until(lambda: engine.queue_depth() == 1)
    # Give a worker that wrongly takes a lone job the chance to do it (a correct one never does).
    await asyncio.to_thread(time.sleep, 0.05)
    assert rec.attempts == []
    responses = await asyncio.gather(first, submit(engine, 1), submit(engine, 2))
    assert [answered_id(r) for r in responses] == [0, 1, 2]
    assert rec.attempts == [[0, 1, 2]]


@pytest.mark.parametrize("delay_ms", [0.0, 20.0])
async def test_lone_job_is_flushed_after_the_delay(
    make_engine: MakeEngine, delay_ms: float
) -> None:
    rec = Recorder()
    engine = await make_engine(rec, max_batch_size=8, max_delay_ms=delay_ms)
    response = await asyncio.wait_for(submit(engine, 7), WAIT_S)
    assert answered_id(response) == 7
    assert rec.attempts == [[7]]


async def test_queue_full_is_refused_at_once(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec, max_queue_size=2)
    first = await running_first(engine, rec)
    queued = [submit(engine, 1), submit(engine, 2)]
    await wait_until(lambda: engine.queue_depth() == 2)
    with pytest.raises(QueueFullError) as refused:
        await engine.infer(PoseRequest(image=image_for(3)))
    assert refused.value.code == "queue_full"
    assert refused.value.retry_after_s == RETRY_DEFAULT_S  # nothing measured yet
    assert rec.gate is not None
    rec.gate.set()
    await asyncio.gather(first, *queued)
    assert rec.flat() == [0, 1, 2]

    # Now throughput is known: the hint comes from it, within bounds.
    again = await running_first(engine, rec, job_id=3)
    queued = [submit(engine, 4), submit(engine, 5)]
    await wait_until(lambda: engine.queue_depth() == 2)
    with pytest.raises(QueueFullError) as refused:
        await engine.infer(PoseRequest(image=image_for(6)))
    assert RETRY_MIN_S <= refused.value.retry_after_s <= RETRY_MAX_S
    rec.gate.set()
    await asyncio.gather(again, *queued)
    assert rec.attempts[2:] == [[3], [4, 5]]


async def test_jobs_being_decoded_count_toward_the_queue(make_engine: MakeEngine) -> None:
    rec = Recorder()
    decoder = FakeDecoder()
    decoder.gate = threading.Event()
    engine = await make_engine(rec, decoder=decoder, max_queue_size=2, decode_workers=1)
    tasks = [
        asyncio.create_task(engine.infer(PoseRequest(image=f"img:{i}".encode()))) for i in (1, 2)
    ]
    await wait_until(lambda: engine.queue_depth() == 2)
    with pytest.raises(QueueFullError):
        await engine.infer(PoseRequest(image=b"img:3"))
    decoder.gate.set()
    assert [answered_id(r) for r in await asyncio.gather(*tasks)] == [1, 2]
    assert sorted(rec.flat()) == [1, 2]


async def test_decoding_runs_off_the_event_loop(make_engine: MakeEngine) -> None:
    rec = Recorder()
    decoder = FakeDecoder()
    engine = await make_engine(rec, decoder=decoder)
    response = await engine.infer(PoseRequest(image=b"img:5"))
    assert answered_id(response) == 5
    assert decoder.threads and threading.get_ident() not in decoder.threads


async def test_decode_error_reaches_the_caller_unchanged(make_engine: MakeEngine) -> None:
    rec = Recorder()
    decoder = FakeDecoder()
    engine = await make_engine(rec, decoder=decoder)
    with pytest.raises(ImageError) as raised:
        await engine.infer(PoseRequest(image=b"bad"))
    assert raised.value is decoder.error
    assert rec.attempts == []
    assert engine.queue_depth() == 0
    assert answered_id(await engine.infer(PoseRequest(image=b"img:1"))) == 1


async def test_unusable_tensor_or_boxes_are_refused_before_queueing(
    make_engine: MakeEngine,
) -> None:
    rec = Recorder()
    engine = await make_engine(rec)
    with pytest.raises(ImageError) as bad_image:
        await engine.infer(PoseRequest(image=torch.zeros((2, 4, 4), dtype=torch.uint8)))
    assert bad_image.value.code == "bad_image"
    for boxes in (torch.zeros((2, 3)), torch.tensor([[0.0, 0.0, 0.0, 5.0]])):
        with pytest.raises(ImageError) as bad_boxes:
            await engine.infer(PoseRequest(image=image_for(1), boxes=boxes))
        assert bad_boxes.value.code == "bad_boxes"
    with pytest.raises(ValueError):
        options = PoseOptions(precision="fp8")  # type: ignore[arg-type]
        await engine.infer(PoseRequest(image=image_for(1), options=options))
    assert rec.attempts == []


async def test_boxes_outside_the_image_are_refused_on_every_side(make_engine: MakeEngine) -> None:
    """A caller box must overlap the image: one past any edge (or starting exactly on the right
    or bottom edge) is refused, one overlapping an edge by half a pixel is run."""
    rec = Recorder()
    engine = await make_engine(rec)
    image = torch.zeros((3, 30, 40), dtype=torch.uint8)  # W 40, H 30; answers as job 0
    outside = {
        "right": [40.0, 5.0, 10.0, 10.0],  # x >= W
        "below": [5.0, 30.0, 10.0, 10.0],  # y >= H
        "left": [-10.0, 5.0, 10.0, 10.0],  # x + w <= 0
        "above": [5.0, -10.0, 10.0, 10.0],  # y + h <= 0
    }
    inside = [[5.0, 5.0, 10.0, 10.0]]
    for side, box in outside.items():
        with pytest.raises(ImageError) as refused:
            await engine.infer(PoseRequest(image=image, boxes=[*inside, box]))
        assert refused.value.code == "bad_boxes", side
        assert "box 1" in str(refused.value), (side, str(refused.value))
    # the same check once the size is known from decoding (b"img:3" is 4 x 2 pixels)
    for box in ([0.0, 2.0, 2.0, 2.0], [0.0, -2.0, 2.0, 2.0], [4.0, 0.0, 2.0, 2.0]):
        with pytest.raises(ImageError, match="box 0"):
            await engine.infer(PoseRequest(image=b"img:3", boxes=[box]))
    assert rec.attempts == []
    overlapping = [[39.5, 5.0, 10.0, 10.0], [5.0, 29.5, 10.0, 10.0]]
    overlapping += [[-9.5, 5.0, 10.0, 10.0], [5.0, -9.5, 10.0, 10.0]]
    assert answered_id(await engine.infer(PoseRequest(image=image, boxes=overlapping))) == 0
    answer = await engine.infer(PoseRequest(image=b"img:3", boxes=[[3.5, 1.5, 2.0, 2.0]]))
    assert answered_id(answer) == 3
    assert rec.attempts == [[0], [3]]


async def test_one_pipeline_per_device_pulling_from_one_queue(make_engine: MakeEngine) -> None:
    rec = Recorder()
    engine = await make_engine(rec, devices=("cpu", "cpu"))
    assert len(rec.built) == 2 and len(set(rec.built)) == 2  # each built in its own thread
    first = await running_first(engine, rec)  # worker A is held inside run()
    second = submit(engine, 1)
    await asyncio.to_thread(rec.wait_attempts, 2)  # so worker B took job 1
    assert len(set(rec.instances)) == 2
    assert rec.gate is not None
    rec.gate.set()
    assert [answered_id(r) for r in await asyncio.gather(first, second)] == [0, 1]


async def test_observer_sees_depth_waits_and_batches(make_engine: MakeEngine) -> None:
    rec = Recorder()
    observer = RecordingObserver()
    engine = await make_engine(rec, observer=observer, max_batch_size=5, max_delay_ms=600_000.0)
    responses = await asyncio.gather(*(submit(engine, i) for i in range(5)))
    assert len(observer.waits) == 5 and all(w >= 0 for w in observer.waits)
    assert len(observer.batches) == 1
    stats, images = observer.batches[0]
    assert images == 5
    assert (stats.detect_images, stats.pose_crops) == (5, 5)
    assert stats.persons_per_image == [1] * 5
    # Jobs admitted in one event-loop iteration are reported once, by the wake that follows.
    assert observer.depths == [5, 0]
    timing = responses[0].timing_ms
    assert set(timing) == {"queue", "decode", "detect", "pose", "total"}
    assert timing["detect"] == pytest.approx(250.0) and timing["pose"] == pytest.approx(500.0)
    assert timing["decode"] == 0.0 and timing["queue"] >= 0 and timing["total"] >= timing["queue"]


async def test_failing_observer_does_not_break_the_engine(make_engine: MakeEngine) -> None:
    class Broken(RecordingObserver):
        def on_batch(self, stats: BatchStats, images: int) -> None:
            raise RuntimeError("metrics down")

    rec = Recorder()
    engine = await make_engine(rec, observer=Broken())
    assert answered_id(await submit(engine, 3)) == 3
