"""Results drawn on their frames with Pillow, for ``pose-client --render``.

Boxes, skeleton limbs and keypoints, limbs coloured by side from the keypoint names (``left_*``
orange, ``right_*`` blue, the rest green), as the server's ``/v1/pose/render`` draws them; a
keypoint or limb is drawn only when its raw score reaches ``min_score``. The keypoint names and
the skeleton come from the server (``model_info()``), so any model's skeleton draws right.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from service.client.media import Frame

_LEFT = (255, 140, 0)
_RIGHT = (30, 144, 255)
_CENTRE = (50, 205, 50)
_BOX = (255, 255, 0)


def _side_colour(name: str) -> tuple[int, int, int]:
    if name.startswith("left_"):
        return _LEFT
    if name.startswith("right_"):
        return _RIGHT
    return _CENTRE


def frame_image(frame: Frame) -> Image.Image:
    """The RGB picture of a frame as the server saw it (EXIF orientation applied, alpha over
    white).

    Raises:
        OSError: Pillow cannot decode the frame's bytes.
    """
    if frame.raw is not None:
        return Image.frombytes("RGB", (frame.width, frame.height), frame.raw)
    with Image.open(io.BytesIO(frame.image or b"")) as image:
        image.seek(0)  # the first frame of an animation, as the server decodes it
        upright = ImageOps.exif_transpose(image) or image
        if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
            rgba = upright.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return upright.convert("RGB")


def draw_poses(
    image: Image.Image,
    persons: Sequence[dict[str, Any]],
    keypoint_names: Sequence[str],
    skeleton: Sequence[Sequence[int]],
    *,
    min_score: float = 0.3,
) -> Image.Image:
    """Draw ``persons`` (result dicts; a None keypoint is not drawn) on a copy of ``image``.

    Args:
        image: the RGB picture the result was computed on.
        persons: ``bbox`` [x, y, w, h] and ``keypoints`` [[x, y, score] or None] in pixels.
        keypoint_names: K names (for the left/right colours).
        skeleton: 0-based limb pairs.
        min_score: smallest raw keypoint score drawn.

    Returns:
        An RGB Pillow image of the same size.
    """
    canvas = image.convert("RGB")  # a copy
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(canvas.size) / 200))
    radius = max(1, line + 1)

    def visible(point: Sequence[float] | None) -> bool:
        return point is not None and point[2] >= min_score

    for person in persons:
        x, y, w, h = person["bbox"][:4]
        draw.rectangle([x, y, x + w, y + h], outline=_BOX, width=line)
        points = person["keypoints"]
        for a, b in skeleton:
            if a >= len(points) or b >= len(points):
                continue
            if not (visible(points[a]) and visible(points[b])):
                continue
            name = keypoint_names[b] if b < len(keypoint_names) else ""
            start, end = (points[a][0], points[a][1]), (points[b][0], points[b][1])
            draw.line([start, end], fill=_side_colour(name), width=line * 2)
        for index, point in enumerate(points):
            if not visible(point):
                continue
            kx, ky = point[0], point[1]
            name = keypoint_names[index] if index < len(keypoint_names) else ""
            draw.ellipse(
                [kx - radius, ky - radius, kx + radius, ky + radius],
                fill=_side_colour(name),
                outline=(0, 0, 0),
            )
    return canvas


class Mp4Writer:
    """Drawn frames into one H.264 MP4 (``pose-client --render out.mp4``), with PyAV.

    Frames of another size than the first are scaled to it; ``close`` finishes the file.

    Raises:
        ImportError: PyAV is not installed (``pip install av``).
    """

    def __init__(self, path: Path, fps: int = 30) -> None:
        import av  # type: ignore[import-not-found]

        self._av = av
        self.path = path
        self.fps = fps
        self._container: Any = None
        self._stream: Any = None

    def add(self, picture: Image.Image) -> None:
        """Append one frame."""
        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = self._av.open(str(self.path), "w", format="mp4")
            self._stream = self._container.add_stream("h264", rate=self.fps)
            # yuv420p wants even sizes
            self._stream.width = picture.width - picture.width % 2
            self._stream.height = picture.height - picture.height % 2
            self._stream.pix_fmt = "yuv420p"
        size = (self._stream.width, self._stream.height)
        if picture.size != size:
            picture = picture.resize(size)
        frame = self._av.VideoFrame.from_image(picture.convert("RGB"))
        self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        """Flush the encoder and close the file (nothing is written without a frame)."""
        if self._container is not None:
            self._container.mux(self._stream.encode())
            self._container.close()
            self._container = None


def draw_result(
    frame: Frame, result: dict[str, Any], info: dict[str, Any], min_score: float
) -> Image.Image:
    """``result`` drawn on its frame (see ``render_frame``)."""
    return draw_poses(
        frame_image(frame),
        result.get("persons", ()),
        info.get("keypoint_names", ()),
        info.get("skeleton", ()),
        min_score=min_score,
    )


def render_frame(
    frame: Frame, result: dict[str, Any], info: dict[str, Any], path: Path, min_score: float
) -> Path:
    """Draw ``result`` on its frame and save it as a JPEG at ``path`` (folders made as needed).

    Args:
        frame: what was sent.
        result: its result dict.
        info: ``model_info()`` (``keypoint_names``, ``skeleton``).
        path: the file to write.
        min_score: smallest raw keypoint score drawn.

    Raises:
        OSError: the frame cannot be decoded here, or the file cannot be written.
    """
    canvas = draw_result(frame, result, info, min_score)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="JPEG", quality=90)
    return path
