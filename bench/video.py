"""Video tracking: id switches, detector share, keypoint drift and speed of tracked streams.

Clips with known motion are made from real photos: a pan-and-zoom clip (a crop window moving and
zooming over a multi-person photo, every frame resized to one size) and a slideshow MP4 of the
COCO sample photos (each held for a while, drifting, encoded with H.264 and decoded back). The
frames go through the real engine and ``service.tracking.Tracker`` exactly as a gRPC
``StreamEstimate`` or ``POST /v1/pose/video`` sends them, with ``detect_every`` 1 and N.

Measured:

- **id switches** on the pan clip: each answered person's box is mapped back to photo pixels
  through its frame's crop window and matched to a COCO ground-truth person (IoU >= 0.3); a switch
  is a ground-truth person whose track id changes from one matched frame to the next;
- **detector share**: frames the detector ran on / frames;
- **ids over cuts** on the slideshow: track ids answered on frames of more than one photo, and the
  cuts the tracker saw (``cut_scores``);
- **keypoint drift**: mean distance (px, frame pixels) between the keypoints (both scored above
  0.2) of the same ground-truth person with ``detect_every`` N and with 1;
- what bounds the drift: the **jitter** of each run (mean distance between a ground-truth person's
  keypoints in consecutive frames once the clip's known motion is taken out: a still photo under
  a moving window, so a perfect model would show 0), the drift of a **floor** run whose boxes are
  the previous frame's detector boxes carried by the exact known motion (the best any tracker that
  skips the detector could send), and the **error** of each run against the COCO keypoint
  annotation mapped into the frame;
- **speed**: frames/s of S concurrent streams, each with ``--window`` frames in flight, and the
  per-frame latency (submit to answer) p50/p99.

    .venv/bin/python -m bench.video                                      # CPU, defaults
    .venv/bin/python -m bench.video --streams 1 4 --frames 90 --detect-every 1 10
    .venv/bin/python -m bench.video --clips pan                          # the pan figures only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import (
    REPO_ROOT,
    add_common_args,
    apply_threads,
    environment,
    percentile,
    write_result,
)

SHARED_SAMPLES = REPO_ROOT.parent / "shared" / "data" / "coco_val2017_samples"
# The multi-person photo of the pan clip (5 annotated persons; local only, see its SOURCES.md),
# and the committed one-person photo used when the shared samples are not there.
PAN_PHOTO = SHARED_SAMPLES / "000000196141.jpg"
PAN_FALLBACK = REPO_ROOT / "tests" / "assets" / "000000000785.jpg"
SLIDESHOW_PHOTOS = ("000000000785.jpg", "000000040083.jpg", "000000196141.jpg", "000000197388.jpg")
CLIPS = ("pan", "slideshow", "speed")


@dataclass(frozen=True)
class Window:
    """The part of the photo one frame shows: photo pixel = frame pixel * scale + (x, y)."""

    x: float
    y: float
    scale: float

    def box_to_photo(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """An (x, y, w, h) frame box in photo pixels."""
        return (
            box[0] * self.scale + self.x,
            box[1] * self.scale + self.y,
            box[2] * self.scale,
            box[3] * self.scale,
        )


def pan_zoom_clip(
    photo: np.ndarray, frames: int, size: tuple[int, int] = (480, 320), *, zoom: float = 0.25
) -> tuple[list[np.ndarray], list[Window]]:
    """A crop window panning left to right across ``photo`` and zooming in by ``zoom`` halfway.

    Args:
        photo: (H, W, 3) uint8 RGB.
        frames: How many frames.
        size: (width, height) of every frame.
        zoom: How much narrower the window is at mid-clip than at the ends (0.25: 25 %).

    Returns:
        The (height, width, 3) uint8 frames and the window of each.
    """
    height, width = photo.shape[:2]
    out_w, out_h = size
    base = min(0.75 * width / out_w, height / out_h)  # photo px per frame px at the ends
    image = Image.fromarray(photo)
    clip, windows = [], []
    for t in range(frames):
        u = t / max(1, frames - 1)
        scale = base * (1 - zoom * math.sin(math.pi * u))
        crop_w, crop_h = out_w * scale, out_h * scale
        x = u * (width - crop_w)
        y = (height - crop_h) / 2
        window = Window(x, y, scale)
        box = (x, y, x + crop_w, y + crop_h)
        frame = image.resize(size, Image.Resampling.BILINEAR, box=box)
        clip.append(np.asarray(frame))
        windows.append(window)
    return clip, windows


def slideshow_clip(
    photos: Sequence[np.ndarray], frames_each: int, size: tuple[int, int] = (480, 320)
) -> tuple[list[np.ndarray], list[int]]:
    """Each photo for ``frames_each`` frames, its window drifting right by 1 % per frame.

    Returns:
        The frames and, per frame, the index of its photo.
    """
    clip, which = [], []
    for index, photo in enumerate(photos):
        height, width = photo.shape[:2]
        image = Image.fromarray(photo)
        scale = min(0.8 * width / size[0], height / size[1])
        crop_w, crop_h = size[0] * scale, size[1] * scale
        for t in range(frames_each):
            x = (width - crop_w) * t / max(1, frames_each - 1)
            y = (height - crop_h) / 2
            clip.append(np.asarray(image.resize(size, box=(x, y, x + crop_w, y + crop_h))))
            which.append(index)
    return clip, which


def encode_mp4(frames: Sequence[np.ndarray], path: Path, fps: int = 30) -> Path:
    """Write ``frames`` as an H.264 MP4 (PyAV)."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return path


