"""``pose-client`` on a video: a tracked gRPC stream (``--track``, ``--detect-every``) and
``--render out.mp4`` (an annotated H.264 video), against a real server over a fake pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.client import cli
from tests.service.rpc_harness import serving
from tests.service.test_video import make_clip

av = pytest.importorskip("av")


async def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    args = cli._parser().parse_args(list(argv))
    code = await cli._main(args)
    out, err = capsys.readouterr()
    return code, out, err


async def test_a_tracked_video_is_rendered_as_an_mp4(capsys: Any, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    make_clip(clip, "mp4", frames=6)
    out = tmp_path / "drawn" / "clip.mp4"
    async with serving() as s:
        code, stdout, err = await run_cli(
            capsys,
            str(clip),
            "--target",
            s.target,
            "--track",
            "--detect-every",
            "3",
            "--render",
            str(out),
        )
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["index"] for line in lines] == list(range(6))
    assert all([p["track_id"] for p in line["persons"]] == [1] for line in lines)
    assert all(line["detector_ran"] is False for line in lines)  # the fake has no detector
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (96, 160, 3)


async def test_track_over_http_is_a_usage_error(capsys: Any, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    make_clip(clip, "mp4", frames=2)
    code, _, err = await run_cli(capsys, str(clip), "--target", "http://127.0.0.1:1", "--track")
    assert code == 2 and "/v1/pose/video" in err
