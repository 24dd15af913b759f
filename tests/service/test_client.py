"""``service.client`` (the async API and ``pose-client``) against real gRPC and HTTP servers on
localhost ports over one engine with a fake pipeline; ``service.client.media`` on made-up files."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.client import (
    Frame,
    GrpcPoseClient,
    HttpPoseClient,
    Options,
    PoseClientError,
    connect,
)
from service.client import cli as pose_client
from service.client.media import is_video, split_mjpeg, video_frames
from service.client.results import short_floats
from tests.service.rpc_harness import png_bytes, serving


def jpeg_bytes(width: int, height: int, value: int, exif_thumbnail: bool = False) -> bytes:
    """A flat JPEG; optionally with an EXIF block holding a JPEG thumbnail (its own SOI/EOI)."""
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), (value, value, value))
    if exif_thumbnail:
        thumb = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(thumb, format="JPEG")
        # A made-up APP1 carrying a whole JPEG, which a naive SOI/EOI splitter would cut at.
        exif = b"Exif\x00\x00" + thumb.getvalue()
        image.save(buffer, format="JPEG", exif=exif)
    else:
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def drop_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("timing_ms", "index")}


async def test_grpc_and_http_clients_give_the_same_results() -> None:
    boxes = [[2.0, 3.0, 10.0, 12.0], [1.0, 1.0, 4.0, 4.0, 0.5]]
    frame = Frame(image=png_bytes(32, 24, value=64), frame_id="a", boxes=boxes)
    options = Options(flip_test=False, return_sigmas=True)
    async with (
        serving(http=True) as s,
        connect(s.target) as grpc_client,
        connect(s.http_url) as http_client,
    ):
        assert isinstance(grpc_client, GrpcPoseClient)
        assert isinstance(http_client, HttpPoseClient)
        over_grpc = await grpc_client.estimate(frame, options=options, timeout_s=10)
        over_http = await http_client.estimate(frame, options=options, timeout_s=10)
        info_grpc = await grpc_client.model_info()
        info_http = await http_client.model_info()
    assert drop_timing(over_grpc) == drop_timing(over_http)
    assert over_grpc["image"] == {"width": 32, "height": 24}
    assert [p["bbox"] for p in over_grpc["persons"]] == [boxes[0], boxes[1][:4]]
    assert len(over_grpc["persons"][0]["sigmas"]) == 17
    assert set(over_grpc["timing_ms"]) >= {"queue", "decode", "detect", "pose", "total"}
    assert info_grpc["keypoint_names"] == info_http["keypoint_names"]
    assert info_grpc["skeleton"] == info_http["skeleton"]


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_stream_in_order_with_a_bad_frame(transport: str) -> None:
    frames = [Frame(image=png_bytes(10 + i, 8), frame_id=f"f{i}") for i in range(20)]
    frames[7] = Frame(image=b"\x00\x01 not an image", frame_id="f7")
    async with serving(http=True, stream_window=4) as s:
        target = s.target if transport == "grpc" else s.http_url
        async with connect(target) as client:
            results = [r async for r in client.stream(frames, window=4, timeout_s=30)]
    assert [r["frame_id"] for r in results] == [f"f{i}" for i in range(20)]
    assert [r["index"] for r in results] == list(range(20))
    assert results[7]["error"]["code"] == "bad_image"
    assert [r["image"]["width"] for r in results if "error" not in r] == [
        10 + i for i in range(20) if i != 7
    ]


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_errors_and_api_keys(transport: str) -> None:
    async with serving(http=True, api_keys=["secret"]) as s:
        target = s.target if transport == "grpc" else s.http_url
        async with connect(target) as anonymous:
            with pytest.raises(PoseClientError) as info:
                await anonymous.estimate(png_bytes(8, 8))
        assert info.value.code == "unauthenticated"
        async with connect(target, api_key="secret") as client:
            with pytest.raises(PoseClientError) as info:
                await client.estimate(b"\x00\x01 not an image")
            assert info.value.code == "bad_image"
            assert info.value.status in ("INVALID_ARGUMENT", 400)
            result = await client.estimate(png_bytes(8, 8))
    assert len(result["persons"]) == 1


async def test_raw_frames_over_grpc() -> None:
    frame = Frame(raw=bytes([50, 50, 50]) * 12, width=4, height=3, frame_id="raw")
    async with serving() as s, connect(s.target) as client:
        result = await client.estimate(frame)
    assert result["image"] == {"width": 4, "height": 3}
    assert result["persons"][0]["keypoints"][0][1] == pytest.approx(50.0)


def test_short_floats() -> None:
    tenth = float(np.float32(0.1))  # what a float32 field holds: 0.10000000149011612
    assert short_floats({"a": [tenth, 2.5, "x", 3]}) == {"a": [0.1, 2.5, "x", 3]}


def test_split_mjpeg_walks_markers(tmp_path: Path) -> None:
    frames = [jpeg_bytes(16, 12, 10 * i, exif_thumbnail=i == 1) for i in range(4)]
    data = b"".join(frames)
    assert list(split_mjpeg(data)) == frames
    assert list(split_mjpeg(data + frames[0][:50])) == frames  # a cut last frame is dropped
    path = tmp_path / "clip.mjpeg"
    path.write_bytes(data)
    assert is_video(path)
    got = list(video_frames(path))
    assert [f.frame_id for f in got] == [f"clip.mjpeg#{i:06d}" for i in range(4)]
    assert got[2].image == frames[2]


def test_animated_gif_frames(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    images = [Image.new("RGB", (12, 10), (40 * i, 0, 0)) for i in range(3)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40)
    still = tmp_path / "still.gif"
    images[0].save(still)
    assert is_video(path) and not is_video(still)
    raw = list(video_frames(path, "raw"))
    assert [(f.width, f.height, len(f.raw or b"")) for f in raw] == [(12, 10, 360)] * 3
    assert all(f.image and f.image.startswith(b"\xff\xd8") for f in video_frames(path))


def test_mp4_frames_with_pyav(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
        for i in range(4):
            picture = np.full((24, 32, 3), 40 * i, dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    assert is_video(path)
    frames = list(video_frames(path))
    assert [f.frame_id for f in frames] == [f"clip.mp4#{i:06d}" for i in range(4)]
    assert Image.open(io.BytesIO(frames[3].image or b"")).size == (32, 24)


def test_video_container_without_pyav_explains(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(RuntimeError, match="PyAV"):
        next(video_frames(path))


async def run_cli(*argv: str) -> int:
    """``pose-client`` in this event loop (the servers run on it too)."""
    return await pose_client._main(pose_client._parser().parse_args(list(argv)))


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_cli_image_folder_video_and_render(transport: str, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:02d}.png").write_bytes(png_bytes(20 + i, 16))
    (folder / "notes.txt").write_text("ignored")
    video = tmp_path / "clip.mjpeg"
    video.write_bytes(b"".join(jpeg_bytes(24, 16, 30 * i) for i in range(5)))
    out = tmp_path / "out.jsonl"
    rendered = tmp_path / "rendered"
    async with serving(http=True) as s:
        target = s.target if transport == "grpc" else s.http_url
        code = await run_cli(
            str(folder / "01.png"),
            str(folder),
            str(video),
            "--target",
            target,
            "--output",
            str(out),
            "--render",
            str(rendered),
            "--boxes",
            "[[1, 1, 8, 8]]",
        )
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["source"], line["frame_id"]) for line in lines] == [
        (str(folder / "01.png"), "01.png"),
        *[(str(folder / f"{i:02d}.png"), f"{i:02d}.png") for i in range(3)],  # per-file source
        *[(str(video), f"clip.mjpeg#{i:06d}") for i in range(5)],
    ]
    assert lines[0]["persons"][0]["bbox"] == [1, 1, 8, 8]  # --boxes for a single image
    assert lines[1]["persons"][0]["bbox"] == [0, 0, 20, 16]  # whole image for the folder
    assert len(list(rendered.glob("*.jpg"))) == 8  # 01.png is drawn once, from the folder


async def test_cli_reports_failed_frames(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x00\x01 not a png")
    out = tmp_path / "out.jsonl"
    async with serving() as s:
        code = await run_cli(str(bad), "--target", s.target, "--output", str(out))
    assert code == 1
    assert json.loads(out.read_text())["error"]["code"] == "bad_image"


async def test_cli_console_script_info() -> None:
    async with serving() as s:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.client",
            "--info",
            "--target",
            s.target,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    info = json.loads(stdout)
    assert info["model"] == "fake" and info["stream_window"] == 8


def test_cli_needs_an_input(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        pose_client.main([])
    assert "give an image" in capsys.readouterr().err


async def test_unreachable_server_is_an_error() -> None:
    async with connect("127.0.0.1:1") as client:
        with pytest.raises(PoseClientError) as info:
            await client.estimate(png_bytes(8, 8), timeout_s=5)
    assert info.value.status == "UNAVAILABLE"
