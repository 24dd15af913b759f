"""Draw pose results on their image (boxes, skeleton limbs, keypoints) and encode it as PNG or JPEG.

Used by ``POST /v1/pose/render`` for people who would rather look than read. The drawing is the
client's (``service.client.draw``: limbs coloured by side from the keypoint names, a keypoint or
limb drawn only when its raw score reaches ``min_score``), so that ``pose-client --render`` and the
server draw alike from one piece of code.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image

from model.interfaces import ImageResult


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
    # Imported here: the client package imports grpc, whose C core reads GRPC_VERBOSITY when it is
    # first imported, and ``service.__main__`` sets that only once the process starts.
    from service.client import draw

    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), mode="RGB")
    persons = [{"bbox": p.bbox, "keypoints": p.keypoints} for p in result.persons]
    return draw.draw_poses(canvas, persons, keypoint_names, skeleton, min_score=min_score)


def encode(canvas: Image.Image, fmt: Literal["png", "jpeg"]) -> bytes:
    """Encode as PNG (lossless) or JPEG (quality 90)."""
    out = io.BytesIO()
    if fmt == "jpeg":
        canvas.save(out, format="JPEG", quality=90)
    else:
        canvas.save(out, format="PNG", compress_level=3)
    return out.getvalue()
