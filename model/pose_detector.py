"""BlazePose's pose detector (MediaPipe pose detection model), converted to plain PyTorch.

Bazarevsky et al., "BlazePose: On-device Real-time Body Pose tracking" (CVPR-W 2020), section 2:
a BlazeFace-like SSD that finds a person by the face and predicts, per detection, the mid-hip
centre and a point on the circle around the whole body (its radius gives the body's size, its
direction the body's tilt). The network is
``mediapipe/modules/pose_detection/pose_detection.tflite`` from the ``mediapipe==0.10.21`` wheel
(Apache-2.0, (c) The MediaPipe Authors), read by ``model.tflite_graph`` (its pruned 1x1 convolutions
are sparse: ``DENSIFY``; its feature pyramid uses ``DEPTH_TO_SPACE``). Ported, with the numbers of
MediaPipe's graph configs (``pose_detection_cpu.pbtxt``, ``pose_detection_to_roi.pbtxt``):

* the network on a 224x224 RGB input in [-1, 1] (2254 anchors x 12 box values, 2254 score logits);
* the anchors (``SsdAnchorsCalculator``: 5 layers, strides 8, 16, 32, 32, 32, two anchors per
  layer and cell, fixed size 1, so 28x28x2 + 14x14x2 + 7x7x6 = 2254);
* the decoding (``TensorsToDetectionsCalculator``: values x, y, w, h then 4 keypoints x, y, in
  input pixels relative to the anchor centre; scores clipped to +-100, sigmoid);
* weighted NMS (``NonMaxSuppressionCalculator``, IoU 0.3, WEIGHTED: each cluster's box and
  keypoints are the score-weighted mean of its members, its score the best member's);
* the body ROI (``PoseDetectionToRoi``: a square of side 2 |k1 - k0| centred on keypoint 0, the
  mid-hip, turned so that k0 -> k1 points up, then x 1.25; ``model.blazepose.roi_from_auxiliary``).

Keypoints: 0 mid-hip centre, 1 full-body size and rotation point, 2 mid-shoulder centre, 3 upper
body size and rotation point. The box is the face's.

Checked against MediaPipe 0.10.21 itself (``tests/reference_outputs``): the network's outputs
against LiteRT's, the whole-image ROI against the Pose solution's ``pose_rect_from_detection``.

Left out: the Pose solution's tracking across video frames. Where the detector looks for each
person box of the pipeline is ``BodyRois``'s choice (see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model import crops
from model.blazepose import ROI_SCALE, roi_from_auxiliary
from model.convgraph import ConvGraph
from model.interfaces import Rois

# TFLite output tensor names -> ours.
TFLITE_OUTPUTS = {"boxes": "Identity", "scores": "Identity_1"}


@dataclass(frozen=True)
class PoseDetectorConfig:
    """The fixed recipe of MediaPipe's pose detection graph (``pose_detection_cpu.pbtxt``)."""

    input_size: int = 224
    min_scale: float = 0.1484375
    max_scale: float = 0.75
    strides: tuple[int, ...] = (8, 16, 32, 32, 32)
    anchor_offset: float = 0.5
    anchors_per_layer: int = 2  # aspect ratio 1 plus the interpolated scale; sizes fixed to 1
    num_keypoints: int = 4
    score_clipping: float = 100.0
    nms_iou: float = 0.3


CONFIG = PoseDetectorConfig()


def pose_anchors(config: PoseDetectorConfig = CONFIG) -> torch.Tensor:
    """Anchor centres of ``SsdAnchorsCalculator`` with ``fixed_anchor_size`` (every size is 1).

    Consecutive layers of one stride share a feature map and put their anchors together per cell
    (MediaPipe's loop over ``last_same_stride_layer``); ordered by feature map, row, column, anchor
    like the network's outputs.

    Returns:
        (A, 2) [x_center, y_center] in [0, 1] input units (A = 2254).
    """
    out = []
    layer = 0
    while layer < len(config.strides):
        stride = config.strides[layer]
        last = layer
        while last < len(config.strides) and config.strides[last] == stride:
            last += 1
        same = last - layer
        per_cell = config.anchors_per_layer * same
        size = math.ceil(config.input_size / stride)
        centres = (torch.arange(size, dtype=torch.float32) + config.anchor_offset) / size  # (S,)
        cy = centres.view(size, 1, 1).expand(size, size, per_cell)
        cx = centres.view(1, size, 1).expand(size, size, per_cell)
        out.append(torch.stack((cx, cy), dim=-1).reshape(-1, 2))
        layer += same
    return torch.cat(out)


