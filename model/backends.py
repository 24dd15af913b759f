"""CPU inference backends: the exported ONNX graph under OpenVINO or ONNX Runtime.

``apply_backend(pose_model, detector, rois=..., backend=..., device=..., cache_dir=...)`` returns
the same three objects on PyTorch, or wrappers that run their exported networks (``model.export``):

* ``BackendPoseModel`` is a ``PoseModel`` with the wrapped model's ``info`` and
  ``weights_sha256``: ``predict(crops)`` runs the exported ``predict`` graph. Crops, flip test
  and decoding stay in the pipeline, so the geometry is the same on every backend.
* ``BackendDetector`` is the SSDLite person detector whose network (with box decoding) runs on
  the backend; the per-image resize, thresholds and NMS stay in PyTorch. torchvision detectors
  stay on PyTorch (their transform and post-processing do not export cleanly).
* ``BackendRois`` is BlazePose's ROI finder (``model.pose_detector.BodyRois``) whose pose detector
  network runs on the backend; the views, anchors, decoding, NMS and ROI geometry stay in PyTorch.

Backends (``BACKENDS``):

* ``torch``: the PyTorch modules as built.
* ``openvino``: OpenVINO's CPU plugin. fp32 runs as f32 (``INFERENCE_PRECISION_HINT=f32``: OpenVINO
  would otherwise pick bf16 on CPUs that have it), within 5e-7 of PyTorch. Where the CPU
  has bf16 (``OPTIMIZATION_CAPABILITIES`` lists BF16: AVX-512 BF16 or AMX), a second compilation
  in bf16 serves requests that ask for ``precision="bf16"`` (``BackendPoseModel.variants``).
  The detectors run f32 for every request, so a bf16 request crops the same boxes and ROIs.
* ``onnxruntime``: ONNX Runtime's CPU provider, fp32, its threads not spinning between runs.
* ``auto``: on CPU the fastest installed (OpenVINO, else ONNX Runtime, else PyTorch; see
  BENCHMARKS.md); on CUDA PyTorch.

Each network is compiled once, when the pipeline is built. Exports are cached in
``<cache_dir>/onnx`` keyed by the weights' sha256 (``model.export.export_cached``), OpenVINO's
compiled blobs in ``<cache_dir>/openvino`` (its ``CACHE_DIR``). Random weights (no sha256) stay
on PyTorch under ``auto`` (smoke runs: no export at every start); an explicit backend exports them
into a temporary folder each time, unchecked (the random init is too ill-conditioned to compare)
and uncached.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from model.blazepose import BlazePose
from model.crops import PackedImages
from model.distilpose import DistilPose
from model.export import export_cached, export_onnx
from model.interfaces import Detector, PoseModel, PoseModelInfo, PoseOutput, RoiFinder, Rois
from model.pose_detector import BodyRois, PoseDetector
from model.ssdlite import SSDLite, SSDLitePersonDetector

logger = logging.getLogger(__name__)

Backend = Literal["torch", "openvino", "onnxruntime", "auto"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# Which ONNX packages each exported backend needs (onnx + onnxruntime: export and its check).
_NEEDS = {
    "openvino": ("openvino", "onnx", "onnxruntime"),
    "onnxruntime": ("onnx", "onnxruntime"),
}
_INSTALL_HINT = "install the cpu-fast extra: pip install -e '.[cpu-fast]'"
# Batch sizes the pipeline's warm-up runs through a backend model: a new batch size costs
# OpenVINO a kernel set-up on its first call (measured 10-200 ms on 2 cores).
WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16)


def installed(backend: str) -> bool:
    """Whether the packages ``backend`` needs are importable (PyTorch: always)."""
    return all(importlib.util.find_spec(name) is not None for name in _NEEDS.get(backend, ()))


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The concrete backend ``backend`` means on ``device``.

    Raises:
        ValueError: unknown backend; an ONNX backend on a CUDA device; or its packages are missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        if not on_cpu:
            return "torch"
        return next((b for b in ("openvino", "onnxruntime") if installed(b)), "torch")
    if backend != "torch":
        if not on_cpu:
            raise ValueError(f"the {backend} backend runs on the CPU, not on {device}")
        if not installed(backend):
            missing = [n for n in _NEEDS[backend] if importlib.util.find_spec(n) is None]
            raise ValueError(f"the {backend} backend needs {', '.join(missing)}: {_INSTALL_HINT}")
    return backend


def bf16_available() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 on this CPU."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# -------------------------------------------------------------------------------------- runners

Runner = Callable[[np.ndarray], list[np.ndarray]]


class OpenVINORunner:
    """One compiled OpenVINO model: (B, C, H, W) float32 -> its outputs in graph order.

    Args:
        path: the ONNX file.
        precision: "f32" or "bf16" (``INFERENCE_PRECISION_HINT``).
        threads: inference threads.
        cache_dir: OpenVINO's ``CACHE_DIR`` (compiled blobs), or None.
    """

    def __init__(
        self, path: Path, precision: str, threads: int, cache_dir: Path | None = None
    ) -> None:
        import openvino as ov

        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        }
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        # What OpenVINO runs ("f32", "bf16"): a bf16 hint falls back to f32 without bf16.
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._request = self.compiled.create_infer_request()
        self._outputs = list(self.compiled.outputs)
        self._lock = threading.Lock()  # one infer request: one call at a time

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one batch; returns copies of the outputs."""
        with self._lock:
            result = self._request.infer({0: x}, share_inputs=True, share_outputs=False)
            return [np.asarray(result[port]) for port in self._outputs]


