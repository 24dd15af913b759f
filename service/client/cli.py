"""``pose-client``: send images, folders or videos to the pose service over gRPC or HTTP.

Writes one JSON line per image or frame (``--output``, default stdout), or with ``--format coco``
one JSON list of COCO keypoint results; with ``--render DIR`` the frames with the poses drawn.
Inputs: an image file, a folder of images (unary calls, ``--concurrency`` at a time;
``--recursive`` walks subfolders; ``--stream`` sends them as video frames), ``-`` for an image on
stdin, or a video (MJPEG, animated GIF/WebP; MP4 and other containers with PyAV: see
``service.client.media``). Video frames go through ``StreamEstimate`` (over HTTP: ``--window``
requests in flight, answers in order).

Every failure is one line on stderr (``pose-client: error: ...``, or a JSON object with
``--json``) and a non-zero exit status, never a traceback: 2 when the run could not be done (bad
arguments, a missing or corrupt file, the server down or refusing), 1 when it was done but some
images failed (each of those is in the output with its ``error``, and named on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from service.client.api import PRECISIONS, Options, PoseClient, PoseClientError, connect
from service.client.draw import Mp4Writer, draw_result, render_frame
from service.client.media import (
    Frame,
    MediaError,
    Skipped,
    folder_images,
    in_thread,
    is_video,
    one_line,
    video_frames,
    video_length,
)
from service.client.progress import Progress
from service.client.results import (
    apply_min_score,
    coco_image_id,
    coco_order,
    coco_results,
    short_floats,
)

API_KEY_ENV = "POSE_API_KEY"
OLD_API_KEY_ENV = "DISTILPOSE_API_KEY"  # the name before POSE_API_KEY; still read
DRAW_MIN_SCORE = 0.3  # keypoints drawn from this raw score when --min-score is not given
BOXES_FORM = "[[x, y, w, h(, score)], ...]"
MAX_FAILURE_LINES = 20  # per-image failures named on stderr; the rest are in the output only
MAX_SKIPPED_NAMED = 5  # skipped entries named per reason in the summary

_EPILOG = f"""\
environment:
  {API_KEY_ENV}      the API key when --api-key is not given ({OLD_API_KEY_ENV}, its old name,
                    is read too)

exit status:
  0  every image or frame has its result
  1  done, but some images failed: their lines hold an "error", and stderr names them
  2  not done: bad arguments, a missing or corrupt file, the server down or refusing the key;
     one line on stderr says why (a JSON object with --json)

examples:
  pose-client photo.jpg                                 one image over gRPC (localhost:50051)
  pose-client photos/ -r --target http://host:8000 -o poses.jsonl
  pose-client val2017/ --format coco -o results.json    COCO results for pycocotools
  pose-client clip.mp4 --render out/                    frames drawn as out/clip_000000.jpg, ...
