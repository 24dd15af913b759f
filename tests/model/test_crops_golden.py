"""``model.crops`` against the official numbers (golden files in tests/golden, no pose model).

* golden_S.pt / golden_L.pt: the official flip merge (``test_pred_jts``, ``test_score`` with the
  score quirk), decode (``test_preds``) and box output (``test_boxes``) from the stored raw outputs.
* golden_pipeline_S.pt: box -> centre/scale and the crops the official demo fed to the network.
* More crops (border boxes, float boxes, rotations) against OpenCV 4.14 through mmpose's
  ``get_affine_transform``: their sha256 was recorded once with the official NumPy/OpenCV code path
  (mmpose v0.22 ``_box2cs`` + ``get_affine_transform`` with NumPy 1.x dtypes, ``cv2.warpAffine``
  INTER_LINEAR), so the test needs no OpenCV.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from model import crops
from model.keypoints import COCO_KEYPOINT_NAMES, flip_indices

GOLDEN = Path(__file__).parents[1] / "golden"
INPUT_SIZE = (192, 256)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module", params=["S", "L"])
def golden(request: pytest.FixtureRequest) -> dict:
    return torch.load(GOLDEN / f"golden_{request.param}.pt")


@pytest.fixture(scope="module")
def pipeline_golden() -> dict:
    return torch.load(GOLDEN / "golden_pipeline_S.pt")


def flip_index() -> torch.Tensor:
    index = torch.tensor(flip_indices(COCO_KEYPOINT_NAMES))
    pairs = {tuple(p) for p in torch.load(GOLDEN / "golden_S.pt")["meta"]["flip_pairs"]}
    assert pairs == {(i, int(j)) for i, j in enumerate(index) if i < j}
    return index


def test_pred_jts(golden: dict) -> None:
    out = golden["outputs"]
    coords, _ = crops.merge_flip(
        out["pred"],
        out["score"][..., 0],
        out["flipimg_pred"],
        out["flipimg_score"][..., 0],
        flip_index(),
    )
    torch.testing.assert_close(coords, out["test_pred_jts"], atol=1e-5, rtol=0)
    assert torch.equal(coords, out["test_pred_jts"])  # measured: bit-identical


def test_score_official_quirk_is_the_default(golden: dict) -> None:
    out = golden["outputs"]
    args = (out["pred"], out["score"][..., 0], out["flipimg_pred"], out["flipimg_score"][..., 0])
    _, quirk = crops.merge_flip(*args, flip_index())
    assert torch.equal(quirk, out["test_score"][..., 0])
    _, fixed = crops.merge_flip(*args, flip_index(), swap_scores=True)
    # the corrected merge swaps the flipped scores: it differs (by up to 0.34 for S, 0.25 for L)
    assert (fixed - out["test_score"][..., 0]).abs().max() > 0.1
    torch.testing.assert_close(fixed, (args[1] + args[3][:, flip_index()]) / 2)
    assert torch.equal(fixed[:, 0], quirk[:, 0])  # the nose has no twin


def test_preds(golden: dict) -> None:
    out, meta = golden["outputs"], golden["meta"]
    assert meta["input_size_wh"] == list(INPUT_SIZE) and meta["pixel_std"] == 200.0
    xy = crops.decode_keypoints(out["test_pred_jts"], meta["centers"], meta["scales"], INPUT_SIZE)
    torch.testing.assert_close(xy, out["test_preds"][..., :2], atol=2e-3, rtol=0)
    assert torch.equal(xy, out["test_preds"][..., :2])  # measured: bit-identical (float64 decode)
    coords, scores = crops.merge_flip(
        out["pred"],
        out["score"][..., 0],
        out["flipimg_pred"],
        out["flipimg_score"][..., 0],
        flip_index(),
    )
    preds = torch.cat(
        (
            crops.decode_keypoints(coords, meta["centers"], meta["scales"], INPUT_SIZE),
            scores[..., None],
        ),
        dim=-1,
    )
    assert torch.equal(preds, out["test_preds"])


def test_boxes(golden: dict) -> None:
    out, meta = golden["outputs"], golden["meta"]
    size = meta["scales"] * meta["pixel_std"]
    area = size[:, 0] * size[:, 1]
    boxes = torch.cat(
        (meta["centers"], meta["scales"], area[:, None], meta["bbox_scores"][:, None]), 1
    )
    torch.testing.assert_close(boxes, out["test_boxes"], rtol=1e-6, atol=0)


def test_pipeline_centers_and_scales(pipeline_golden: dict) -> None:
    centers, scales = crops.boxes_to_center_scale(pipeline_golden["boxes_xywh_score"], 192 / 256)
    assert torch.equal(centers, pipeline_golden["centers"])
    assert torch.equal(scales, pipeline_golden["scales"])


def test_pipeline_crops_equal_the_official_model_input(pipeline_golden: dict) -> None:
    image = pipeline_golden["image_bgr_uint8"].flip(-1).permute(2, 0, 1).contiguous()  # RGB CHW
    a = crops.crop_to_image_affine(
        pipeline_golden["centers"], pipeline_golden["scales"], INPUT_SIZE
    )
    pixels = crops.warp_crops(
        crops.pack_images([image], "cpu"), torch.zeros(2, dtype=torch.long), a, INPUT_SIZE
    )
    x = crops.normalize_crops(pixels, IMAGENET_MEAN, IMAGENET_STD)
    # measured: max |difference| 0 (the issue allows "nearly"; the README 1e-6 with OpenCV 4.x)
    assert torch.equal(x, pipeline_golden["model_input"])
    assert torch.equal(x.flip(3), pipeline_golden["model_input_flipped"])


# Recorded with mmpose v0.22 get_affine_transform (NumPy 1.x dtype rules) + cv2.warpAffine 4.14 on
# the golden pipeline image (RGB): 12 crops, HWC uint8 bytes concatenated.
OPENCV_BOXES = [
    [345.065, 368.607, 388.74, 115.703],
    [124.113, 356.777, 6.612, 411.329],
    [462.007, 153.967, 154.304, 142.099],
    [93.311, 142.538, 254.256, 278.535],
    [596.94, 316.331, 312.601, 494.524],
    [66.41, 0.106, 307.82, 25.795],
    [-55.737, 177.444, 235.238, 458.915],
    [347.874, 177.059, 250.449, 126.767],
    [-71.98, 16.201, 347.248, 103.501],
    [171.285, -78.133, 415.704, 80.613],
    [101.968, 360.166, 256.856, 424.187],
    [355.008, 290.885, 49.382, 272.407],
]
OPENCV_ROTATIONS = [0.0] * 6 + [1.399, 66.841, -24.972, 17.673, -79.335, -20.226]
OPENCV_SHA256 = "b22a3303b721385e27e52fc201fdd54727617f4de20edb8ff704a76a6fdfa529"


def test_more_crops_equal_opencv_bit_for_bit(pipeline_golden: dict) -> None:
    image = pipeline_golden["image_bgr_uint8"].flip(-1).permute(2, 0, 1).contiguous()
    centers, scales = crops.boxes_to_center_scale(torch.tensor(OPENCV_BOXES), 192 / 256)
    a = crops.crop_to_image_affine(
        centers, scales, INPUT_SIZE, rotations=torch.tensor(OPENCV_ROTATIONS, dtype=torch.float64)
    )
    pixels = crops.warp_crops(
        crops.pack_images([image], "cpu"), torch.zeros(12, dtype=torch.long), a, INPUT_SIZE
    )
    digest = hashlib.sha256(pixels.permute(0, 2, 3, 1).contiguous().numpy().tobytes()).hexdigest()
    assert digest == OPENCV_SHA256
