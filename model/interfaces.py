"""The data passed between layers: pose models, detectors, the pipeline and the serving engine.

Everything here is a plain dataclass or a ``Protocol``; no behaviour lives in this module. The
pipeline is generic over any ``PoseModel`` (DistilPose, or another top-down model such as BlazePose)
and any ``Detector``; the engine only sees ``PipelineItem`` in and ``ImageResult`` out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from model.keypoints import COCO_KEYPOINT_NAMES, COCO_SKELETON

if TYPE_CHECKING:
    import torch

    from model.crops import PackedImages

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class PoseModelInfo:
    """What the top-down geometry needs to know about a pose model (carried by its weights)."""

    name: str  # "distilpose_s", "distilpose_l", "blazepose_full", ...
    input_size: tuple[int, int]  # (W, H) of the crop, e.g. (192, 256)
    mean: tuple[float, float, float]  # RGB, in [0, 1] units, e.g. ImageNet (0.485, 0.456, 0.406)
    std: tuple[float, float, float]  # RGB, in [0, 1] units
    padding: float = 1.25  # box enlargement before the crop
    keypoint_names: tuple[str, ...] = COCO_KEYPOINT_NAMES
    skeleton: tuple[tuple[int, int], ...] = COCO_SKELETON
    pixel_std: float = 200.0  # the official "scale" unit, kept for parity with mmpose
    has_sigmas: bool = True  # whether ``predict`` gives sigmas (``PoseOutput.sigmas``)
    # Whether a keypoint that lands outside the image scores 0: true for a model whose scores are
    # probabilities of being seen (BlazePose); false keeps a model's raw scores (DistilPose parity).
    zero_out_of_frame: bool = False
    # What a crop shows outside the image (``model.crops.warp_crops``): "constant" zeros
    # (mmpose's crops, DistilPose parity) or "replicate" (MediaPipe's landmark crops, BlazePose).
    border: str = "constant"

    @property
    def aspect(self) -> float:
        """Crop width / height (0.75 for 192x256)."""
        return self.input_size[0] / self.input_size[1]


@dataclass
class PoseOutput:
    """Batched output of a pose model on N normalised crops.

    coords: (N, K, 2) (x, y) in [0, 1] crop coordinates (x over the crop width, y over its height).
    scores: (N, K) per-keypoint confidence. Raw for DistilPose: may be < 0 or > 1.
    sigmas: (N, K, 2) uncertainty in [0, 1] crop units, or None when the model has none.
    """

    coords: torch.Tensor
    scores: torch.Tensor
    sigmas: torch.Tensor | None = None


@runtime_checkable
class PoseModel(Protocol):
    """A top-down pose model as the pipeline uses it."""

    info: PoseModelInfo

    def predict(self, crops: torch.Tensor) -> PoseOutput:
        """Run on normalised crops (N, 3, H, W) (on the model's device and dtype)."""
        ...


@runtime_checkable
class Detector(Protocol):
    """A person detector: a batch of uint8 RGB images (3, H, W) of any sizes -> boxes per image."""

    name: str

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return per image an (M, 5) float32 tensor of [x, y, w, h, score] in pixels, by score."""
        ...


@dataclass
class Rois:
    """Rotated square crops for the pose model, in image pixels, one per person box.

    centers: (N, 2) (x, y).
    sides: (N,) side length.
    rotations: (N,) degrees, with the sign of ``model.crops.crop_to_image_affine``.
    found: (N,) bool: a ROI was found for the box (else its row is meaningless and the box's own
        crop is used).
    scores: (N,) confidence of each ROI (0 where none was found).
    """

    centers: torch.Tensor
    sides: torch.Tensor
    rotations: torch.Tensor
    found: torch.Tensor
    scores: torch.Tensor


@runtime_checkable
class RoiFinder(Protocol):
    """Places the pose model's crop for each person box (e.g. ``model.pose_detector.BodyRois``)."""

    name: str

    def __call__(
        self, packed: PackedImages, image_index: torch.Tensor, boxes: torch.Tensor
    ) -> Rois:
        """boxes (N, >=4) [x, y, w, h, ...] px of images ``image_index`` (N,) -> N ROIs."""
        ...


@dataclass(frozen=True)
class PoseOptions:
    """Per-request options. Defaults are the paper's inference settings."""

    flip_test: bool = True
    return_sigmas: bool = False
    oks_nms: bool = False  # OKS-NMS over detector persons (official threshold 0.9)
    precision: Precision = "fp32"  # honoured on CUDA; CPU always runs fp32
    swap_flip_scores: bool = False  # False = official score merge (the quirk); True = corrected


@dataclass
class PipelineItem:
    """One image of a batch.

    image: (3, H, W) uint8 RGB tensor, on any device.
    boxes: (M, 4) or (M, 5) float32 [x, y, w, h(, score)] in pixels, or None to use the detector
        (or the whole image when no detector is configured).
    """

    image: torch.Tensor
    boxes: torch.Tensor | None = None
    options: PoseOptions = field(default_factory=PoseOptions)


@dataclass
class Person:
    """One person in image pixels. Keypoint scores are the model's raw values."""

    bbox: tuple[float, float, float, float]  # x, y, w, h
    bbox_score: float
    score: float  # bbox_score x mean(keypoint scores > 0.2), 0 when none is above 0.2
    keypoints: list[tuple[float, float, float]]  # K x (x, y, score)
    sigmas: list[tuple[float, float]] | None = None  # K x (sx, sy) in pixels, when asked


@dataclass
class ImageResult:
    """All persons of one image: in caller-box order, or by descending score for detector boxes."""

    width: int
    height: int
    persons: list[Person]


@dataclass
class BatchStats:
    """What one pipeline call did, for metrics: per-stage batch sizes and compute seconds."""

    detect_images: int = 0
    detect_seconds: float = 0.0
    pose_crops: int = 0
    pose_seconds: float = 0.0
    persons_per_image: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ModelDescription:
    """What a pipeline serves, as every transport and the metrics describe it.

    Built by ``TopDownPipeline.describe()``; ``source`` and ``licence`` come from the model
    catalogue (None for a model that is not in it, e.g. a test double).
    """

    model: str  # the pose model's name ("distilpose_s", "blazepose_full", ...)
    weights_sha256: str | None  # of the pose weight file; None for random weights
    input_size: tuple[int, int]  # (W, H) of the crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    padding: float
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]
    has_sigmas: bool  # whether the model predicts per-keypoint sigmas
    detector: str | None  # None: caller boxes, else the whole image
    detector_weights_sha256: str | None
    device: str
    max_crops_per_batch: int
    defaults: PoseOptions
    oks_nms_threshold: float
    source: str | None = None
    licence: str | None = None
    # what runs the networks: "torch", or an exported graph's runtime and precisions
    # ("openvino 2026.4.1 (fp32 as f32, bf16 as bf16)"; see ``model.backends``)
    backend: str = "torch"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: tuples become lists, ``defaults`` a dict."""
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["keypoint_names"] = list(self.keypoint_names)
        out["skeleton"] = [list(edge) for edge in self.skeleton]
        return out
