"""The one validation pass of a pose request, run by the engine; transports parse, never validate.

Checked, with an ``InvalidRequestError`` naming what is wrong (code ``bad_boxes``, ``bad_image``
or ``bad_options``):

- the image: a (3, H, W) uint8 tensor with H, W >= 1 (an encoded upload is checked by its decoder);
- the caller's boxes ``[x, y, w, h(, score)]`` in pixels: a list of 4- or 5-number rows (or an
  (M, 4|5) tensor), at most ``max_boxes``; every value a finite number within +-``MAX_BOX_COORD``
  (so that the crop geometry cannot overflow float32); width and height at least
  ``min_box_size_px``; the score in [0, 1] (a 4-value box gets 1);
- once the image size is known (after decoding): every box overlaps the image;
- the options: booleans are booleans, the precision is one the pipeline knows.

``parse_boxes`` runs before the request is queued (no decoding is spent on bad boxes);
``check_boxes_in_image`` when the image size is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, get_args

import numpy as np
import torch

from model.interfaces import PoseOptions, Precision
from service.engine_api import MAX_BOX_COORD, RequestLimits
from service.errors import InvalidRequestError

_BOX_FORM = "[[x, y, w, h(, score)], ...] in pixels"


def check_image(image: torch.Tensor) -> None:
    """Refuse a tensor the pipeline cannot take, so that one bad request cannot fail a batch."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise InvalidRequestError(
            "bad_image",
            f"image must be a (3, H, W) uint8 RGB tensor, got {tuple(image.shape)} {image.dtype}",
        )
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise InvalidRequestError("bad_image", f"image is empty: {tuple(image.shape)}")


_PRECISIONS = get_args(Precision)
_FLAGS = tuple(f.name for f in fields(PoseOptions) if f.name != "precision")


def check_options(options: PoseOptions) -> None:
    """Booleans must be booleans and the precision one of ``Precision``."""
    if options.precision not in _PRECISIONS:
        raise InvalidRequestError(
            "bad_options",
            f"precision must be one of {list(_PRECISIONS)}, got {options.precision!r}",
        )
    for name in _FLAGS:
        value = getattr(options, name)
        if value is not True and value is not False:
            raise InvalidRequestError("bad_options", f"{name} must be true or false, got {value!r}")


def parse_boxes(boxes: Any, limits: RequestLimits) -> torch.Tensor:
    """Check caller boxes and return them as a tensor.

    Args:
        boxes: a sequence of ``[x, y, w, h]`` or ``[x, y, w, h, score]`` rows of numbers, or an
            (M, 4) / (M, 5) tensor or array.
        limits: the count and size limits.

    Returns:
        (M, 5) float32 [x, y, w, h, score] on the CPU; a box without a score gets 1.0.

    Raises:
        InvalidRequestError: "bad_boxes" naming the first bad box (or the count over the limit).
    """
    if isinstance(boxes, torch.Tensor | np.ndarray):
        array = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else boxes
        if array.ndim != 2:
            raise InvalidRequestError(
                "bad_boxes", f"boxes must be a 2-D array, got shape {array.shape}"
            )
        if array.shape[0] > limits.max_boxes:
            raise _too_many(array.shape[0], limits)
        if array.shape[1] not in (4, 5) or not np.issubdtype(array.dtype, np.number):
            raise InvalidRequestError("bad_boxes", f"boxes must be {_BOX_FORM}")
        boxes = array.astype(np.float64).tolist()
    if not isinstance(boxes, Sequence) or isinstance(boxes, str | bytes):
        raise InvalidRequestError("bad_boxes", f"boxes must be {_BOX_FORM}")
    if len(boxes) > limits.max_boxes:
        raise _too_many(len(boxes), limits)
    rows = [_check_box(index, box, limits) for index, box in enumerate(boxes)]
    # Through numpy: torch.tensor() on a list of lists costs twice as much.
    return torch.from_numpy(np.array(rows, dtype=np.float32).reshape(len(rows), 5))


def _too_many(count: int, limits: RequestLimits) -> InvalidRequestError:
    return InvalidRequestError(
        "bad_boxes", f"{count} boxes given; at most {limits.max_boxes} are allowed"
    )


def _check_box(index: int, box: Any, limits: RequestLimits) -> list[float]:
    """One box -> [x, y, w, h, score] floats, or InvalidRequestError naming ``index``."""
    where = f"box {index}"
    sequence = type(box) is list or type(box) is tuple  # (the common cases, without an ABC check)
    sequence = sequence or (isinstance(box, Sequence) and not isinstance(box, str | bytes))
    if not sequence or len(box) not in (4, 5):
        raise InvalidRequestError(
            "bad_boxes", f"{where}: expected [x, y, w, h] or [x, y, w, h, score]"
        )
    values: list[float] = []
    for value in box:
        if type(value) is float:  # the common case, without the checks below
            if math.isfinite(value) and abs(value) <= MAX_BOX_COORD:
                values.append(value)
                continue
        elif isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise InvalidRequestError("bad_boxes", f"{where}: {_short(value)} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            raise InvalidRequestError("bad_boxes", f"{where}: values must be finite numbers")
        if abs(number) > MAX_BOX_COORD:
            raise InvalidRequestError(
                "bad_boxes", f"{where}: {number:g} is out of range (|v| <= 1e7)"
            )
        values.append(number)
    x, y, w, h = values[:4]
    if w < limits.min_box_size_px or h < limits.min_box_size_px:
        raise InvalidRequestError(
            "bad_boxes",
            f"{where}: width and height must be at least {limits.min_box_size_px:g} px, "
            f"got {w:g} x {h:g}",
        )
    score = values[4] if len(values) == 5 else 1.0
    if not 0.0 <= score <= 1.0:
        raise InvalidRequestError(
            "bad_boxes", f"{where}: the score must be in [0, 1], got {score:g}"
        )
    return [x, y, w, h, score]


def check_boxes_in_image(boxes: torch.Tensor, width: int, height: int) -> None:
    """Every box must overlap the ``width`` x ``height`` image.

    Args:
        boxes: (M, 5) [x, y, w, h, score] as ``parse_boxes`` returns them.

    Raises:
        InvalidRequestError: "bad_boxes" naming the first box that lies outside.
    """
    # A loop over Python floats: a request has a few boxes (at most ``max_boxes``), where each
    # tensor op would cost more than the whole loop.
    for j, (x, y, w, h, *_) in enumerate(boxes.tolist()):
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            box = ", ".join(f"{v:g}" for v in (x, y, w, h))
            raise InvalidRequestError(
                "bad_boxes", f"box {j}: [{box}] lies outside the {width}x{height} image"
            )


def _short(value: Any, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: an error message stays small whatever was sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