class OnnxRuntimeRunner:
    """One ONNX Runtime CPU session: (B, C, H, W) float32 -> its outputs in graph order."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its worker threads would spin after each run, taking the cores from the PyTorch work that
        # follows (crops, decoding, NMS): the reference pair's pipeline measured 374 -> 277 ms per
        # image with SSDLite boxes, 193 -> 121 with caller boxes (2 cores, BENCHMARKS.md), though
        # a network alone, called back to back, runs 20-60 % slower without spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one batch (sessions are thread-safe)."""
        return list(self.session.run(None, {self._input: x}))


def _runner(backend: str, path: Path, precision: str, cache_dir: Path | None) -> Runner:
    threads = torch.get_num_threads()
    if backend == "openvino":
        return OpenVINORunner(path, precision, threads, cache_dir)
    return OnnxRuntimeRunner(path, threads)


def _version(backend: str) -> str:
    module = importlib.import_module(backend)
    return str(getattr(module, "__version__", "")).split("-")[0]


# -------------------------------------------------------------------------------------- wrappers


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """A contiguous float32 host array of x (no copy when x already is one)."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class BackendPoseModel:
    """A ``PoseModel`` whose ``predict`` runs an exported graph.

    Attributes:
        info: the wrapped model's (geometry, keypoints, normalisation).
        weights_sha256: the wrapped model's.
        backend: what runs, for ``ModelDescription.backend`` ("openvino 2026.4 f32", ...).
        variants: precision -> the model that serves it ("fp32": this one; "bf16" where the
            backend and the CPU have it). The pipeline runs a request's precision when listed.
    """

    def __init__(
        self,
        info: PoseModelInfo,
        runner: Runner,
        backend: str,
        weights_sha256: str | None = None,
    ) -> None:
        self.info = info
        self.weights_sha256 = weights_sha256
        self.backend = backend
        self.variants: dict[str, BackendPoseModel] = {"fp32": self}
        self._runner = runner
        # (K, 2), (K,), (K, 2): trailing output shapes, for an empty batch.
        self._trailing = [out.shape[1:] for out in runner(self._zeros(1))]

    def _zeros(self, n: int) -> np.ndarray:
        w, h = self.info.input_size
        return np.zeros((n, 3, h, w), dtype=np.float32)

    def predict(self, crops: torch.Tensor) -> PoseOutput:
        """Run on normalised crops (N, 3, H, W); float32 CPU outputs as ``PoseOutput``."""
        if crops.shape[0] == 0:
            outs = [np.zeros((0, *shape), dtype=np.float32) for shape in self._trailing]
        else:
            outs = self._runner(_to_numpy(crops))
        tensors = [torch.from_numpy(out).float() for out in outs]
        sigmas = tensors[2] if len(tensors) > 2 else None
        return PoseOutput(coords=tensors[0], scores=tensors[1], sigmas=sigmas)

    def warmup(self, max_batch_size: int, batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES) -> None:
        """Run every precision variant once at each batch size up to ``max_batch_size``."""
        for model in self.variants.values():
            for n in batch_sizes:
                if n <= max_batch_size:
                    model._runner(model._zeros(n))


class _SSDLiteOnBackend(SSDLite):
    """``SSDLite`` whose ``forward`` (network + box decoding) runs the exported graph;
    ``preprocess`` (the per-image resize) stays in PyTorch."""

    def __init__(self, net: SSDLite, runner: Runner) -> None:
        super().__init__(net.graph, net.config)
        self.runner = runner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``SSDLite.forward``."""
        if x.shape[0] == 0:
            return super().forward(x)
        boxes, scores = self.runner(_to_numpy(x))
        return torch.from_numpy(boxes), torch.from_numpy(scores)


