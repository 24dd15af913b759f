"""The one validation pass (``service.validation``, run by the engine), unit by unit and through
both transports: the same request gets the same refusal over HTTP and gRPC, and refused work never
reaches the pipeline."""

from __future__ import annotations

import base64

import grpc
import httpx
import numpy as np
import pytest
import torch

from model.interfaces import PoseOptions
from service.errors import STATUS_OF_CODE, InvalidRequestError
from service.pb.pose.v1 import pose_pb2
from service.validation import (
    RequestLimits,
    check_boxes_in_image,
    check_options,
    parse_boxes,
)
from tests.service.rpc_harness import FakePipeline, png_bytes, serving

LIMITS = RequestLimits(max_boxes=10, min_box_size_px=2.0)


def test_parse_boxes_accepts_four_or_five_values() -> None:
    boxes = parse_boxes([[1, 2, 3, 4], [5.5, 6, 7, 8, 0.25]], LIMITS)
    assert boxes.dtype == torch.float32 and boxes.shape == (2, 5)
    assert boxes.tolist() == [[1, 2, 3, 4, 1.0], [5.5, 6, 7, 8, 0.25]]
    assert parse_boxes([], LIMITS).shape == (0, 5)
    assert parse_boxes(torch.tensor([[0.0, 0, 10, 10]]), LIMITS).tolist() == [[0, 0, 10, 10, 1]]
    assert parse_boxes(np.array([[0, 0, 10, 10, 0.5]]), LIMITS).tolist() == [[0, 0, 10, 10, 0.5]]
    assert parse_boxes([[0, 0, 2, 2, 0], [0, 0, 2, 2, 1]], LIMITS).shape == (2, 5)  # bounds


@pytest.mark.parametrize(
    "boxes",
    [
        [[0, 0, float("nan"), 10]],
        [[0, 0, 10, float("inf")]],
        [[0, 0, 10, 10, float("-inf")]],
        [[0, 0, 0, 10]],
        [[0, 0, 10, -1]],
        [[0, 0, 5e-324, 10]],
        [[0, 0, 1e-30, 1e-30]],  # below the minimum size
        [[0, 0, 1.99, 10]],
        [[0, 0, 10]],
        [[0, 0, 10, 10, 1, 2]],
        [[0, 0, "10", 10]],  # strings are not numbers, on every transport
        [[0, 0, True, 10]],
        [[0, 0, 1e30, 10]],
        [[0, 0, 10**400, 10]],  # too large for a float: refused, not an OverflowError
        [[0, 0, 10, 10, -5]],  # score outside [0, 1]
        [[0, 0, 10, 10, 1e7]],
        [[0, 0, 10, 10, 1.0001]],
        "0,0,10,10",
        [5],
        [[1, 1, 3, 3]] * 11,  # over max_boxes
        torch.zeros((2, 3)),
        torch.zeros((2, 4, 1)),
    ],
)
def test_parse_boxes_refuses_bad_boxes(boxes: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_boxes(boxes, LIMITS)
    assert info.value.code == "bad_boxes" and info.value.status.http == 400
    assert len(info.value.message) < 200  # bounded, whatever was sent


@pytest.mark.parametrize(
    ("box", "inside"),
    [
        ([-5, -5, 10, 10], True),  # overlaps the top-left corner
        ([19, 19, 10, 10], True),  # overlaps the bottom-right corner
        ([0, 0, 20, 20], True),
        ([20, 0, 10, 10], False),  # right of the image (x >= W)
        ([-10, 0, 10, 10], False),  # left of it (x + w <= 0)
        ([0, 20, 10, 10], False),  # below it (y >= H)
        ([0, -10, 10, 10], False),  # above it (y + h <= 0)
        ([0, 25, 10, 10], False),
    ],
)
def test_boxes_must_overlap_the_image(box: list[float], inside: bool) -> None:
    boxes = parse_boxes([box], LIMITS)
    if inside:
        check_boxes_in_image(boxes, 20, 20)
    else:
        with pytest.raises(InvalidRequestError, match="outside the 20x20 image"):
            check_boxes_in_image(boxes, 20, 20)


def test_options_are_typed() -> None:
    check_options(PoseOptions())
    with pytest.raises(InvalidRequestError, match="precision"):
        check_options(PoseOptions(precision="fp8"))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="flip_test"):
        check_options(PoseOptions(flip_test="yes"))  # type: ignore[arg-type]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        RequestLimits(min_box_size_px=0)
    with pytest.raises(ValueError):
        RequestLimits(max_boxes=-1)


