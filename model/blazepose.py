"""BlazePose-full (MediaPipe pose landmark model, GHUM topology), converted to plain PyTorch.

Bazarevsky et al., "BlazePose: On-device Real-time Body Pose tracking" (CVPR-W 2020). The network is
``mediapipe/modules/pose_landmark/pose_landmark_full.tflite`` from the ``mediapipe==0.10.21`` wheel
(Apache-2.0, (c) The MediaPipe Authors), read by ``model.tflite_graph``. Ported:

* the landmark network on a 256x256 RGB crop in [0, 1] (outputs: 39 points x (x, y, z, visibility
  logit, presence logit) in input pixels, a pose-presence probability, a 64x64x39 heatmap);
* MediaPipe's post-processing of one crop (``TensorsToLandmarks`` + ``RefineLandmarksFromHeatmap``,
  kernel 7, refine where the window's max sigmoid >= 0.5), vectorised over crops;
* MediaPipe's ROI rule from two alignment points (``AlignmentPointsRects`` + ``RectTransformation``)
  applied to the auxiliary points 33 (hip centre) and 34 (scale point), for an optional second,
  rotated pass (``roi_from_auxiliary``; ``predict_with_auxiliary`` returns the two points).

The pose detector that places MediaPipe's crop is ``model.pose_detector``; served with it, each
person box's crop is the body-centred, rotated ROI of the detection in it (``BodyRois``), and
crops show the image's edge pixels beyond it (MediaPipe's ``BORDER_REPLICATE``; with both, our
landmarks on MediaPipe's ROI are within ~2 crop pixels of the Pose solution's own).

Left out: the segmentation and world-landmark heads (pruned from the converted graph), smoothing
across video frames.

COCO-17 keypoints are BlazePose points ``BLAZEPOSE_TO_COCO``; their score is the probability that
the point is seen: pose presence x sigmoid(visibility) x sigmoid(presence), MediaPipe's "a person is
in the crop" (it drops crops under 0.5), "the point is not occluded" and "the point is inside the
frame". A box around no person (a detector's false positive) so scores near 0 on every point, and
the pipeline zeroes a point decoded outside the image (``PoseModelInfo.zero_out_of_frame``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model.convgraph import ConvGraph
from model.interfaces import PoseModelInfo, PoseOutput

NUM_LANDMARKS = 39  # 33 body points + auxiliary points 33 (hip centre), 34 (scale point), 35..38
INPUT_SIZE = 256
HEATMAP_KERNEL = 7
MIN_CONFIDENCE_TO_REFINE = 0.5
# Enlargement of the second-pass square. MediaPipe uses 1.25 around the ROI derived from its pose
# detector and 1.5 around the one derived from the previous video frame; 1.25 scored better on
# still images here (mean OKS 0.753 vs 0.703 on the 12 COCO sample persons after a first pass at
# padding 1.5, ground-truth boxes, no flip; see the README).
ROI_SCALE = 1.25
BLAZEPOSE_TO_COCO: tuple[int, ...] = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)

# TFLite output tensor names -> ours (segmentation "Identity_2" and world "Identity_4" are dropped).
TFLITE_OUTPUTS = {"landmarks": "Identity", "presence": "Identity_1", "heatmap": "Identity_3"}

BLAZEPOSE_FULL_INFO = PoseModelInfo(
    name="blazepose_full",
    input_size=(INPUT_SIZE, INPUT_SIZE),
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    padding=1.5,  # mean OKS 0.741 vs 0.695 at 1.25 on the COCO samples (one pass, no flip)
    has_sigmas=False,
    zero_out_of_frame=True,
    border="replicate",  # MediaPipe's landmark crops (mean OKS 0.766 vs 0.758 with zeros, GT boxes)
)


@dataclass
class BlazePoseOutput:
    """All outputs of one forward over N crops.

    landmarks: (N, 39, 2) (x, y) in [0, 1] crop coordinates, heatmap-refined.
    visibility: (N, 39) sigmoid of the visibility logit.
    presence: (N, 39) sigmoid of the per-point presence logit.
    pose_presence: (N,) probability that a pose is in the crop (MediaPipe drops < 0.5).
    seen: (N, 39) pose_presence x visibility x presence: the keypoint score (module docstring).
    """

    landmarks: torch.Tensor
    visibility: torch.Tensor
    presence: torch.Tensor
    pose_presence: torch.Tensor
    seen: torch.Tensor


def refine_from_heatmap(
    coords: torch.Tensor,
    heatmap: torch.Tensor,
    kernel: int = HEATMAP_KERNEL,
    min_confidence: float = MIN_CONFIDENCE_TO_REFINE,
) -> torch.Tensor:
    """MediaPipe ``RefineLandmarksFromHeatMap``, batched over crops and points.

    Per point: the heatmap cell ``(int(y * h), int(x * w))`` (truncation), a ``kernel`` x ``kernel``
    window around it clipped to the heatmap, ``s = sigmoid(heatmap)`` in it; when ``max(s) >=
    min_confidence`` the point becomes ``(sum(col * s) / w, sum(row * s) / h) / sum(s)``. A point
    left, right or above the heatmap is kept as is; as in MediaPipe one below it is not tested (its
    window is clipped, usually to nothing).

    Args:
        coords: (N, K, 2) (x, y) in [0, 1] crop coordinates.
        heatmap: (N, K, h, w) logits.
        kernel: window size (odd).
        min_confidence: refinement threshold on the window's max sigmoid.

    Returns:
        (N, K, 2) refined coordinates.
    """
    n, k, h, w = heatmap.shape
    col = torch.trunc(coords[..., 0] * w).long()  # (N, K)
    row = torch.trunc(coords[..., 1] * h).long()
    offsets = torch.arange(kernel, device=heatmap.device) - (kernel - 1) // 2  # (k,)
    cols = col.unsqueeze(-1).unsqueeze(-1) + offsets.view(1, 1, 1, -1)  # (N, K, 1, k)
    rows = row.unsqueeze(-1).unsqueeze(-1) + offsets.view(1, 1, -1, 1)  # (N, K, k, 1)
    inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)  # (N, K, k, k)
    flat = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).reshape(n, k, -1)
    conf = torch.sigmoid(heatmap.reshape(n, k, h * w).gather(2, flat))  # (N, K, k*k)
    conf = conf * inside.reshape(n, k, -1).to(conf.dtype)
    total = conf.sum(-1)  # (N, K)
    peak = conf.amax(-1)
    col_mean = (conf * cols.expand(-1, -1, kernel, -1).reshape(n, k, -1)).sum(-1) / w
    row_mean = (conf * rows.expand(-1, -1, -1, kernel).reshape(n, k, -1)).sum(-1) / h
    refined = torch.stack((col_mean, row_mean), dim=-1) / total.clamp(min=1e-12).unsqueeze(-1)
    testable = (col >= 0) & (col < w) & (row >= 0)
    use = testable & (peak >= min_confidence) & (total > 0)
    return torch.where(use.unsqueeze(-1), refined, coords)


def roi_from_auxiliary(
    hip_center: torch.Tensor, scale_point: torch.Tensor, scale: float = ROI_SCALE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MediaPipe's ROI from auxiliary points 33 and 34, in image pixels.

    ``AlignmentPointsRectsCalculator`` (a square of side 2 |p34 - p33| centred on p33, rotated so
    that p33 -> p34 points up in the crop) followed by ``RectTransformation`` (x ``scale``,
    ``ROI_SCALE`` by default).

    Args:
        hip_center: (N, 2) point 33 in image pixels.
        scale_point: (N, 2) point 34 in image pixels.
        scale: enlargement of the square.

    Returns:
        centres (N, 2) px, sides (N,) px, rotations (N,) in degrees, with the sign of
        ``model.crops.crop_to_image_affine`` (the crop's up axis is the image's turned clockwise).
    """
    d = scale_point - hip_center
    side = 2.0 * torch.linalg.vector_norm(d, dim=-1) * scale
    radians = math.pi / 2 - torch.atan2(-d[..., 1], d[..., 0])
    radians = radians - 2 * math.pi * torch.floor((radians + math.pi) / (2 * math.pi))
    return hip_center, side, torch.rad2deg(radians)


