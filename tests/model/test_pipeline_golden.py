"""The pipeline with the real DistilPose-S (recipe weights): the official demo path, a real photo,
and CUDA when there is one.

golden_pipeline_S.pt: a synthetic 640x480 image and two boxes (one past the right border) through
the official ``inference_top_down_pose_model`` with flip test. Measured on CPU (torch 2.14): crops
equal to the official ``model_input`` bit for bit, keypoints within 9.2e-5 px, scores within
7.7e-7; from the stored crops the same. The asserted bounds are the golden README's (2e-3 px,
3e-5), well inside the issue's 0.1 px.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import create_model, crops
from model.interfaces import PipelineItem, PoseOptions
from model.keypoints import flip_indices
from model.pipeline import TopDownPipeline, build_pipeline

HERE = Path(__file__).parents[1]
XY_TOL_PX = 2e-3
SCORE_TOL = 3e-5


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(HERE / "golden" / "golden_pipeline_S.pt")


@pytest.fixture(scope="module")
def pipeline(distilpose_s_checkpoint: Path) -> TopDownPipeline:
    return build_pipeline(
        model=None,
        weights=str(distilpose_s_checkpoint),
        detector=None,
        detector_weights=None,
        device="cpu",
    )


def rgb_chw(golden: dict) -> torch.Tensor:
    return golden["image_bgr_uint8"].flip(-1).permute(2, 0, 1).contiguous()


def keypoint_tensor(persons: list) -> torch.Tensor:
    return torch.tensor([p.keypoints for p in persons])  # (M, K, 3)


def test_golden_pipeline_keypoints(pipeline: TopDownPipeline, golden: dict) -> None:
    boxes = golden["boxes_xywh_score"]
    (result,), stats = pipeline.run([PipelineItem(image=rgb_chw(golden), boxes=boxes)])
    got, ref = keypoint_tensor(result.persons), golden["keypoints_xy_score"]
    xy_err = (got[..., :2] - ref[..., :2]).abs().max().item()
    score_err = (got[..., 2] - ref[..., 2]).abs().max().item()
    print(
        f"golden pipeline from own crops: max |dxy| {xy_err:.2e} px, max |dscore| {score_err:.2e}"
    )
    assert xy_err <= XY_TOL_PX and score_err <= SCORE_TOL
    assert [p.bbox for p in result.persons] == [tuple(b[:4]) for b in boxes.tolist()]
    assert [p.bbox_score for p in result.persons] == boxes[:, 4].tolist()
    # the official demo returns x2 = x + w - 1: the same boxes in another convention
    returned = golden["bboxes_xyxy_score_returned"]
    torch.testing.assert_close(returned[:, 2:4] - returned[:, :2] + 1, boxes[:, 2:4])
    assert stats.pose_crops == 2


def test_golden_pipeline_from_the_stored_crops(pipeline: TopDownPipeline, golden: dict) -> None:
    """Network + flip merge + decode alone, fed the official crops (no resampling involved)."""
    net = pipeline.pose_model
    out = net.predict(torch.cat((golden["model_input"], golden["model_input_flipped"])))
    index = torch.tensor(flip_indices(net.info.keypoint_names))
    coords, scores = crops.merge_flip(
        out.coords[:2], out.scores[:2], out.coords[2:], out.scores[2:], index
    )
    xy = crops.decode_keypoints(coords, golden["centers"], golden["scales"], net.info.input_size)
    ref = golden["keypoints_xy_score"]
    xy_err = (xy - ref[..., :2]).abs().max().item()
    score_err = (scores - ref[..., 2]).abs().max().item()
    print(
        f"golden pipeline from stored crops: max |dxy| {xy_err:.2e} px, "
        f"max |dscore| {score_err:.2e}"
    )
    assert xy_err <= XY_TOL_PX and score_err <= SCORE_TOL


def test_real_photo_with_its_detections_as_caller_boxes(
    pipeline: TopDownPipeline, golden: dict
) -> None:
    """COCO val2017 000000000785 (CC BY 2.0) and its 22 person detections; random weights, so only
    shapes, finiteness, boxes and order are checked. Mixed with the golden image in one batch."""
    meta = json.loads((HERE / "assets" / "coco_000000000785.json").read_text())
    with Image.open(HERE / "assets" / "000000000785.jpg") as im:
        photo = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    assert tuple(photo.shape) == (3, meta["images"][0]["height"], meta["images"][0]["width"])
    dets = meta["detections"]
    boxes = torch.tensor([[*d["bbox"], d["score"]] for d in dets], dtype=torch.float32)
    items = [
        PipelineItem(
            image=photo, boxes=boxes, options=PoseOptions(flip_test=False, return_sigmas=True)
        ),
        PipelineItem(image=rgb_chw(golden), boxes=golden["boxes_xywh_score"][:1]),
    ]
    results, stats = pipeline.run(items)
    assert stats.persons_per_image == [len(dets), 1]
    persons = results[0].persons
    assert (results[0].width, results[0].height) == (640, 425)
    assert [p.bbox for p in persons] == [tuple(b[:4]) for b in boxes.tolist()]
    assert [p.bbox_score for p in persons] == boxes[:, 4].tolist()
    for p in persons:
        assert len(p.keypoints) == 17 and p.sigmas is not None and len(p.sigmas) == 17
        numbers = (
            [v for kp in p.keypoints for v in kp] + [v for s in p.sigmas for v in s] + [p.score]
        )
        assert all(isinstance(v, float) and math.isfinite(v) for v in numbers)
        assert all(s > 0 for sig in p.sigmas for s in sig)
    (alone,), _ = pipeline.run([items[1]])
    assert alone.persons[0].keypoints == results[1].persons[0].keypoints


def test_create_model_and_direct_pipeline_agree(
    distilpose_s_checkpoint: Path, golden: dict
) -> None:
    net = create_model("distilpose_s", weights=distilpose_s_checkpoint)
    pipe = TopDownPipeline(
        net, max_crops_per_batch=2
    )  # 2 inputs: one box (plus its flip) per forward
    (result,), _ = pipe.run([PipelineItem(image=rgb_chw(golden), boxes=golden["boxes_xywh_score"])])
    ref = golden["keypoints_xy_score"]
    assert (keypoint_tensor(result.persons) - ref).abs().max().item() <= XY_TOL_PX


# Reduced precision against CPU fp32 on the golden image (boxes 180 x 330 and 300 x 200 px):
# max |dxy| px and max |dscore|. Not measured on a GPU yet; the bounds are 3x what the same
# pipeline gives under CPU autocast (bf16 1.23 px / 0.0125, fp16 0.102 px / 0.0013; 1.89 px and
# 0.143 px while the model's 5-output head also ran in bf16/fp16), a placeholder until a CUDA run
# replaces them with its own figures.
REDUCED_PRECISION_TOL = {"fp32": (1e-3, 1e-4), "bf16": (4.0, 0.03), "fp16": (0.5, 0.005)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_matches_cpu_and_bf16_fp16_stay_close(
    pipeline: TopDownPipeline, distilpose_s_checkpoint: Path, golden: dict
) -> None:
    gpu = build_pipeline(
        model=None,
        weights=str(distilpose_s_checkpoint),
        detector=None,
        detector_weights=None,
        device="cuda",
    )
    image, boxes = rgb_chw(golden), golden["boxes_xywh_score"]
    (cpu,), _ = pipeline.run([PipelineItem(image=image, boxes=boxes)])
    ref = keypoint_tensor(cpu.persons)
    errors, outputs = {}, {}
    for precision in ("fp32", "bf16", "fp16"):
        (res,), _ = gpu.run(
            [PipelineItem(image=image, boxes=boxes, options=PoseOptions(precision=precision))]
        )
        got = outputs[precision] = keypoint_tensor(res.persons)
        errors[precision] = (
            (got[..., :2] - ref[..., :2]).abs().max().item(),
            (got[..., 2] - ref[..., 2]).abs().max().item(),
        )
        print(
            f"CUDA {precision} vs CPU fp32: max |dxy| {errors[precision][0]:.3e} px, "
            f"max |dscore| {errors[precision][1]:.3e}"
        )
    golden_err = (ref[..., :2] - golden["keypoints_xy_score"][..., :2]).abs().max().item()
    print(f"CPU vs golden: {golden_err:.3e} px")
    for precision, (xy_tol, score_tol) in REDUCED_PRECISION_TOL.items():
        xy, score = errors[precision]
        assert xy <= xy_tol and score <= score_tol, (precision, errors[precision])
    # bf16 and fp16 really ran in reduced precision (a silently ignored option gives fp32 back)
    assert not torch.equal(outputs["bf16"], outputs["fp32"])
    assert not torch.equal(outputs["fp16"], outputs["fp32"])
    assert not torch.equal(outputs["bf16"], outputs["fp16"])
