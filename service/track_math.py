"""The tracker's arithmetic and one track's motion (``service.tracking``): pose and box
similarity, the one-to-one assignment, scale-and-shift fits, the One Euro filter, and ``Track``
(a person's last sighting, its anchor box and its motion since). NumPy/SciPy over arrays; no engine,
nothing of a stream's frame order or of which frame runs the detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

from model.keypoints import COCO_OKS_SIGMAS

if TYPE_CHECKING:
    from service.tracking import Smoothing

__all__ = [
    "BROKEN_OKS",
    "KEYPOINT_MIN_SCORE",
    "STILL",
    "Anchor",
    "OneEuroFilter",
    "ScaleShift",
    "Track",
    "associate",
    "fit_scale_shift",
    "in_view",
    "iou",
    "joints_in_both",
    "match",
    "oks",
    "pose_agreement",
    "pose_agreements",
    "similarity",
    "whole_box",
]

# A keypoint counts (for motion fits and OKS) when its raw score is above this: the pipeline's own
# visibility threshold of the instance rescoring.
KEYPOINT_MIN_SCORE = 0.2
# Two poses of one track agreeing less than this (``pose_agreement``) are another pose altogether:
# the track broke from its motion (a cut, another person in its box).
BROKEN_OKS = 0.2
# A point of a scale-and-shift fit missing its fit by more than this many times the median miss
# (and by more than a pixel) is left out of the second pass.
_FIT_OUTLIER = 3.0


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
    terms, counted = _oks_terms(keypoints_a, boxes_a, keypoints_b, boxes_b)
    count = counted.sum(-1)
    return np.where(count > 0, (terms * counted).sum(-1) / np.maximum(count, 1), 0.0)


def pose_agreement(
    keypoints_a: np.ndarray, box_a: np.ndarray, keypoints_b: np.ndarray, box_b: np.ndarray
) -> float | None:
    """How well two poses of one person agree: the median, over the keypoints scored above 0.2 in
    both, of their OKS terms; None when no keypoint is (nothing to compare).

    OKS is their mean: a few joints the pose model misplaces (its noise is largest on a person
    cut by the image edge, whose hidden joints it guesses) pull it down as far as a pose that
    moved as a whole. The median falls only when most joints moved: a cut, another person.

    Args:
        keypoints_a: (K, 3) x, y, score in pixels.
        box_a: (4,) x, y, w, h.
        keypoints_b: (K, 3).
        box_b: (4,).
    """
    agreement = pose_agreements(keypoints_a[None], box_a[None], keypoints_b[None], box_b[None])
    return None if np.isnan(agreement[0, 0]) else float(agreement[0, 0])


def pose_agreements(
    keypoints_a: np.ndarray, boxes_a: np.ndarray, keypoints_b: np.ndarray, boxes_b: np.ndarray
) -> np.ndarray:
    """(A, B) ``pose_agreement`` of every pair, NaN where no keypoint counts; inputs as in
    ``similarity``."""
    terms, counted = _oks_terms(keypoints_a, boxes_a, keypoints_b, boxes_b)
    chosen = np.sort(np.where(counted, terms, np.inf), axis=-1)  # (A, B, K) counted ones first
    count = counted.sum(-1)[..., None]  # (A, B, 1)
    # The median of the first ``count`` sorted terms: the mean of the middle two (one when odd).
    low = np.take_along_axis(chosen, np.maximum(count - 1, 0) // 2, -1)[..., 0]
    high = np.take_along_axis(chosen, count // 2, -1)[..., 0]
    return np.where(count[..., 0] > 0, (low + high) / 2, np.nan)


def _oks_terms(
    keypoints_a: np.ndarray, boxes_a: np.ndarray, keypoints_b: np.ndarray, boxes_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The per-keypoint OKS terms of every pair, (A, B, K), and whether each keypoint counts
    (scored above 0.2 in both), (A, B, K) bool; inputs as in ``similarity``."""
    a, b = len(boxes_a), len(boxes_b)
    k = keypoints_a.shape[1] if keypoints_a.ndim == 3 else keypoints_b.shape[1]
    if a == 0 or b == 0:
        return np.zeros((a, b, k)), np.zeros((a, b, k), dtype=bool)
    sigmas = np.asarray(COCO_OKS_SIGMAS if k == len(COCO_OKS_SIGMAS) else [0.07] * k)
    var = (2 * sigmas) ** 2  # (K,)
    area_a = boxes_a[:, 2] * boxes_a[:, 3]
    area_b = boxes_b[:, 2] * boxes_b[:, 3]
    scale = (area_a[:, None] + area_b[None, :]) / 2 + np.finfo(np.float64).eps  # (A, B)
    d2 = ((keypoints_a[:, None, :, :2] - keypoints_b[None, :, :, :2]) ** 2).sum(-1)  # (A, B, K)
    terms = np.exp(-d2 / var / scale[..., None] / 2)
    counted = (keypoints_a[:, None, :, 2] > KEYPOINT_MIN_SCORE) & (
        keypoints_b[None, :, :, 2] > KEYPOINT_MIN_SCORE
    )
    return terms, counted


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