"""


class UsageError(Exception):
    """A command line that cannot be run as given (nothing was sent)."""


def parse_boxes(text: str) -> list[list[float]]:
    """``--boxes``: a JSON list of ``[x, y, w, h(, score)]`` lists of numbers.

    Raises:
        argparse.ArgumentTypeError: saying what is wrong and the form expected.
    """
    try:
        boxes = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); expected {BOXES_FORM}") from exc
    if not isinstance(boxes, list):
        raise argparse.ArgumentTypeError(f"not a list of boxes; expected {BOXES_FORM}")
    for index, box in enumerate(boxes):
        numbers = isinstance(box, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box
        )
        if not numbers or len(box) not in (4, 5):
            shown = one_line(json.dumps(box), 60)
            raise argparse.ArgumentTypeError(
                f"box {index} is {shown}, not 4 or 5 finite numbers; expected {BOXES_FORM}"
            )
    return [[float(v) for v in box] for box in boxes]


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in "invalid int value"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a JSON object when ``json_errors``)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        _report_error(sys.stderr, "usage", f"{message} (see pose-client --help)", self.json_errors)
        sys.exit(2)


def _parser(json_errors: bool = False) -> _Parser:
    parser = _Parser(
        prog="pose-client",
        description="Send images, folders or videos to the pose service; write JSON lines.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.json_errors = json_errors
    add = parser.add_argument
    add("inputs", nargs="*", help="image, folder, video (MJPEG, GIF, MP4, ...), or - for stdin")
    add(
        "--target",
        metavar="TARGET",
        default="localhost:50051",
        help="host:port (gRPC) or http(s)://host:port",
    )
    add("--api-key", metavar="KEY", help=f"the server's API key (default: ${API_KEY_ENV})")
    add("-o", "--output", metavar="FILE", help="where results go (default: stdout)")
    add("--format", choices=("jsonl", "coco"), default="jsonl", help=_FORMAT_HELP)
    add(
        "--render",
        type=Path,
        metavar="DIR|FILE.mp4",
        help="write the frames with the poses drawn here, as JPEG; a path ending in .mp4: "
        "one H.264 video of them (PyAV)",
    )
    add("--min-score", type=float, metavar="S", help=_MIN_SCORE_HELP)
    add(
        "--boxes",
        type=parse_boxes,
        metavar="JSON",
        help=f"person boxes for single images and -: {BOXES_FORM}",
    )
    add("-r", "--recursive", action="store_true", help="walk the subfolders of folders too")
    add("--no-flip", action="store_true", help="flip_test off")
    add("--sigmas", action="store_true", help="return per-keypoint sigmas")
    add("--oks-nms", action="store_true", help="OKS-NMS over detector persons")
    add("--precision", choices=sorted(PRECISIONS), help="on CUDA")
    add("--stream", action="store_true", help="send a folder as video frames")
    add("--track", action="store_true", help="videos: stable track_id per person (gRPC)")
    add(
        "--detect-every",
        type=_positive(int),
        metavar="N",
        help="with --track: the detector on every N-th frame, tracked boxes between",
    )
    add("--frame-format", choices=("jpeg", "png", "raw"), default="jpeg", help=_FRAME_HELP)
    add(
        "--window",
        type=_positive(int),
        default=8,
        metavar="N",
        help="HTTP frames in flight per video",
    )
    add(
        "--concurrency",
        type=_positive(int),
        default=4,
        metavar="N",
        help="images in flight per folder",
    )
    add("--timeout", type=_positive(float), default=60.0, metavar="S", help="seconds per request")
    add("--info", action="store_true", help="print the served model and exit")
    add("--json", action="store_true", help="errors and the summary on stderr as JSON objects")
    return parser


_FORMAT_HELP = (
    "jsonl: one JSON line per image or frame (default); coco: one JSON list of COCO keypoint "
    "results ({image_id, category_id, keypoints, score}) for pycocotools' loadRes, image_id from "
    "numeric file names (000000000785.jpg -> 785) or a video's frame number"
)
_MIN_SCORE_HELP = (
    "leave out persons scoring below this and blank (null) their keypoints below it, in the "
    "output and the drawings (coco: visibility 0); default: keep everything, draw keypoints "
    f"from {DRAW_MIN_SCORE}"
)
_FRAME_HELP = "decoded video frames sent as (raw: pixels, gRPC only)"


def _report_error(stream: TextIO, code: str, message: str, as_json: bool) -> None:
    if as_json:
        stream.write(json.dumps({"error": {"code": code, "message": message}}) + "\n")
    else:
        stream.write(f"pose-client: error: {message}\n")
    stream.flush()


@dataclass(frozen=True)
class Item:
    """Where a frame came from: what its output line, its drawing and its COCO entry are named.

    Attributes:
        source: the file (``-`` for stdin), written as ``source`` on the frame's line.
        index: position in its source (frame number of a video, image number in a folder).
        label: how stderr names it (``clip.mp4 frame 15``).
        render_name: the drawing's path under ``--render`` (``photo.jpg``, ``clip_000015.jpg``).
        image_id: COCO's image id (None where a file name gives none).
    """

    source: str
    index: int
    label: str
    render_name: str
    image_id: int | None


@dataclass
class Job:
    """One input: its frames (read in a worker thread) and how they are sent."""

    pairs: Iterator[tuple[Frame, Item]]
    label: str
    stream: bool
    progress: bool = False  # show a bar (folders and videos)
    total: int | None = None  # of the bar; None: a count and a rate only


def _plan(args: argparse.Namespace, skipped: list[Skipped]) -> list[Job]:
    """Every input checked and listed before anything is sent.

    Raises:
        UsageError: an input is missing, or ``--format coco`` has no image id for one.
        MediaError: a folder cannot be listed.
    """
    jobs = []
    coco = args.format == "coco"
    for name in args.inputs:
        path = Path(name)
        if name == "-":
            if coco:
                raise UsageError("--format coco needs file names for image ids; - has none")
            item = Item("-", 0, "stdin", "stdin.jpg", None)
            jobs.append(Job(_stdin_pairs(item, args.boxes), "-", stream=False))
        elif not path.exists():
            raise UsageError(f"{name}: no such file or folder")
        elif path.is_dir():
            images, left_out = folder_images(path, recursive=args.recursive)
            skipped.extend(left_out)
            if coco:
                for image in images:
                    _coco_id(image)
            pairs = _folder_pairs(path, images, skipped)
            jobs.append(Job(pairs, name, stream=args.stream, progress=True, total=len(images)))
        elif is_video(path):
            pairs = _video_pairs(path, name, args.frame_format)
            jobs.append(Job(pairs, name, stream=True, progress=True, total=video_length(path)))
        else:
            item = Item(name, 0, name, path.stem + ".jpg", _coco_id(path) if coco else None)
            jobs.append(Job(_file_pairs(path, item, args.boxes), name, stream=False))
    return jobs


def _coco_id(path: Path) -> int:
    image_id = coco_image_id(path.name)
    if image_id is None:
        raise UsageError(
            "--format coco takes each image_id from a numeric file name (000000000785.jpg -> 785); "
            f"{path} has none"
        )
    return image_id


def _stdin_pairs(item: Item, boxes: Any) -> Iterator[tuple[Frame, Item]]:
    yield Frame(image=sys.stdin.buffer.read(), frame_id="stdin", boxes=boxes), item


def _file_pairs(path: Path, item: Item, boxes: Any) -> Iterator[tuple[Frame, Item]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    yield Frame(image=data, frame_id=path.name, boxes=boxes), item


def _folder_pairs(
    root: Path, images: list[Path], skipped: list[Skipped]
) -> Iterator[tuple[Frame, Item]]:
    """The folder's images, an unreadable one added to ``skipped`` instead."""
    index = 0
    for path in images:
        try:
            data = path.read_bytes()
        except OSError as exc:
            skipped.append(Skipped(path, "unreadable", exc.strerror or str(exc)))
            continue
        relative = path.relative_to(root)
        render_name = relative.with_suffix(".jpg").as_posix()
        item = Item(str(path), index, str(path), render_name, coco_image_id(path.name))
        yield Frame(image=data, frame_id=relative.as_posix()), item
        index += 1


