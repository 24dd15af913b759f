"""ONNX export (model.export, ``pose-service export``): dynamic batch, checked against PyTorch,
provenance in ``metadata_props``.

DistilPose-S (recipe weights) is checked on the golden input against the official outputs with the
golden tolerances (coords 1e-5, scores and sigmas 3e-5); BlazePose, SSDLite and BlazePose's pose
detector network against PyTorch on COCO image 785 with ``model.export``'s tolerances. DistilPose-L
exports through the same code (the same wrapper, only the backbone differs); at ~30 s per export on
2 cores it is checked by hand, not here (BENCHMARKS.md, "CPU backends").
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import create_model, crops
from model.catalogue import exportable
from model.export import (
    BLAZEPOSE_TOLERANCES,
    DETECTOR_TOLERANCES,
    POSE_DETECTOR_TOLERANCES,
    ExportError,
    cached_path,
    check_onnx,
    export_cached,
    export_model,
    read_metadata,
    verify_onnx,
)
from model.reference import (
    default_cache_dir,
    load_body_rois,
    load_detector,
    reference_models_available,
)
from model.weights import sha256_file
from service import __main__ as cli
from tests.model.test_backends import GOLDEN_TOL, onnx_cache
from tests.model.test_model_golden import load_golden


@pytest.fixture(scope="module")
def exported_s(
    distilpose_s_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """``pose-service export --weights S.pth`` into the session's export cache."""
    sha = sha256_file(distilpose_s_checkpoint)
    out = cached_path(onnx_cache(tmp_path_factory), "distilpose_s", sha)
    argv = ["export", "--weights", str(distilpose_s_checkpoint), "--output", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0
    return out, json.loads(stdout.getvalue())


def test_cli_writes_provenance(
    exported_s: tuple[Path, dict], distilpose_s_checkpoint: Path
) -> None:
    import onnx

    path, summary = exported_s
    assert summary["path"] == str(path) and summary["model"] == "distilpose_s"
    assert summary["file_sha256"] == sha256_file(path)
    meta = verify_onnx(path, sha256_file(distilpose_s_checkpoint))
    assert meta == read_metadata(path)
    assert meta["source_weights_sha256"] == sha256_file(distilpose_s_checkpoint)
    assert meta["graph_sha256"] == summary["graph_sha256"] and meta["opset"] == "17"
    assert "coords" in meta["check"] and summary["max_abs_diff_vs_torch"]["coords"] <= 1e-5
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # dynamic


def test_golden_outputs_from_the_onnx_file(exported_s: tuple[Path, dict]) -> None:
    """ONNX Runtime on the golden input (batch 2 and 1) against the official outputs."""
    import onnxruntime as ort

    path, _ = exported_s
    golden = load_golden("distilpose_s")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = golden["outputs"]
    to_cells = np.array([192 / 4, 256 / 4], dtype=np.float32)  # sigma: crop units -> cells
    for prefix, x in (("", golden["input"]), ("flipimg_", golden["input"].flip(3))):
        for rows in (slice(0, 2), slice(1, 2)):
            coords, scores, sigmas = session.run(None, {"crops": x[rows].numpy()})
            diffs = {
                "coords": np.abs(coords - ref[prefix + "pred"][rows].numpy()).max(),
                "scores": np.abs(scores - ref[prefix + "score"][rows, :, 0].numpy()).max(),
                "sigmas": np.abs(sigmas * to_cells - ref[prefix + "sigma"][rows].numpy()).max(),
            }
            assert all(diffs[k] <= GOLDEN_TOL[k] for k in diffs), (prefix, rows, diffs)


def test_verify_refuses_edited_or_foreign_files(
    exported_s: tuple[Path, dict], tmp_path: Path
) -> None:
    import onnx

    path, _ = exported_s
    model = onnx.load(str(path))
    with pytest.raises(ExportError, match="other weights"):
        verify_onnx(path, "0" * 64)
    weight = model.graph.initializer[0]
    weight.raw_data = bytes(len(weight.raw_data))  # zeroed: another graph
    onnx.save(model, str(tmp_path / "edited.onnx"))
    with pytest.raises(ExportError, match="graph changed"):
        verify_onnx(tmp_path / "edited.onnx")
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ExportError, match="not exported by pose-service"):
        verify_onnx(tmp_path / "bare.onnx")


