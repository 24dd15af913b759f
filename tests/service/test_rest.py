"""The HTTP API end to end: a real uvicorn server on a localhost port, over the real engine and the
real CPU pipeline with DistilPose-S recipe weights.

One module-scoped server holds two apps over one engine: an open one (with a 1 MB body limit, so
that 413 is cheap to reach) and one with API keys. Images are small and flip test is off where it
does not matter, to keep the file quick on 2 cores.

Every test runs against both layouts of ``pose-service serve`` (issue 16): one process (the apps
over the engine itself), and front ends over an engine process (``--frontends 2``: each app over
its own engine client, the engine and its model in ``service.processes.engine_main``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from model.keypoints import COCO_KEYPOINT_NAMES, COCO_SKELETON
from service.engine import EngineConfig
from service.metrics import Metrics
from service.rest import create_app
from service.settings import Settings
from tests.service.rest_support import (
    EngineClients,
    LiveServer,
    cpu_pipeline_engine,
    finite_numbers,
    jpeg,
    png,
    promtool_check,
    split_engine,
)

KEY = "test-key-123"
BOX = [8.0, 4.0, 40.0, 40.0]
NO_FLIP = {"flip_test": "false"}


@pytest.fixture(scope="module", params=["one process", "engine process"])
def live(request: pytest.FixtureRequest, distilpose_s_checkpoint: Path) -> Iterator[LiveServer]:
    settings = Settings(max_body_bytes=1_000_000, max_boxes=4, max_images_per_request=4)
    keyed = settings.model_copy(update={"api_keys": [KEY]})
    metrics = Metrics()
    config = EngineConfig(max_batch_size=8, max_delay_ms=2.0)
    weights = str(distilpose_s_checkpoint)
    if request.param == "one process":
        engine = cpu_pipeline_engine(settings, config, weights=weights, observer=metrics)
        with LiveServer(
            engine,
            lambda: [create_app(engine, settings, metrics=metrics), create_app(engine, keyed)],
        ) as server:
            yield server
        return
    with split_engine(settings, config, weights=weights) as split:
        open_client, keyed_client = split.client(frontends=2), split.client(frontends=2)
        with LiveServer(
            EngineClients([open_client, keyed_client]),
            lambda: [
                create_app(open_client, settings, metrics=metrics),
                create_app(keyed_client, keyed),
            ],
        ) as server:
            yield server


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.urls()[0], timeout=120) as client:
        yield client


def check_result(body: dict, width: int, height: int, persons: int) -> None:
    assert body["image"] == {"width": width, "height": height}
    assert body["keypoint_names"] == list(COCO_KEYPOINT_NAMES)
    assert body["skeleton"] == [list(pair) for pair in COCO_SKELETON]
    assert body["model"]["weights_sha256"]
    assert set(body["timing_ms"]) >= {"queue", "decode", "pose", "total", "request"}
    assert len(body["persons"]) == persons
    for person in body["persons"]:
        assert len(person["bbox"]) == 4
        assert len(person["keypoints"]) == 17
        assert all(len(point) == 3 for point in person["keypoints"])
    assert finite_numbers(body)


def test_raw_body_with_query_options_and_the_pose_alias(http: httpx.Client) -> None:
    answer = http.post(
        "/pose",
        content=jpeg(64, 48),
        params={"boxes": json.dumps([BOX]), **NO_FLIP},
        headers={"content-type": "image/jpeg", "x-request-id": "req-42"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "req-42"
    body = answer.json()
    check_result(body, 64, 48, 1)
    assert body["persons"][0]["bbox"] == BOX
    assert "sigmas" not in body["persons"][0]


def test_the_three_input_forms_give_the_same_answer(http: httpx.Client) -> None:
    image = png(64, 48, seed=3)
    boxes = [BOX, [20.0, 10.0, 30.0, 36.0, 0.5]]
    raw = http.post(
        "/v1/pose",
        content=image,
        params={"boxes": json.dumps(boxes), "return_sigmas": "true", **NO_FLIP},
        headers={"content-type": "image/png"},
    )
    form = http.post(
        "/v1/pose",
        files={"image": ("a.png", image, "image/png")},
        data={"boxes": json.dumps(boxes), "return_sigmas": "true", **NO_FLIP},
    )
    as_json = http.post(
        "/v1/pose",
        json={
            "image": base64.b64encode(image).decode(),
            "boxes": boxes,
            "return_sigmas": True,
            "flip_test": False,
        },
    )
    answers = [raw, form, as_json]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    bodies = [a.json() for a in answers]
    for body in bodies:
        check_result(body, 64, 48, 2)
        # Caller boxes come back in order, with their scores (1 when not given).
        assert [p["bbox"] for p in body["persons"]] == [b[:4] for b in boxes]
        assert [p["bbox_score"] for p in body["persons"]] == [1.0, 0.5]
        assert all(len(p["sigmas"]) == 17 for p in body["persons"])
    first = np.array([p["keypoints"] for p in bodies[0]["persons"]])
    for body in bodies[1:]:
        assert np.allclose(np.array([p["keypoints"] for p in body["persons"]]), first, atol=1e-3)


def test_no_boxes_and_no_detector_is_the_whole_image(http: httpx.Client) -> None:
    answer = http.post("/v1/pose", files={"image": ("a.jpg", jpeg(50, 70), "image/jpeg")})
    assert answer.status_code == 200, answer.text
    body = answer.json()  # flip test on: the server's default
    check_result(body, 50, 70, 1)
    assert body["persons"][0]["bbox"] == [0.0, 0.0, 50.0, 70.0]


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("one pixel", lambda: png(1, 1)),
        ("extreme aspect", lambda: png(600, 2)),
        ("cmyk jpeg", lambda: encode(Image.open(io.BytesIO(png())).convert("CMYK"), "JPEG")),
        ("16-bit gray png", lambda: encode(Image.fromarray(np.full((9, 7), 40000, np.uint16)))),
        ("rgba png", lambda: encode(Image.new("RGBA", (12, 10), (5, 5, 5, 0)))),
        ("progressive jpeg", lambda: encode(Image.open(io.BytesIO(png())), "JPEG", True)),
    ],
)
def test_unusual_but_valid_images(http: httpx.Client, name: str, make: object) -> None:
    data = make()  # type: ignore[operator]
    answer = http.post("/v1/pose", content=data, params=NO_FLIP)  # no Content-Type: sniffed
    assert answer.status_code == 200, (name, answer.text)
    body = answer.json()
    assert len(body["persons"]) == 1 and finite_numbers(body)


def encode(image: Image.Image, fmt: str = "PNG", progressive: bool = False) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"progressive": True} if progressive else {}))
    return out.getvalue()


def test_curl_data_binary_without_a_content_type(http: httpx.Client) -> None:
    # curl --data-binary @photo.jpg sends application/x-www-form-urlencoded: the image is taken.
    form = {"content-type": "application/x-www-form-urlencoded"}
    answer = http.post("/pose", content=jpeg(20, 20), params=NO_FLIP, headers=form)
    assert answer.status_code == 200 and answer.json()["image"]["width"] == 20
    text = http.post("/pose", content=b"a=1&b=2", headers=form)
    assert text.status_code == 415
    assert text.json()["error"]["code"] == "unsupported_media_type"


def test_exif_orientation_reaches_the_answer(http: httpx.Client) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise: a 60x40 file is shown 40x60
    out = io.BytesIO()
    Image.open(io.BytesIO(png(60, 40))).save(out, format="JPEG", exif=exif)
    answer = http.post("/v1/pose", content=out.getvalue(), params=NO_FLIP)
    assert answer.status_code == 200
    assert answer.json()["image"] == {"width": 40, "height": 60}


def test_render_returns_the_drawn_image(http: httpx.Client) -> None:
    answer = http.post(
        "/v1/pose/render",
        content=png(80, 60),
        params={"boxes": json.dumps([BOX]), **NO_FLIP, "min_score": "-100"},
        headers={"content-type": "image/png"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    drawn = Image.open(io.BytesIO(answer.content))
    assert drawn.format == "PNG" and drawn.size == (80, 60)
    original = np.array(Image.open(io.BytesIO(png(80, 60))))
    assert (np.array(drawn.convert("RGB")) != original).any()  # something was drawn
    as_jpeg = http.post(
        "/v1/pose/render",
        json={"image": base64.b64encode(png(80, 60)).decode(), "flip_test": False},
        headers={"accept": "image/jpeg, image/png;q=0.5"},
    )
    assert as_jpeg.status_code == 200 and as_jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(as_jpeg.content)).size == (80, 60)


def test_batch_multipart_and_json_list(http: httpx.Client) -> None:
    images = [png(30, 20, seed=1), jpeg(40, 30, seed=2)]
    form = http.post(
        "/v1/pose/batch",
        files=[("image", ("a.png", images[0], "image/png")), ("image", ("b.jpg", images[1]))],
        data={"boxes": json.dumps([[BOX], None]), **NO_FLIP},
    )
    assert form.status_code == 200, form.text
    results = form.json()["results"]
    assert [r["image"]["width"] for r in results] == [30, 40]
    assert results[0]["persons"][0]["bbox"] == BOX
    assert results[1]["persons"][0]["bbox"] == [0.0, 0.0, 40.0, 30.0]
    listed = http.post(
        "/v1/pose/batch",
        json=[{"image": base64.b64encode(image).decode(), "flip_test": False} for image in images],
    )
    assert listed.status_code == 200, listed.text
    assert [r["image"]["height"] for r in listed.json()["results"]] == [20, 30]
    assert all(finite_numbers(r) for r in listed.json()["results"])


def test_models_describes_what_is_served(http: httpx.Client) -> None:
    body = http.get("/v1/models").json()
    model = body["model"]
    assert len(model["weights_sha256"]) == 64
    assert model["keypoint_names"] == list(COCO_KEYPOINT_NAMES)
    assert model["detector"] is None
    assert "distilpose_s" in json.dumps(model)
    assert body["server"]["limits"]["max_boxes"] == 4
    assert body["server"]["defaults"]["flip_test"] is True


def bomb_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


NAN_BOX = b'{"image": "%s", "boxes": [[0, 0, NaN, 10]]}'


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        (
            {"content": b"\x00\x01\x02garbage\xff", "headers": {"content-type": "image/png"}},
            400,
            "bad_image",
        ),
        ({"json": {"image": "not base64 at all!!"}}, 400, "bad_base64"),
        (
            {"content": b'{"image": "abc"', "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        ({"json": {"image": "PLACEHOLDER", "boxes": [[0, 0, 0, 10]]}}, 400, "bad_boxes"),
        ({"json": {"image": "PLACEHOLDER", "boxes": [[0, 0, 5, 5]] * 5}}, 400, "bad_boxes"),
        ({"content": NAN_BOX, "headers": {"content-type": "application/json"}}, 400, "bad_boxes"),
        ({"content": bomb_png(), "headers": {"content-type": "image/png"}}, 413, "too_many_pixels"),
        (
            {"content": b"x" * 1_000_001, "headers": {"content-type": "image/png"}},
            413,
            "body_too_large",
        ),
        (
            {"content": b"<svg/>", "headers": {"content-type": "image/svg+xml"}},
            415,
            "unsupported_media_type",
        ),
        ({"content": b"<svg xmlns='http://www.w3.org/2000/svg'/>"}, 415, "unsupported_media_type"),
        (
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"json": {"image": "PLACEHOLDER", "flip_test": "maybe"}}, 422, "invalid_request"),
        ({"json": {"image": "PLACEHOLDER", "unknown": 1}}, 422, "invalid_request"),
        # boxes are validated once, by the engine: the same 400 bad_boxes over every transport
        ({"json": {"image": "PLACEHOLDER", "boxes": [[1, 2, 3]]}}, 400, "bad_boxes"),
        ({"files": {"picture": ("a.png", b"x")}}, 422, "invalid_request"),
    ],
)
def test_errors_are_json_with_their_status(
    http: httpx.Client, request_kwargs: dict, status: int, code: str
) -> None:
    image = base64.b64encode(png(8, 8)).decode()
    if "json" in request_kwargs:
        request_kwargs = {"json": {**request_kwargs["json"]}}
        if request_kwargs["json"].get("image") == "PLACEHOLDER":
            request_kwargs["json"]["image"] = image
    if request_kwargs.get("content") is NAN_BOX:
        request_kwargs = {**request_kwargs, "content": NAN_BOX % image.encode()}
    answer = http.post("/v1/pose", **request_kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]


def test_a_streamed_body_over_the_limit_is_cut_off(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\x89PNG" + b"\x00" * 65_532  # 40 x 64 KiB, no Content-Length

    answer = http.post("/v1/pose", content=chunks(), headers={"content-type": "image/png"})
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "body_too_large"


def test_unknown_paths_and_methods_are_json_errors(http: httpx.Client) -> None:
    missing = http.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = http.get("/v1/pose")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_api_keys(live: LiveServer) -> None:
    with httpx.Client(base_url=live.urls()[1], timeout=120) as keyed:
        image = {"content": png(16, 16), "headers": {"content-type": "image/png"}}
        missing = keyed.post("/v1/pose", params=NO_FLIP, **image)  # type: ignore[arg-type]
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "unauthenticated"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = keyed.get("/v1/models", headers={"x-api-key": "nope"})
        assert wrong.status_code == 401
        bearer = keyed.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200
        headers = {"content-type": "image/png", "x-api-key": KEY}
        ok = keyed.post("/v1/pose", content=png(16, 16), params=NO_FLIP, headers=headers)
        assert ok.status_code == 200
        # The pose routes are served past FastAPI's dependencies (DirectRoutes): the same check.
        for path in ("/v1/pose", "/pose", "/v1/pose/batch"):
            for given in ({}, {"x-api-key": "nope"}, {"authorization": "Bearer nope"}):
                refused = keyed.post(path, content=b"", headers=given)
                assert refused.status_code == 401, (path, given)
                assert refused.json()["error"]["code"] == "unauthenticated"
        bearer_pose = keyed.post(
            "/v1/pose",
            content=png(16, 16),
            params=NO_FLIP,
            headers={"content-type": "image/png", "authorization": f"Bearer {KEY}"},
        )
        assert bearer_pose.status_code == 200
        for open_path in ("/livez", "/readyz", "/metrics"):
            assert keyed.get(open_path).status_code == 200


def test_request_ids_and_one_structured_log_line_per_request(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.access")
    generated = http.get("/livez").headers["x-request-id"]
    assert len(generated) == 32
    bad = http.get("/livez", headers={"x-request-id": "no spaces allowed"})
    assert bad.headers["x-request-id"] != "no spaces allowed"
    http.get("/readyz", headers={"x-request-id": "trace-7"})

    def mine() -> list[logging.LogRecord]:
        lines = [r for r in caplog.records if r.name == "service.access"]
        return [r for r in lines if getattr(r, "request_id", None) == "trace-7"]

    # The line is written once the answer is sent, so it may trail the response a little.
    for _ in range(500):
        if mine():
            break
        threading.Event().wait(0.01)
    assert len(mine()) == 1
    line = mine()[0]
    assert line.path == "/readyz" and line.status == 200  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]


def test_metrics_content_and_promtool(live: LiveServer, http: httpx.Client) -> None:
    http.post("/v1/pose", content=png(16, 16), params=NO_FLIP)
    answer = http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert 'pose_requests_total{code="200",transport="http"}' in text
    assert 'pose_request_duration_seconds_count{transport="http"}' in text
    if isinstance(live.engine, EngineClients):
        # The engine's series are in its own process's files: one /metrics with both is checked
        # on the real command (tests/service/test_frontends.py), where every process shares them.
        if shutil.which("promtool") or os.environ.get("CI") == "true":
            assert promtool_check(answer.content) == ""
        return
    assert 'pose_batch_size_count{stage="pose"}' in text
    assert 'pose_inference_seconds_count{stage="pose"}' in text
    assert "pose_queue_wait_seconds_count" in text
    assert "pose_queue_depth 0.0" in text
    assert "pose_persons_per_image_count" in text
    assert "pose_model_info{" in text and "distilpose_s" in text
    if shutil.which("promtool") or os.environ.get("CI") == "true":
        assert promtool_check(answer.content) == ""
