"""Batched top-down pose estimation: detect -> crop -> pose -> back to image pixels.

``TopDownPipeline.run`` takes a batch of decoded images (uint8 RGB, any sizes) with optional caller
boxes per image and returns every person's keypoints in image pixels:

1. the detector runs once over the images that have no caller boxes (with no detector, such an
   image is one box ``[0, 0, W, H]``);
2. every box of every image is cropped in one batched gather (``model.crops``: official geometry,
   crops equal to OpenCV's bit for bit) and all crops go through the pose model together, chunked
   by ``max_crops_per_batch`` network inputs and grouped only by what changes the forward (flip
   test, precision);
3. flip merge, decode, rescoring on the device; one transfer of all results to the host at the end.

The pipeline is generic over its ``PoseModel``: crop size, aspect, padding and mean/std come from
``pose_model.info``, flip pairs from its keypoint names.

Choices where the task was silent (also in the README):

* Caller boxes are validated before any work: a box with a non-finite value or a width or height
  <= 0 raises ``ValueError`` naming the item and the box. ``(0, 4)`` boxes mean "no persons".
* Keypoint scores are the model's raw values (DistilPose: may be < 0 or > 1). A non-finite model
  output (broken weights, fp16 overflow) is reported as 0 so that every number is a finite float.
* Detector persons are ordered by instance score (then detector order); OKS-NMS, when asked, is
  applied to detector persons only. Caller boxes keep their order and are never suppressed. A
  model's catalogue entry may also drop detector persons always (``ModelSpec.dedup_oks``,
  ``min_person_score``: the reference pair answers one person per body and none where no keypoint
  is seen).
* Sigmas come from the plain (not flipped) pass, in pixels along the crop axes; a model without
  sigmas (``PoseModelInfo.has_sigmas`` false) answers none when they are asked for, never zeros.
* On CUDA, fp32 means IEEE fp32: creating a pipeline on a CUDA device turns TF32 off for
  convolutions and matmuls (process-wide); bf16/fp16 (autocast) are the fast options. CPU runs
  fp32, except bf16 where the pose model has a bf16 variant (OpenVINO on a CPU with bf16,
  ``model.backends``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from model import crops
from model.catalogue import CATALOGUE, build_detector, build_pose_model, build_rois
from model.interfaces import (
    BatchStats,
    Detector,
    ImageResult,
    ModelDescription,
    Person,
    PipelineItem,
    PoseModel,
    PoseOptions,
    Precision,
    RoiFinder,
)
from model.keypoints import COCO_KEYPOINT_NAMES, COCO_OKS_SIGMAS, flip_indices

logger = logging.getLogger(__name__)

_PRECISIONS = frozenset(get_args(Precision))

OKS_NMS_THRESHOLD = 0.9  # official oks_thr
VIS_THRESHOLD = 0.2  # official vis_thr of the instance rescoring
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class _Plan:
    """One validated item: its size, its boxes (CPU (M, 5) float32, or None) and options."""

    height: int
    width: int
    boxes: torch.Tensor | None
    options: PoseOptions


def _ieee_fp32_on_cuda() -> None:
    """fp32 means fp32 on CUDA: no TF32 in convolutions or matmuls (process-wide switch)."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        cudnn_conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # torch without the fp32_precision API
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class TopDownPipeline:
    """Detector + pose model over batches of images (see the module docstring).

    Args:
        pose_model: any ``PoseModel``; an ``nn.Module`` is moved to ``device`` and put in eval mode.
        detector: a ``Detector`` for images without caller boxes, or None (whole image).
        device: where cropping, the pose model and post-processing run.
        max_crops_per_batch: most network inputs per pose forward (a flip-test box counts twice).
        dedup_oks: drop a detector person whose OKS to a better-scored one of its image is above
            this (``ModelSpec.dedup_oks``); None answers every detector box.
        min_person_score: drop a detector person whose instance score is not above this
            (``ModelSpec.min_person_score``: 0 drops a box where no keypoint scores above the
            rescoring's 0.2); None answers every detector box.
        rois: places the pose model's crop of each box (``ModelSpec.rois``: BlazePose's pose
            detector), where it finds one; None (and boxes it finds nothing for) crop the box
            padded by ``info.padding``.
    """

    def __init__(
        self,
        pose_model: PoseModel,
        detector: Detector | None = None,
        device: str | torch.device = "cpu",
        max_crops_per_batch: int = 256,
        dedup_oks: float | None = None,
        min_person_score: float | None = None,
        rois: RoiFinder | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            _ieee_fp32_on_cuda()
        if isinstance(pose_model, nn.Module):
            pose_model.to(self.device).eval()
        self.pose_model = pose_model
        # precision -> the model serving it, where the pose model runs more than fp32 on the CPU
        # (``model.backends.BackendPoseModel.variants``: OpenVINO's bf16)
        self._variants: dict[str, PoseModel] = dict(getattr(pose_model, "variants", {}))
        self.detector = detector
        self.max_crops_per_batch = max(1, int(max_crops_per_batch))
        self.dedup_oks = dedup_oks
        self.min_person_score = min_person_score
        self.rois = rois
        self.info = pose_model.info
        names = self.info.keypoint_names
        self._flip_index = torch.tensor(flip_indices(names), dtype=torch.int64, device=self.device)
        sigma_of = dict(zip(COCO_KEYPOINT_NAMES, COCO_OKS_SIGMAS, strict=True))
        self._oks_sigmas = (
            torch.tensor([sigma_of[n] for n in names], dtype=torch.float64)
            if all(n in sigma_of for n in names)
            else None
        )

    # ------------------------------------------------------------------------------ public API

    @torch.inference_mode()
    def run(self, items: Sequence[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        """Estimate the poses of every person in a batch of images.

        Args:
            items: images with optional caller boxes and per-image options.

        Returns:
            One ``ImageResult`` per item (same order) and what the call did.

        Raises:
            ValueError: an item is malformed (image not (3, H, W) uint8, boxes not (M, 4|5),
                a non-finite box value or a width/height <= 0, unknown precision, OKS-NMS asked
                for a model without COCO keypoints).
        """
        stats = BatchStats()
        plans = [self._validate(i, item) for i, item in enumerate(items)]
        if not plans:
            return [], stats
        images = [item.image.to(self.device, non_blocking=True) for item in items]  # one copy each
        boxes, from_detector = self._boxes(images, plans, stats)
        counts = [int(b.shape[0]) for b in boxes]

        start = time.perf_counter()
        rows, order = self._pose(images, plans, boxes, counts)
        # every number finite (a NaN detector box included), then the one device -> host transfer
        host = torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0).cpu()
        stats.pose_crops = sum(counts)
        results = self._results(plans, host, order, counts, from_detector)
        stats.pose_seconds = time.perf_counter() - start
        stats.persons_per_image = [len(r.persons) for r in results]
        return results, stats

    def warmup(self) -> None:
        """Run a tiny batch through every stage (and every CUDA precision) once."""
        image = torch.zeros((3, 64, 48), dtype=torch.uint8)
        box = torch.tensor([[4.0, 4.0, 40.0, 56.0]])
        precisions: list[Precision] = ["fp32"]
        if self.device.type == "cuda":
            precisions += ["bf16", "fp16"]
        precisions += [p for p in get_args(Precision) if p in self._variants and p != "fp32"]
        for precision in precisions:
            options = PoseOptions(precision=precision)
            items = [PipelineItem(image=image, boxes=box, options=options)]
            if self.detector is not None:
                items.append(PipelineItem(image=image, boxes=None, options=options))
            self.run(items)
        for stage in (self.pose_model, self.rois):
            backend_warmup = getattr(stage, "warmup", None)
            if callable(backend_warmup):  # an exported graph: the batch sizes served most
                backend_warmup(self.max_crops_per_batch)

    def describe(self) -> ModelDescription:
        """Model, weights, geometry, keypoints, detector, device, default options, source."""
        info = self.info
        spec = CATALOGUE.get(info.name)
        return ModelDescription(
            model=info.name,
            weights_sha256=getattr(self.pose_model, "weights_sha256", None),
            input_size=info.input_size,
            mean=info.mean,
            std=info.std,
            padding=info.padding,
            keypoint_names=tuple(info.keypoint_names),
            skeleton=tuple(info.skeleton),
            has_sigmas=info.has_sigmas,
            detector=None if self.detector is None else self.detector.name,
            detector_weights_sha256=getattr(self.detector, "weights_sha256", None),
            device=str(self.device),
            max_crops_per_batch=self.max_crops_per_batch,
            defaults=PoseOptions(),
            oks_nms_threshold=OKS_NMS_THRESHOLD,
            source=None if spec is None else spec.source,
            licence=None if spec is None else spec.licence,
            backend=self._backend(),
        )

    def _backend(self) -> str:
        """The pose model's backend, and the detector's and ROI finder's where they differ."""
        pose = str(getattr(self.pose_model, "backend", "torch"))
        parts = [pose]
        for what, stage in (("detector", self.detector), ("rois", self.rois)):
            runs = str(getattr(stage, "backend", "torch"))
            if stage is not None and runs != pose:
                parts.append(f"{what}: {runs}")
        return "; ".join(parts)

    # ------------------------------------------------------------------------------ stages

    def _validate(self, index: int, item: PipelineItem) -> _Plan:
        """Check one item on the host; caller boxes become a CPU (M, 5) float32 tensor."""
        image, options = item.image, item.options
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
            raise ValueError(f"item {index}: image must be a (3, H, W) uint8 tensor")
        channels, height, width = image.shape
        if channels != 3 or height < 1 or width < 1:
            raise ValueError(f"item {index}: image must be (3, H, W), got {tuple(image.shape)}")
        if options.precision not in _PRECISIONS:
            raise ValueError(f"item {index}: unknown precision {options.precision!r}")
        if options.oks_nms and self._oks_sigmas is None:
            raise ValueError(f"item {index}: OKS-NMS needs COCO keypoints ({self.info.name})")
        boxes = None
        if item.boxes is not None:
            b = item.boxes
            if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] not in (4, 5):
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"item {index}: boxes must be (M, 4) or (M, 5), got {shape}")
            if b.device.type != "cpu" or b.dtype != torch.float32 or b.requires_grad:
                b = b.detach().to("cpu", torch.float32)
            if b.shape[1] == 4:
                b = torch.cat((b, torch.ones((b.shape[0], 1))), dim=1)
            # Python floats: a few boxes, where each tensor op costs more than this loop.
            for j, row in enumerate(b.tolist()):
                if not (all(map(math.isfinite, row)) and row[2] > 0 and row[3] > 0):
                    raise ValueError(
                        f"item {index}: box {j} {row} needs finite values and a width and "
                        "height > 0"
                    )
            boxes = b
        return _Plan(height, width, boxes, options)

    def _boxes(
        self, images: list[torch.Tensor], plans: list[_Plan], stats: BatchStats
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """(M_i, 5) boxes per image on the device: caller's, detector's, or the whole image."""
        dev = self.device
        boxes: list[torch.Tensor] = []
        from_detector = [p.boxes is None and self.detector is not None for p in plans]
        # caller boxes and whole-image boxes: one host -> device copy for all of them
        host = [
            p.boxes
            if p.boxes is not None
            else torch.tensor([[0.0, 0.0, float(p.width), float(p.height), 1.0]])
            for p in plans
        ]
        pairs = list(zip(host, from_detector, strict=True))
        host_counts = [0 if det else int(b.shape[0]) for b, det in pairs]
        sent = torch.cat([b for b, det in pairs if not det] or [host[0][:0]])
        on_device = list(sent.to(dev, non_blocking=True).split(host_counts))
        detected: list[torch.Tensor] = []
        wanted = [i for i, det in enumerate(from_detector) if det]
        if wanted and self.detector is not None:
            start = time.perf_counter()
            detected = self.detector([images[i] for i in wanted])
            if dev.type == "cuda":  # this worker's stream only: other workers' keep running
                torch.cuda.current_stream(dev).synchronize()
            stats.detect_images = len(wanted)
            stats.detect_seconds = time.perf_counter() - start
        found = iter(detected)
        for i, det in enumerate(from_detector):
            if det:
                boxes.append(next(found).to(dev, torch.float32).reshape(-1, 5))
            else:
                boxes.append(on_device[i])
        return boxes, from_detector

    def _precision(self, options: PoseOptions) -> str:
        if self.device.type == "cuda" or options.precision in self._variants:
            return options.precision
        return "fp32"

    def _pose(
        self,
        images: list[torch.Tensor],
        plans: list[_Plan],
        boxes: list[torch.Tensor],
        counts: list[int],
    ) -> tuple[torch.Tensor, list[int]]:
        """All crops through the pose model; returns (N, F) result rows and their item order."""
        info, dev = self.info, self.device
        used = [i for i, c in enumerate(counts) if c > 0]
        slot = {i: s for s, i in enumerate(used)}
        packed = crops.pack_images([images[i] for i in used], dev)
        groups: dict[tuple[bool, str], list[int]] = {}
        for i in used:
            key = (plans[i].options.flip_test, self._precision(plans[i].options))
            groups.setdefault(key, []).append(i)

        width = len(info.keypoint_names) * 5 + 7
        rows: list[torch.Tensor] = []
        order: list[int] = []  # item of each row, in row order
        for (flip, precision), members in groups.items():
            group_boxes = torch.cat([boxes[i] for i in members])  # (N, 5)
            member_counts = [counts[i] for i in members]
            image_index = torch.repeat_interleave(
                torch.tensor([slot[i] for i in members]), torch.tensor(member_counts)
            ).to(dev, non_blocking=True)
            swap = [plans[i].options.swap_flip_scores for i in members]
            swap_mask: bool | torch.Tensor = any(swap)
            if any(swap) and not all(swap):
                swap_mask = torch.repeat_interleave(
                    torch.tensor(swap), torch.tensor(member_counts)
                ).to(dev, non_blocking=True)
            chunk = max(1, self.max_crops_per_batch // (2 if flip else 1))
            for s in range(0, group_boxes.shape[0], chunk):
                part = slice(s, s + chunk)
                mask = swap_mask if isinstance(swap_mask, bool) else swap_mask[part]
                rows.append(
                    self._pose_chunk(
                        packed, image_index[part], group_boxes[part], flip, precision, mask
                    )
                )
            for i in members:
                order.extend([i] * counts[i])
        if not rows:
            return torch.zeros((0, width)), order
        return torch.cat(rows), order

    def _pose_chunk(
        self,
        packed: crops.PackedImages,
        image_index: torch.Tensor,
        boxes: torch.Tensor,
        flip: bool,
        precision: str,
        swap_scores: bool | torch.Tensor,
    ) -> torch.Tensor:
        """One pose forward over n boxes -> (n, 5K + 7) rows.

        Row layout: K x (x, y, score), K x (sigma_x, sigma_y), instance score, area, box x, y, w, h,
        box score. Non-finite model outputs are set to 0.
        """
        info = self.info
        n, k = boxes.shape[0], len(info.keypoint_names)
        centers, scales = crops.boxes_to_center_scale(
            boxes, info.aspect, info.padding, info.pixel_std
        )
        # the person's area for OKS comparisons: its box's padded crop, wherever the crop goes
        size = scales * info.pixel_std
        area = (size[:, 0] * size[:, 1]).float()
        rotations = None
        if self.rois is not None:
            centers, scales, rotations = self._roi_crops(
                packed, image_index, boxes, centers, scales
            )
        to_image = crops.crop_to_image_affine(
            centers, scales, info.input_size, info.pixel_std, rotations
        )
        # (n, 3, H, W)
        pixels = crops.warp_crops(packed, image_index, to_image, info.input_size, info.border)
        x = crops.normalize_crops(pixels, info.mean, info.std)
        if flip:
            x = torch.cat((x, x.flip(3)))  # one forward for both passes
        model = self._variants.get(precision, self.pose_model)
        with self._autocast(precision):
            out = model.predict(x)
        coords, scores = out.coords.float(), out.scores.float()  # (B, K, 2), (B, K)
        if flip:
            coords, scores = crops.merge_flip(
                coords[:n], scores[:n], coords[n:], scores[n:], self._flip_index, swap_scores
            )
        coords = torch.nan_to_num(coords, nan=0.0, posinf=0.0, neginf=0.0)
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        xy = crops.decode_keypoints(
            coords, centers, scales, info.input_size, info.pixel_std, rotations
        )
        if info.zero_out_of_frame:
            height_width = packed.sizes[image_index].to(xy.dtype)  # (n, 2) (H, W)
            inside = (xy >= 0).all(-1) & (xy < height_width.flip(-1).unsqueeze(1)).all(-1)
            scores = torch.where(inside, scores, torch.zeros_like(scores))
        if out.sigmas is not None:
            sig = crops.sigmas_to_pixels(out.sigmas[:n].float(), scales, info.pixel_std)
        else:
            sig = torch.zeros((n, k, 2), device=xy.device)
        instance = crops.instance_scores(scores, boxes[:, 4], VIS_THRESHOLD)
        return torch.cat(
            (
                torch.cat((xy, scores.unsqueeze(-1)), dim=-1).flatten(1),  # (n, 3K)
                sig.flatten(1),  # (n, 2K)
                instance.unsqueeze(1),
                area.unsqueeze(1),
                boxes,
            ),
            dim=1,
        )

    def _roi_crops(
        self,
        packed: crops.PackedImages,
        image_index: torch.Tensor,
        boxes: torch.Tensor,
        centers: torch.Tensor,
        scales: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The crops ``self.rois`` places: (n, 2) centres, (n, 2) scales, (n,) rotations in
        degrees; a box without a ROI keeps its own centre and scale, unrotated."""
        assert self.rois is not None
        info = self.info
        rois = self.rois(packed, image_index, boxes)
        found = rois.found.to(centers.device)
        side = rois.sides.to(centers.device, torch.float32).unsqueeze(1)  # (n, 1)
        # the square ROI as a box, grown to the crop's aspect with no further padding
        roi_boxes = torch.cat((rois.centers.to(centers.device) - side / 2, side, side), dim=1)
        roi_centers, roi_scales = crops.boxes_to_center_scale(
            roi_boxes, info.aspect, 1.0, info.pixel_std
        )
        return (
            torch.where(found.unsqueeze(1), roi_centers, centers),
            torch.where(found.unsqueeze(1), roi_scales, scales),
            torch.where(found, rois.rotations.to(centers.device).double(), 0.0),
        )

    def _autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and precision in _AUTOCAST:
            return torch.autocast(device_type="cuda", dtype=_AUTOCAST[precision])
        return contextlib.nullcontext()

    def _results(
        self,
        plans: list[_Plan],
        host: torch.Tensor,
        order: list[int],
        counts: list[int],
        from_detector: list[bool],
    ) -> list[ImageResult]:
        """Host-side assembly of ``ImageResult``s from the transferred rows."""
        k = len(self.info.keypoint_names)
        per_item: list[list[int]] = [[] for _ in plans]
        for row, item in enumerate(order):
            per_item[item].append(row)
        values = host.tolist()
        results = []
        for i, plan in enumerate(plans):
            rows = per_item[i]
            if from_detector[i] and rows:
                rows = self._order_detections(host, rows, plan.options.oks_nms)
            # A model without sigmas answers none, never zeros (which would read as certainty).
            sigmas = plan.options.return_sigmas and self.info.has_sigmas
            persons = [self._person(values[r], k, sigmas) for r in rows]
            results.append(ImageResult(width=plan.width, height=plan.height, persons=persons))
        return results

    def _order_detections(self, host: torch.Tensor, rows: list[int], oks_nms: bool) -> list[int]:
        """Detector persons by instance score (stable), without those at or under
        ``min_person_score``; OKS-NMS over them when asked, or always at ``dedup_oks``."""
        k = len(self.info.keypoint_names)
        sub = host[rows]  # (M, F)
        ranked = torch.argsort(sub[:, 5 * k], descending=True, stable=True)
        if self.min_person_score is not None:
            ranked = ranked[sub[ranked, 5 * k] > self.min_person_score]
        thresholds = [OKS_NMS_THRESHOLD] if oks_nms else []
        if self.dedup_oks is not None:
            thresholds.append(self.dedup_oks)
        if thresholds and self._oks_sigmas is not None and len(ranked) > 1:
            ranked_sub = sub[ranked]
            xy = ranked_sub[:, : 3 * k].view(-1, k, 3)[..., :2].double()
            area = ranked_sub[:, 5 * k + 1].double()
            oks = crops.oks_matrix(xy.unsqueeze(0), area.unsqueeze(0), self._oks_sigmas)
            valid = torch.ones((1, len(ranked)), dtype=torch.bool)
            keep = crops.greedy_suppression(oks, valid, min(thresholds))[0]
            ranked = ranked[keep]
        return [rows[j] for j in ranked.tolist()]

    @staticmethod
    def _person(row: list[float], k: int, with_sigmas: bool) -> Person:
        kpts = row[: 3 * k]
        sig = row[3 * k : 5 * k]
        tail = row[5 * k :]  # instance, area, x, y, w, h, box score
        return Person(
            bbox=(tail[2], tail[3], tail[4], tail[5]),
            bbox_score=tail[6],
            score=tail[0],
            keypoints=[(kpts[3 * j], kpts[3 * j + 1], kpts[3 * j + 2]) for j in range(k)],
            sigmas=[(sig[2 * j], sig[2 * j + 1]) for j in range(k)] if with_sigmas else None,
        )


# ---------------------------------------------------------------------------------- construction


def build_pipeline(
    *,
    model: str | None,
    weights: str | None,
    detector: str | None,
    detector_weights: str | None,
    device: str = "cpu",
    max_crops_per_batch: int = 256,
    detector_settings: Mapping[str, Any] | None = None,
    backend: str = "torch",
    cache_dir: str | Path | None = None,
) -> TopDownPipeline:
    """Build a pipeline from catalogue names (``model.catalogue``) and weight files.

    A catalogue model without weights (``identity``) gets ``model.identity.IdentityPipeline``, which
    computes nothing; it takes no detector and ignores ``backend``.

    Args:
        model: a pose model of the catalogue; None infers the DistilPose variant from ``weights``.
        weights: pose weight file (a "cache" model: its cached file, or None for the default
            cache); None keeps a random DistilPose init (smoke runs only).
        detector: None or "none" (caller boxes, else the whole image), or a detector of the
            catalogue.
        detector_weights: for torchvision detectors a weights enum name ("DEFAULT") or a local
            state_dict file (None: random init); for "cache" detectors the cached file or None.
        device: "cpu", "cuda", "cuda:1", ...
        max_crops_per_batch: most network inputs per pose forward.
        detector_settings: the detector's settings (``ModelSpec.detector_settings``).
        backend: what runs the networks: "torch", "openvino", "onnxruntime" or "auto"
            (``model.backends``; exported graphs are compiled here, once).
        cache_dir: where exported graphs are cached (default ``model.reference.default_cache_dir``).

    Raises:
        KeyError: unknown model or detector name.
        ValueError: neither model nor weights given, a setting the detector does not take, or a
            backend that cannot run here (``model.backends.resolve_backend``).
        model.export.ExportError: a network's export does not match PyTorch.
    """
    if model is None:
        if weights is None:
            raise ValueError("build_pipeline needs a model name or a weight file to infer it from")
        from model import create_model

        pose: PoseModel = create_model(None, weights=weights, device=device)
    else:
        pose = build_pose_model(model, weights, device)
    if model is not None and CATALOGUE[model].weights == "none":
        # No network (``model.identity``): the persons are the caller's boxes; no crop, no detector.
        from model.identity import IdentityPipeline

        if detector not in (None, "none"):
            raise ValueError(f"{model} answers the caller's boxes: no detector, not {detector}")
        return IdentityPipeline(pose, device=device, max_crops_per_batch=max_crops_per_batch)
    det: Detector | None = None
    if detector is not None and detector != "none":
        det = build_detector(detector, detector_weights, device, dict(detector_settings or {}))
    spec = CATALOGUE.get(model) if model is not None else None
    rois = None
    if spec is not None and spec.rois is not None:
        rois = build_rois(spec.name, weights, device)
    if backend != "torch":
        from model.backends import apply_backend
        from model.reference import default_cache_dir

        cache = default_cache_dir() if cache_dir is None else cache_dir
        pose, det, rois = apply_backend(
            pose, det, rois=rois, backend=backend, device=device, cache_dir=cache
        )
    return TopDownPipeline(
        pose,
        det,
        device=device,
        max_crops_per_batch=max_crops_per_batch,
        dedup_oks=None if spec is None else spec.dedup_oks,
        min_person_score=None if spec is None else spec.min_person_score,
        rois=rois,
    )
