"""``pose-client`` for real use, against real gRPC and HTTP servers over a fake pipeline: every
failure one stderr line and a non-zero status, folders (per-file source, ``--recursive``, what was
skipped), render names, ``--min-score``, the same fields over both transports, the API key's
environment variables, the progress bar, and ``--format coco`` scored by pycocotools."""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from model.interfaces import ImageResult, Person, PipelineItem
from service.client import cli, connect
from service.client.progress import Progress
from service.client.results import (
    COCO_KEYPOINT_NAMES,
    apply_min_score,
    coco_image_id,
    coco_order,
)
from service.settings import UnknownSettingError
from tests.service.rpc_harness import FakePipeline, png_bytes, serving, settings_for
from tests.service.test_client import jpeg_bytes

ASSETS = Path(__file__).resolve().parents[1] / "assets"
COCO_IMAGE = ASSETS / "000000000785.jpg"
COCO_ANNOTATIONS = ASSETS / "coco_000000000785.json"

TRANSPORTS = ["grpc", "http"]


async def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``pose-client`` in this event loop (the servers run on it too): status, stdout, stderr."""
    args = cli._parser(json_errors="--json" in argv).parse_args(list(argv))
    code = await cli._main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single stderr line of a failed run (no traceback, nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def target_of(served: Any, transport: str) -> str:
    return served.target if transport == "grpc" else served.http_url


def make_folder(root: Path) -> Path:
    """photos/{a.png, b.jpg, notes.txt, .hidden.png, broken.png -> nowhere, sub/c.png}."""
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(20, 16))
    (folder / "b.jpg").write_bytes(jpeg_bytes(22, 16, 90))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(png_bytes(8, 8))
    (folder / "broken.png").symlink_to(root / "missing.png")  # listed, then unreadable
    (folder / "sub" / "c.png").write_bytes(png_bytes(24, 16))
    return folder


# --------------------------------------------------------------------------------------------------
# Every failure is one line
# --------------------------------------------------------------------------------------------------


async def test_missing_file_is_one_line(capsys: Any, tmp_path: Path) -> None:
    code, out, err = await run_cli(capsys, str(tmp_path / "nope.jpg"), "--target", "127.0.0.1:1")
    assert code == 2 and out == ""
    assert (
        one_error_line(err)
        == f"pose-client: error: {tmp_path / 'nope.jpg'}: no such file or folder"
    )


async def test_unwritable_output_is_one_line(capsys: Any, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(8, 8))
    output = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    code, _, err = await run_cli(capsys, str(image), "-o", str(output), "--target", "127.0.0.1:1")
    assert code == 2
    assert one_error_line(err) == f"pose-client: error: {output}: No such file or directory"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_server_down_is_one_line(capsys: Any, tmp_path: Path, transport: str) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(8, 8))
    target = "127.0.0.1:1" if transport == "grpc" else "http://127.0.0.1:1"
    code, _, err = await run_cli(capsys, str(image), "--target", target, "--timeout", "5")
    assert code == 2
    assert one_error_line(err).startswith(f"pose-client: error: {target}: unavailable: ")


async def test_server_down_as_json(capsys: Any, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(8, 8))
    code, _, err = await run_cli(capsys, str(image), "--target", "http://127.0.0.1:1", "--json")
    assert code == 2
    assert json.loads(one_error_line(err))["error"]["code"] == "unavailable"


@pytest.mark.parametrize(
    ("boxes", "says"),
    [
        ("garbage", "not JSON"),
        ('{"x": 1}', "not a list of boxes"),
        ("[[1, 2, 3]]", "box 0 is [1, 2, 3], not 4 or 5 finite numbers"),
        ("[[1, 2, 3, NaN]]", "box 0 is [1, 2, 3, NaN]"),
        ('[[1, 2, 3, 4], [1, 2, "w", 4]]', "box 1 is"),
    ],
)
def test_bad_boxes_say_what_is_wrong(capsys: Any, boxes: str, says: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["photo.jpg", "--boxes", boxes])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("pose-client: error: argument --boxes: ")
    assert says in line and "expected [[x, y, w, h(, score)], ...]" in line


def test_usage_errors_as_json(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        cli.main(["photo.jpg", "--boxes", "garbage", "--json"])
    error = json.loads(one_error_line(capsys.readouterr().err))["error"]
    assert error["code"] == "usage" and "[[x, y, w, h(, score)], ...]" in error["message"]


def mp4_bytes(tmp_path: Path) -> bytes:
    av = pytest.importorskip("av")
    path = tmp_path / "whole.mp4"
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
        for i in range(6):
            picture = np.full((24, 32, 3), 30 * i, dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["truncated_mp4", "garbage_avi", "garbage_mjpeg"])
async def test_corrupt_video_is_one_line(capsys: Any, tmp_path: Path, kind: str) -> None:
    if kind == "truncated_mp4":
        path = tmp_path / "clip.mp4"
        path.write_bytes(mp4_bytes(tmp_path)[:300])
        says = "cannot decode the video"
    elif kind == "garbage_avi":
        pytest.importorskip("av")
        path = tmp_path / "clip.avi"
        path.write_bytes(b"RIFF\x00\x00garbage" * 20)
        says = "cannot decode the video"
    else:
        path = tmp_path / "clip.mjpeg"
        path.write_bytes(b"\x00" * 100 + jpeg_bytes(8, 8, 10)[:40])
        says = "no whole JPEG frame"
    async with serving() as s:
        code, _, err = await run_cli(capsys, str(path), "--target", s.target)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"pose-client: error: {path}: ") and says in line, line


async def test_cut_gif_is_sent_and_refused_by_the_server(capsys: Any, tmp_path: Path) -> None:
    """A GIF too broken to count its frames goes as one image: the server says why, in one line."""
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (12, 10), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40)
    path.write_bytes(path.read_bytes()[:60])
    async with serving() as s:
        code, out, err = await run_cli(capsys, str(path), "--target", s.target)
    assert code == 1
    assert json.loads(out)["error"]["code"] == "bad_image"
    (failure,) = [line for line in err.splitlines() if "failed:" in line]
    assert failure.startswith(f"pose-client: failed: {path}: bad_image: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refused_key_is_one_line(capsys: Any, tmp_path: Path, transport: str) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(8, 8))
    async with serving(http=True, api_keys=["secret"]) as s:
        target = target_of(s, transport)
        code, out, err = await run_cli(capsys, str(image), "--target", target, "--api-key", "bad")
    assert code == 2 and out == ""
    assert one_error_line(err).startswith(f"pose-client: error: {target}: unauthenticated: ")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_server_not_ready_is_one_line(capsys: Any, tmp_path: Path, transport: str) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(8, 8))
    async with serving(http=True, start_engine=False) as s:
        code, _, err = await run_cli(capsys, str(image), "--target", target_of(s, transport))
    assert code == 2
    assert one_error_line(err).startswith("pose-client: error: ")


async def test_http_not_found_is_one_line(capsys: Any, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(8, 8))
    async with serving(http=True) as s:
        target = s.http_url + "/not/here"
        code, _, err = await run_cli(capsys, str(image), "--target", target)
    assert code == 2
    assert "404" in one_error_line(err) or "not_found" in err


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_server_error_on_one_image(capsys: Any, tmp_path: Path, transport: str) -> None:
    """A 500 (gRPC INTERNAL) on one image: its line holds the error, stderr names it, status 1."""
    (tmp_path / "ok.png").write_bytes(png_bytes(20, 16))
    (tmp_path / "fails.png").write_bytes(png_bytes(13, 16))
    async with serving(FakePipeline(fail_on_width=13), http=True) as s:
        # One at a time: a failing batch fails all of its images.
        argv = [str(tmp_path), "--target", target_of(s, transport), "--concurrency", "1"]
        code, out, err = await run_cli(capsys, *argv)
    assert code == 1
    lines = {json.loads(line)["frame_id"]: json.loads(line) for line in out.splitlines()}
    assert lines["fails.png"]["error"]["code"] == "internal" and "persons" in lines["ok.png"]
    (failure,) = [line for line in err.splitlines() if "failed:" in line]
    assert failure.startswith(f"pose-client: failed: {tmp_path / 'fails.png'}: internal: ")
    assert "Traceback" not in err


async def test_raw_frames_over_http_is_a_usage_error(capsys: Any, tmp_path: Path) -> None:
    path = tmp_path / "clip.mjpeg"
    path.write_bytes(jpeg_bytes(8, 8, 10))
    code, _, err = await run_cli(
        capsys, str(path), "--target", "http://127.0.0.1:1", "--frame-format", "raw"
    )
    assert code == 2 and "only gRPC" in one_error_line(err)


# --------------------------------------------------------------------------------------------------
# Folders, render names, fields, --min-score
# --------------------------------------------------------------------------------------------------


async def test_folder_sources_skips_and_recursion(capsys: Any, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    async with serving() as s:
        code, out, err = await run_cli(capsys, str(folder), "--target", s.target)
        flat = [json.loads(line) for line in out.splitlines()]
        assert code == 0
        assert [(r["source"], r["frame_id"], r["index"]) for r in flat] == [
            (str(folder / "a.png"), "a.png", 0),
            (str(folder / "b.jpg"), "b.jpg", 1),
        ]
        summary = err.splitlines()[-1]
        assert summary.startswith("pose-client: skipped 3: ")
        assert f"1 not an image ({folder / 'notes.txt'})" in summary
        assert f"1 subfolder ({folder / 'sub'}; --recursive walks them)" in summary
        assert f"1 unreadable ({folder / 'broken.png'}: No such file or directory)" in summary
        assert "hidden" not in err

        code, out, err = await run_cli(capsys, str(folder), "-r", "--target", s.target, "--json")
    deep = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(r["source"], r["frame_id"]) for r in deep] == [
        (str(folder / "a.png"), "a.png"),
        (str(folder / "b.jpg"), "b.jpg"),
        (str(folder / "sub" / "c.png"), "sub/c.png"),
    ]
    summary = json.loads(err.splitlines()[-1])["summary"]
    assert summary["results"] == 3 and summary["failed"] == 0
    assert sorted(entry["reason"] for entry in summary["skipped"]) == [
        "not an image",
        "unreadable",
    ]


async def test_render_names(capsys: Any, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "a.jpg").write_bytes(jpeg_bytes(20, 16, 40))  # a.png's drawing is a.jpg too
    video = tmp_path / "clip.mjpeg"
    video.write_bytes(b"".join(jpeg_bytes(24, 16, 30 * i) for i in range(3)))
    single = tmp_path / "photo.jpg"
    single.write_bytes(jpeg_bytes(30, 20, 70))
    rendered = tmp_path / "rendered"
    async with serving(http=True) as s:
        code, _, _ = await run_cli(
            capsys, str(folder), str(video), str(single), "-r", "--render", str(rendered),
            "--target", s.http_url,
        )  # fmt: skip
    assert code == 0
    names = sorted(p.relative_to(rendered).as_posix() for p in rendered.rglob("*.jpg"))
    assert names == [
        "a.jpg",
        "a_2.jpg",
        "b.jpg",
        "clip_000000.jpg",
        "clip_000001.jpg",
        "clip_000002.jpg",
        "photo.jpg",
        "sub/c.jpg",
    ]
    drawn = Image.open(rendered / "photo.jpg")
    assert drawn.size == (30, 20) and drawn.format == "JPEG"


async def test_render_draws_the_skeleton(capsys: Any, tmp_path: Path) -> None:
    image = tmp_path / "grey.png"
    image.write_bytes(png_bytes(64, 48, value=0))
    rendered = tmp_path / "out"
    async with serving() as s:
        boxes = "[[4, 4, 40, 30]]"
        code, _, _ = await run_cli(
            capsys, str(image), "--target", s.target, "--render", str(rendered), "--boxes", boxes
        )
    assert code == 0
    pixels = np.asarray(Image.open(rendered / "grey.jpg"))
    assert pixels.max() > 100  # boxes and keypoints drawn on the black image


async def test_same_fields_over_both_transports(capsys: Any, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    video = tmp_path / "clip.mjpeg"
    video.write_bytes(b"".join(jpeg_bytes(24, 16, 30 * i) for i in range(3)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x00 not a png")
    lines = {}
    async with serving(http=True) as s:
        for transport in TRANSPORTS:
            argv = [
                str(folder),
                str(video),
                str(bad),
                "--sigmas",
                "--target",
                target_of(s, transport),
            ]
            code, out, _ = await run_cli(capsys, *argv)
            assert code == 1  # bad.png
            lines[transport] = [json.loads(line) for line in out.splitlines()]

    def comparable(line: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in line.items() if k != "timing_ms"}

    assert [comparable(r) for r in lines["grpc"]] == [comparable(r) for r in lines["http"]]
    assert [r["index"] for r in lines["http"]] == [0, 1, 0, 1, 2, 0]
    assert list(lines["http"][0]) == list(lines["grpc"][0])
    assert list(lines["http"][0])[:3] == ["source", "frame_id", "index"]
    assert lines["http"][-1]["error"]["code"] == "bad_image"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_min_score_trims_the_output(capsys: Any, tmp_path: Path, transport: str) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(20, 16))
    # Fake scores: person = box score / 2 (no flip), keypoint k = k / 8.
    boxes = "[[1, 1, 8, 8, 0.2], [2, 2, 8, 8, 1.0]]"
    async with serving(http=True) as s:
        argv = [str(image), "--target", target_of(s, transport), "--boxes", boxes, "--no-flip"]
        code, out, _ = await run_cli(capsys, *argv, "--sigmas", "--min-score", "0.5")
        _, everything, _ = await run_cli(capsys, *argv)
    assert code == 0
    (person,) = json.loads(out)["persons"]  # the 0.1 person is gone
    assert person["bbox"] == [2, 2, 8, 8] and person["score"] == 0.5
    assert person["keypoints"][:4] == [None] * 4 and person["sigmas"][:4] == [None] * 4
    assert person["keypoints"][4] == [6.0, person["keypoints"][4][1], 0.5]
    assert len(json.loads(everything)["persons"]) == 2  # no --min-score: nothing left out


def test_apply_min_score_keeps_failed_results() -> None:
    failed = {"frame_id": "x", "error": {"code": "bad_image", "message": "no"}}
    assert apply_min_score(failed, 0.5) == failed


# --------------------------------------------------------------------------------------------------
# Names: the API key's variables, the server's view of them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "flag", "status"),
    [
        ({"POSE_API_KEY": "secret"}, None, 0),
        ({"DISTILPOSE_API_KEY": "secret"}, None, 0),  # the old name still works
        ({"POSE_API_KEY": "secret", "DISTILPOSE_API_KEY": "old"}, None, 0),
        ({"POSE_API_KEY": "secret"}, "wrong", 2),  # --api-key wins
        ({}, None, 2),
    ],
)
async def test_api_key_from_the_environment(
    capsys: Any,
    tmp_path: Path,
    monkeypatch: Any,
    environ: dict[str, str],
    flag: str | None,
    status: int,
) -> None:
    for name in ("POSE_API_KEY", "DISTILPOSE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(8, 8))
    async with serving(http=True, api_keys=["secret"]) as s:
        for name, value in environ.items():
            monkeypatch.setenv(name, value)  # after the server read its settings
        argv = [str(image), "--target", s.http_url, *(["--api-key", flag] if flag else [])]
        code, _, err = await run_cli(capsys, *argv)
    assert code == status, err


def test_readme_examples_parse() -> None:
    """Every ``pose-client`` line of the README's section is a command line the parser takes."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### pose-client\n", 1)[1].split("\n## ", 1)[0]
    examples = [
        line
        for line in section.splitlines()
        if line.startswith(("pose-client ", ".venv/bin/pose-client "))
    ]
    assert len(examples) >= 8
    for line in examples:
        argv = shlex.split(line, comments=True)[1:]
        args = cli._parser().parse_args(argv)
        assert args.inputs or args.info, line


