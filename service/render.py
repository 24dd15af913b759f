"""Draw pose results on their image (boxes, skeleton limbs, keypoints) and encode it as PNG or JPEG.

Used by ``POST /v1/pose/render`` for people who would rather look than read. Limbs are coloured
by side, derived from the keypoint names (``left_*`` orange, ``right_*`` blue, the rest green); a
keypoint or limb is drawn only when its raw score reaches ``min_score``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image, ImageDraw

from model.interfaces import ImageResult

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


def draw_poses(
    image: torch.Tensor,
    result: ImageResult,
    keypoint_names: Sequence[str],
    skeleton: Sequence[Sequence[int]],
    *,
    min_score: float = 0.3,
) -> Image.Image:
    """Draw every person of ``result`` on a copy of ``image``.

    Args:
        image: (3, H, W) uint8 RGB tensor the result was computed on.
        result: persons in image pixels.
        keypoint_names: K names (for the left/right colours).
        skeleton: 0-based limb pairs.
        min_score: smallest raw keypoint score drawn.

    Returns:
        An RGB Pillow image of the same size.
    """
    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(1, round(min(width, height) / 200))
    radius = max(1, line + 1)
    for person in result.persons:
        x, y, w, h = person.bbox
        draw.rectangle([x, y, x + w, y + h], outline=_BOX, width=line)
        points = person.keypoints
        for a, b in skeleton:
            if a >= len(points) or b >= len(points):
                continue
            xa, ya, sa = points[a]
            xb, yb, sb = points[b]
            if sa < min_score or sb < min_score:
                continue
            name = keypoint_names[b] if b < len(keypoint_names) else ""
            draw.line([(xa, ya), (xb, yb)], fill=_side_colour(name), width=line * 2)
        for index, (kx, ky, score) in enumerate(points):
            if score < min_score:
                continue
            name = keypoint_names[index] if index < len(keypoint_names) else ""
            draw.ellipse(
                [kx - radius, ky - radius, kx + radius, ky + radius],
                fill=_side_colour(name),
                outline=(0, 0, 0),
            )
    return canvas


def encode(canvas: Image.Image, fmt: Literal["png", "jpeg"]) -> bytes:
    """Encode as PNG (lossless) or JPEG (quality 90)."""
    out = io.BytesIO()
    if fmt == "jpeg":
        canvas.save(out, format="JPEG", quality=90)
    else:
        canvas.save(out, format="PNG", compress_level=3)
    return out.getvalue()