def _video_pairs(path: Path, name: str, frame_format: str) -> Iterator[tuple[Frame, Item]]:
    for index, frame in enumerate(video_frames(path, frame_format)):
        render_name = f"{path.stem}_{index:06d}.jpg"
        yield frame, Item(name, index, f"{name} frame {index}", render_name, index)


@dataclass
class _Run:
    """State of one command run: where results go, what failed and what was skipped."""

    client: PoseClient
    args: argparse.Namespace
    out: TextIO
    progress: Progress
    info: dict[str, Any] = field(default_factory=dict)
    coco_order: list[int] | None = None
    coco: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    rendered: dict[str, str] = field(default_factory=dict)  # render name -> its source
    video: Mp4Writer | None = None  # --render FILE.mp4
    results: int = 0
    failed: int = 0

    @property
    def options(self) -> Options:
        args = self.args
        return Options(
            flip_test=False if args.no_flip else None,
            return_sigmas=True if args.sigmas else None,
            oks_nms=True if args.oks_nms else None,
            precision=args.precision,
            track=True if args.track else None,
            detect_every=args.detect_every,
        )

    async def write(self, frame: Frame, item: Item, result: dict[str, Any]) -> None:
        """One result: its line (or COCO entries), its drawing, a failure named on stderr."""
        self.results += 1
        result = short_floats(result)  # gRPC's float32 values; HTTP's print the same
        line: dict[str, Any] = {
            "source": item.source,
            "frame_id": result.get("frame_id"),
            "index": item.index,
        }
        line.update((k, v) for k, v in result.items() if k not in line)
        min_score = self.args.min_score
        if "error" in line:
            self.failed += 1
            self._failure(item, line["error"])
        elif min_score is not None:
            line = apply_min_score(line, min_score)
        if self.coco_order is not None:
            assert item.image_id is not None  # _plan refused inputs without one
            self.coco.extend(coco_results(result, item.image_id, self.coco_order, min_score))
        else:
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()
        if self.args.render is not None and "error" not in line:
            draw_from = min_score if min_score is not None else DRAW_MIN_SCORE
            if self.video is not None:
                picture = await asyncio.to_thread(draw_result, frame, line, self.info, draw_from)
                await asyncio.to_thread(self.video.add, picture)
            else:
                path = self.args.render / self._render_name(item)
                await asyncio.to_thread(render_frame, frame, line, self.info, path, draw_from)
        self.progress.advance()

    def _render_name(self, item: Item) -> str:
        """``item.render_name``, numbered when another source took it (a.png and a.jpg)."""
        name, number = item.render_name, 1
        while self.rendered.setdefault(name, item.source) != item.source:
            number += 1
            stem, dot, suffix = item.render_name.rpartition(".")
            name = f"{stem}_{number}{dot}{suffix}"
        return name

    def _failure(self, item: Item, error: dict[str, Any]) -> None:
        if self.failed > MAX_FAILURE_LINES:
            return
        code, message = error.get("code", "error"), one_line(error.get("message", ""))
        if self.args.json:
            record = {"failed": {"source": item.source, "index": item.index, **error}}
            text = json.dumps(record) + "\n"
        elif self.failed == MAX_FAILURE_LINES:
            text = f"pose-client: failed: {item.label}: {code}: {message} (further ones: output)\n"
        else:
            text = f"pose-client: failed: {item.label}: {code}: {message}\n"
        self.progress.message(text)

    def summary(self, elapsed: float) -> str:
        """The closing stderr line(s): counts, rate and what was skipped, by reason."""
        rate = self.results / elapsed if elapsed > 0 else 0.0
        if self.args.json:
            skipped = [entry.as_dict() for entry in self.skipped[:100]]
            record = {
                "results": self.results,
                "failed": self.failed,
                "seconds": round(elapsed, 3),
                "skipped": skipped,
                "skipped_total": len(self.skipped),
            }
            return json.dumps({"summary": record}) + "\n"
        text = (
            f"pose-client: {self.results} results ({self.failed} failed) in {elapsed:.2f} s, "
            f"{rate:.1f}/s\n"
        )
        if self.skipped:
            by_reason: dict[str, list[Skipped]] = defaultdict(list)
            for entry in self.skipped:
                by_reason[entry.reason].append(entry)
            parts = []
            for reason, entries in by_reason.items():
                names = [
                    f"{e.path}: {e.detail}" if e.detail else str(e.path)
                    for e in entries[:MAX_SKIPPED_NAMED]
                ]
                more = len(entries) - len(names)
                listed = ", ".join(names) + (f" and {more} more" if more else "")
                hint = "; --recursive walks them" if reason == "subfolder" else ""
                parts.append(f"{len(entries)} {reason} ({listed}{hint})")
            text += f"pose-client: skipped {len(self.skipped)}: {'; '.join(parts)}\n"
        return text