def test_every_code_has_both_statuses() -> None:
    for code, status in STATUS_OF_CODE.items():
        assert 400 <= status.http < 600, code
        assert status.grpc in grpc.StatusCode.__members__, code


# Through both transports, on a 64x48 image. Each refused request must never reach the pipeline.
BAD_BOXES = [
    pytest.param([[70, 0, 10, 10]], id="right-of-image"),
    pytest.param([[0, 50, 10, 10]], id="below-image"),
    pytest.param([[0, -30, 10, 10]], id="above-image"),
    pytest.param([[0, 0, 1e-30, 1e-30]], id="tiny"),
    pytest.param([[0, 0, 10, 10, -5]], id="score-negative"),
    pytest.param([[0, 0, 10, 10, 1e7]], id="score-huge"),
]


@pytest.mark.parametrize("boxes", BAD_BOXES)
async def test_bad_boxes_are_refused_alike_by_http_and_grpc(boxes: list[list[float]]) -> None:
    pipeline = FakePipeline()
    image = png_bytes(64, 48)
    async with serving(pipeline, http=True) as s:
        async with httpx.AsyncClient(base_url=s.http_url) as http:
            answer = await http.post(
                "/v1/pose",
                json={"image": base64.b64encode(image).decode(), "boxes": boxes},
            )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            request = pose_pb2.EstimateRequest(
                image=image,
                boxes=[
                    pose_pb2.Box(
                        x=b[0],
                        y=b[1],
                        width=b[2],
                        height=b[3],
                        **({"score": b[4]} if b[4:] else {}),
                    )
                    for b in boxes
                ],
            )
            await s.stub.Estimate(request, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "bad_boxes"
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("bad_boxes")
    assert dict(info.value.trailing_metadata() or ())["error-code"] == "bad_boxes"
    assert pipeline.images_run == 0


async def test_strings_and_unknown_enums_are_refused_on_both_transports() -> None:
    pipeline = FakePipeline()
    image = png_bytes(64, 48)
    encoded = base64.b64encode(image).decode()
    async with serving(pipeline, http=True) as s:
        async with httpx.AsyncClient(base_url=s.http_url) as http:
            strings = await http.post(
                "/v1/pose", json={"image": encoded, "boxes": [["1", 2, 9, 9]]}
            )
            multipart = await http.post(
                "/v1/pose", files={"image": ("a.png", image)}, data={"boxes": '[["1", 2, 9, 9]]'}
            )
            query = await http.post(
                "/v1/pose", content=image, params={"boxes": "[[1, 2, 10" + "0" * 400 + ", 9]]"}
            )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.stub.Estimate(pose_pb2.EstimateRequest(image=image, precision=99), timeout=10)
    for answer in (strings, multipart, query):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "bad_boxes"
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("bad_options")
    assert pipeline.images_run == 0


async def test_good_boxes_at_the_edges_are_served() -> None:
    pipeline = FakePipeline()
    async with serving(pipeline, http=True) as s, httpx.AsyncClient(base_url=s.http_url) as http:
        answer = await http.post(
            "/v1/pose",
            json={
                "image": base64.b64encode(png_bytes(64, 48)).decode(),
                "boxes": [[-5, -5, 10, 10], [60, 44, 20, 20, 0.0], [0, 0, 2, 2, 1]],
            },
        )
    assert answer.status_code == 200, answer.text
    assert [p["bbox"] for p in answer.json()["persons"]] == [
        [-5, -5, 10, 10],
        [60, 44, 20, 20],
        [0, 0, 2, 2],
    ]


async def test_lean_answers_leave_the_model_out() -> None:
    image = png_bytes(64, 48)
    async with (
        serving(FakePipeline(), http=True) as s,
        httpx.AsyncClient(base_url=s.http_url) as http,
    ):
        full = (await http.post("/v1/pose", content=image)).json()
        lean = (await http.post("/v1/pose", content=image, params={"model_info": "false"})).json()
        batch = await http.post(
            "/v1/pose/batch", files=[("image", ("a.png", image))], params={"model_info": "false"}
        )
    assert {"keypoint_names", "skeleton", "model"} <= set(full)
    assert not {"keypoint_names", "skeleton", "model"} & set(lean)
    assert lean["persons"] == full["persons"] and lean["image"] == full["image"]
    assert "model" not in batch.json()["results"][0]