class BackendDetector:
    """The SSDLite person detector with its network on a backend (a ``Detector``).

    Attributes:
        name, weights_sha256: the wrapped detector's.
        backend: what runs its network.
        inner: the wrapped detector (a copy whose ``net`` runs the backend).
    """

    def __init__(self, detector: SSDLitePersonDetector, runner: Runner, backend: str) -> None:
        self.inner = copy.copy(detector)
        self.inner.net = _SSDLiteOnBackend(detector.net, runner).eval()
        self.name = detector.name
        self.weights_sha256 = detector.weights_sha256
        self.backend = backend

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """See ``SSDLitePersonDetector.__call__``."""
        return self.inner(images)


class _PoseDetectorOnBackend(PoseDetector):
    """``PoseDetector`` whose network runs the exported graph; its anchors and decoding
    (``PoseDetector.decode``) stay in PyTorch."""

    def __init__(self, net: PoseDetector, runner: Runner) -> None:
        super().__init__(net.graph, net.weights_sha256, net.config)
        self.runner = runner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See ``PoseDetector.forward``."""
        if x.shape[0] == 0:
            return super().forward(x)
        raw_boxes, logits = self.runner(_to_numpy(x))  # (V, A, 12), (V, A, 1)
        return self.decode(torch.from_numpy(raw_boxes), torch.from_numpy(logits))


class BackendRois:
    """BlazePose's ROI finder with its pose detector network on a backend (a ``RoiFinder``).

    Attributes:
        name, weights_sha256: the wrapped finder's.
        backend: what runs its network.
        runner: the compiled network (f32 for every request).
        inner: the wrapped finder (a copy whose ``net`` runs the backend).
    """

    def __init__(self, rois: BodyRois, runner: Runner, backend: str) -> None:
        self.inner = copy.copy(rois)
        self.inner.net = _PoseDetectorOnBackend(rois.net, runner).eval()
        self.name = rois.name
        self.weights_sha256 = rois.weights_sha256
        self.backend = backend
        self.runner = runner

    def __call__(
        self, packed: PackedImages, image_index: torch.Tensor, boxes: torch.Tensor
    ) -> Rois:
        """See ``BodyRois.__call__``."""
        return self.inner(packed, image_index, boxes)

    def warmup(self, max_batch_size: int, batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES) -> None:
        """Run the network once at each batch size up to ``max_batch_size`` (one view per box)."""
        size = self.inner.net.config.input_size
        for n in batch_sizes:
            if n <= max_batch_size:
                self.runner(np.zeros((n, 3, size, size), dtype=np.float32))


# -------------------------------------------------------------------------------------- apply


class _Exporter:
    """ONNX files of one build: cached by weights sha256, else (random weights, or a cache that
    cannot be written: a read-only image) in a temporary folder removed after compilation."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def _scratch_path(self, name: str) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="pose-onnx-")
        return Path(self._scratch.name) / f"{name}.onnx"

    def path(self, net: Any, name: str, weights_sha256: str | None) -> tuple[Path, Path | None]:
        """The ONNX file of ``net`` and OpenVINO's ``CACHE_DIR`` for it (None: no cache)."""
        if weights_sha256 is None:
            logger.warning("%s has random weights: exporting it unchecked and uncached", name)
            path = self._scratch_path(name)
            export_onnx(net, name, path, check=False)
            return path, None
        try:
            ov_cache = self.cache_dir / "openvino"
            ov_cache.mkdir(parents=True, exist_ok=True)
            return export_cached(net, name, self.cache_dir, weights_sha256), ov_cache
        except OSError as exc:
            logger.warning("cannot cache the export of %s in %s (%s)", name, self.cache_dir, exc)
        path = self._scratch_path(name)
        export_onnx(net, name, path, source_weights_sha256=weights_sha256)
        return path, None

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()


