"""``POST /v1/pose/video`` against a real localhost server over a fake pipeline: every container,
tracking options, the limits (from the header, and as passed), errors, and a client going away.

The clips are made at test time from the committed COCO photo (a crop window panning over it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service import rest_video
from tests.service.rpc_harness import FakePipeline, serving

av = pytest.importorskip("av")

PHOTO = Path(__file__).resolve().parents[1] / "assets" / "000000000785.jpg"
FRAMES = 8
# container format, codec, pixel format, Content-Type
KINDS = {
    "mp4": ("mp4", "h264", "yuv420p", "video/mp4"),
    "webm": ("webm", "libvpx", "yuv420p", "video/webm"),
    "mjpeg": ("mjpeg", "mjpeg", "yuvj420p", "video/x-motion-jpeg"),
    "gif": ("gif", "gif", "rgb8", "image/gif"),
}


def make_clip(
    path: Path, kind: str, frames: int = FRAMES, size: tuple[int, int] = (160, 96)
) -> bytes:
    """A ``frames``-frame pan over the COCO photo at 10 frames/s."""
    fmt, codec, pix_fmt, _ = KINDS[kind]
    photo = Image.open(PHOTO).convert("RGB")
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        for t in range(frames):
            crop = photo.resize(size, box=(200 + 8 * (t % 10), 40, 520 + 8 * (t % 10), 232))
            frame = av.VideoFrame.from_ndarray(np.asarray(crop), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path.read_bytes()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("clips")
    return {kind: make_clip(folder / f"clip.{kind}", kind) for kind in KINDS}


def lines_of(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]


async def post(url: str, body: bytes, ctype: str, query: str = "") -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{url}/v1/pose/video{query}", content=body, headers={"content-type": ctype}
        )


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_every_container_gives_one_line_per_frame_in_order(
    clips: dict[str, bytes], kind: str
) -> None:
    async with serving(http=True) as s:
        response = await post(s.http_url, clips[kind], KINDS[kind][3], "?track=true")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = lines_of(response)
    assert [line["index"] for line in lines] == list(range(FRAMES))
    assert all(line["image"] == {"width": 160, "height": 96} for line in lines)
    stamps = [line["timestamp_ms"] for line in lines]
    # Raw MJPEG carries no frame rate: FFmpeg's demuxer assumes 25 frames/s.
    step = 40 if kind == "mjpeg" else 100
    assert stamps == pytest.approx([step * t for t in range(FRAMES)], abs=1)
    # The fake pipeline has no detector: one whole-image person, the same track throughout.
    assert all([p["track_id"] for p in line["persons"]] == [1] for line in lines)
    assert not any(line["detector_ran"] for line in lines)


async def test_without_track_the_lines_carry_no_ids_and_options_apply(
    clips: dict[str, bytes],
) -> None:
    async with serving(http=True) as s:
        response = await post(s.http_url, clips["mp4"], "video/mp4", "?flip_test=false")
    lines = lines_of(response)
    assert len(lines) == FRAMES
    for line in lines:
        assert "detector_ran" not in line and "track_id" not in line["persons"][0]
        assert line["persons"][0]["score"] == 0.5  # the fake's mark of flip_test off


async def test_a_header_over_the_limits_is_refused_before_any_frame_runs(
    clips: dict[str, bytes],
) -> None:
    pipeline = FakePipeline()
    async with serving(pipeline, http=True, max_video_frames=5) as s:
        response = await post(s.http_url, clips["mp4"], "video/mp4")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "video_too_long"
    async with serving(pipeline, http=True, max_video_seconds=0.5) as s:
        response = await post(s.http_url, clips["webm"], "video/webm")
    assert response.status_code == 413 and "0.5 s" in response.json()["error"]["message"]
    async with serving(pipeline, http=True, max_image_pixels=1000) as s:
        response = await post(s.http_url, clips["mp4"], "video/mp4")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_pixels"
    assert pipeline.images_run == 0


async def test_a_headerless_video_is_stopped_as_soon_as_it_passes_the_limit(
    clips: dict[str, bytes],
) -> None:
    async with serving(http=True, max_video_frames=5) as s:
        response = await post(s.http_url, clips["mjpeg"], "video/x-motion-jpeg")
    assert response.status_code == 200
    lines = lines_of(response)
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4, 5]
    assert lines[-1]["error"]["code"] == "video_too_long" and "persons" not in lines[-1]


async def test_bad_bodies_are_refused_with_their_codes(
    clips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(http=True) as s:
        garbage = await post(s.http_url, b"not a video" * 100, "video/mp4")
        wrong_type = await post(s.http_url, clips["mp4"], "text/plain")
        bad_option = await post(s.http_url, clips["mp4"], "video/mp4", "?detect_every=5000")
        empty = await post(s.http_url, b"", "video/mp4")
        monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
        no_pyav = await post(s.http_url, clips["mp4"], "video/mp4")
    assert (garbage.status_code, garbage.json()["error"]["code"]) == (400, "bad_image")
    assert (wrong_type.status_code, wrong_type.json()["error"]["code"]) == (
        415,
        "unsupported_media_type",
    )
    assert bad_option.status_code == 422
    assert empty.status_code == 400
    assert no_pyav.status_code == 415 and "PyAV" in no_pyav.json()["error"]["message"]


async def test_a_client_that_goes_away_stops_the_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = make_clip(tmp_path / "long.mjpeg", "mjpeg", frames=300, size=(64, 48))
    decoded: list[int] = []
    closed = asyncio.Event()
    real_next, real_close = rest_video._Video.next, rest_video._Video.close
    loop = asyncio.get_running_loop()

    def counting_next(self: Any) -> Any:
        decoded.append(1)
        return real_next(self)

    def signalling_close(self: Any) -> None:
        real_close(self)
        loop.call_soon_threadsafe(closed.set)

    monkeypatch.setattr(rest_video._Video, "next", counting_next)
    monkeypatch.setattr(rest_video._Video, "close", signalling_close)
    async with serving(http=True, stream_window=2) as s, httpx.AsyncClient(timeout=30) as client:
        request = client.build_request(
            "POST",
            f"{s.http_url}/v1/pose/video",
            content=body,
            headers={"content-type": "video/x-motion-jpeg"},
        )
        response = await client.send(request, stream=True)
        async for _ in response.aiter_lines():
            break  # one line, then hang up
        await response.aclose()
        await asyncio.wait_for(closed.wait(), 10)
    assert len(decoded) < 300
