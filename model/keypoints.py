"""COCO-17 keypoint metadata: names, skeleton, OKS sigmas, and flip indices derived from names."""

from __future__ import annotations

from collections.abc import Sequence

COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

# 0-based limb pairs (COCO person_keypoints skeleton, converted from its 1-based form).
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 12),
    (5, 11),
    (6, 12),
    (5, 6),
    (5, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (1, 2),
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
)

# Per-keypoint OKS sigmas of COCO keypoint evaluation (same order as the names).
COCO_OKS_SIGMAS: tuple[float, ...] = (
    0.026,
    0.025,
    0.025,
    0.035,
    0.035,
    0.079,
    0.079,
    0.072,
    0.072,
    0.062,
    0.062,
    0.107,
    0.107,
    0.087,
    0.087,
    0.089,
    0.089,
)


def flip_indices(names: Sequence[str]) -> list[int]:
    """Index permutation that swaps left/right keypoints, derived from their names.

    ``flip_indices(COCO_KEYPOINT_NAMES)[5] == 6`` (left_shoulder <-> right_shoulder); a name with no
    ``left_``/``right_`` counterpart maps to itself.
    """
    position = {name: i for i, name in enumerate(names)}
    out = []
    for i, name in enumerate(names):
        if name.startswith("left_"):
            twin = "right_" + name[len("left_") :]
        elif name.startswith("right_"):
            twin = "left_" + name[len("right_") :]
        else:
            twin = name
        out.append(position.get(twin, i))
    return out


def flip_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """Left/right pairs ``(i, j)`` with ``i < j``, e.g. ``[(1, 2), (3, 4), ...]`` for COCO."""
    return [(i, j) for i, j in enumerate(flip_indices(names)) if i < j]