def test_help_documents_the_key_variable(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "POSE_API_KEY" in text and "DISTILPOSE_API_KEY" in text and "exit status" in text


async def test_server_starts_with_the_client_key_set(monkeypatch: Any) -> None:
    """POSE_API_KEY is the client's: the server neither refuses it nor takes it as its key."""
    monkeypatch.setenv("POSE_API_KEY", "client-key")
    assert settings_for().api_keys == []
    async with serving() as s, connect(s.target) as client:
        assert (await client.model_info())["model"] == "fake"
    monkeypatch.setenv("POSE_API_KEYZ", "typo")
    with pytest.raises(UnknownSettingError, match="POSE_API_KEYZ"):
        settings_for()


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------


def test_progress_bar_draws_only_when_enabled() -> None:
    screen = io.StringIO()
    progress = Progress(screen, enabled=True)
    progress.start("photos", 4)
    for _ in range(4):
        progress.advance()
    progress.message("pose-client: failed: x\n")
    progress.finish()
    text = screen.getvalue()
    assert "photos [" in text and "4/4" in text and "pose-client: failed: x\n" in text
    assert text.endswith("\r\x1b[K")  # the bar is taken off at the end
    quiet = io.StringIO()
    silent = Progress(quiet, enabled=False)
    silent.start("photos", 4)
    silent.advance()
    silent.message("line\n")
    silent.finish()
    assert quiet.getvalue() == "line\n"


async def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys: Any, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    async with serving() as s:
        code, _, err = await run_cli(capsys, str(folder), "--target", s.target)
    assert code == 0 and "\r" not in err and "\x1b" not in err


# --------------------------------------------------------------------------------------------------
# COCO results
# --------------------------------------------------------------------------------------------------


class GroundTruthPipeline(FakePipeline):
    """Answers the COCO annotation's own keypoints for its image: a perfect model."""

    def __init__(self, annotation: dict[str, Any]) -> None:
        super().__init__()
        self.annotation = annotation

    def _one(self, item: PipelineItem) -> ImageResult:
        _, height, width = item.image.shape
        flat = self.annotation["keypoints"]
        keypoints = [(float(flat[i]), float(flat[i + 1]), 0.9) for i in range(0, len(flat), 3)]
        x, y, w, h = self.annotation["bbox"]
        person = Person(bbox=(x, y, w, h), bbox_score=1.0, score=0.9, keypoints=keypoints)
        return ImageResult(width=width, height=height, persons=[person])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_coco_results_evaluate_with_pycocotools(
    capsys: Any, tmp_path: Path, transport: str
) -> None:
    coco_module = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    annotations = json.loads(COCO_ANNOTATIONS.read_text())
    (truth,) = annotations["annotations"]
    results = tmp_path / "results.json"
    async with serving(GroundTruthPipeline(truth), http=True) as s:
        target = target_of(s, transport)
        code, _, err = await run_cli(
            capsys, str(COCO_IMAGE), "--target", target, "--format", "coco", "-o", str(results)
        )
    assert code == 0, err
    entries = json.loads(results.read_text())
    assert [(e["image_id"], e["category_id"], len(e["keypoints"])) for e in entries] == [
        (785, 1, 51)
    ]
    gt = coco_module.COCO(str(COCO_ANNOTATIONS))
    evaluation = cocoeval.COCOeval(gt, gt.loadRes(str(results)), iouType="keypoints")
    evaluation.params.imgIds = [785]
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # AP of the perfect answer


async def test_coco_needs_numeric_names(capsys: Any, tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes(8, 8, 10))
    async with serving() as s:
        code, out, err = await run_cli(capsys, str(image), "--target", s.target, "--format", "coco")
    assert code == 2 and out == ""
    assert "numeric file name" in one_error_line(err)


def test_coco_helpers() -> None:
    assert coco_image_id("000000000785.jpg") == 785
    assert coco_image_id("photo.jpg") is None
    names = ["nose", *reversed(COCO_KEYPOINT_NAMES[1:])]
    order = coco_order(names)
    assert [names[i] for i in order] == list(COCO_KEYPOINT_NAMES)
    with pytest.raises(ValueError, match="left_eye"):
        coco_order(["nose"])