def decode_video(path: Path) -> list[np.ndarray]:
    """The frames of a video file as (H, W, 3) uint8 RGB (PyAV)."""
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def load_photo(path: Path) -> np.ndarray:
    """A photo as (H, W, 3) uint8 RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def ground_truth(photo: Path) -> list[tuple[float, float, float, float]]:
    """COCO person boxes (x, y, w, h) of a sample photo, from the shared annotations or the
    committed one of image 785."""
    image_id = int(photo.stem)
    for path in (SHARED_SAMPLES / "test_coco.json", photo.parent / f"coco_{photo.stem}.json"):
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        boxes = [
            tuple(a["bbox"])
            for a in data["annotations"]
            if a["image_id"] == image_id and a.get("num_keypoints", 1) > 0
        ]
        if boxes:
            return boxes  # type: ignore[return-value]
    raise FileNotFoundError(f"no COCO annotations for {photo}")


def truth_keypoints(photo: Path) -> list[np.ndarray]:
    """The COCO keypoints, (17, 3) x, y, v in photo pixels, of the persons ``ground_truth`` lists
    (same order)."""
    image_id = int(photo.stem)
    for path in (SHARED_SAMPLES / "test_coco.json", photo.parent / f"coco_{photo.stem}.json"):
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        found = [
            np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3)
            for a in data["annotations"]
            if a["image_id"] == image_id and a.get("num_keypoints", 1) > 0
        ]
        if found:
            return found
    raise FileNotFoundError(f"no COCO annotations for {photo}")


# ---------------------------------------------------------------------------------------------
# Running a clip and scoring it


@dataclass
class ClipRun:
    """What one tracked clip gave: per frame its persons' (track id, box, (K, 3) keypoints), and
    whether the detector ran; latencies in seconds."""

    persons: list[list[tuple[int, tuple[float, float, float, float], np.ndarray]]]
    detector_ran: list[bool]
    latencies_s: list[float]
    seconds: float
    cuts: int = 0  # scene cuts the tracker saw


async def track_clip(
    engine: Any, settings: Any, frames: Sequence[np.ndarray], options: Any, *, window: int = 4
) -> ClipRun:
    """Send ``frames`` through a ``Tracker`` over ``engine`` as one stream with ``window`` frames
    in flight (the gRPC ``StreamEstimate`` way), flip test as ``settings`` says."""
    from model.interfaces import PoseOptions
    from service.engine import PoseRequest
    from service.tracking import start_tracker

    tracker = start_tracker(engine, options, settings)
    tensors = [torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in frames]
    pending: list[tuple[float, asyncio.Task[Any]]] = []
    persons, ran, latencies = [], [], []
    t0 = time.monotonic()
    submitted = 0
    while submitted < len(tensors) or pending:
        while submitted < len(tensors) and len(pending) < window:
            request = PoseRequest(
                tensors[submitted],
                options=PoseOptions(flip_test=settings.flip_test),
                source=f"clip:{id(tracker)}",
            )
            pending.append((time.monotonic(), tracker.submit(request)))
            submitted += 1
        sent, task = pending.pop(0)
        frame = await task
        latencies.append(time.monotonic() - sent)
        ran.append(frame.detector_ran)
        persons.append(
            [
                (tid, p.bbox, np.asarray(p.keypoints, dtype=np.float64))
                for tid, p in zip(frame.track_ids, frame.response.result.persons, strict=True)
            ]
        )
    return ClipRun(persons, ran, latencies, time.monotonic() - t0, tracker.cuts)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def assign_truth(
    run: ClipRun, windows: Sequence[Window], truth: Sequence[Sequence[float]]
) -> list[dict[int, int]]:
    """Per frame: ground-truth index -> the index of the answered person matched to it (best IoU
    in photo pixels, at least 0.3, one-to-one)."""
    from service.tracking import match

    out = []
    for persons, window in zip(run.persons, windows, strict=True):
        scores = np.array(
            [[_iou(window.box_to_photo(box), gt) for _, box, _ in persons] for gt in truth]
        ).reshape(len(truth), len(persons))
        out.append(dict(match(scores, 0.3)))
    return out


def id_switches(run: ClipRun, windows: Sequence[Window], truth: Sequence[Sequence[float]]) -> int:
    """How often a ground-truth person's track id changes between its matched frames."""
    last: dict[int, int] = {}
    switches = 0
    for persons, matched in zip(run.persons, assign_truth(run, windows, truth), strict=True):
        for gt, index in matched.items():
            track_id = persons[index][0]
            switches += int(gt in last and last[gt] != track_id)
            last[gt] = track_id
    return switches


