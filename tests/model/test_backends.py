"""The CPU backends (model.backends): exported graphs under OpenVINO and ONNX Runtime.

Parity, fp32, with the golden tests' tolerances (tests/model/test_model_golden.py): DistilPose-S
(recipe weights) on the golden input and its mirror, coords abs <= 1e-5, scores and sigmas
abs <= 3e-5 against the official outputs (measured on both backends: coords < 5e-7, scores and
sigmas < 2e-6). The reference pair (BlazePose + SSDLite, crops placed by BlazePose's pose detector)
on COCO image 785 through ``auto`` (OpenVINO) and ONNX Runtime: OKS within 0.005 of PyTorch's,
boxes within 0.01 px; the pose detector's network within ``model.export``'s tolerances and its ROIs
within 0.01 px and 0.001 degrees. bf16 (OpenVINO, only where the CPU has it): within 3 px of a
192 x 256 crop (``BF16_TOL_PX``); the detectors stay f32.

Exports go to one folder per test session (``onnx_cache``), never to the user's cache.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from model import DistilPose, create_model, crops
from model.backends import (
    BACKENDS,
    BackendDetector,
    BackendPoseModel,
    BackendRois,
    OpenVINORunner,
    apply_backend,
    bf16_available,
    resolve_backend,
)
from model.export import POSE_DETECTOR_TOLERANCES
from model.interfaces import PipelineItem, PoseModelInfo, PoseOptions, PoseOutput, Rois
from model.pipeline import TopDownPipeline, build_pipeline
from model.pose_detector import BodyRois
from model.reference import default_cache_dir, reference_models_available
from tests.model.test_model_golden import load_golden

ONNX_BACKENDS = ["openvino", "onnxruntime"]
GOLDEN_TOL = {"coords": 1e-5, "scores": 3e-5, "sigmas": 3e-5}
OKS_TOL = 0.005
# Measured 1.53 px (max over the golden input's 17 x 2 keypoints; scores 0.018) on an AMD EPYC
# with AVX-512 BF16, OpenVINO 2026.4.1: the first CPU here to have bf16 (the 0.5 px this bound
# was before had never run). OpenVINO runs the whole graph in bf16, the 5-output head included:
# PyTorch's autocast gave 1.89 image px on the golden pipeline with its head in bf16, 1.23 with
# it in float32 (model.distilpose). Marking the head's ops ``disable_fp16_compression`` changed
# nothing under the CPU plugin's bf16 hint. Twice the measured figure.
BF16_TOL_PX = 3.0
ROI_TOL_PX = 0.01
ROI_TOL_DEG = 1e-3


def onnx_cache(factory: pytest.TempPathFactory) -> Path:
    """The session's cache of exports (shared with tests/model/test_export.py)."""
    return factory.getbasetemp() / "onnx-cache"


@pytest.fixture(scope="module")
def net_s(distilpose_s_checkpoint: Path) -> DistilPose:
    return create_model("distilpose_s", weights=distilpose_s_checkpoint)


@pytest.fixture(scope="module")
def on_backend(
    net_s: DistilPose, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, BackendPoseModel]:
    """DistilPose-S compiled once per backend (one export, cached)."""
    models = {}
    for backend in ONNX_BACKENDS:
        model, _, _ = apply_backend(
            net_s, None, backend=backend, device="cpu", cache_dir=onnx_cache(tmp_path_factory)
        )
        assert isinstance(model, BackendPoseModel)
        models[backend] = model
    return models


