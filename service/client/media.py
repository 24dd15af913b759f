"""Frames for ``pose-client``: images, folders, animated images, MJPEG and videos in.

Kept apart from the transports (``api``) because it is about files and pixels, not the wire. Video:
MJPEG (JPEGs back to back) is split by walking the JPEG markers and sent without re-encoding;
animated GIF/WebP/APNG frames come from Pillow; other containers (MP4, MKV, AVI, ...) are decoded
with PyAV when it is installed (``pip install av``); without it, convert first:
``ffmpeg -i in.mp4 -c:v mjpeg -q:v 3 out.mjpeg``. Every failure to read a file is a
``MediaError`` whose message names the file and says what is wrong, in one line.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from PIL import Image, ImageSequence

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MJPEG_SUFFIXES = frozenset({".mjpeg", ".mjpg"})
# Containers PyAV decodes. Any other suffix is sent as an image and the server says what it is.
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg", ".ts"}
    | {".mts", ".m2ts", ".3gp", ".ogv", ".h264", ".h265", ".hevc", ".y4m"}
)
_ANIMATED_SUFFIXES = (".gif", ".webp", ".png")

T = TypeVar("T")


class MediaError(RuntimeError):
    """A file that cannot be read as what it claims to be (the message names it)."""


@dataclass
class Frame:
    """One image to send: encoded bytes, or raw RGB pixels (gRPC only), and its caller boxes."""

    image: bytes | None = None
    frame_id: str = ""
    boxes: Sequence[Sequence[float]] | None = None
    raw: bytes | None = None  # (height, width, 3) uint8 RGB
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Skipped:
    """A folder entry that was not sent: ``reason`` is ``not an image``, ``subfolder`` or
    ``unreadable``, ``detail`` what the system said (``Permission denied``)."""

    path: Path
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        """``{path, reason(, detail)}`` for JSON."""
        out = {"path": str(self.path), "reason": self.reason}
        return out | {"detail": self.detail} if self.detail else out


def encode_frame(image: Image.Image, frame_id: str, frame_format: str = "jpeg") -> Frame:
    """A decoded frame as a ``Frame``: JPEG (quality 95), PNG, or raw RGB pixels (gRPC only)."""
    rgb = image.convert("RGB")
    if frame_format == "raw":
        return Frame(raw=rgb.tobytes(), width=rgb.width, height=rgb.height, frame_id=frame_id)
    buffer = io.BytesIO()
    if frame_format == "png":
        rgb.save(buffer, format="PNG", compress_level=1)
    else:
        rgb.save(buffer, format="JPEG", quality=95)
    return Frame(image=buffer.getvalue(), frame_id=frame_id)


def split_mjpeg(data: bytes) -> Iterator[bytes]:
    """The JPEG images of an MJPEG file (JPEGs back to back), walking the markers so that an EXIF
    thumbnail's own start/end markers inside a frame do not split it."""
    size, pos = len(data), 0
    while (start := data.find(b"\xff\xd8\xff", pos)) >= 0:
        i, end = start + 2, -1
        while i + 1 < size and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
            elif marker == 0xD9:  # EOI
                end = i + 2
                break
            elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
                i += 2
            elif i + 4 > size:
                break
            else:
                i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
                if marker == 0xDA:  # SOS: entropy-coded data up to the next real marker
                    while (i := data.find(b"\xff", i)) >= 0 and i + 1 < size:
                        if data[i + 1] not in (0x00, 0xFF) and not 0xD0 <= data[i + 1] <= 0xD7:
                            break
                        i += 2 if data[i + 1] != 0xFF else 1
                    if i < 0:
                        break
        if end < 0:
            return  # truncated or corrupt: stop at the last whole frame
        yield data[start:end]
        pos = end


