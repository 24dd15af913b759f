"""A ``ModelDescription`` for the test doubles of a pipeline (what ``TopDownPipeline.describe()``
returns, with fake values)."""

from __future__ import annotations

from typing import Any

from model.interfaces import ModelDescription, PoseOptions
from model.keypoints import COCO_KEYPOINT_NAMES, COCO_SKELETON


def fake_description(model: str = "fake", **overrides: Any) -> ModelDescription:
    """A COCO-17 model called ``model`` on the CPU; ``overrides`` replace any field."""
    fields: dict[str, Any] = {
        "model": model,
        "weights_sha256": None,
        "input_size": (192, 256),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "padding": 1.25,
        "keypoint_names": COCO_KEYPOINT_NAMES,
        "skeleton": COCO_SKELETON,
        "has_sigmas": True,
        "detector": None,
        "detector_weights_sha256": None,
        "device": "cpu",
        "max_crops_per_batch": 256,
        "defaults": PoseOptions(),
        "oks_nms_threshold": 0.9,
    }
    fields.update(overrides)
    return ModelDescription(**fields)
