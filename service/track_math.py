"""The tracker's arithmetic (``service.tracking``): pose and box similarity, the one-to-one
assignment, and the One Euro filter. Pure NumPy/SciPy over arrays; no engine, no state of a stream.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

from model.keypoints import COCO_OKS_SIGMAS

if TYPE_CHECKING:
    from service.tracking import Smoothing

__all__ = ["KEYPOINT_MIN_SCORE", "OneEuroFilter", "iou", "match", "oks", "similarity"]

# A keypoint counts (for box hulls and OKS) when its raw score is above this: the pipeline's own
# visibility threshold of the instance rescoring.
KEYPOINT_MIN_SCORE = 0.2


class OneEuroFilter:
    """The One Euro filter over an array of values (e.g. (K, 2) keypoint pixels), elementwise.

    ``x_hat = a(fc) x + (1 - a(fc)) x_hat_prev`` with ``fc = min_cutoff + beta |dx_hat|`` and
    ``a(f) = 1 / (1 + 1 / (2 pi f dt))``; ``dx_hat`` is the speed, itself low-passed at
    ``d_cutoff``.
    """

    def __init__(self, params: Smoothing) -> None:
        self.params = params
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t = 0.0

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        return 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff * dt))

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        """Filter ``x`` taken at ``t`` seconds; the first call returns ``x`` itself."""
        if self._x is None or self._dx is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        if not dt > 0:  # a repeated or backwards timestamp: one frame at the nominal rate
            dt = 1.0 / self.params.fps
        p = self.params
        dx = (x - self._x) / dt
        self._dx = self._dx + self._alpha(p.d_cutoff, dt) * (dx - self._dx)
        cutoff = p.min_cutoff + p.beta * np.abs(self._dx)
        self._x = self._x + self._alpha(cutoff, dt) * (x - self._x)
        self._t = t
        return self._x.copy()


def similarity(
    keypoints_a: np.ndarray,
    boxes_a: np.ndarray,
    keypoints_b: np.ndarray,
    boxes_b: np.ndarray,
) -> np.ndarray:
    """Pairwise similarity of two sets of persons: max(OKS, IoU).

    OKS is COCO's over the keypoints scored above 0.2 in both persons (0 when none is), with the
    mean of the two box areas as the scale; IoU is the boxes'. OKS says two poses agree; IoU keeps
    a small or partly hidden person matched when its OKS collapses.

    Args:
        keypoints_a: (A, K, 3) x, y, score in pixels.
        boxes_a: (A, 4) x, y, w, h in pixels.
        keypoints_b: (B, K, 3).
        boxes_b: (B, 4).

    Returns:
        (A, B) similarities in [0, 1].
    """
    return np.maximum(oks(keypoints_a, boxes_a, keypoints_b, boxes_b), iou(boxes_a, boxes_b))


def oks(
    keypoints_a: np.ndarray, boxes_a: np.ndarray, keypoints_b: np.ndarray, boxes_b: np.ndarray
) -> np.ndarray:
    """(A, B) COCO OKS over the keypoints scored above 0.2 in both (see ``similarity``)."""
    a, b = len(boxes_a), len(boxes_b)
    if a == 0 or b == 0:
        return np.zeros((a, b))
    k = keypoints_a.shape[1]
    sigmas = np.asarray(COCO_OKS_SIGMAS if k == len(COCO_OKS_SIGMAS) else [0.07] * k)
    var = (2 * sigmas) ** 2  # (K,)
    area_a = boxes_a[:, 2] * boxes_a[:, 3]
    area_b = boxes_b[:, 2] * boxes_b[:, 3]
    scale = (area_a[:, None] + area_b[None, :]) / 2 + np.finfo(np.float64).eps  # (A, B)
    d2 = ((keypoints_a[:, None, :, :2] - keypoints_b[None, :, :, :2]) ** 2).sum(-1)  # (A, B, K)
    e = np.exp(-d2 / var / scale[..., None] / 2)
    visible = (keypoints_a[:, None, :, 2] > KEYPOINT_MIN_SCORE) & (
        keypoints_b[None, :, :, 2] > KEYPOINT_MIN_SCORE
    )
    count = visible.sum(-1)
    return np.where(count > 0, (e * visible).sum(-1) / np.maximum(count, 1), 0.0)


def iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(A, B) intersection over union of (x, y, w, h) boxes."""
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return np.zeros((len(boxes_a), len(boxes_b)))
    area_a = boxes_a[:, 2] * boxes_a[:, 3]
    area_b = boxes_b[:, 2] * boxes_b[:, 3]
    x1 = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    y1 = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    x2 = np.minimum((boxes_a[:, 0] + boxes_a[:, 2])[:, None], (boxes_b[:, 0] + boxes_b[:, 2])[None])
    y2 = np.minimum((boxes_a[:, 1] + boxes_a[:, 3])[:, None], (boxes_b[:, 1] + boxes_b[:, 3])[None])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def match(scores: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """The one-to-one assignment of rows to columns with the largest total score (Hungarian
    method, scipy), keeping the pairs scoring at least ``threshold``.

    Args:
        scores: (A, B) similarities.

    Returns:
        (row, column) pairs.
    """
    if scores.size == 0:
        return []
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if scores[r, c] >= threshold]