def video_frames(path: Path, frame_format: str = "jpeg") -> Iterator[Frame]:
    """Frames of a video file, named ``<file name>#<index, 6 digits>``.

    MJPEG frames are sent as they are; animated GIF/WebP/APNG frames are read with Pillow; other
    containers are decoded with PyAV when it is installed.

    Raises:
        MediaError: the file cannot be read or decoded (a truncated MJPEG's cut last frame is
            dropped, not an error), or the container needs PyAV and it is not installed.
    """
    name = path.name
    suffix = path.suffix.lower()
    if suffix in MJPEG_SUFFIXES:
        yield from _mjpeg_frames(path, frame_format)
        return
    if suffix in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as animated:
                for index, image in enumerate(ImageSequence.Iterator(animated)):
                    yield encode_frame(image, f"{name}#{index:06d}", frame_format)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's ways of saying "corrupt"
            raise MediaError(f"{path}: cannot decode the animation: {one_line(exc)}") from exc
        return
    try:
        import av  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MediaError(
            f"{name}: decoding this video needs PyAV (pip install av); or convert it to MJPEG: "
            f"ffmpeg -i {name} -c:v mjpeg -q:v 3 {path.stem}.mjpeg"
        ) from exc
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(
                    f"{path}: cannot decode the video: no video stream (cut short, or not a video)"
                )
            for index, decoded in enumerate(container.decode(video=0)):
                yield encode_frame(decoded.to_image(), f"{name}#{index:06d}", frame_format)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: cannot decode the video: {one_line(exc)}") from exc


def _mjpeg_frames(path: Path, frame_format: str) -> Iterator[Frame]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    count = 0
    for count, jpeg in enumerate(split_mjpeg(data), start=1):
        frame_id = f"{path.name}#{count - 1:06d}"
        if frame_format == "jpeg":
            yield Frame(image=jpeg, frame_id=frame_id)
            continue
        try:
            yield encode_frame(Image.open(io.BytesIO(jpeg)), frame_id, frame_format)
        except (OSError, ValueError, SyntaxError) as exc:
            raise MediaError(f"{path}: frame {count - 1} is corrupt: {one_line(exc)}") from exc
    if count == 0:
        raise MediaError(f"{path}: no whole JPEG frame in it (not an MJPEG file, or cut short)")


def video_length(path: Path) -> int | None:
    """How many frames a video has, when its header says so cheaply (for a progress bar)."""
    suffix = path.suffix.lower()
    if suffix in MJPEG_SUFFIXES:
        return None
    try:
        if suffix in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                return int(getattr(image, "n_frames", 1))
        import av

        with av.open(str(path)) as container:
            frames = int(container.streams.video[0].frames) if container.streams.video else 0
            return frames or None
    except Exception:  # only a hint: the decoding itself reports what is wrong
        return None


def is_video(path: Path) -> bool:
    """Whether a file is sent as a stream of frames (MJPEG, animated images, video containers)."""
    suffix = path.suffix.lower()
    if suffix in MJPEG_SUFFIXES or suffix in VIDEO_SUFFIXES:
        return True
    if suffix not in _ANIMATED_SUFFIXES:
        return False
    try:
        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1)) > 1
    except (OSError, ValueError, SyntaxError):
        return False  # not readable here: send it as it is and let the server say why


def folder_images(folder: Path, *, recursive: bool = False) -> tuple[list[Path], list[Skipped]]:
    """The image files of a folder, sorted by path, and what was left out.

    Hidden entries (``.DS_Store``, ``.git``) are ignored without a word; files whose suffix is not
    an image's are skipped as ``not an image``; subfolders as ``subfolder`` unless ``recursive``,
    which walks them (symbolic links to folders are not followed, so a link loop cannot trap it).

    Raises:
        MediaError: the folder cannot be listed.
    """
    images: list[Path] = []
    skipped: list[Skipped] = []

    def fail(exc: OSError) -> None:
        raise MediaError(f"{exc.filename or folder}: cannot list it: {exc.strerror or exc}")

    for parent, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if not recursive:
            skipped.extend(Skipped(Path(parent, d), "subfolder") for d in dirs)
            dirs.clear()
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(parent, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
            else:
                skipped.append(Skipped(path, "not an image"))
    images.sort()
    return images, skipped


async def in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """Pull a blocking iterator (file reads, video decoding) in a worker thread."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item  # type: ignore[misc]


def one_line(value: object, limit: int = 300) -> str:
    """``str(value)`` on one line, at most ``limit`` characters (error messages stay bounded)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
