"""What ``pose-client`` writes: result dicts trimmed by ``--min-score``, float32 values with their
shortest digits, and COCO keypoint results.

COCO results are the list ``pycocotools``' ``COCO.loadRes`` reads: one
``{"image_id", "category_id": 1, "keypoints": [x, y, v] * 17, "score"}`` per person, keypoints in
COCO's own order (matched by name to the server's ``keypoint_names``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

# The COCO keypoint format's own order (part of the file format, like its field names).
COCO_KEYPOINT_NAMES = (
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
PERSON_CATEGORY_ID = 1


def short_floats(value: Any) -> Any:
    """Float32 values (gRPC) written with their shortest digits: 0.1, not 0.10000000149011612."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    if isinstance(value, list):
        return [short_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: short_floats(v) for k, v in value.items()}
    return value


def apply_min_score(result: dict[str, Any], min_score: float) -> dict[str, Any]:
    """``result`` without the persons whose score is below ``min_score``, and with each keypoint
    (and its sigmas) below it replaced by None, so that positions still name keypoints."""
    if "persons" not in result:
        return result
    persons = []
    for person in result["persons"]:
        if person["score"] < min_score:
            continue
        points = person["keypoints"]
        low = [point is None or point[2] < min_score for point in points]
        kept = {**person, "keypoints": [None if d else p for d, p in zip(low, points, strict=True)]}
        if person.get("sigmas") is not None:
            sigmas = person["sigmas"]
            kept["sigmas"] = [None if d else s for d, s in zip(low, sigmas, strict=True)]
        persons.append(kept)
    return {**result, "persons": persons}


def coco_order(keypoint_names: Sequence[str]) -> list[int]:
    """Where each COCO keypoint is in the server's ``keypoint_names``.

    Raises:
        ValueError: the server's keypoints lack some of COCO's (the message lists them).
    """
    position = {name: i for i, name in enumerate(keypoint_names)}
    missing = [name for name in COCO_KEYPOINT_NAMES if name not in position]
    if missing:
        raise ValueError(
            f"the served model has no COCO keypoint(s) {', '.join(missing)}; "
            "--format coco needs the 17 COCO keypoints"
        )
    return [position[name] for name in COCO_KEYPOINT_NAMES]


def coco_image_id(name: str) -> int | None:
    """COCO's image id from a file name (``000000000785.jpg`` -> 785); None if not numeric."""
    stem = PurePath(name).stem
    return int(stem) if stem.isascii() and stem.isdigit() else None


def coco_results(
    result: dict[str, Any], image_id: int, order: Sequence[int], min_score: float | None = None
) -> list[dict[str, Any]]:
    """The persons of one result as COCO keypoint results.

    Args:
        result: a result dict (a failed one gives no entries).
        image_id: COCO's id of the image.
        order: ``coco_order`` of the server's keypoints.
        min_score: persons below it are left out and keypoints below it get visibility 0 (their
            x and y stay: COCO's evaluation scores all 17 points of a result).
    """
    entries = []
    for person in result.get("persons", ()):
        if min_score is not None and person["score"] < min_score:
            continue
        flat: list[float] = []
        for index in order:
            x, y, score = person["keypoints"][index]
            visible = 0 if min_score is not None and score < min_score else 1
            flat += [round(x, 2), round(y, 2), visible]
        entries.append(
            {
                "image_id": image_id,
                "category_id": PERSON_CATEGORY_ID,
                "keypoints": flat,
                "score": person["score"],
            }
        )
    return entries
