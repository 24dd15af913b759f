"""HTTP behaviour under overload, cancellation, deadlines, failures, warm-up and drain.

A real uvicorn server on a localhost port over the real ``Engine``; only the pipeline is a fake
(``SlowPipeline``), since these tests are about concurrency and error injection.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from service.engine import Engine, EngineConfig
from service.json_logs import JsonLogFormatter
from service.metrics import Metrics
from service.rest import create_app
from service.rest_middleware import AccessLog
from service.settings import Settings
from service.uploads import decode_image
from tests.service.rest_support import (
    LiveServer,
    SlowPipeline,
    client,
    metrics_containing,
    png,
    wait_until,
)


def make_engine(pipeline: SlowPipeline, **config: object) -> Engine:
    settings = Settings()
    engine_config = EngineConfig(**{"max_delay_ms": 0.0, "decode_workers": 2, **config})  # type: ignore[arg-type]
    return Engine(
        lambda device: pipeline,
        ["cpu"],
        engine_config,
        decoder=lambda data: decode_image(data, max_pixels=settings.max_image_pixels),
    )


def serve(
    pipeline: SlowPipeline,
    *,
    start_engine: bool = True,
    settings: Settings | None = None,
    **config: object,
) -> LiveServer:
    engine = make_engine(pipeline, **config)
    chosen = settings or Settings()
    return LiveServer(engine, lambda: [create_app(engine, chosen)], start_engine=start_engine)


IMAGE = png(32, 24)


async def post_pose(http: httpx.AsyncClient, data: bytes = IMAGE) -> httpx.Response:
    return await http.post("/v1/pose", content=data, headers={"content-type": "image/png"})


async def test_overload_gives_429_with_retry_after_and_nothing_is_lost() -> None:
    # Exact counts: the worker holds one image, the queue (max_queue_size=2) two more, so of 13
    # further requests every one is refused at once. Sent in that order, so that no timing decides.
    hold = threading.Event()
    pipeline = SlowPipeline(run_gate=hold)
    with serve(pipeline, max_batch_size=1, max_queue_size=2) as live:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=live.url, timeout=30, limits=limits) as http:

            async def one_running() -> bool:
                return pipeline.images_run == 1

            async def two_queued() -> bool:
                return live.engine.queue_depth() == 2

            tasks = [asyncio.create_task(post_pose(http))]
            await wait_until(one_running, timeout_s=10)
            tasks += [asyncio.create_task(post_pose(http)) for _ in range(2)]
            await wait_until(two_queued, timeout_s=10)
            overflow = [asyncio.create_task(post_pose(http)) for _ in range(13)]

            async def overflow_answered() -> bool:  # or one got in: fail now, not at a timeout
                return all(t.done() for t in overflow) or live.engine.queue_depth() != 2

            await wait_until(overflow_answered, timeout_s=10)
            assert live.engine.queue_depth() == 2 and pipeline.images_run == 1
            refused = [task.result() for task in overflow]
            assert not any(task.done() for task in tasks)  # still held or queued
            hold.set()
            done = await asyncio.gather(*tasks)
            metrics = await metrics_containing(
                http,
                'pose_requests_total{code="429",transport="http"} 13.0',
                'pose_requests_total{code="200",transport="http"} 3.0',
            )
    assert [a.status_code for a in refused] == [429] * 13
    assert [a.status_code for a in done] == [200] * 3
    for answer in refused:
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["error"]["code"] == "queue_full"
    # Only the accepted requests reached the pipeline, one at a time.
    assert pipeline.images_run == 3 and pipeline.batches == [1, 1, 1]
    assert "pose_queue_depth 0.0" in metrics


async def test_readiness_during_warm_up_and_drain() -> None:
    warm = threading.Event()
    hold = threading.Event()
    pipeline = SlowPipeline(warmup_gate=warm, run_gate=hold)
    with serve(pipeline, start_engine=False) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            assert (await http.get("/livez")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "starting"
            early = await post_pose(http)
            assert early.status_code == 503 and early.json()["error"]["code"] == "unavailable"
            assert (await http.get("/v1/models")).status_code == 503

            started = live.submit(live.engine.start)
            assert (await http.get("/readyz")).status_code == 503  # warming up
            warm.set()
            started.result(30)
            assert (await http.get("/readyz")).status_code == 200

            in_flight = asyncio.create_task(post_pose(http))

            async def running() -> bool:
                return pipeline.images_run == 1

            await wait_until(running)
            stopped = live.submit(lambda: live.engine.stop(grace_s=30.0))

            async def draining() -> bool:
                return (await http.get("/readyz")).json()["status"] == "draining"

            await wait_until(draining)
            refused = await post_pose(http)
            assert refused.status_code == 503
            hold.set()
            assert (await in_flight).status_code == 200  # admitted work finishes
            stopped.result(30)
            assert (await http.get("/readyz")).status_code == 503


async def test_client_disconnect_cancels_the_queued_job() -> None:
    hold = threading.Event()
    pipeline = SlowPipeline(run_gate=hold)
    with serve(pipeline, max_batch_size=1) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            first = asyncio.create_task(post_pose(http))

            async def busy() -> bool:
                return pipeline.images_run == 1

            await wait_until(busy)
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as other:
                second = asyncio.create_task(post_pose(other))

                async def queued() -> bool:
                    return live.engine.queue_depth() == 1

                await wait_until(queued)
                second.cancel()  # the client goes away: its connection closes
                with pytest.raises(asyncio.CancelledError):
                    await second

            async def dropped() -> bool:
                return live.engine.queue_depth() == 0

            await wait_until(dropped)
            hold.set()
            assert (await first).status_code == 200
            await metrics_containing(http, 'pose_requests_total{code="499",transport="http"} 1.0')
    assert pipeline.images_run == 1  # the cancelled job never reached the pipeline


def test_deadline_gives_504() -> None:
    pipeline = SlowPipeline(delay_s=1.0)
    with (
        serve(pipeline, settings=Settings(request_timeout_ms=100)) as live,
        client(live.url) as http,
    ):
        answer = http.post("/v1/pose", content=IMAGE, headers={"content-type": "image/png"})
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "deadline_exceeded"


@pytest.fixture(scope="module")
def failing() -> Iterator[LiveServer]:
    with serve(SlowPipeline(fail=True)) as live:
        yield live


def test_inference_failure_gives_a_json_500_with_the_request_id(failing: LiveServer) -> None:
    with client(failing.url) as http:
        answer = http.post(
            "/v1/pose",
            content=IMAGE,
            headers={"content-type": "image/png", "x-request-id": "abc-1"},
        )
    assert answer.status_code == 500
    assert answer.headers["x-request-id"] == "abc-1"
    error = answer.json()["error"]
    assert error["code"] == "internal" and "abc-1" in error["message"]


def test_a_non_finite_result_gives_500_never_invalid_json() -> None:
    with serve(SlowPipeline(nan=True)) as live, client(live.url) as http:
        answer = http.post("/v1/pose", content=IMAGE, headers={"content-type": "image/png"})
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal"


async def test_batch_images_are_separate_engine_jobs_that_batch_together() -> None:
    hold = threading.Event()
    pipeline = SlowPipeline(run_gate=hold)
    # A batch is due when 4 images are queued or its first image waited 1 s: the 4 images of the
    # request, once decoded, fill one batch (and the lone blocker runs after its 1 s).
    with serve(pipeline, max_batch_size=4, max_delay_ms=1000.0) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            blocker = asyncio.create_task(post_pose(http))

            async def busy() -> bool:
                return pipeline.images_run == 1

            await wait_until(busy)
            images = [png(20 + i, 16, seed=i) for i in range(4)]
            body = [{"image": base64.b64encode(image).decode()} for image in images]
            batch = asyncio.create_task(http.post("/v1/pose/batch", json=body))

            async def queued() -> bool:
                return live.engine.queue_depth() == 4

            await wait_until(queued)
            hold.set()
            answer = await batch
            assert (await blocker).status_code == 200
    assert answer.status_code == 200
    widths = [result["image"]["width"] for result in answer.json()["results"]]
    assert widths == [20, 21, 22, 23]  # in request order
    assert pipeline.batches == [1, 4]  # the four images ran as one pipeline batch


def test_batch_fails_whole_on_a_bad_image() -> None:
    pipeline = SlowPipeline()
    with serve(pipeline) as live, client(live.url) as http:
        good = base64.b64encode(IMAGE).decode()
        answer = http.post(
            "/v1/pose/batch",
            json=[{"image": good}, {"image": base64.b64encode(b"\x00\x01junk\xff").decode()}],
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "bad_image"
        too_many = http.post("/v1/pose/batch", json=[{"image": good}] * 33)
        assert too_many.status_code == 413
        assert too_many.json()["error"]["code"] == "too_many_images"


def test_metrics_registries_are_private_per_app() -> None:
    pipeline = SlowPipeline()
    engine = make_engine(pipeline)
    one, two = create_app(engine, Settings()), create_app(engine, Settings())
    assert isinstance(one.state.metrics, Metrics) and one.state.metrics is not two.state.metrics


class BrokenDescribe(SlowPipeline):
    """A pipeline whose description raises: a bug, not an ``EngineError``."""

    def describe(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug in describe")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/pose"),  # answered in front of FastAPI (DirectRoutes)
        ("GET", "/v1/models"),  # answered inside it (its router and error middleware)
    ],
)
def test_a_bug_in_a_route_gives_a_json_500_with_the_request_id(method: str, path: str) -> None:
    with serve(BrokenDescribe()) as live, client(live.url) as http:
        answer = http.request(
            method,
            path,
            content=IMAGE if method == "POST" else None,
            headers={"content-type": "image/png", "x-request-id": "bug-1"},
        )
        alive = http.get("/livez")
    assert answer.status_code == 500
    assert answer.headers["x-request-id"] == "bug-1"
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error == {"code": "internal", "message": "internal error (request id bug-1)"}
    assert alive.status_code == 200


@pytest.mark.parametrize("access_log", [True, False])
def test_the_access_log_line_can_be_turned_off(
    access_log: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``access_log`` off: no ``service.access`` line; the request id and metrics stay."""
    caplog.set_level(logging.INFO, logger="service.access")
    with (
        serve(SlowPipeline(), settings=Settings(access_log=access_log)) as live,
        client(live.url) as http,
    ):
        answer = http.post(
            "/v1/pose",
            content=IMAGE,
            headers={"content-type": "image/png", "x-request-id": "quiet-1"},
        )
        # The line is written once the answer is sent: the scrape comes after it.
        text = http.get("/metrics").text
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "quiet-1"
    assert 'pose_requests_total{code="200",transport="http"} 1.0' in text
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "quiet-1"]
    assert len(lines) == (1 if access_log else 0)