def associate(
    predicted: np.ndarray,
    boxes: np.ndarray,
    found: np.ndarray,
    found_boxes: np.ndarray,
    pose_only: np.ndarray,
    threshold: float,
    size: tuple[int, int],
) -> tuple[list[tuple[int, int]], list[bool]]:
    """Tracks to the persons of a frame: the best one-to-one assignment (``match``) over
    ``similarity``, the rows of ``pose_only`` (tracks that broke) by pose alone: their OKS where
    the two poses agree at all (``pose_agreement`` over joints in view, at least ``BROKEN_OKS``),
    else 0.

    Args:
        predicted: (T, K, 3) the tracks' keypoints moved on to this frame, pixels.
        boxes: (T, 4) their boxes moved on, x, y, w, h.
        found: (P, K, 3) the frame's persons.
        found_boxes: (P, 4).
        pose_only: (T,) bool.
        threshold: Least score of a pair.
        size: (width, height) of the frame.

    Returns:
        (track, person) pairs, and whether each pair's poses agree (not broken; true where no
        joint in view tells).
    """
    agreement = pose_agreements(  # (T, P), NaN where no joint in view counts in both
        in_view(predicted, *size), boxes, in_view(found, *size), found_boxes
    )
    by_pose = np.where(agreement < BROKEN_OKS, 0.0, oks(predicted, boxes, found, found_boxes))
    scores = similarity(predicted, boxes, found, found_boxes)
    scores[pose_only] = by_pose[pose_only]
    pairs = match(scores, threshold)
    return pairs, [not agreement[row, col] < BROKEN_OKS for row, col in pairs]


def in_view(keypoints: np.ndarray, width: float, height: float) -> np.ndarray:
    """The keypoints with the score of those outside the image set to 0.

    A pose model still places the joints of a person cut by the image edge outside the image,
    often with a fair score; they are guesses, so motion fits and pose agreement leave them out.

    Args:
        keypoints: (..., K, 3) x, y, score in pixels.

    Returns:
        (..., K, 3) a copy.
    """
    out = keypoints.copy()
    x, y = keypoints[..., 0], keypoints[..., 1]
    outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
    out[..., 2] = np.where(outside, 0.0, keypoints[..., 2])
    return out