async def _send(run: _Run, job: Job) -> None:
    """One input's frames; the frames in flight are kept to name and draw their results."""
    sent: deque[tuple[Frame, Item]] = deque()

    async def frames() -> AsyncIterator[Frame]:
        async for pair in in_thread(job.pairs):
            sent.append(pair)
            yield pair[0]

    args = run.args
    if job.stream:
        results = run.client.stream(frames(), options=run.options, window=args.window)
    else:  # single images: no tracking (Estimate refuses it)
        options = dataclasses.replace(run.options, track=None, detect_every=None)
        results = run.client.estimate_many(
            frames(), options=options, timeout_s=args.timeout, window=args.concurrency
        )
    if job.progress:
        run.progress.start(job.label, job.total)
    try:
        async with contextlib.aclosing(results):
            async for result in results:
                frame, item = sent.popleft()
                await run.write(frame, item, result)
    finally:
        run.progress.finish()


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    """The run itself; failures raise (``_main`` turns them into one line)."""
    if args.frame_format == "raw" and args.target.startswith(("http://", "https://")):
        raise UsageError("--frame-format raw sends pixels, which only gRPC carries")
    if (args.track or args.detect_every) and args.target.startswith(("http://", "https://")):
        raise UsageError(
            "--track streams over gRPC; over HTTP, POST the video file to /v1/pose/video?track=true"
        )
    if args.detect_every and not args.track:
        raise UsageError("--detect-every needs --track")
    progress = Progress(sys.stderr, enabled=sys.stderr.isatty() and not args.json)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or os.environ.get(OLD_API_KEY_ENV)
    async with connect(args.target, api_key=api_key or None, timeout_s=args.timeout) as client:
        run = _Run(client, args, out, progress)
        jobs = [] if args.info else _plan(args, run.skipped)
        if args.info or args.render is not None or args.format == "coco":
            run.info = await client.model_info()
        if args.info:
            out.write(json.dumps(short_floats(run.info), indent=2) + "\n")
            return 0
        if args.format == "coco":
            try:
                run.coco_order = coco_order(run.info.get("keypoint_names", ()))
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
        if args.render is not None and args.render.suffix.lower() == ".mp4":
            try:
                run.video = Mp4Writer(args.render)
            except ImportError as exc:
                raise UsageError("--render FILE.mp4 needs PyAV (pip install av)") from exc
        elif args.render is not None:
            args.render.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            for job in jobs:
                await _send(run, job)
        finally:
            if run.video is not None:
                await asyncio.to_thread(run.video.close)
        elapsed = time.monotonic() - started
    if run.coco_order is not None:
        json.dump(run.coco, out)
        out.write("\n")
    sys.stderr.write(run.summary(elapsed))
    return 1 if run.failed else 0