def decode_detections(
    raw: torch.Tensor, anchors: torch.Tensor, config: PoseDetectorConfig = CONFIG
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TensorsToDetectionsCalculator`` (``reverse_output_order``, fixed anchor size 1).

    Args:
        raw: (N, A, 12) network box values: x, y, w, h, then 4 keypoints x, y, in input pixels
            (centres relative to the anchor's).
        anchors: (A, 2) [x_center, y_center] (``pose_anchors``).
        config: the scales (the input size).

    Returns:
        boxes (N, A, 4) [xmin, ymin, xmax, ymax] and keypoints (N, A, 4, 2) (x, y), both in [0, 1]
        input units (not clipped).
    """
    scale = float(config.input_size)
    centre = raw[..., 0:2] / scale + anchors  # (N, A, 2)
    size = raw[..., 2:4] / scale
    boxes = torch.cat((centre - size / 2, centre + size / 2), dim=-1)
    points = raw[..., 4 : 4 + 2 * config.num_keypoints].unflatten(-1, (config.num_keypoints, 2))
    return boxes, points / scale + anchors.unsqueeze(-2)


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU within each group, MediaPipe's ``OverlapSimilarity`` (0 for empty boxes).

    Args:
        boxes: (G, M, 4) [xmin, ymin, xmax, ymax].

    Returns:
        (G, M, M).
    """
    low = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    high = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)  # (G, M)
    union = area[:, :, None] + area[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def weighted_nms(
    boxes: torch.Tensor,
    points: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float = CONFIG.nms_iou,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MediaPipe's WEIGHTED non-max suppression, for G groups of candidates at once.

    Candidates are sorted by descending score. The best remaining one heads a cluster of every
    remaining candidate whose IoU with it is above ``iou_threshold`` (itself included); the
    cluster's box and keypoints are the score-weighted means of its members, its score the head's.

    Args:
        boxes: (G, M, 4) candidate boxes, by descending score within each group.
        points: (G, M, K, 2) their keypoints.
        scores: (G, M) their scores.
        valid: (G, M) bool, False for padding.
        iou_threshold: the suppression threshold.

    Returns:
        boxes (G, M, 4), keypoints (G, M, K, 2) of the cluster each candidate heads, and (G, M)
        bool: which candidates head a cluster (the detections, still by descending score).
    """
    g, m = scores.shape
    iou = box_iou(boxes)  # (G, M, M)
    eye = torch.eye(m, dtype=torch.bool, device=boxes.device)
    remaining = valid.clone()
    heads = torch.zeros_like(valid)
    member_of = torch.zeros((g, m, m), dtype=scores.dtype, device=boxes.device)  # [head, member]
    for i in range(m):
        head = remaining[:, i]  # (G,) the best remaining candidate of its group
        members = remaining & ((iou[:, i] > iou_threshold) | eye[i]) & head.unsqueeze(1)
        heads[:, i] = head
        member_of[:, i] = members.to(scores.dtype)
        remaining &= ~members
    weights = member_of * scores.unsqueeze(1)  # (G, M heads, M members)
    total = weights.sum(-1).clamp(min=1e-12)  # (G, M)
    merged_boxes = torch.einsum("ghm,gmc->ghc", weights, boxes) / total.unsqueeze(-1)
    merged_points = torch.einsum("ghm,gmkc->ghkc", weights, points) / total[..., None, None]
    return merged_boxes, merged_points, heads


class PoseDetector(nn.Module):
    """The converted network with its anchors: (N, 3, 224, 224) in [-1, 1] -> decoded candidates.

    Args:
        graph: the converted network (outputs "boxes", "scores").
        weights_sha256: sha256 of the original ``.tflite`` file.
        config: the recipe.
    """

    anchors: torch.Tensor  # (A, 2)

    def __init__(
        self,
        graph: ConvGraph,
        weights_sha256: str | None = None,
        config: PoseDetectorConfig = CONFIG,
    ) -> None:
        super().__init__()
        self.graph = graph
        self.config = config
        self.weights_sha256 = weights_sha256
        self.register_buffer("anchors", pose_anchors(config), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, 224, 224) RGB in [-1, 1] -> boxes (N, A, 4), keypoints (N, A, 4, 2) in [0, 1]
        input units and scores (N, A) in [0, 1] (all anchors, before thresholds and NMS)."""
        out = self.graph(x)
        return self.decode(out["boxes"], out["scores"])

    def decode(
        self, raw_boxes: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network's outputs -> ``forward``'s (the part that stays in PyTorch on every backend,
        ``model.backends``).

        Args:
            raw_boxes: (N, A, 12) box values in input pixels (``decode_detections``).
            logits: (N, A, 1) score logits.
        """
        boxes, points = decode_detections(raw_boxes.float(), self.anchors, self.config)
        clip = self.config.score_clipping
        scores = torch.sigmoid(logits.float().squeeze(-1).clamp(-clip, clip))
        return boxes, points, scores


class BodyRois:
    """Person box -> MediaPipe's body-centred, rotated ROI for the landmark model (a ``RoiFinder``).

    MediaPipe's own pipeline never crops a person box: it runs the pose detector on the whole image
    (letterboxed to a square, zeros around) and crops the landmark model's input around the
    detection's mid-hip, sized by the full-body circle and turned upright (``PoseDetectionToRoi``).
    A box can be anything (a caller's, a detector's around part of a body), so here the detector
    looks at a square view around each box and the box's person is the best-scored detection whose
    face centre is inside the box. The view is the box's own square (side ``padding`` x its longer
    side) or, for a box that spans at least ``whole_view_fill`` of the image's width or height,
    MediaPipe's own whole-image view. A box that is the whole image (no detector; SSDLite's "no one
    seen" candidate) says nothing of where a person is and keeps its plain crop, as does a box whose
    view has no detection: the pose detector would pick the most prominent person, whom other boxes
    usually cover already (OCHuman 003896: its second person is found only by the plain crop).

    The ROI of a portrait's box reaches below the picture, so the hips land outside it (and score
    0, ``PoseModelInfo.zero_out_of_frame``) instead of being drawn inside the crop.

    Measured on the shared photos (``tests/service/test_reference_oks_shared.py``): padding 1.0
    and whole-image views from 0.75 gave mean OKS 0.791 with ground-truth boxes (0.749 at padding
    1.25, 0.762 at 1.5) and 0.758 with SSDLite's; without whole-image views the astronaut's hips
    scored 0.44 (its box's own view puts the ROI 27 px higher than MediaPipe's).

    Args:
        net: the converted pose detector.
        score_threshold: minimum detection score (the Pose solution's ``min_detection_confidence``
            default; its graph's own is 0.2, which here added a person to a portrait).
        padding: a box view's side over the box's longer side.
        whole_view_fill: boxes at least this share of the image's width or height are seen in the
            whole image's view (None: never).
        roi_scale: the ROI's enlargement (MediaPipe's 1.25).
    """

    name = "blazepose_detector"

    def __init__(
        self,
        net: PoseDetector,
        *,
        score_threshold: float = 0.5,
        padding: float = 1.0,
        whole_view_fill: float | None = 0.75,
        roi_scale: float = ROI_SCALE,
    ) -> None:
        self.net = net.eval()
        self.score_threshold = float(score_threshold)
        self.padding = float(padding)
        self.whole_view_fill = whole_view_fill
        self.roi_scale = float(roi_scale)
        self.weights_sha256 = net.weights_sha256

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self.net.anchors.device

    def view_inputs(
        self, packed: crops.PackedImages, image_index: torch.Tensor, views: torch.Tensor
    ) -> torch.Tensor:
        """The network's inputs: each square view resized to 224 x 224, zeros outside the image
        (MediaPipe's letterbox), RGB in [-1, 1].

        Args:
            packed: the images (``model.crops.pack_images``).
            image_index: (V,) image of each view.
            views: (V, 4) [cx, cy, side, side] square views in pixels.

        Returns:
            (V, 3, 224, 224) float32 on the network's device.
        """
        size = self.net.config.input_size
        scales = views[:, 2:4].float() / 200.0
        to_image = crops.crop_to_image_affine(views[:, :2].float(), scales, (size, size))
        pixels = crops.warp_crops(packed, image_index, to_image, (size, size))  # (V, 3, s, s)
        return pixels.to(self.device).float() * (2.0 / 255.0) - 1.0

    def detect(
        self, packed: crops.PackedImages, image_index: torch.Tensor, views: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pose detections of square views of the images, in image pixels.

        Args:
            packed: the images (``model.crops.pack_images``).
            image_index: (V,) image of each view.
            views: (V, 4) [cx, cy, side, side] square views in pixels (``view_inputs``).

        Returns:
            face boxes (V, M, 4) [xmin, ymin, xmax, ymax], keypoints (V, M, 4, 2), scores (V, M)
            and (V, M) bool: the detections after NMS, by descending score (False: none there).
        """
        size = self.net.config.input_size
        v = views.shape[0]
        centers = views[:, :2].float()
        scales = views[:, 2:4].float() / 200.0
        x = self.view_inputs(packed, image_index, views)
        cand_boxes, cand_points, scores = self.net(x)  # (V, A, 4), (V, A, 4, 2), (V, A)
        keep = scores >= self.score_threshold
        m = max(1, int(keep.sum(1).max())) if v else 1
        top, order = torch.topk(torch.where(keep, scores, -1.0), m, dim=1)  # (V, M) descending
        gather = order.unsqueeze(-1)
        det_boxes, det_points, heads = weighted_nms(
            cand_boxes.gather(1, gather.expand(-1, -1, 4)),
            cand_points.gather(1, gather[..., None].expand(-1, -1, *cand_points.shape[-2:])),
            top,
            top >= self.score_threshold,
        )
        # into image pixels through the view's own geometry
        k = det_points.shape[2]  # explicit sizes: no box (v = 0) is a valid call
        flat = torch.cat((det_boxes.view(v, 2 * m, 2), det_points.view(v, m * k, 2)), dim=1)
        px = crops.decode_keypoints(flat.to(centers.device), centers, scales, (size, size))
        box_px, point_px = px[:, : 2 * m].reshape(v, m, 4), px[:, 2 * m :].reshape(v, m, k, 2)
        return box_px, point_px, top.to(box_px.device), heads.to(box_px.device)

    @torch.inference_mode()
    def __call__(
        self, packed: crops.PackedImages, image_index: torch.Tensor, boxes: torch.Tensor
    ) -> Rois:
        """The ROI of each box's person.

        Args:
            packed: the images (``model.crops.pack_images``).
            image_index: (N,) image of each box.
            boxes: (N, >=4) [x, y, w, h, ...] in pixels.

        Returns:
            One ROI per box, on the device of ``boxes``.
        """
        n = boxes.shape[0]
        b = boxes[:, :4].float()
        hw = packed.sizes[image_index.to(packed.sizes.device)].to(b.device, torch.float32)
        wh = hw.flip(-1)  # (N, 2) image (W, H)
        side = b[:, 2:4].amax(-1, keepdim=True) * self.padding
        views = torch.cat((b[:, :2] + b[:, 2:4] / 2, side, side), dim=1)  # (N, 4)
        if self.whole_view_fill is not None:
            whole_side = wh.amax(-1, keepdim=True)
            whole = torch.cat((wh / 2, whole_side, whole_side), dim=1)
            fill = (b[:, 2:4] / wh).amax(-1)  # (N,) the box's extent over the image's
            views = torch.where((fill >= self.whole_view_fill).unsqueeze(1), whole, views)
        face_box, points, scores, heads = self.detect(packed, image_index, views)
        face = (face_box[..., :2] + face_box[..., 2:]) / 2  # (N, M, 2)
        low, high = b[:, None, :2], b[:, None, :2] + b[:, None, 2:4]
        ok = heads & ((face >= low) & (face <= high)).all(-1)
        whole_box = (b[:, :2] <= 0).all(-1) & (b[:, :2] + b[:, 2:4] >= wh).all(-1)
        found = ok.any(1) & ~whole_box
        pick = torch.where(ok, scores, -1.0).argmax(1)  # the best-scored qualifying detection
        rows = torch.arange(n, device=pick.device)
        hip, top_point = points[rows, pick, 0], points[rows, pick, 1]
        centers, sides, rotations = roi_from_auxiliary(hip, top_point, self.roi_scale)
        return Rois(
            centers=centers,
            sides=sides,
            rotations=rotations,
            found=found & (sides > 0),
            scores=torch.where(found, scores[rows, pick], torch.zeros_like(sides)),
        )