@dataclass(frozen=True)
class ScaleShift:
    """A motion of the image plane without rotation: ``p -> scale * p + shift`` (a pan, a zoom,
    a person stepping nearer), fitted to points seen twice.

    Attributes:
        scale: Size ratio.
        shift: (2,) px.
        error: Root mean square miss (px) of the points the fit kept.
        count: How many points it kept.
        centre: (2,) their mean (before the motion).
        spread: Root mean square distance (px) of them from their mean.
    """

    scale: float
    shift: np.ndarray
    error: float
    count: int
    centre: np.ndarray
    spread: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) points (or (..., 4) x1, y1, x2, y2 boxes) moved."""
        return self.scale * points + np.tile(self.shift, points.shape[-1] // 2)

    def uncertainty(self, points: np.ndarray) -> float:
        """Standard error (px) of where the fit puts the farthest of (N, 2) points.

        Least squares: the fitted shift is known to ``error / sqrt(count)`` at the points'
        centre, the scale to ``error / (sqrt(count) * spread)``, so a point ``r`` px from the
        centre to ``error / sqrt(count) * sqrt(1 + (r / spread)^2)``: a fit to a few joints
        close together says little about a box corner far from them. Infinite under three
        points (two fix the fit, nothing checks it) or with no spread.
        """
        if self.count < 3 or self.spread < 1e-6:
            return math.inf
        reach = float(np.hypot(*(points - self.centre).T).max())
        return self.error / math.sqrt(self.count) * math.sqrt(1 + (reach / self.spread) ** 2)


def fit_scale_shift(source: np.ndarray, target: np.ndarray) -> ScaleShift | None:
    """The ``ScaleShift`` that takes ``source`` closest to ``target``.

    Least squares, once over all points and once more without those missing the first fit by
    far (a joint the pose model misplaced in one of the two).

    Args:
        source: (N, 2) points.
        target: (N, 2) the same points later.

    Returns:
        The fit; with one point (or all at one place) its scale is 1 and its shift the mean
        shift; None without points.
    """
    if len(source) == 0:
        return None
    fit = _least_squares(source, target)
    if len(source) >= 3:
        misses = np.hypot(*(fit.apply(source) - target).T)  # (N,)
        inliers = misses <= max(_FIT_OUTLIER * float(np.median(misses)), 1.0)
        if 2 <= inliers.sum() < len(source):
            fit = _least_squares(source[inliers], target[inliers])
    return fit


def _least_squares(source: np.ndarray, target: np.ndarray) -> ScaleShift:
    """``fit_scale_shift``'s one pass over (N >= 1, 2) points; a scale that is not positive (the
    points swapped sides: no motion of one body) gives way to the mean shift."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    spread = float(((source - source_mean) ** 2).sum())
    scale = 1.0
    if len(source) >= 2 and spread > 1e-6:
        scale = float(((source - source_mean) * (target - target_mean)).sum()) / spread
    if not scale > 0:
        scale = 1.0
    shift = target_mean - scale * source_mean
    error = float(np.sqrt(((scale * source + shift - target) ** 2).sum(-1).mean()))
    return ScaleShift(
        scale, shift, error, len(source), source_mean, math.sqrt(spread / len(source))
    )


# ---------------------------------------------------------------------------------------------
# One track's motion

# No motion: a track's anchor is its last sighting.
STILL = ScaleShift(1.0, np.zeros(2), 0.0, 0, np.zeros(2), 0.0)
# A detector box side this close to the image's edge (share of the image's side, at least 2 px)
# lies on it: the person is cut there (detectors' boxes stop a pixel or two short of the edge).
_EDGE_SHARE = 0.01


@dataclass(frozen=True)
class Anchor:
    """A track's last detector (or caller) box, the keypoints found in it, and the track's
    velocity and growth then: its tracked boxes are this box carried by the motion since."""

    corners: np.ndarray  # (4,) x1, y1, x2, y2 of the whole person (``whole_box``)
    keypoints: np.ndarray  # (K, 3)
    velocity: np.ndarray  # (2,) px per frame
    growth: float  # size ratio per frame

    @property
    def centre(self) -> np.ndarray:
        return (self.corners[:2] + self.corners[2:]) / 2