def keypoint_drift(
    run: ClipRun, reference: ClipRun, windows: Sequence[Window], truth: Sequence[Sequence[float]]
) -> float:
    """Mean distance (frame px) between the keypoints of the same ground-truth person in ``run``
    and ``reference``, over the keypoints scored above 0.2 in both."""
    distances: list[float] = []
    pairs = zip(
        run.persons,
        reference.persons,
        assign_truth(run, windows, truth),
        assign_truth(reference, windows, truth),
        strict=True,
    )
    for persons, ref_persons, matched, ref_matched in pairs:
        for gt in matched.keys() & ref_matched.keys():
            a, b = persons[matched[gt]][2], ref_persons[ref_matched[gt]][2]
            good = (a[:, 2] > 0.2) & (b[:, 2] > 0.2)
            distances.extend(np.hypot(*(a[good, :2] - b[good, :2]).T).tolist())
    return float(np.mean(distances)) if distances else float("nan")


def cut_scores(run: ClipRun, which: Sequence[int]) -> dict[str, int]:
    """How a slideshow's ids fare over its cuts (``which``: each frame's photo).

    Returns:
        ``cuts``: photo changes; ``cuts_seen``: cuts the tracker reported;
        ``ids_carried_across_cuts``: cuts after which, on the first frame the detector ran, an id
        of the frame before the cut is answered; ``ids_on_two_photos``: track ids answered on
        frames of more than one photo (a track of one photo found again on any later frame).
    """
    cuts = [i for i in range(1, len(which)) if which[i] != which[i - 1]]
    carried = 0
    for c in cuts:
        ran = [i for i in range(c, len(which)) if run.detector_ran[i]]
        if ran:
            before = {p[0] for p in run.persons[c - 1]}
            carried += bool(before & {p[0] for p in run.persons[ran[0]]})
    photos: dict[int, set[int]] = {}
    for persons, photo in zip(run.persons, which, strict=True):
        for track_id, _, _ in persons:
            photos.setdefault(track_id, set()).add(photo)
    return {
        "cuts": len(cuts),
        "cuts_seen": run.cuts,
        "ids_carried_across_cuts": carried,
        "ids_on_two_photos": sum(len(seen) > 1 for seen in photos.values()),
    }


def _to_frame(points: np.ndarray, window: Window) -> np.ndarray:
    """(..., 2) photo pixels -> frame pixels of ``window``."""
    return (points - [window.x, window.y]) / window.scale


def jitter(run: ClipRun, windows: Sequence[Window], truth: Sequence[Sequence[float]]) -> float:
    """Mean distance (frame px) between a ground-truth person's keypoints (scored above 0.2 in
    both) in consecutive frames, after moving the earlier ones by the clip's known motion."""
    distances: list[float] = []
    matched = assign_truth(run, windows, truth)
    for t in range(1, len(run.persons)):
        for gt in matched[t].keys() & matched[t - 1].keys():
            now, before = (
                run.persons[t][matched[t][gt]][2],
                run.persons[t - 1][matched[t - 1][gt]][2],
            )
            earlier = windows[t - 1]
            moved = _to_frame(before[:, :2] * earlier.scale + [earlier.x, earlier.y], windows[t])
            good = (now[:, 2] > 0.2) & (before[:, 2] > 0.2)
            distances.extend(np.hypot(*(now[good, :2] - moved[good]).T).tolist())
    return float(np.mean(distances)) if distances else float("nan")


