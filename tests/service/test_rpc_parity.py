"""gRPC answers equal HTTP answers on the real DistilPose-S pipeline (recipe weights, CPU).

One engine serves both transports, as in production: the same image and options through
``Estimate`` and through ``POST /v1/pose`` must give the same persons, to float32 precision (the
proto carries float32; the JSON carries the pipeline's float32 values as float64). Frames of a
``StreamEstimate`` stream must match their unary answers.

Each test runs against both layouts of ``pose-service serve`` (issue 16): one process (both
transports over the engine itself), and a front end over the engine process (both transports over
one engine client, the model in ``service.processes.engine_main``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model.pipeline import build_pipeline
from service.engine_api import EngineConfig
from service.engine_client import EngineClient
from service.pb.pose.v1 import pose_pb2
from service.settings import Settings
from tests.service.rest_support import SplitEngine, split_engine
from tests.service.rpc_harness import serving


@pytest.fixture(scope="module")
def pipeline(distilpose_s_checkpoint: Path) -> Any:
    """The real top-down pipeline: DistilPose-S recipe weights, no detector, CPU."""
    return build_pipeline(
        model=None,
        weights=str(distilpose_s_checkpoint),
        detector=None,
        detector_weights=None,
        device="cpu",
    )


@pytest.fixture(scope="module", params=["one process", "engine process"])
def layout(request: pytest.FixtureRequest, distilpose_s_checkpoint: Path) -> Iterator[Any]:
    """None (one process), or the engine process every test's front end connects to."""
    if request.param == "one process":
        yield None
        return
    config = EngineConfig(max_batch_size=4)
    with split_engine(Settings(), config, weights=str(distilpose_s_checkpoint)) as split:
        yield split


def front_end(layout: SplitEngine | None) -> EngineClient | None:
    """The engine the servers of one test use: an engine client in the split layout."""
    return None if layout is None else layout.client()


def photo(seed: int, width: int = 160, height: int = 120) -> bytes:
    """A smooth random picture as PNG (lossless, so both transports decode the same pixels)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def f32(value: float) -> float:
    return float(np.float32(value))


def assert_same(grpc_answer: Any, http_answer: dict[str, Any]) -> None:
    """A gRPC ``EstimateResponse`` equals an HTTP JSON answer, number by number (as float32)."""
    assert (grpc_answer.width, grpc_answer.height) == (
        http_answer["image"]["width"],
        http_answer["image"]["height"],
    )
    assert len(grpc_answer.persons) == len(http_answer["persons"]) > 0
    for got, want in zip(grpc_answer.persons, http_answer["persons"], strict=True):
        box = got.box
        assert [box.x, box.y, box.width, box.height] == [f32(v) for v in want["bbox"]]
        assert box.score == f32(want["bbox_score"])
        assert got.score == f32(want["score"])
        assert [[k.x, k.y, k.score] for k in got.keypoints] == [
            [f32(v) for v in point] for point in want["keypoints"]
        ]
        if "sigmas" in want:
            assert [[k.sigma_x, k.sigma_y] for k in got.keypoints] == [
                [f32(v) for v in sigma] for sigma in want["sigmas"]
            ]
        else:
            assert not got.keypoints[0].HasField("sigma_x")


CASES = [
    pytest.param(
        {"boxes": [[20.0, 10.0, 60.0, 100.0], [90.5, 5.25, 50.0, 80.0, 0.75]]}, id="boxes"
    ),
    pytest.param({"return_sigmas": True, "flip_test": False}, id="whole-image-sigmas-noflip"),
]


@pytest.mark.parametrize("options", CASES)
async def test_unary_equals_http(pipeline: Any, layout: Any, options: dict[str, Any]) -> None:
    image = photo(0)
    boxes = options.get("boxes")
    request = pose_pb2.EstimateRequest(image=image, frame_id="x")
    for box in boxes or ():
        message = request.boxes.add(x=box[0], y=box[1], width=box[2], height=box[3])
        if len(box) > 4:
            message.score = box[4]
    params: dict[str, str] = {}
    for name in ("return_sigmas", "flip_test"):
        if name in options:
            setattr(request, name, options[name])
            params[name] = str(options[name]).lower()
    if boxes:
        params["boxes"] = json.dumps(boxes)
    async with serving(pipeline, engine=front_end(layout), http=True) as s:
        over_grpc = await s.stub.Estimate(request, timeout=120)
        async with httpx.AsyncClient(base_url=s.http_url, timeout=120) as http:
            reply = await http.post(
                "/v1/pose",
                content=image,
                params=params,
                headers={"content-type": "image/png"},
            )
    assert reply.status_code == 200, reply.text
    assert over_grpc.frame_id == "x"
    assert_same(over_grpc, reply.json())


async def test_stream_frames_equal_their_unary_answers(pipeline: Any, layout: Any) -> None:
    images = [photo(seed) for seed in range(5)]
    requests = [
        pose_pb2.EstimateRequest(image=data, frame_id=str(i)) for i, data in enumerate(images)
    ]
    async with serving(pipeline, engine=front_end(layout), stream_window=4, max_batch_size=4) as s:
        unary = [await s.stub.Estimate(r, timeout=120) for r in requests]
        streamed = [a async for a in s.stub.StreamEstimate(iter(requests), timeout=300)]
    assert [a.frame_id for a in streamed] == [str(i) for i in range(5)]
    for one, frame in zip(unary, streamed, strict=True):
        assert not frame.HasField("error")
        # Frames may run in larger batches than the unary calls: equal up to batching round-off.
        got = [[k.x, k.y, k.score] for p in frame.persons for k in p.keypoints]
        want = [[k.x, k.y, k.score] for p in one.persons for k in p.keypoints]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


async def test_raw_pixels_equal_png(pipeline: Any, layout: Any) -> None:
    data = photo(7)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    raw = pose_pb2.RawImage(width=image.width, height=image.height, rgb=image.tobytes())
    async with serving(pipeline, engine=front_end(layout)) as s:
        encoded = await s.stub.Estimate(pose_pb2.EstimateRequest(image=data), timeout=120)
        decoded = await s.stub.Estimate(pose_pb2.EstimateRequest(raw=raw), timeout=120)
    encoded.ClearField("timing_ms")
    decoded.ClearField("timing_ms")
    assert decoded == encoded
