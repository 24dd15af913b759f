"""ONNX export of the served networks, checked against PyTorch, with provenance in the file.

``export_onnx(net, name, path)`` writes one network as ONNX (opset ``OPSET``, dynamic batch
dimension), checks the file against the PyTorch module under ONNX Runtime at two batch sizes, and
records in the file's ``metadata_props``:

* ``source_weights_sha256``: sha256 of the weight file the module was loaded from (the official
  checkpoint, the ``.tflite``, the ``.pb``);
* ``graph_sha256``: sha256 of the ONNX file as written with no ``metadata_props`` (a file cannot
  hold its own hash; ``verify_onnx`` recomputes this one from the file);
* the model name, the exporter (torch version, opset, ``EXPORT_VERSION``) and the check's largest
  differences against its tolerances.

What is exported is exactly what a backend replaces (``model.backends``):

* pose models: ``predict`` (crops -> coords, scores[, sigmas] in the units of ``PoseOutput``);
  crops, flip test and decoding stay in the pipeline, so the geometry is the same on every backend;
* the SSDLite person detector: its network with box decoding (``SSDLite.forward``: normalised
  300x300 input -> boxes, scores); the per-image resize, thresholds and NMS stay in PyTorch.
  torchvision detectors are not exported (their transform and post-processing, with
  data-dependent shapes, do not export cleanly): they stay on PyTorch;
* BlazePose's pose detector (``PoseDetector``, the ``ModelSpec.rois`` of ``blazepose_full``): its
  network alone (224x224 views in [-1, 1] -> raw box values, score logits); the views, anchors,
  decoding, NMS and ROI geometry stay in PyTorch (``PoseDetector.decode``, ``BodyRois``).

The exporter is PyTorch's TorchScript-based ``torch.onnx.export(dynamo=False)``: it works on
every supported torch (2.11 to 2.14), takes seconds (the dynamo exporter takes ~25 s for
DistilPose-S and needs onnxscript) and its graphs run as fast as the dynamo exporter's under
ONNX Runtime and OpenVINO.

``export_cached`` keeps exported files in ``<cache_dir>/onnx``, keyed by the source weights' sha256,
so a service exports once per weight file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.blazepose import BlazePose
from model.distilpose import DistilPose
from model.interfaces import PoseModelInfo
from model.pose_detector import PoseDetector
from model.ssdlite import SSDLite

logger = logging.getLogger(__name__)

OPSET = 17
# Bumped whenever what is exported changes (a new output, a different wrapper): cached files of
# an older version are exported again.
EXPORT_VERSION = 2
META_PREFIX = "distilpose_service."
# Largest |ONNX - PyTorch| accepted per output, fp32. DistilPose: the golden tests' tolerances
# (coordinates in [0, 1] crop units: 1e-5 is 0.003 px of a 256 px crop; measured < 5e-7).
# BlazePose's visibility scores: 1e-4 (measured up to 2.4e-5: its 39 deep depthwise branches sum
# in another order under ONNX Runtime than in PyTorch's channels-last kernels).
POSE_TOLERANCES: dict[str, float] = {"coords": 1e-5, "scores": 3e-5, "sigmas": 3e-5}
BLAZEPOSE_TOLERANCES: dict[str, float] = {"coords": 1e-5, "scores": 1e-4}
# SSDLite: boxes and person scores in [0, 1] image units (measured ~4e-7).
DETECTOR_TOLERANCES: dict[str, float] = {"boxes": 1e-5, "box_scores": 1e-5}
# BlazePose's pose detector, its network alone: raw box values in pixels of its 224 px input
# (values up to ~800 px: keypoint offsets of far anchors) and score logits (down to ~-600).
# Measured under ONNX Runtime on the check inputs 4.0e-4 px and 2.6e-4, on real views (COCO
# samples, whole images and boxes) up to 1.1e-3 px and 4.9e-4 (5e-3 px is 0.014 px of a 640 px
# image's view; 2e-3 in logit near the 0.5 score threshold is 5e-4 in score).
POSE_DETECTOR_TOLERANCES: dict[str, float] = {"raw_boxes": 5e-3, "score_logits": 2e-3}
CHECK_BATCH_SIZES = (1, 3)


class ExportError(RuntimeError):
    """The module cannot be exported, or the exported file disagrees with it."""


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how well it matched PyTorch.

    Attributes:
        path: The ONNX file.
        model: Catalogue name of the network.
        source_weights_sha256: Of the weight file the module came from (None: random weights).
        graph_sha256: Of the file without its metadata (``verify_onnx`` checks it).
        file_sha256: Of the file as written.
        max_abs_diff: Per output, the largest |ONNX Runtime - PyTorch| over the check inputs.
    """

    path: Path
    model: str
    source_weights_sha256: str | None
    graph_sha256: str
    file_sha256: str
    max_abs_diff: dict[str, float]