@dataclass
class Track:
    id: int
    keypoints: np.ndarray  # (K, 3) raw x, y, score of its last sighting
    box: tuple[float, float, float, float]  # x, y, w, h of its last sighting
    box_score: float  # of the last detector (or caller) box it was matched to
    unseen: int = 0  # frames since its last sighting
    smoother: OneEuroFilter | None = None
    anchor: Anchor | None = None  # set by its first sighting (always on a detector frame)
    since_anchor: int = 0  # frames from the anchor to the last sighting
    motion: ScaleShift | None = None  # from the anchor to the last sighting; None: not known
    leaving: bool = False  # its last tracked box: see ``Tracker._box_around``
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # box centre, px/frame, (2,)
    growth: float = 1.0  # size ratio per frame
    broken: bool = False  # its last tracked pose broke from its motion (kept the one before)
    sightings: int = 0  # its motion is known from the second on

    def predicted(self, frames: int = 1) -> np.ndarray:
        """(K, 3) keypoints moved on ``frames`` frames at the track's velocity and growth."""
        centre = np.asarray(self.box[:2]) + np.asarray(self.box[2:]) / 2
        moved = self.keypoints.copy()
        moved[:, :2] = (
            centre + self.velocity * frames + (moved[:, :2] - centre) * (self.growth**frames)
        )
        return moved

    def sighted(
        self,
        keypoints: np.ndarray,
        box: tuple[float, float, float, float],
        motion: ScaleShift | None,
        size: tuple[int, int],
        *,
        boxed: bool,
    ) -> None:
        """Take a new sighting, ``unseen + 1`` frames after the last.

        Args:
            keypoints: (K, 3).
            box: The box it was found in; a detector's or caller's (``boxed``) becomes the
                anchor.
            motion: From the anchor's keypoints to these (``Tracker._motions`` of
                ``service.tracking``), or None.
            size: (width, height) of the image.

        The velocity and growth are the motion's per frame since the anchor, weighed by the
        frames it spans against the velocity and growth before the anchor. Measured from the
        anchor, not from the last frame: a tracked frame's keypoints lean towards the box they
        were found in, so a motion measured frame to frame would feed one box's error into the
        next.
        """
        span = self.since_anchor + self.unseen + 1
        anchor = self.anchor
        if anchor is not None and motion is not None:
            weight = span / (span + 1)
            step = (motion.apply(anchor.centre) - anchor.centre) / span
            self.velocity = weight * step + (1 - weight) * anchor.velocity
            self.growth = math.exp(
                weight * math.log(motion.scale) / span + (1 - weight) * math.log(anchor.growth)
            )
        if boxed:
            corners = whole_box(box, keypoints, size)
            self.anchor = Anchor(corners, keypoints, self.velocity, self.growth)
            self.since_anchor, self.motion = 0, STILL
        else:
            self.since_anchor, self.motion = span, motion
        self.keypoints, self.box = keypoints, box
        self.sightings += 1


def whole_box(
    box: tuple[float, float, float, float], keypoints: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """A detector's (x, y, w, h) box of a person and its (K, 3) keypoints -> (4,) x1, y1, x2, y2
    of the whole person.

    The detector boxes only the part in view, so a box side on the image's edge is moved out
    over the joints the pose model places beyond it (at most one box size): carried along by a
    pan or a step, the box then uncovers the rest of a person coming into view, and a person
    moving away from the edge takes the side along with it.
    """
    x, y, w, h = box
    corners = np.array([x, y, x + w, y + h])
    edges = np.array([0.0, 0.0, *size])
    on_edge = np.abs(corners - edges) <= np.maximum(_EDGE_SHARE * np.tile(size, 2), 2.0)
    extent = np.array([w, h])
    low = np.maximum(keypoints[:, :2].min(0), corners[:2] - extent)
    high = np.minimum(keypoints[:, :2].max(0), corners[2:] + extent)
    whole = np.concatenate((np.minimum(corners[:2], low), np.maximum(corners[2:], high)))
    return np.where(on_edge, whole, corners)


def joints_in_both(
    source: np.ndarray, target: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 2) positions in two (K, 3) keypoint sets of the joints scored above 0.2 and
    inside the image (``in_view``) in both."""
    a, b = in_view(source, *size), in_view(target, *size)
    both = (a[:, 2] > KEYPOINT_MIN_SCORE) & (b[:, 2] > KEYPOINT_MIN_SCORE)
    return a[both, :2], b[both, :2]