def test_export_cached_reuses_a_good_file_and_replaces_a_bad_one(
    exported_s: tuple[Path, dict],
    distilpose_s_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import model.export as export

    path, _ = exported_s
    net = create_model("distilpose_s", weights=distilpose_s_checkpoint)
    sha = sha256_file(distilpose_s_checkpoint)
    exports: list[Path] = []
    monkeypatch.setattr(export, "export_onnx", lambda _n, _m, p, **_kw: exports.append(Path(p)))
    assert export_cached(net, "distilpose_s", path.parents[1], sha) == path
    assert exports == []  # a cache hit: not exported again
    bad = cached_path(tmp_path, "distilpose_s", sha)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not onnx")
    assert export_cached(net, "distilpose_s", tmp_path, sha) == bad
    assert exports == [bad]


def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--model", "distilpose_l", "--cache-dir", str(tmp_path)]) == 1
    assert cli.main(["export", "--cache-dir", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):  # torchvision detectors are not exported
        cli.main(["export", "--model", "fasterrcnn_mobilenet_v3_large_fpn"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="opset"):
        export_model("blazepose_full", None, tmp_path / "x.onnx", opset=13)
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def reference_cache() -> Path:
    directory = default_cache_dir()
    if not reference_models_available(directory):
        pytest.skip(
            f"reference models not in the cache {directory}: run `pose-service models fetch`"
        )
    return directory


def test_the_cli_exports_the_pose_detector(
    reference_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``pose-service export --model blazepose_detector``: the ROI finder of ``blazepose_full``
    (``ModelSpec.rois``), its network alone, with its ``.tflite``'s sha256 as the source."""
    import onnx

    names = exportable()
    assert names[names.index("blazepose_full") + 1] == "blazepose_detector"
    rois = load_body_rois(cache_dir=reference_cache)
    sha = rois.weights_sha256
    assert sha is not None
    out = cached_path(onnx_cache(tmp_path_factory), "blazepose_detector", sha)
    argv = ["export", "--model", "blazepose_detector", "--cache-dir", str(reference_cache)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main([*argv, "--output", str(out)]) == 0
    summary = json.loads(stdout.getvalue())
    assert summary["source_weights_sha256"] == sha and summary["file_sha256"] == sha256_file(out)
    meta = verify_onnx(out, sha)
    assert meta["model"] == "blazepose_detector" and "raw_boxes" in meta["check"]
    diffs = summary["max_abs_diff_vs_torch"]
    assert set(diffs) == set(POSE_DETECTOR_TOLERANCES)
    assert all(diffs[k] <= POSE_DETECTOR_TOLERANCES[k] for k in diffs)
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["raw_boxes", "score_logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_reference_models_on_a_real_photo(
    reference_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """BlazePose, SSDLite and the pose detector export (checked on their own inputs), then again
    on COCO 785: the pose detector on the views ``BodyRois`` gives it (the whole image and the
    annotated box, and their mirrors). Measured there: raw boxes 9.8e-4 px, logits 4.9e-4."""
    from model.reference import load_pose_model
    from tests.model.test_reference import skier

    image, annotation = skier()
    cache = onnx_cache(tmp_path_factory)
    pose = load_pose_model("blazepose_full", cache_dir=reference_cache)
    detector = load_detector("ssdlite_person", cache_dir=reference_cache)
    assert pose.weights_sha256 is not None and detector.weights_sha256 is not None
    # the exports the backends use (cached: shared with tests/model/test_backends.py)
    pose_file = export_cached(pose, "blazepose_full", cache, pose.weights_sha256)
    det_file = export_cached(detector.net, "ssdlite_person", cache, detector.weights_sha256)
    assert verify_onnx(det_file)["source_weights_sha256"] == detector.weights_sha256
    # real inputs: the annotated person as a 256x256 crop in [0, 1], the whole image at 300x300
    x, y, w, h = (int(v) for v in annotation["bbox"])
    crop = image[:, y : y + h, x : x + w].float().unsqueeze(0) / 255.0
    crop = torch.nn.functional.interpolate(crop, size=(256, 256), mode="bilinear")
    diffs = check_onnx(pose, pose_file, torch.cat((crop, crop.flip(3))))
    assert all(diffs[k] <= BLAZEPOSE_TOLERANCES[k] for k in diffs)
    diffs = check_onnx(detector.net, det_file, detector.net.preprocess([image, image.flip(2)]))
    assert all(diffs[k] <= DETECTOR_TOLERANCES[k] for k in diffs)
    rois = load_body_rois(cache_dir=reference_cache)
    assert rois.weights_sha256 is not None
    rois_file = export_cached(rois.net, "blazepose_detector", cache, rois.weights_sha256)
    assert verify_onnx(rois_file)["source_weights_sha256"] == rois.weights_sha256
    height, width = image.shape[1:]
    whole, side = max(height, width), max(w, h)
    views = torch.tensor(
        [[width / 2, height / 2, whole, whole], [x + w / 2, y + h / 2, side, side]]
    )
    packed = crops.pack_images([image, image.flip(2)], "cpu")
    inputs = rois.view_inputs(packed, torch.tensor([0, 0, 1, 1]), views.repeat(2, 1))
    diffs = check_onnx(rois.net, rois_file, inputs, batch_sizes=(1, 4))
    assert all(diffs[k] <= POSE_DETECTOR_TOLERANCES[k] for k in diffs)