# ------------------------------------------------------------------------------------- graphs


class _DistilPoseGraph(nn.Module):
    """``DistilPose.predict`` as a traceable module: crops -> coords, scores, sigmas."""

    def __init__(self, net: DistilPose) -> None:
        super().__init__()
        self.net = net
        self.sigma_to_crop = net.sigma_to_crop

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> (N, K, 2), (N, K), (N, K, 2) (sigmas in [0, 1] crop units)."""
        out = self.net(crops)
        scale = torch.tensor(self.sigma_to_crop, dtype=out.sigmas.dtype)
        return out.coords, out.scores, out.sigmas * scale


class _BlazePoseGraph(nn.Module):
    """``BlazePose.predict``: crops -> COCO-17 coords, scores (no sigmas)."""

    def __init__(self, net: BlazePose) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 256, 256) -> (N, 17, 2), (N, 17)."""
        out = self.net(crops)
        index = self.net.coco_index
        return out.landmarks.index_select(1, index), out.seen.index_select(1, index)


class _SSDLiteGraph(nn.Module):
    """``SSDLite.forward``: normalised (N, 3, 300, 300) -> boxes (N, A, 4), scores (N, A)."""

    def __init__(self, net: SSDLite) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``SSDLite.forward``."""
        return self.net(x)


class _PoseDetectorGraph(nn.Module):
    """``PoseDetector``'s network alone: anchors, decoding and NMS stay in PyTorch
    (``PoseDetector.decode``, ``model.pose_detector.BodyRois``)."""

    def __init__(self, net: PoseDetector) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 224, 224) in [-1, 1] -> raw boxes (N, A, 12), score logits (N, A, 1)."""
        out = self.net.graph(x)
        return out["boxes"], out["scores"]


@dataclass(frozen=True)
class GraphSignature:
    """Input and output names of an exported network, its input shape and check tolerances."""

    input_name: str
    output_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)
    tolerances: dict[str, float]  # output name -> largest |ONNX - PyTorch| accepted


def _graph_of(net: Any) -> tuple[nn.Module, GraphSignature]:
    """The traceable module of a served network and its signature.

    Raises:
        ExportError: a network that is not exported (torchvision detectors, test doubles).
    """
    if isinstance(net, DistilPose):
        w, h = net.info.input_size
        return _DistilPoseGraph(net), GraphSignature(
            "crops", ("coords", "scores", "sigmas"), (3, h, w), POSE_TOLERANCES
        )
    if isinstance(net, BlazePose):
        w, h = net.info.input_size
        return _BlazePoseGraph(net), GraphSignature(
            "crops", ("coords", "scores"), (3, h, w), BLAZEPOSE_TOLERANCES
        )
    if isinstance(net, SSDLite):
        size = net.config.input_size
        return _SSDLiteGraph(net), GraphSignature(
            "images", ("boxes", "box_scores"), (3, size, size), DETECTOR_TOLERANCES
        )
    if isinstance(net, PoseDetector):
        size = net.config.input_size
        return _PoseDetectorGraph(net), GraphSignature(
            "images", ("raw_boxes", "score_logits"), (3, size, size), POSE_DETECTOR_TOLERANCES
        )
    raise ExportError(f"{type(net).__name__} is not exported to ONNX (see model.export)")