def _describe(exc: Exception, target: str) -> tuple[str, str]:
    """``(code, message)`` of a failure that ended the run."""
    if isinstance(exc, PoseClientError):
        return exc.code, f"{target}: {exc.code}: {one_line(exc.message, 500)}"
    if isinstance(exc, UsageError):
        return "usage", str(exc)
    if isinstance(exc, MediaError):
        return "bad_media", one_line(exc, 500)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return "os_error", f"{where}{exc.strerror or one_line(exc)}"
    return "internal", f"{type(exc).__name__}: {one_line(exc, 500)}"


async def _main(args: argparse.Namespace) -> int:
    """``pose-client`` with parsed arguments: the exit status, every failure one stderr line."""
    try:
        out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    except OSError as exc:
        _report_error(sys.stderr, "os_error", f"{args.output}: {exc.strerror}", args.json)
        return 2
    try:
        return await _run(args, out)
    except BrokenPipeError:  # the reader went away (| head): nothing more to say to anyone
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        code, message = _describe(exc, args.target)
        _report_error(sys.stderr, code, message, args.json)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pose-client``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(json_errors="--json" in argv)
    args = parser.parse_args(argv)
    if not args.inputs and not args.info:
        parser.error("give an image, a folder, a video or -, or --info")
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        _report_error(sys.stderr, "interrupted", "interrupted", args.json)
        return 130