def truth_error(
    run: ClipRun,
    windows: Sequence[Window],
    truth: Sequence[Sequence[float]],
    keypoints: Sequence[np.ndarray],
    size: tuple[int, int],
) -> float:
    """Mean distance (frame px) between answered keypoints (scored above 0.2) and the COCO
    annotation (labelled, inside the (width, height) frame) of the same ground-truth person."""
    distances: list[float] = []
    for persons, window, matched in zip(
        run.persons, windows, assign_truth(run, windows, truth), strict=True
    ):
        for gt, index in matched.items():
            answered, true = persons[index][2], _to_frame(keypoints[gt][:, :2], window)
            inside = (true >= 0).all(1) & (true < size).all(1)
            good = (answered[:, 2] > 0.2) & (keypoints[gt][:, 2] > 0) & inside
            distances.extend(np.hypot(*(answered[good, :2] - true[good]).T).tolist())
    return float(np.mean(distances)) if distances else float("nan")


async def carried_detector_boxes(
    engine: Any,
    settings: Any,
    frames: Sequence[np.ndarray],
    windows: Sequence[Window],
    reference: ClipRun,
) -> ClipRun:
    """The floor of the drift: each frame run on the previous frame's detector boxes (from
    ``reference``, the every-frame run) carried by the clip's exact motion and clipped to the
    frame, as caller boxes: what a tracker with perfect motion and the detector's own boxes of
    one frame before would send."""
    from model.interfaces import PoseOptions
    from service.engine import PoseRequest

    persons = [reference.persons[0]]
    height, width = frames[0].shape[:2]
    for t in range(1, len(frames)):
        boxes = []
        for _, (x, y, w, h), _ in reference.persons[t - 1]:
            corners = np.array([[x, y], [x + w, y + h]])
            before = windows[t - 1]
            moved = _to_frame(corners * before.scale + [before.x, before.y], windows[t])
            (x1, y1), (x2, y2) = np.clip(moved, 0, [width, height])
            if x2 - x1 >= 2 and y2 - y1 >= 2:
                boxes.append([x1, y1, x2 - x1, y2 - y1, 1.0])
        image = torch.from_numpy(np.array(frames[t])).permute(2, 0, 1)
        response = await engine.infer(
            PoseRequest(
                image, boxes=boxes or None, options=PoseOptions(flip_test=settings.flip_test)
            )
        )
        persons.append(
            [
                (i, p.bbox, np.asarray(p.keypoints, dtype=np.float64))
                for i, p in enumerate(response.result.persons)
            ]
        )
    return ClipRun(persons, [False] * len(frames), [], 0.0)