def signature_of(net: Any) -> GraphSignature:
    """Input and output names of ``net``'s exported graph (``ExportError``: not exported)."""
    return _graph_of(net)[1]


# -------------------------------------------------------------------------------- check inputs


def check_inputs(net: Any, batch: int = max(CHECK_BATCH_SIZES), seed: int = 0) -> torch.Tensor:
    """Image-like network inputs for the export check: (batch, C, H, W) float32.

    Smooth random images (uint8 noise, 8x average-pooled and upsampled, so they have edges and
    flat areas like photos), normalised as the network expects: mean/std for pose models, the
    SSDLite input scale for the detector.
    """
    _, sig = _graph_of(net)
    c, h, w = sig.input_shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((batch, c, math.ceil(h / 8), math.ceil(w / 8)), generator=g)
    fine = torch.rand((batch, c, h, w), generator=g)
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    pixels = (0.85 * up + 0.15 * fine).clamp(0, 1)  # (B, C, H, W) in [0, 1]
    if isinstance(net, SSDLite):
        return (pixels * 255.0).round() * torch.tensor(net.config.input_scale) - 1.0
    if isinstance(net, PoseDetector):  # as ``BodyRois.detect`` scales its views
        return (pixels * 255.0).round() * (2.0 / 255.0) - 1.0
    info: PoseModelInfo = net.info
    pixels = (pixels * 255.0).round() / 255.0
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


# -------------------------------------------------------------------------------------- export


