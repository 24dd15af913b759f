"""Frames for ``pose-client``: images, folders, animated images, MJPEG and videos in; results drawn.

Kept apart from ``service.client`` (the transports and the command) because it is about files and
pixels, not the wire. Video: MJPEG (JPEGs back to back) is split by walking the JPEG markers and
sent without re-encoding; animated GIF/WebP/APNG frames come from Pillow; other containers (MP4,
MKV, AVI, ...) are decoded with PyAV when it is installed (``pip install av``); without it, convert
first: ``ffmpeg -i in.mp4 -c:v mjpeg -q:v 3 out.mjpeg``.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MJPEG_SUFFIXES = frozenset({".mjpeg", ".mjpg"})


@dataclass
class Frame:
    """One image to send: encoded bytes, or raw RGB pixels (gRPC only), and its caller boxes."""

    image: bytes | None = None
    frame_id: str = ""
    boxes: Sequence[Sequence[float]] | None = None
    raw: bytes | None = None  # (height, width, 3) uint8 RGB
    width: int = 0
    height: int = 0


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
        RuntimeError: the container needs PyAV and it is not installed.
    """
    name = path.name
    if path.suffix.lower() in MJPEG_SUFFIXES:
        for index, jpeg in enumerate(split_mjpeg(path.read_bytes())):
            frame_id = f"{name}#{index:06d}"
            if frame_format == "jpeg":
                yield Frame(image=jpeg, frame_id=frame_id)
            else:
                yield encode_frame(Image.open(io.BytesIO(jpeg)), frame_id, frame_format)
        return
    if path.suffix.lower() in IMAGE_SUFFIXES:
        with Image.open(path) as animated:
            for index, image in enumerate(ImageSequence.Iterator(animated)):
                yield encode_frame(image, f"{name}#{index:06d}", frame_format)
        return
    try:
        import av  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(
            f"{name}: decoding this video needs PyAV (pip install av); or convert it to MJPEG: "
            f"ffmpeg -i {name} -c:v mjpeg -q:v 3 {path.stem}.mjpeg"
        ) from exc
    with av.open(str(path)) as container:
        for index, decoded in enumerate(container.decode(video=0)):
            yield encode_frame(decoded.to_image(), f"{name}#{index:06d}", frame_format)


def is_video(path: Path) -> bool:
    """Whether a file is sent as a stream of frames (MJPEG, animated images, video containers)."""
    suffix = path.suffix.lower()
    if suffix in MJPEG_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        if suffix not in (".gif", ".webp", ".png"):
            return False
        try:
            with Image.open(path) as image:
                return int(getattr(image, "n_frames", 1)) > 1
        except (OSError, ValueError):
            return False  # not readable here: send it as it is and let the server say why
    return True


def folder_frames(folder: Path) -> Iterator[Frame]:
    """The images of a folder by name, each named by its file name."""
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        yield Frame(image=path.read_bytes(), frame_id=path.name)


async def in_thread(frames: Iterator[Frame]) -> AsyncIterator[Frame]:
    """Pull a blocking frame iterator (file reads, video decoding) in a worker thread."""
    done = object()
    while (frame := await asyncio.to_thread(next, frames, done)) is not done:
        assert isinstance(frame, Frame)
        yield frame


# --------------------------------------------------------------------------------------------------
# Output: JSON lines and rendered frames
# --------------------------------------------------------------------------------------------------


def short_floats(value: Any) -> Any:
    """Float32 values (gRPC) written with their shortest digits: 0.1, not 0.10000000149011612."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    if isinstance(value, list):
        return [short_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: short_floats(v) for k, v in value.items()}
    return value


def render_frame(
    frame: Frame, result: dict[str, Any], info: dict[str, Any], out_dir: Path, min_score: float
) -> Path:
    """Draw ``result`` on its frame with ``service.render`` and save it as ``<frame_id>.jpg``."""
    import torch

    from model.interfaces import ImageResult, Person
    from service.images import decode_image
    from service.render import draw_poses, encode

    if frame.raw is not None:
        array = np.frombuffer(frame.raw, dtype=np.uint8).reshape(frame.height, frame.width, 3)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
    else:
        image = decode_image(frame.image or b"", max_pixels=1 << 40)  # as the server decoded it
    persons = [
        Person(
            bbox=tuple(p["bbox"]),  # type: ignore[arg-type]
            bbox_score=p["bbox_score"],
            score=p["score"],
            keypoints=[tuple(k) for k in p["keypoints"]],  # type: ignore[misc]
        )
        for p in result.get("persons", [])
    ]
    canvas = draw_poses(
        image,
        ImageResult(width=image.shape[2], height=image.shape[1], persons=persons),
        info.get("keypoint_names", ()),
        info.get("skeleton", ()),
        min_score=min_score,
    )
    safe = "".join(c if c.isalnum() or c in "-_.#" else "_" for c in frame.frame_id) or "frame"
    path = out_dir / f"{safe}.jpg"
    path.write_bytes(encode(canvas, "jpeg"))
    return path