# ---------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--photo", type=Path, default=None, help="the pan clip's photo")
    parser.add_argument("--frames", type=int, default=60, help="frames of the pan clip")
    parser.add_argument("--size", default="480x320", help="frame size WxH")
    parser.add_argument("--detect-every", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--streams", type=int, nargs="+", default=[1], help="concurrent streams")
    parser.add_argument("--window", type=int, default=4, help="frames in flight per stream")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--flip", choices=("on", "off"), default="off")
    parser.add_argument("--slideshow-frames", type=int, default=15, help="frames per photo")
    parser.add_argument(
        "--clips",
        nargs="+",
        choices=CLIPS,
        default=list(CLIPS),
        help="what to run: the pan clip's figures, the slideshow MP4's, the speed table",
    )
    return parser.parse_args(argv)


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from model.pipeline import build_pipeline
    from service.engine import Engine, EngineConfig
    from service.settings import Settings
    from service.tracking import TrackOptions

    size = tuple(int(v) for v in args.size.lower().split("x"))
    photo_path = args.photo or (PAN_PHOTO if PAN_PHOTO.exists() else PAN_FALLBACK)
    frames, windows = pan_zoom_clip(load_photo(photo_path), args.frames, size)  # type: ignore[arg-type]
    settings = Settings(flip_test=args.flip == "on")

    def factory(device: str) -> Any:
        return build_pipeline(
            model="blazepose_full",
            weights=None,
            detector="ssdlite_person",
            detector_weights=None,
            device=device,
        )

    config = EngineConfig(
        max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms, decode_workers=1
    )
    engine = Engine(factory, [args.device], config)
    await engine.start()
    rows: list[dict[str, Any]] = []
    try:
        if "pan" in args.clips:
            rows.extend(await _pan_rows(engine, settings, args, photo_path, frames, windows))
        slideshow = [p for p in (SHARED_SAMPLES / n for n in SLIDESHOW_PHOTOS) if p.exists()]
        if slideshow and "slideshow" in args.clips:
            clip, which = slideshow_clip([load_photo(p) for p in slideshow], args.slideshow_frames)
            decoded = decode_video(encode_mp4(clip, Path("/tmp") / "bench_video_slideshow.mp4"))
            for every in args.detect_every:
                run = await track_clip(
                    engine, settings, decoded, TrackOptions(detect_every=every), window=args.window
                )
                cuts = [i for i in range(1, len(which)) if which[i] != which[i - 1]]
                rows.append(
                    {
                        "clip": f"slideshow mp4 of {len(slideshow)} COCO photos",
                        "detect_every": every,
                        "frames": len(decoded),
                        **cut_scores(run, which),
                        "detector_share": sum(run.detector_ran) / len(decoded),
                        "detector_within_a_frame_of_each_cut": all(
                            run.detector_ran[c] or run.detector_ran[min(c + 1, len(which) - 1)]
                            for c in cuts
                        ),
                    }
                )
        for streams in args.streams if "speed" in args.clips else []:
            for every in args.detect_every:
                t0 = time.monotonic()
                done = await asyncio.gather(
                    *[
                        track_clip(
                            engine,
                            settings,
                            frames,
                            TrackOptions(detect_every=every),
                            window=args.window,
                        )
                        for _ in range(streams)
                    ]
                )
                seconds = time.monotonic() - t0
                latencies = [s * 1000 for run in done for s in run.latencies_s]
                rows.append(
                    {
                        "clip": "speed",
                        "streams": streams,
                        "detect_every": every,
                        "frames_per_s": streams * len(frames) / seconds,
                        "latency_ms_p50": percentile(latencies, 50),
                        "latency_ms_p99": percentile(latencies, 99),
                        "first_answer_ms": float(np.mean([run.latencies_s[0] for run in done]))
                        * 1000,
                    }
                )
    finally:
        await engine.stop(0)
    return {"rows": rows, "settings": vars(args) | {"photo": str(photo_path)}}


async def _pan_rows(
    engine: Any,
    settings: Any,
    args: argparse.Namespace,
    photo: Path,
    frames: Sequence[np.ndarray],
    windows: Sequence[Window],
) -> list[dict[str, Any]]:
    """The pan clip's rows: one per ``detect_every``, and the floor of the drift."""
    from service.tracking import TrackOptions

    truth, keypoints = ground_truth(photo), truth_keypoints(photo)
    height, width = frames[0].shape[:2]
    runs: dict[int, ClipRun] = {}
    for every in args.detect_every:
        options = TrackOptions(detect_every=every)
        runs[every] = await track_clip(engine, settings, frames, options, window=args.window)
    reference = runs.get(1) or next(iter(runs.values()))
    runs_named: list[tuple[str, int | None, ClipRun]] = [
        (f"pan {photo.name}", every, run) for every, run in runs.items()
    ]
    if 1 in runs:
        floor = await carried_detector_boxes(engine, settings, frames, windows, reference)
        runs_named.append(
            (f"pan {photo.name}, floor: last frame's detector boxes moved", None, floor)
        )
    rows = []
    for name, every, run in runs_named:
        rows.append(
            {
                "clip": name,
                "detect_every": every,
                "frames": len(frames),
                "id_switches": id_switches(run, windows, truth) if every else None,
                "cuts_seen": run.cuts if every else None,
                "detector_share": sum(run.detector_ran) / len(frames),
                "drift_px_vs_every_frame": _finite(keypoint_drift(run, reference, windows, truth)),
                "jitter_px": _finite(jitter(run, windows, truth)),
                "error_px_vs_coco": _finite(
                    truth_error(run, windows, truth, keypoints, (width, height))
                ),
                "persons_per_frame": float(np.mean([len(p) for p in run.persons])),
            }
        )
    return rows


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print one JSON line per row and write the result file."""
    args = parse_args(argv)
    apply_threads(args.threads)
    env = environment(args.device)
    result = asyncio.run(_bench(args))
    for row in result["rows"]:
        print(json.dumps(row))
    path = write_result(
        "video",
        args.device,
        args,
        result["rows"],
        out_dir=args.out_dir,
        env=env,
        extra={"photo": result["settings"]["photo"]},
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