def _max_diffs(out: PoseOutput, golden: dict, prefix: str, net: DistilPose) -> dict[str, float]:
    ref = golden["outputs"]
    assert out.sigmas is not None
    cells = out.sigmas / torch.tensor(net.sigma_to_crop)  # crop units -> heatmap cells (golden)
    return {
        "coords": (out.coords - ref[prefix + "pred"]).abs().max().item(),
        "scores": (out.scores - ref[prefix + "score"][..., 0]).abs().max().item(),
        "sigmas": (cells - ref[prefix + "sigma"]).abs().max().item(),
    }


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_golden_outputs_through_each_backend(
    backend: str, on_backend: dict[str, BackendPoseModel], net_s: DistilPose
) -> None:
    model = on_backend[backend]
    assert model.info == net_s.info and model.weights_sha256 == net_s.weights_sha256
    golden = load_golden("distilpose_s")
    x = golden["input"]
    for prefix, batch in (("", x), ("flipimg_", x.flip(3))):
        diffs = _max_diffs(model.predict(batch), golden, prefix, net_s)
        failed = {k: v for k, v in diffs.items() if not v <= GOLDEN_TOL[k]}
        assert not failed, f"{backend} {prefix or 'plain'}: {failed} (tolerances {GOLDEN_TOL})"
    # the batch dimension is dynamic: one crop alone gives the same numbers
    single = model.predict(x[1:2])
    assert torch.allclose(single.coords, model.predict(x).coords[1:2], atol=1e-6)


def test_an_empty_batch(on_backend: dict[str, BackendPoseModel]) -> None:
    out = on_backend["onnxruntime"].predict(torch.zeros((0, 3, 256, 192)))
    assert out.coords.shape == (0, 17, 2) and out.scores.shape == (0, 17)
    assert out.sigmas is not None and out.sigmas.shape == (0, 17, 2)


def test_bf16_only_where_the_cpu_has_it(
    on_backend: dict[str, BackendPoseModel], net_s: DistilPose
) -> None:
    model = on_backend["openvino"]
    assert "fp32 as f32" in model.backend
    if not bf16_available():
        assert set(model.variants) == {"fp32"} and "no bf16 on this CPU" in model.backend
        return
    assert "bf16 as bf16" in model.backend
    x = load_golden("distilpose_s")["input"]
    fp32, bf16 = model.predict(x), model.variants["bf16"].predict(x)
    px = ((bf16.coords - fp32.coords) * torch.tensor([192.0, 256.0])).abs().max().item()
    assert px <= BF16_TOL_PX