class BlazePose(nn.Module):
    """BlazePose-full as a ``PoseModel``: ``predict(crops)`` gives COCO-17 keypoints.

    Args:
        graph: the converted landmark network (outputs "landmarks", "presence", "heatmap").
        weights_sha256: sha256 of the original ``.tflite`` file.
    """

    coco_index: torch.Tensor  # (17,) BlazePose index of each COCO keypoint

    def __init__(self, graph: ConvGraph, weights_sha256: str | None = None) -> None:
        super().__init__()
        self.graph = graph
        self.info = BLAZEPOSE_FULL_INFO
        self.weights_sha256 = weights_sha256
        self.register_buffer(
            "coco_index", torch.tensor(BLAZEPOSE_TO_COCO, dtype=torch.long), persistent=False
        )

    def forward(self, crops: torch.Tensor) -> BlazePoseOutput:
        """crops: (N, 3, 256, 256) RGB in [0, 1] -> all 39 points, refined."""
        out = self.graph(crops)
        # Post-processing in float32 even under autocast: coordinates need more than bf16's 8 bits.
        raw = out["landmarks"].float().reshape(-1, NUM_LANDMARKS, 5)  # (N, 39, 5) input pixels
        coords = raw[..., :2] / INPUT_SIZE
        heatmap = out["heatmap"].float()  # (N, 39, 64, 64) logits
        visibility, presence = torch.sigmoid(raw[..., 3]), torch.sigmoid(raw[..., 4])
        pose_presence = out["presence"].float().reshape(-1)  # (N,)
        return BlazePoseOutput(
            landmarks=refine_from_heatmap(coords, heatmap),
            visibility=visibility,
            presence=presence,
            pose_presence=pose_presence,
            seen=pose_presence.unsqueeze(1) * visibility * presence,
        )

    @torch.inference_mode()
    def predict(self, crops: torch.Tensor) -> PoseOutput:
        """crops: (N, 3, 256, 256) RGB in [0, 1] -> COCO-17 coords in [0, 1], scores in [0, 1]."""
        return self.predict_with_auxiliary(crops)[0]

    @torch.inference_mode()
    def predict_with_auxiliary(self, crops: torch.Tensor) -> tuple[PoseOutput, torch.Tensor]:
        """``predict`` plus the auxiliary points for a second pass.

        Returns:
            The COCO-17 ``PoseOutput`` and (N, 2, 2) points 33 (hip centre) and 34 (scale point)
            in [0, 1] crop coordinates; map them to the image and call ``roi_from_auxiliary``.
        """
        out = self.forward(crops)
        pose = PoseOutput(
            coords=out.landmarks.index_select(1, self.coco_index),
            scores=out.seen.index_select(1, self.coco_index),
            sigmas=None,
        )
        return pose, out.landmarks[:, 33:35]