def test_access_records_are_the_records_logger_info_would_make(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``AccessLog`` builds its records from a template: each still carries its own time and
    fields, the thread that wrote it, and the logger's level still decides."""
    log = logging.getLogger("service.access.template-test")
    caplog.set_level(logging.INFO, logger=log.name)
    writer = AccessLog(log)
    t0 = time.time()
    writer.write({"status": 200, "path": "/v1/pose"})
    time.sleep(0.01)
    other = threading.Thread(target=writer.write, args=({"status": 404},), name="other-loop")
    other.start()
    other.join()
    writer.write({"status": 201})
    log.setLevel(logging.WARNING)
    writer.write({"status": 202})  # below the logger's level: no record
    first, from_other, third = [r for r in caplog.records if r.name == log.name]
    assert first.getMessage() == "request" and first.levelname == "INFO"
    assert t0 <= first.created <= third.created <= time.time()
    assert first.msecs == int((first.created - int(first.created)) * 1000)
    assert third.relativeCreated - first.relativeCreated == pytest.approx(
        (third.created - first.created) * 1000.0, abs=0.01
    )
    assert (first.status, first.path, third.status, from_other.status) == (
        200,
        "/v1/pose",
        201,
        404,
    )
    assert not hasattr(third, "path")  # one request's fields never reach the next record
    assert first.thread == third.thread == threading.get_ident()
    assert (from_other.thread, from_other.threadName) == (other.ident, "other-loop")
    line = JsonLogFormatter().format(first)
    assert '"msg":"request"' in line and '"status":200' in line and '"path":"/v1/pose"' in line
