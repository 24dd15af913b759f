"""The built-in ``identity`` model (``model.identity``): no network, the caller's boxes come back as
persons with zero keypoints, none without boxes.

The live test goes through everything ``pose-service serve --model identity`` runs: the settings,
``choose_model``, ``build_pipeline``, the real engine, and the HTTP and gRPC servers on one loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import grpc
import httpx
import pytest
import torch

import service.__main__ as cli
from model.catalogue import CATALOGUE, exportable, names
from model.identity import IdentityPipeline, IdentityPoseModel
from model.interfaces import PipelineItem, PoseOptions
from model.pipeline import build_pipeline
from service import model_choice
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc
from service.settings import Settings
from tests.service.rest_support import png, wait_until

# (x, y, w, h[, score]) as sent, and what comes back: the box, its score (1 when not given).
BOXES = [[5.0, 6.0, 10.0, 20.0], [1.0, 2.0, 3.0, 4.0, 0.25]]
EXPECTED = [([5.0, 6.0, 10.0, 20.0], 1.0), ([1.0, 2.0, 3.0, 4.0], 0.25)]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("POSE_"):
            monkeypatch.delenv(key)


def test_the_catalogue_lists_it_as_a_pose_model_without_weights() -> None:
    spec = CATALOGUE["identity"]
    assert "identity" in names("pose") and spec.weights == "none" and not spec.weights_required
    assert "identity" not in exportable()  # nothing to export
    model = spec.build(None, "cpu")
    out = model.predict(torch.ones((3, 3, 1, 1)))  # zeros of the right shapes, if ever called
    assert out.coords.shape == (3, 17, 2) and out.scores.shape == (3, 17)
    assert not out.coords.any() and not out.scores.any()
    with pytest.raises(ValueError, match="no weights"):
        spec.build("w.pth", "cpu")


def test_build_pipeline_gives_the_identity_pipeline() -> None:
    # backend is ignored: no network to export
    pipe = build_pipeline(
        model="identity", weights=None, detector="none", detector_weights=None, backend="openvino"
    )
    assert isinstance(pipe, IdentityPipeline) and isinstance(pipe.pose_model, IdentityPoseModel)
    info = pipe.describe()
    assert (info.model, info.detector, info.weights_sha256, info.backend) == (
        "identity",
        None,
        None,
        "none",
    )
    assert info.source is not None and "no network" in info.source
    with pytest.raises(ValueError, match="no detector"):
        build_pipeline(
            model="identity", weights=None, detector="ssdlite_person", detector_weights=None
        )
    with pytest.raises(ValueError, match="no weights"):
        build_pipeline(model="identity", weights="w.pth", detector=None, detector_weights=None)


def test_the_identity_pipeline_answers_boxes_and_checks_items_as_the_real_one() -> None:
    pipe = build_pipeline(model="identity", weights=None, detector=None, detector_weights=None)
    pipe.warmup()
    image = torch.zeros((3, 30, 40), dtype=torch.uint8)
    with_sigmas = PoseOptions(return_sigmas=True)
    results, stats = pipe.run(
        [
            PipelineItem(image=image, boxes=torch.tensor(BOXES[:1])),
            PipelineItem(image=image),
            PipelineItem(image=image, boxes=torch.zeros((0, 4))),
            PipelineItem(image=image, boxes=torch.tensor([BOXES[1]]), options=with_sigmas),
        ]
    )
    assert [len(r.persons) for r in results] == [1, 0, 0, 1] == stats.persons_per_image
    assert stats.pose_crops == 2 and stats.detect_images == 0
    assert (results[1].width, results[1].height) == (40, 30)
    first, last = results[0].persons[0], results[3].persons[0]
    assert (first.bbox, first.bbox_score, first.score) == ((5.0, 6.0, 10.0, 20.0), 1.0, 0.0)
    assert first.keypoints == [(0.0, 0.0, 0.0)] * 17 and first.sigmas is None
    assert last.bbox_score == 0.25 and last.sigmas == [(0.0, 0.0)] * 17
    with pytest.raises(ValueError, match="width and height > 0"):
        pipe.run([PipelineItem(image=image, boxes=torch.tensor([[0.0, 0.0, 0.0, 5.0]]))])
    with pytest.raises(ValueError, match="uint8"):
        pipe.run([PipelineItem(image=image.float())])


def test_choose_model(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def no_cache(path: Path) -> dict[str, Path]:
        raise AssertionError("the identity model needs no cache")

    monkeypatch.setattr(model_choice, "_cached", no_cache)
    argv = ["serve", "--model", "identity"]
    settings = cli.settings_from_args(cli.build_parser().parse_args(argv))
    choice = cli.choose_model(settings)  # --detector auto: none
    assert (choice.model, choice.weights, choice.detector) == ("identity", None, None)
    assert "no network" in choice.summary
    assert cli.choose_model(Settings(model="identity", detector="none")).detector is None
    caplog.set_level(logging.WARNING, logger="service")
    assert cli.choose_model(Settings(model="identity", detector_nms_iou=0.3)).detector is None
    assert "ignoring detector_nms_iou" in caplog.text
    with pytest.raises(cli.SetupError, match="runs no detector: drop --detector ssdlite_person"):
        cli.choose_model(Settings(model="identity", detector="ssdlite_person"))
    with pytest.raises(cli.SetupError, match="has no weights"):
        cli.choose_model(Settings(model="identity", weights="w.pth"))


async def test_serve_identity_over_http_and_grpc(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``pose-service serve --model identity``: caller boxes come back, none without boxes, and
    ``GET /v1/models`` and ``GetModelInfo`` name it."""
    settings = Settings(
        model="identity",
        host="127.0.0.1",
        http_port=0,
        grpc_port=0,
        cache_dir=str(tmp_path / "no-cache"),
    )
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="service")
    task = asyncio.create_task(cli.serve(settings, stop=stop))

    def listening() -> logging.LogRecord | None:
        return next((r for r in caplog.records if r.getMessage() == "listening"), None)

    async def bound() -> bool:
        if task.done():
            raise AssertionError(f"serve ended with {task.result()}")
        return listening() is not None

    await wait_until(bound)
    record = listening()
    http_port, grpc_port = record.http_port, record.grpc_port  # type: ignore[union-attr]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pose_pb2_grpc.PoseServiceStub(channel)
    image = png(64, 48)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await wait_until(ready)
            form = {"boxes": json.dumps(BOXES), "return_sigmas": "true"}
            files = {"image": ("a.png", image, "image/png")}
            answer = await http.post("/v1/pose", files=files, data=form)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["image"]["width"], body["image"]["height"]) == (64, 48)
            got = [(p["bbox"], p["bbox_score"]) for p in body["persons"]]
            assert got == EXPECTED
            for person in body["persons"]:
                assert person["score"] == 0.0
                assert person["keypoints"] == [[0.0, 0.0, 0.0]] * 17
                assert person["sigmas"] == [[0.0, 0.0]] * 17
            bare = await http.post("/v1/pose", content=image, headers={"content-type": "image/png"})
            assert bare.status_code == 200, bare.text
            assert bare.json()["persons"] == []

            models = (await http.get("/v1/models")).json()["model"]
            assert (models["model"], models["detector"], models["backend"]) == (
                "identity",
                None,
                "none",
            )
            assert models["weights_sha256"] is None and "no network" in models["source"]

        boxes = [pose_pb2.Box(x=b[0], y=b[1], width=b[2], height=b[3]) for b in BOXES]
        boxes[1].score = BOXES[1][4]
        request = pose_pb2.EstimateRequest(image=image, boxes=boxes)
        response = await stub.Estimate(request, timeout=30)
        got = [
            ([p.box.x, p.box.y, p.box.width, p.box.height], p.box.score) for p in response.persons
        ]
        assert got == EXPECTED
        for person in response.persons:
            assert person.score == 0.0 and len(person.keypoints) == 17
            assert all((k.x, k.y, k.score) == (0.0, 0.0, 0.0) for k in person.keypoints)
        empty = await stub.Estimate(pose_pb2.EstimateRequest(image=image), timeout=30)
        assert (empty.width, empty.height, len(empty.persons)) == (64, 48, 0)
        info = await stub.GetModelInfo(pose_pb2.GetModelInfoRequest(), timeout=30)
        assert (info.model, info.detector, info.weights_sha256) == ("identity", "", "")
    finally:
        await channel.close()
        stop.set()
    assert await asyncio.wait_for(task, 60) == 0
    assert any(r.getMessage().startswith("serving identity (no network") for r in caplog.records)