def wrap_pose_model(
    pose: DistilPose | BlazePose, backend: str, path: Path, ov_cache: Path | None = None
) -> BackendPoseModel:
    """``pose`` exported to ``path`` as a ``BackendPoseModel`` on ``backend`` ("openvino" or
    "onnxruntime"), compiled now: OpenVINO in f32, and in bf16 too where the CPU has it."""
    sha = pose.weights_sha256
    label = f"{backend} {_version(backend)}"
    if backend != "openvino":
        return BackendPoseModel(
            pose.info, _runner(backend, path, "f32", None), f"{label} (fp32)", sha
        )
    threads = torch.get_num_threads()
    fp32 = OpenVINORunner(path, "f32", threads, ov_cache)
    if not bf16_available():
        label += f" (fp32 as {fp32.precision}; bf16 requests run fp32: no bf16 on this CPU)"
        return BackendPoseModel(pose.info, fp32, label, sha)
    bf16 = OpenVINORunner(path, "bf16", threads, ov_cache)
    label += f" (fp32 as {fp32.precision}, bf16 as {bf16.precision})"
    model = BackendPoseModel(pose.info, fp32, label, sha)
    model.variants["bf16"] = BackendPoseModel(pose.info, bf16, label, sha)
    return model


def apply_backend(
    pose_model: PoseModel,
    detector: Detector | None,
    *,
    rois: RoiFinder | None = None,
    backend: str,
    device: str | torch.device,
    cache_dir: Path | str,
) -> tuple[PoseModel, Detector | None, RoiFinder | None]:
    """The pose model, detector and ROI finder on ``backend`` (see the module docstring).

    Args:
        pose_model: as built by the catalogue (a ``DistilPose`` or ``BlazePose`` is exported).
        detector: as built, or None (the SSDLite person detector is exported).
        rois: the pose model's ROI finder (``ModelSpec.rois``), or None (``BodyRois``'s pose
            detector network is exported).
        backend: one of ``BACKENDS``.
        device: the pipeline's device ("auto" means PyTorch off the CPU).
        cache_dir: the service's cache folder (exports in ``onnx/``, OpenVINO blobs in
            ``openvino/``).

    Raises:
        ValueError: see ``resolve_backend``; or an explicit backend for a pose model that is not
            exported (``auto`` keeps such a model on PyTorch).
        model.export.ExportError: the export failed or does not match PyTorch.
    """
    chosen = resolve_backend(backend, device)
    if chosen == "torch":
        return pose_model, detector, rois
    exporter = _Exporter(Path(cache_dir).expanduser())
    try:
        random = getattr(pose_model, "weights_sha256", None) is None
        if isinstance(pose_model, DistilPose | BlazePose) and not (backend == "auto" and random):
            path, ov_cache = exporter.path(
                pose_model, pose_model.info.name, pose_model.weights_sha256
            )
            pose_model = wrap_pose_model(pose_model, chosen, path, ov_cache)
        elif backend == "auto":
            why = "random weights (smoke runs)" if random else "not exported"
            logger.info("%s runs on PyTorch: %s", type(pose_model).__name__, why)
        else:
            raise ValueError(f"{type(pose_model).__name__} cannot run on {chosen}: not exported")
        if isinstance(detector, SSDLitePersonDetector):
            path, ov_cache = exporter.path(detector.net, detector.name, detector.weights_sha256)
            runner = _runner(chosen, path, "f32", ov_cache)
            detector = BackendDetector(detector, runner, f"{chosen} {_version(chosen)} (fp32)")
        elif detector is not None:
            logger.info("the %s detector runs on PyTorch (not exported)", detector.name)
        if isinstance(rois, BodyRois):
            path, ov_cache = exporter.path(rois.net, rois.name, rois.weights_sha256)
            runner = _runner(chosen, path, "f32", ov_cache)
            rois = BackendRois(rois, runner, f"{chosen} {_version(chosen)} (fp32)")
        elif rois is not None:
            logger.info("the %s ROI finder runs on PyTorch (not exported)", rois.name)
    finally:
        exporter.close()
    return pose_model, detector, rois
