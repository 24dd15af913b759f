"""Person detector over torchvision's COCO detection models (first stage of the top-down pipeline).

``PersonDetector`` wraps one of five torchvision detectors, keeps class "person" (COCO label 1) and
returns per image an (M, 5) float32 tensor [x, y, w, h, score] in image pixels, by descending score.
One forward serves a batch of images of different sizes (torchvision's transform resizes and pads).

Weights, as torchvision names them:

* ``None``: random initialisation (torchvision's ``weights=None``; benchmarks and tests only);
* an enum name of the model's weights, e.g. ``"DEFAULT"``, ``"COCO_V1"`` or
  ``"FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"``: read from torchvision's cache
  (``$TORCH_HOME/hub/checkpoints``) and downloaded there only when missing;
* a local file in torchvision's published format: a state_dict saved by
  ``torch.save(model.state_dict(), path)`` (or a ``.safetensors`` file of the same tensors).

Files are read with ``weights_only=True`` and loaded with ``strict=True``: a missing, extra or
mis-shaped key is an error that names it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import detection
from torchvision.ops.misc import FrozenBatchNorm2d

logger = logging.getLogger(__name__)

PERSON_LABEL = 1  # COCO category id of "person" in torchvision's 91-class label space

# name -> (builder, family). The family decides the names of the builder's settings.
DETECTORS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "fasterrcnn_resnet50_fpn_v2": (detection.fasterrcnn_resnet50_fpn_v2, "rcnn"),
    "fasterrcnn_mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn, "rcnn"),
    "retinanet_resnet50_fpn_v2": (detection.retinanet_resnet50_fpn_v2, "dense"),
    "fcos_resnet50_fpn": (detection.fcos_resnet50_fpn, "dense"),
    "ssdlite320_mobilenet_v3_large": (detection.ssdlite320_mobilenet_v3_large, "ssd"),
}

# torchvision builds these with FrozenBatchNorm2d in the backbone when weights are given; their
# published files are meant for that module (FrozenBatchNorm2d also accepts and drops the
# ``num_batches_tracked`` entries of a freshly initialised model's state_dict).
_FROZEN_BN_BACKBONE = {"fasterrcnn_mobilenet_v3_large_fpn", "fcos_resnet50_fpn"}


class DetectorWeightsError(ValueError):
    """A detector weight file or weight name cannot be used; the message says why."""


def _settings_kwargs(
    family: str,
    score_threshold: float,
    nms_iou: float,
    candidates: int,
    min_size: int | None,
    max_size: int | None,
) -> dict[str, Any]:
    """The builder keyword arguments of one model family."""
    if family == "rcnn":
        kwargs: dict[str, Any] = {
            "box_score_thresh": score_threshold,
            "box_nms_thresh": nms_iou,
            "box_detections_per_img": candidates,
        }
    else:
        kwargs = {
            "score_thresh": score_threshold,
            "nms_thresh": nms_iou,
            "detections_per_img": candidates,
        }
    if family != "ssd":  # SSDlite's input size is fixed by its builder; set after building
        if min_size is not None:
            kwargs["min_size"] = min_size
        if max_size is not None:
            kwargs["max_size"] = max_size
    return kwargs


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d (as torchvision does)."""
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, child_name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batchnorm(child)


def _is_path(weights: str | os.PathLike[str]) -> bool:
    text = os.fspath(weights)
    return (
        isinstance(weights, os.PathLike)
        or os.sep in text
        or text.endswith((".pt", ".pth", ".safetensors", ".bin"))
        or os.path.exists(text)
    )