def _torch_outputs(graph: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [t.float().cpu() for t in graph(x.to(_device_of(graph)))]


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _trunc_symbolic(g: Any, x: Any) -> Any:
    """``aten::trunc`` (BlazePose's heatmap cell index), which the TorchScript exporter lacks:
    sign(x) * floor(|x|), exact in floating point."""
    return g.op("Mul", g.op("Sign", x), g.op("Floor", g.op("Abs", x)))


def _export_graph(graph: nn.Module, sig: GraphSignature, path: Path, opset: int) -> None:
    torch.onnx.register_custom_op_symbolic("aten::trunc", _trunc_symbolic, opset)
    example = torch.zeros((2, *sig.input_shape), device=_device_of(graph))
    axes = {name: {0: "batch"} for name in (sig.input_name, *sig.output_names)}
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation and notes constant folding it skips.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[sig.input_name],
                output_names=list(sig.output_names),
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc


def check_onnx(
    net: Any,
    path: Path | str,
    inputs: torch.Tensor | None = None,
    batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
) -> dict[str, float]:
    """Run the ONNX file under ONNX Runtime and compare with the PyTorch module.

    Args:
        net: the module that was exported.
        path: the ONNX file.
        inputs: (B, C, H, W) network inputs; default ``check_inputs(net)``.
        batch_sizes: first rows of ``inputs`` to run as separate batches (the dynamic dimension).

    Returns:
        Per output name, the largest |ONNX Runtime - PyTorch|.

    Raises:
        ExportError: an output differs by more than its tolerance (``GraphSignature``), or is
            not finite.
    """
    import onnxruntime as ort

    graph, sig = _graph_of(net)
    graph.eval()
    x = check_inputs(net) if inputs is None else inputs.float().cpu()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(sig.output_names, 0.0)
    for n in sorted({min(b, x.shape[0]) for b in batch_sizes}):
        part = x[:n].contiguous()
        expected = _torch_outputs(graph, part)
        got = session.run(list(sig.output_names), {sig.input_name: part.numpy()})
        for name, ref, out in zip(sig.output_names, expected, got, strict=True):
            if tuple(out.shape) != tuple(ref.shape):
                raise ExportError(f"{name}: ONNX shape {out.shape} != PyTorch {tuple(ref.shape)}")
            diff = (torch.from_numpy(out).float() - ref).abs().max().item() if n else 0.0
            worst[name] = max(worst[name], diff if math.isfinite(diff) else math.inf)
    tol = sig.tolerances
    failed = [f"{k}: {v:.3g} > {tol[k]:g}" for k, v in worst.items() if not v <= tol[k]]
    if failed:
        raise ExportError(f"{path}: ONNX differs from PyTorch: {', '.join(failed)}")
    return worst


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def graph_sha256(model: Any) -> str:
    """sha256 of an ``onnx.ModelProto`` serialised without its ``metadata_props``."""
    import onnx

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.metadata_props[:]
    return _sha256(bare.SerializeToString())


def read_metadata(path: Path | str) -> dict[str, str]:
    """This service's ``metadata_props`` of an ONNX file, without the prefix."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(META_PREFIX): p.value
        for p in model.metadata_props
        if p.key.startswith(META_PREFIX)
    }


def verify_onnx(path: Path | str, source_weights_sha256: str | None = None) -> dict[str, str]:
    """Check an exported file: its graph hash, export version and (when given) source weights.

    Returns:
        Its metadata (``read_metadata``).

    Raises:
        ExportError: not exported by this module, edited since, of another export version, or
            from other weights.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {
        p.key.removeprefix(META_PREFIX): p.value
        for p in model.metadata_props
        if p.key.startswith(META_PREFIX)
    }
    if "graph_sha256" not in meta:
        raise ExportError(f"{path}: not exported by pose-service (no graph_sha256)")
    if graph_sha256(model) != meta["graph_sha256"]:
        raise ExportError(f"{path}: the graph changed since export (graph_sha256 differs)")
    if meta.get("export_version") != str(EXPORT_VERSION):
        raise ExportError(
            f"{path}: export version {meta.get('export_version')}, not {EXPORT_VERSION}"
        )
    if source_weights_sha256 is not None and meta.get("source_weights_sha256") != (
        source_weights_sha256
    ):
        raise ExportError(f"{path}: exported from other weights than {source_weights_sha256}")
    return meta


def export_onnx(
    net: Any,
    name: str,
    path: Path | str,
    *,
    source_weights_sha256: str | None = None,
    inputs: torch.Tensor | None = None,
    opset: int = OPSET,
    check: bool = True,
) -> ExportResult:
    """Export ``net`` to ``path`` (dynamic batch), check it, and write provenance metadata.

    Args:
        net: a ``DistilPose``, ``BlazePose`` or ``SSDLite`` in eval mode (any device).
        name: its catalogue name (stored in the file).
        path: the ONNX file to write (written atomically).
        source_weights_sha256: of the weight file ``net`` was loaded from; default its
            ``weights_sha256`` attribute (the SSDLite network has none: its detector's).
        inputs: the check's (B, C, H, W) inputs; default ``check_inputs(net)``.
        opset: ONNX opset (17 or later).
        check: compare with PyTorch (``check_onnx``); off only for random weights, whose
            from-scratch init (std 0.001 convolutions, near-constant tokens into LayerNorm) is so
            ill-conditioned that fp32 rounding alone moves the outputs by ~0.1.

    Raises:
        ExportError: the export failed or the check did not pass (nothing is written then).
    """
    import onnx

    graph, sig = _graph_of(net)
    graph.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / "raw.onnx"
        _export_graph(graph, sig, raw, opset)
        diffs = check_onnx(net, raw, inputs) if check else {}
        model = onnx.load(str(raw))
        digest = graph_sha256(model)
        source = source_weights_sha256 or getattr(net, "weights_sha256", None)
        checked = ", ".join(f"{k} {v:.3g} <= {sig.tolerances[k]:g}" for k, v in diffs.items())
        meta = {
            "model": name,
            "source_weights_sha256": source or "random",
            "graph_sha256": digest,
            "export_version": str(EXPORT_VERSION),
            "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False)",
            "opset": str(opset),
            "check": f"onnxruntime vs torch fp32, max abs diff: {checked}" if check else "none",
        }
        onnx.helper.set_model_props(model, {META_PREFIX + k: v for k, v in meta.items()})
        data = model.SerializeToString()
        final = Path(scratch) / "final.onnx"
        final.write_bytes(data)
        os.replace(final, path)
    logger.info("exported %s to %s", name, path, extra={"onnx_check": diffs})
    return ExportResult(
        path=path,
        model=name,
        source_weights_sha256=source,
        graph_sha256=digest,
        file_sha256=_sha256(data),
        max_abs_diff=diffs,
    )


def cached_path(cache_dir: Path | str, name: str, source_weights_sha256: str) -> Path:
    """Where ``export_cached`` keeps the export of ``name`` from these weights."""
    key = f"{name}-{source_weights_sha256[:16]}-v{EXPORT_VERSION}-opset{OPSET}.onnx"
    return Path(cache_dir).expanduser() / "onnx" / key


def export_cached(net: Any, name: str, cache_dir: Path | str, source_weights_sha256: str) -> Path:
    """The ONNX file of ``net`` from the cache, exported (and checked) on a miss.

    A cached file is used only when ``verify_onnx`` passes for these weights; otherwise it is
    exported again over it.
    """
    path = cached_path(cache_dir, name, source_weights_sha256)
    if path.is_file():
        try:
            verify_onnx(path, source_weights_sha256)
            return path
        except Exception as exc:  # a corrupt or foreign file is replaced, not served
            logger.warning("exporting %s again: %s", name, exc)
    export_onnx(net, name, path, source_weights_sha256=source_weights_sha256)
    return path


def export_model(
    name: str | None,
    weights: Path | str | None,
    output: Path | str | None = None,
    *,
    cache_dir: Path | str | None = None,
    opset: int = OPSET,
) -> ExportResult:
    """Build a catalogue model on the CPU from its weights and export it (``export_onnx``).

    Args:
        name: a ``model.catalogue.exportable()`` name; None infers the DistilPose variant from
            ``weights``.
        weights: the DistilPose weight file (required for DistilPose); for a "cache" model or a
            ROI finder its cached file, or None for the one in ``cache_dir``.
        output: the ONNX file; default ``<name>.onnx`` in the working directory.
        cache_dir: the reference models' cache (default ``model.reference.default_cache_dir()``).
        opset: ONNX opset (17 or later).

    Raises:
        KeyError: a name that is not exportable.
        ValueError: DistilPose without weights, or an opset below 17.
        model.weights.WeightsError, model.reference.ReferenceModelError: unreadable weights.
        ExportError: the export failed or does not match PyTorch.
    """
    from model import create_model
    from model.catalogue import (
        CATALOGUE,
        build_detector,
        build_pose_model,
        cache_dir_of,
        exportable,
    )
    from model.reference import default_cache_dir, load_body_rois

    if opset < OPSET:
        raise ValueError(f"opset {opset}: {OPSET} or later")
    if name is not None and name not in exportable():
        raise KeyError(f"{name!r} is not exported; choose one of {exportable()}")
    spec = CATALOGUE.get(name) if name is not None else None
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = str(weights) if weights is not None else str(directory / f"{name}.safetensors")
    net: Any
    if name is not None and spec is None:  # a ROI finder (``ModelSpec.rois``): its network
        net = load_body_rois(name, cache_dir=cache_dir_of(name, cached)).net
        source = net.weights_sha256
    elif spec is None or spec.weights == "checkpoint":
        if weights is None:
            raise ValueError(f"exporting {name or 'DistilPose'} needs its weight file")
        net = create_model(name, weights=weights)
        name, source = net.info.name, net.weights_sha256
    else:
        if spec.role == "pose":
            net = build_pose_model(spec.name, cached)
            source = net.weights_sha256
        else:
            detector = build_detector(spec.name, cached)
            net, source = detector.net, detector.weights_sha256  # type: ignore[attr-defined]
    assert name is not None
    path = Path(output) if output is not None else Path(f"{name}.onnx")
    return export_onnx(net, name, path, source_weights_sha256=source, opset=opset)