def test_the_pipeline_on_auto_reports_and_matches_torch(
    distilpose_s_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``build_pipeline(backend="auto")`` on CPU runs OpenVINO, and says so in ``describe()``."""
    common: dict[str, Any] = {
        "model": None,
        "weights": str(distilpose_s_checkpoint),
        "detector": None,
    }
    reference = build_pipeline(**common, detector_weights=None)
    fast = build_pipeline(
        **common, detector_weights=None, backend="auto", cache_dir=onnx_cache(tmp_path_factory)
    )
    assert reference.describe().backend == "torch"
    assert fast.describe().backend.startswith("openvino ")
    assert fast.describe().weights_sha256 == reference.describe().weights_sha256
    assert isinstance(fast.pose_model, BackendPoseModel)
    fast.pose_model.warmup(2)  # the pipeline's warm-up runs 1..16; 1 and 2 keep this test short
    image = torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8, generator=torch.Generator())
    boxes = torch.tensor([[20.0, 10.0, 120.0, 200.0], [150.0, 30.0, 100.0, 180.0]])
    items = [PipelineItem(image, boxes, PoseOptions()), PipelineItem(image, boxes[:1])]
    want, _ = reference.run(items)
    got, _ = fast.run(items)
    for a, b in zip(want, got, strict=True):
        for p, q in zip(a.persons, b.persons, strict=True):
            assert torch.allclose(torch.tensor(p.keypoints), torch.tensor(q.keypoints), atol=1e-3)


def test_resolve_backend() -> None:
    from service.settings import Settings

    assert typing.get_args(Settings.model_fields["backend"].annotation) == BACKENDS
    assert resolve_backend("auto", "cpu") == "openvino"  # the cpu-fast extra is installed
    assert resolve_backend("auto", "cuda:0") == "torch"
    assert resolve_backend("onnxruntime", "cpu") == "onnxruntime"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("openvino", "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("tensorrt", "cpu")


def test_an_unwritable_cache_exports_to_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only cache (a container image) costs an export per start, not the start."""
    import model.backends as backends

    calls: list[dict] = []

    def export(_net: object, _name: str, path: Path, **kw: object) -> None:
        Path(path).write_bytes(b"onnx")
        calls.append(kw)

    monkeypatch.setattr(backends, "export_onnx", export)
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    exporter = backends._Exporter(blocked)
    path, ov_cache = exporter.path(object(), "distilpose_s", "ab" * 32)
    assert ov_cache is None and path.is_file() and blocked not in path.parents
    assert calls == [{"source_weights_sha256": "ab" * 32}]  # checked, as a cached export is
    exporter.close()
    assert not path.exists()


class _Double:
    """A pose model that is not exported (a test double), recording what ran."""

    def __init__(self, tag: str, log: list[str]) -> None:
        self.info = PoseModelInfo("double", (8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.tag, self.log = tag, log

    def predict(self, crops: torch.Tensor) -> PoseOutput:
        self.log.append(self.tag)
        n = crops.shape[0]
        return PoseOutput(torch.full((n, 17, 2), 0.5), torch.ones((n, 17)), None)


class _TorchvisionLike:
    name = "fasterrcnn_mobilenet_v3_large_fpn"

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros((0, 5)) for _ in images]


class _RoisDouble:
    name = "rois_double"

    def __call__(self, packed: object, image_index: torch.Tensor, boxes: torch.Tensor) -> Rois:
        raise AssertionError("not called")


def test_what_is_not_exported_stays_on_torch(tmp_path: Path) -> None:
    log: list[str] = []
    pose, detector = _Double("fp32", log), _TorchvisionLike()
    rois = _RoisDouble()
    kept = apply_backend(
        pose, detector, rois=rois, backend="auto", device="cpu", cache_dir=tmp_path
    )
    assert kept == (pose, detector, rois)
    with pytest.raises(ValueError, match="not exported"):
        apply_backend(pose, None, backend="onnxruntime", device="cpu", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_pipeline_routes_a_precision_to_its_variant() -> None:
    """A bf16 request on CPU runs the model's bf16 variant where it has one, else fp32."""
    log: list[str] = []
    model = _Double("fp32", log)
    model.variants = {"fp32": model, "bf16": _Double("bf16", log)}  # type: ignore[attr-defined]
    pipeline = TopDownPipeline(model)  # type: ignore[arg-type]
    image = torch.zeros((3, 16, 16), dtype=torch.uint8)
    box = torch.tensor([[2.0, 2.0, 8.0, 8.0]])
    for precision in ("fp32", "bf16", "fp16"):
        pipeline.run([PipelineItem(image, box, PoseOptions(precision=precision))])  # type: ignore[arg-type]
    assert log == ["fp32", "bf16", "fp32"]


@pytest.fixture(scope="module")
def reference_cache() -> Path:
    directory = default_cache_dir()
    if not reference_models_available(directory):
        pytest.skip(
            f"reference models not in the cache {directory}: run `pose-service models fetch`"
        )
    return directory


@pytest.fixture(scope="module")
def reference_pipelines(
    reference_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, TopDownPipeline]:
    """The reference pair (``blazepose_full`` + ``ssdlite_person``, crops placed by BlazePose's pose
    detector) on PyTorch, ``auto`` (OpenVINO) and ONNX Runtime."""
    return {
        backend: build_pipeline(
            model="blazepose_full",
            weights=str(reference_cache / "blazepose_full.safetensors"),
            detector="ssdlite_person",
            detector_weights=str(reference_cache / "ssdlite_person.safetensors"),
            backend=backend,
            cache_dir=onnx_cache(tmp_path_factory),
        )
        for backend in ("torch", "auto", "onnxruntime")
    }


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_reference_pair_oks_unchanged_on_each_backend(
    backend: str, reference_pipelines: dict[str, TopDownPipeline]
) -> None:
    """BlazePose + SSDLite on COCO image 785 (tests/assets): OKS with the annotated box and with
    the detector's box, PyTorch vs each backend, within 0.005; boxes within 0.01 px."""
    from tests.model.test_reference import coco_oks, skier

    image, annotation = skier()
    items = [
        PipelineItem(image, torch.tensor([[*annotation["bbox"], 1.0]]), PoseOptions()),
        PipelineItem(image, None, PoseOptions()),
    ]
    built = reference_pipelines[backend]
    assert isinstance(built.detector, BackendDetector)
    assert isinstance(built.rois, BackendRois)
    label = "openvino " if backend == "auto" else "onnxruntime "
    assert built.describe().backend.startswith(label)
    assert "rois: torch" not in built.describe().backend
    want, _ = reference_pipelines["torch"].run(items)
    got, _ = built.run(items)
    for a, b in zip(want, got, strict=True):
        assert len(a.persons) == len(b.persons) == 1
        p, q = a.persons[0], b.persons[0]
        assert torch.allclose(torch.tensor(p.bbox), torch.tensor(q.bbox), atol=0.01)
        oks_torch, oks_fast = coco_oks(p.keypoints, annotation), coco_oks(q.keypoints, annotation)
        assert oks_torch > 0.85 and abs(oks_fast - oks_torch) <= OKS_TOL, (oks_torch, oks_fast)


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_pose_detector_on_each_backend(
    backend: str, reference_pipelines: dict[str, TopDownPipeline]
) -> None:
    """BlazePose's pose detector network through each backend, in f32 for every request: its raw
    outputs on real views within ``model.export``'s tolerances, and the ROIs it places within
    ``ROI_TOL_PX`` and ``ROI_TOL_DEG`` of PyTorch's. Measured here (OpenVINO; ONNX Runtime):
    raw boxes 2.4e-4 px; 9.8e-4 px, logits 9e-5; 4.9e-4, ROIs 9e-5 px and 8e-6 degrees; 3e-5 px
    and 6e-6 degrees (over every annotated and SSDLite box of the shared photos: 3.7e-4 px and
    4.1e-5 degrees, the same 21 of 35 boxes found)."""
    from tests.model.test_reference import skier

    reference, built = reference_pipelines["torch"].rois, reference_pipelines[backend].rois
    assert isinstance(reference, BodyRois) and isinstance(built, BackendRois)
    assert (built.name, built.weights_sha256) == (reference.name, reference.weights_sha256)
    runner = built.runner
    if isinstance(runner, OpenVINORunner):
        assert runner.precision == "f32"  # also for bf16 requests: only the pose model has bf16
    image, annotation = skier()
    packed = crops.pack_images([image, image.flip(2)], "cpu")
    h, w = image.shape[1:]
    x, y, bw, bh = annotation["bbox"]
    side = max(bw, bh)
    # the whole image's view and the annotated box's, of the photo and its mirror
    whole = max(w, h)
    views = torch.tensor([[w / 2, h / 2, whole, whole], [x + bw / 2, y + bh / 2, side, side]] * 2)
    inputs = reference.view_inputs(packed, torch.tensor([0, 0, 1, 1]), views)
    with torch.inference_mode():
        want = reference.net.graph(inputs)
    got = dict(zip(("boxes", "scores"), runner(inputs.numpy()), strict=True))
    raw = {
        "raw_boxes": (torch.from_numpy(got["boxes"]) - want["boxes"]).abs().max().item(),
        "score_logits": (torch.from_numpy(got["scores"]) - want["scores"]).abs().max().item(),
    }
    assert all(raw[k] <= POSE_DETECTOR_TOLERANCES[k] for k in raw), raw
    # ROIs: the annotated box, a box around the skier's upper body, the whole image (none found)
    boxes = torch.tensor([[x, y, bw, bh], [x, y, bw, bh / 2], [0.0, 0.0, w, h]])
    index = torch.zeros(3, dtype=torch.int64)
    a, b = reference(packed, index, boxes), built(packed, index, boxes)
    assert a.found.tolist() == b.found.tolist() == [True, True, False]
    found = a.found
    px = max(
        (a.centers - b.centers)[found].abs().max().item(),
        (a.sides - b.sides)[found].abs().max().item(),
    )
    degrees = (a.rotations - b.rotations)[found].abs().max().item()
    assert px <= ROI_TOL_PX and degrees <= ROI_TOL_DEG, (px, degrees)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    none = built(packed, torch.zeros(0, dtype=torch.int64), torch.zeros((0, 4)))
    assert none.centers.shape == (0, 2) and none.found.shape == (0,)
    built.warmup(2)