def _read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict file, read without unpickling anything but tensors and containers."""
    if not path.is_file():
        raise FileNotFoundError(f"detector weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise DetectorWeightsError(
            f"{path}: cannot read it as a torchvision state_dict file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise DetectorWeightsError(
            f"{path}: expected a state_dict (a dict of tensors, as saved by "
            f"torch.save(model.state_dict(), path)), got {type(loaded).__name__}"
        )
    return dict(loaded)


def _resolve_enum(name: str, weights: str) -> Any:
    """The torchvision weights enum member named by ``weights`` for model ``name``."""
    enum_cls = torchvision.models.get_model_weights(name)
    member = weights
    if "." in weights:
        cls_name, member = weights.rsplit(".", 1)
        if cls_name != enum_cls.__name__:
            raise DetectorWeightsError(
                f"weights {weights!r} are not for {name}: its weights are {enum_cls.__name__}.*"
            )
    if member not in enum_cls.__members__:
        raise DetectorWeightsError(
            f"unknown weights {weights!r} for {name}; choose one of "
            f"{sorted(enum_cls.__members__)} (or a local state_dict file)"
        )
    return enum_cls[member]


def _cached_enum_state_dict(name: str, weights: str) -> tuple[dict[str, torch.Tensor], Path]:
    """Enum weights from torchvision's cache, downloaded there only when missing."""
    member = _resolve_enum(name, weights)
    filename = os.path.basename(urlparse(member.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        logger.info("downloading %s weights %s to %s", name, member, cached)
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            member.url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as exc:  # no network, a proxy error, a bad hash, a corrupt cache file
        raise DetectorWeightsError(
            f"{name} weights {member} are not in torchvision's cache ({cached}) and could not be "
            f"downloaded from {member.url} ({type(exc).__name__}: {exc}); download them where a "
            "network exists (they land in $TORCH_HOME/hub/checkpoints) or pass a local file"
        ) from exc
    return dict(state_dict), cached


class PersonDetector:
    """A torchvision detector that returns persons only.

    Args:
        name: one of ``DETECTORS``.
        weights: None (random init), a weights enum name (e.g. "DEFAULT"), or a local state_dict
            file path (see the module docstring).
        device: where the network runs.
        score_threshold: keep persons with a score above this.
        nms_iou: IoU threshold of the detector's per-class NMS.
        max_persons: at most this many persons per image (the best-scored).
        min_box_size: drop boxes whose width or height is below this many pixels (boxes of zero
            width or height are always dropped).
        min_size: the network's input resize: shorter side in pixels (torchvision's ``min_size``;
            default 800, 320 for SSDlite, whose input is then square ``min_size`` x ``min_size``).
        max_size: cap of the longer side (torchvision's ``max_size``; ignored by SSDlite).

    Raises:
        KeyError: unknown name.
        FileNotFoundError: ``weights`` names a file that does not exist.
        DetectorWeightsError: unknown weights name, unreadable file, not a state_dict, keys or
            shapes that do not fit the model, or enum weights neither cached nor downloadable.
    """

    def __init__(
        self,
        name: str,
        weights: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        score_threshold: float = 0.5,
        nms_iou: float = 0.5,
        max_persons: int = 100,
        min_box_size: float = 0.0,
        min_size: int | None = None,
        max_size: int | None = None,
    ) -> None:
        if name not in DETECTORS:
            raise KeyError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
        if max_persons < 1:
            raise ValueError(f"max_persons must be >= 1, got {max_persons}")
        builder, family = DETECTORS[name]
        self.name = name
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_persons = int(max_persons)
        self.min_box_size = float(min_box_size)
        self.weights_sha256: str | None = None

        state_dict, source = self._load(name, weights)
        # The model's own cap counts every class; keep room for other classes before filtering.
        candidates = max(300, 4 * self.max_persons)
        kwargs = _settings_kwargs(
            family, self.score_threshold, self.nms_iou, candidates, min_size, max_size
        )
        net: Any = builder(weights=None, weights_backbone=None, num_classes=91, **kwargs)
        if family == "ssd" and min_size is not None:
            net.transform.min_size = (int(min_size),)
            net.transform.max_size = int(min_size)
            net.transform.fixed_size = (int(min_size), int(min_size))
        if name in _FROZEN_BN_BACKBONE:
            _freeze_batchnorm(net.backbone.body)
        if state_dict is None:
            logger.warning("detector %s has RANDOM weights: its boxes are meaningless", name)
        else:
            self._load_into(net, state_dict, source)
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net.to(device).eval()

    @staticmethod
    def _load(
        name: str, weights: str | os.PathLike[str] | None
    ) -> tuple[dict[str, torch.Tensor] | None, str]:
        if weights is None:
            return None, "random"
        if _is_path(weights):
            from model.weights import sha256_file

            path = Path(weights).expanduser()
            state_dict = _read_state_dict_file(path)
            return state_dict, f"{path} (sha256 {sha256_file(path)})"
        state_dict, cached = _cached_enum_state_dict(name, os.fspath(weights))
        return state_dict, str(cached)

    def _load_into(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        try:
            result = net.load_state_dict(state_dict, strict=False)
        except RuntimeError as exc:  # shape mismatches
            lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            raise DetectorWeightsError(
                f"{source} does not fit {self.name}: " + "; ".join(lines[:5] or [str(exc)])
            ) from exc
        if result.missing_keys or result.unexpected_keys:
            raise DetectorWeightsError(
                f"{source} does not fit {self.name}: "
                f"{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
                f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
            )
        if " (sha256 " in source:
            self.weights_sha256 = source.rsplit(" (sha256 ", 1)[1].rstrip(")")

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Detect persons in a batch of images (one network forward for all of them).

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB, any sizes, on any device.

        Returns:
            B float32 tensors (M_i, 5) [x, y, w, h, score] in image pixels, by descending score,
            on the detector's device.
        """
        if not images:
            return []
        device = self.device
        batch = [img.to(device, non_blocking=True).float().div_(255.0) for img in images]
        outputs = self.net(batch)  # per image: boxes (D, 4) xyxy px, scores (D,), labels (D,)
        results = []
        for out in outputs:
            boxes, scores = out["boxes"].float(), out["scores"].float()
            wh = boxes[:, 2:] - boxes[:, :2]  # (D, 2)
            keep = (
                (out["labels"] == PERSON_LABEL)
                & (scores > self.score_threshold)
                & (wh > 0).all(dim=1)
                & (wh >= self.min_box_size).all(dim=1)
            )
            xywh = torch.cat((boxes[:, :2], wh, scores[:, None]), dim=1)[keep]  # (M, 5)
            order = torch.argsort(xywh[:, 4], descending=True, stable=True)
            results.append(xywh[order[: self.max_persons]])
        return results
