"""BlazePose's pose detector (``model.pose_detector``) and the converter ops it needs.

No cache needed: sparse-weight densification, depth-to-space, anchors, decoding, weighted NMS.

With the converted models in the cache (``pose-service models fetch``), against the ORIGINAL
runtimes (tests/reference_outputs/README.md, ``record_pose_detection.py``):

* LiteRT 2.3.0 running ``pose_detection.tflite`` on two 224x224 inputs. Measured (CPU, torch 2.14):
  box values <= 8.5e-4 px of 224, score logits <= 4.3e-4; allowed 2e-3 (as for BlazePose).
* MediaPipe 0.10.21's Pose solution on two committed images: its pose detection (score, face box,
  keypoints) and ``pose_rect_from_detection``. Measured: keypoints <= 1.4e-7 of the image,
  ROI centre and side <= 1.3e-4 px, rotation <= 1.4e-7 rad; allowed 1e-5, 0.01 px, 1e-5 rad.
* Its landmarks: the pipeline's BlazePose crop (edge pixels replicated) on MediaPipe's ROI, no flip.
  Measured <= 1.0 crop px (of 256) and 0.01 in score (ours includes the pose presence); allowed 3 px
  and 0.05.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from model import crops, tflite_graph
from model.blazepose import BLAZEPOSE_TO_COCO, roi_from_auxiliary
from model.convgraph import GraphNode, GraphOp
from model.interfaces import PipelineItem, PoseOptions, Rois
from model.pose_detector import BodyRois, decode_detections, pose_anchors, weighted_nms
from model.reference import default_cache_dir, load_body_rois, reference_models_available

OUTPUTS = Path(__file__).parents[1] / "reference_outputs"
XY_ATOL_PX = 2e-3
LOGIT_ATOL = 2e-3

# ------------------------------------------------------------------------------ converter ops


class _Dim:
    """Stands in for ``tflite.DimensionMetadata`` (its accessors keep the flatbuffer names)."""

    def __init__(self, fmt: int, size: int = 0, segments: Any = None, indices: Any = None):
        self.fmt, self.size, self.segments, self.indices = fmt, size, segments, indices

    def Format(self) -> int:
        return self.fmt

    def DenseSize(self) -> int:
        return self.size

    def ArraySegmentsType(self) -> int:
        return 1

    def ArraySegments(self) -> Any:
        return self.segments

    def ArrayIndicesType(self) -> int:
        return 1

    def ArrayIndices(self) -> Any:
        return self.indices


class _Sparsity:
    """Stands in for ``tflite.SparsityParameters``."""

    def __init__(self, order: list[int], dims: list[_Dim], block_map: int = 0) -> None:
        self.order, self.dims, self.block_map = order, dims, block_map

    def TraversalOrderAsNumpy(self) -> np.ndarray:
        return np.array(self.order)

    def BlockMapLength(self) -> int:
        return self.block_map

    def DimMetadataLength(self) -> int:
        return len(self.dims)

    def DimMetadata(self, i: int) -> _Dim:
        return self.dims[i]


def _csr_last(dense: np.ndarray, order: list[int]) -> tuple[np.ndarray, _Sparsity]:
    """``dense`` stored as TFLite does: dims in ``order``, all dense but the last (CSR)."""
    walked = dense.transpose(order)
    rows = walked.reshape(-1, walked.shape[-1])
    segments, indices, values = [0], [], []
    for row in rows:
        (nonzero,) = np.nonzero(row)
        indices += nonzero.tolist()
        values += row[nonzero].tolist()
        segments.append(len(indices))
    dims = [_Dim(0, size) for size in walked.shape[:-1]]
    dims.append(_Dim(1, 0, np.array(segments), np.array(indices)))
    return np.array(values, dtype=dense.dtype), _Sparsity(order, dims)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 0, 2, 1]])
def test_densify_sparse_weights(order: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tflite_graph, "_index_vector", lambda kind, table: table)
    gen = np.random.default_rng(0)
    dense = gen.standard_normal((6, 1, 2, 5)).astype(np.float16)
    dense[gen.random(dense.shape) < 0.6] = 0  # pruned weights
    dense[0] = 0  # an output channel with nothing stored
    values, sparsity = _csr_last(dense, order)
    got = tflite_graph.densify(values, list(dense.shape), sparsity)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, dense)
    with pytest.raises(ValueError, match="values"):
        tflite_graph.densify(values[:-1], list(dense.shape), sparsity)
    with pytest.raises(ValueError, match="block"):
        tflite_graph.densify(values, list(dense.shape), _Sparsity(order, sparsity.dims, 2))


def test_depth_to_space_is_tensorflows() -> None:
    """out[n, h*b + i, w*b + j, c] = in[n, h, w, (i*b + j)*C + c] (NHWC), here on NCHW values."""
    b, c = 2, 3
    nhwc = torch.randn(2, 4, 5, b * b * c)
    want = torch.empty(2, 4 * b, 5 * b, c)
    for i in range(b):
        for j in range(b):
            want[:, i::b, j::b, :] = nhwc[..., (i * b + j) * c : (i * b + j + 1) * c]
    op = GraphOp("depth_to_space", GraphNode("depth_to_space", (0,), {"block_size": b}).attrs)
    got = op(nhwc.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got.permute(0, 2, 3, 1), want, rtol=0, atol=0)


# ------------------------------------------------------------------------ anchors, decoding, NMS


def test_anchors_as_mediapipe_generates_them() -> None:
    anchors = pose_anchors()
    assert anchors.shape == (28 * 28 * 2 + 14 * 14 * 2 + 7 * 7 * 6, 2) == (2254, 2)
    torch.testing.assert_close(anchors[:2], torch.full((2, 2), 0.5 / 28))  # 2 per cell
    torch.testing.assert_close(anchors[2], torch.tensor([1.5 / 28, 0.5 / 28]))  # x runs first
    torch.testing.assert_close(anchors[1568], torch.full((2,), 0.5 / 14))
    # strides 32, 32, 32 share one 7x7 map: 6 anchors per cell
    torch.testing.assert_close(anchors[-6:], torch.full((6, 2), 6.5 / 7))


def test_decoding_and_weighted_nms() -> None:
    anchors = pose_anchors()
    raw = torch.zeros(1, 2254, 12)
    raw[0, 5, :4] = torch.tensor([22.4, -11.2, 44.8, 22.4])  # +0.1, -0.05; 0.2 x 0.1
    raw[0, 5, 4:6] = torch.tensor([2.24, 0.0])
    boxes, points = decode_detections(raw, anchors)
    cx, cy = anchors[5].tolist()
    torch.testing.assert_close(
        boxes[0, 5], torch.tensor([cx, cy - 0.1, cx + 0.2, cy]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(points[0, 5, 0], torch.tensor([cx + 0.01, cy]), rtol=0, atol=1e-6)
    torch.testing.assert_close(points[0, 6], anchors[6].expand(4, 2))

    cand = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [2.0, 2.0, 3.0, 3.0]])
    pts = torch.stack((cand[:, :2], cand[:, 2:]), 1)  # (3, 2, 2) the corners as keypoints
    scores = torch.tensor([0.9, 0.6, 0.5])
    valid = torch.tensor([True, True, True])
    merged, merged_pts, heads = weighted_nms(cand[None], pts[None], scores[None], valid[None])
    assert heads[0].tolist() == [True, False, True]  # IoU(0, 1) = 0.82 > 0.3: one cluster
    want = (0.9 * cand[0] + 0.6 * cand[1]) / 1.5
    torch.testing.assert_close(merged[0, 0], want)
    torch.testing.assert_close(merged_pts[0, 0], want.view(2, 2))
    torch.testing.assert_close(merged[0, 2], cand[2])
    valid[0] = False  # padding takes part in nothing
    assert weighted_nms(cand[None], pts[None], scores[None], valid[None])[2][0].tolist() == [
        False,
        True,
        True,
    ]


# ---------------------------------------------------------------- against LiteRT and MediaPipe


@pytest.fixture(scope="module")
def rois() -> BodyRois:
    directory = default_cache_dir()
    if not reference_models_available(directory):
        pytest.skip(
            f"reference models not in the cache {directory}: run `pose-service models fetch`"
        )
    return load_body_rois(cache_dir=directory)


def _image(name: str) -> torch.Tensor:
    array = np.asarray(Image.open(OUTPUTS / name).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


MEDIAPIPE_IMAGES = {"astronaut": "pose_astronaut.png", "skier": "det_skier.png"}


def test_network_matches_litert(rois: BodyRois) -> None:
    recorded = np.load(OUTPUTS / "pose_detection_litert.npz")
    for key in ("astronaut", "skier"):
        x = _image(f"posedet_{key}.png")[None].float() * (2.0 / 255.0) - 1.0
        with torch.inference_mode():
            raw = rois.net.graph(x)
        boxes, scores = raw["boxes"][0].numpy(), raw["scores"][0, :, 0].numpy()
        np.testing.assert_allclose(boxes, recorded[f"{key}_boxes"], atol=XY_ATOL_PX, rtol=0)
        np.testing.assert_allclose(scores, recorded[f"{key}_scores"], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("key", sorted(MEDIAPIPE_IMAGES))
def test_whole_image_roi_matches_mediapipe(rois: BodyRois, key: str) -> None:
    """MediaPipe's letterboxed whole-image view, decoding, NMS and ``PoseDetectionToRoi``."""
    mp = np.load(OUTPUTS / "pose_detection_mp.npz")
    image = _image(MEDIAPIPE_IMAGES[key])
    height, width = image.shape[1:]
    side = max(width, height)
    view = torch.tensor([[width / 2, height / 2, side, side]])
    face, points, scores, heads = rois.detect(
        crops.pack_images([image], "cpu"), torch.tensor([0]), view
    )
    assert bool(heads[0, 0])
    size = torch.tensor([width, height])
    np.testing.assert_allclose(float(scores[0, 0]), mp[f"{key}_det_score"][0], atol=1e-5)
    np.testing.assert_allclose(
        (points[0, 0] / size).numpy(), mp[f"{key}_det_keypoints"], atol=1e-5, rtol=0
    )
    x, y, w, h = mp[f"{key}_det_box"]
    np.testing.assert_allclose(
        (face[0, 0] / size.repeat(2)).numpy(), [x, y, x + w, y + h], atol=1e-5, rtol=0
    )
    centres, sides, angles = roi_from_auxiliary(points[0, :1, 0], points[0, :1, 1])
    cx, cy, rw, _, rotation = mp[f"{key}_roi"]
    np.testing.assert_allclose(centres[0].numpy(), [cx * width, cy * height], atol=0.01, rtol=0)
    np.testing.assert_allclose(float(sides[0]), rw * width, atol=0.01)
    np.testing.assert_allclose(np.radians(float(angles[0])), rotation, atol=1e-5)


class _FixedRoi:
    """A ``RoiFinder`` that answers one given ROI for every box."""

    name = "fixed"

    def __init__(self, centre: list[float], side: float, degrees: float) -> None:
        self.roi = (centre, side, degrees)

    def __call__(self, packed: Any, image_index: torch.Tensor, boxes: torch.Tensor) -> Rois:
        n = boxes.shape[0]
        centre, side, degrees = self.roi
        return Rois(
            centers=torch.tensor([centre]).expand(n, 2),
            sides=torch.full((n,), side),
            rotations=torch.full((n,), degrees),
            found=torch.ones(n, dtype=torch.bool),
            scores=torch.ones(n),
        )


@pytest.mark.parametrize("key", sorted(MEDIAPIPE_IMAGES))
def test_landmarks_on_mediapipes_roi_match_mediapipe(rois: BodyRois, key: str) -> None:
    from model.pipeline import build_pipeline

    mp = np.load(OUTPUTS / "pose_detection_mp.npz")
    image = _image(MEDIAPIPE_IMAGES[key])
    height, width = image.shape[1:]
    cx, cy, rw, _, rotation = mp[f"{key}_roi"].tolist()
    pipeline = build_pipeline(
        model="blazepose_full",
        weights=str(default_cache_dir() / "blazepose_full.safetensors"),
        detector=None,
        detector_weights=None,
    )
    assert isinstance(pipeline.rois, BodyRois)
    pipeline.rois = _FixedRoi([cx * width, cy * height], rw * width, float(np.degrees(rotation)))
    box = torch.tensor([[0.0, 0.0, float(width), float(height)]])
    (result,), _ = pipeline.run([PipelineItem(image, box, PoseOptions(flip_test=False))])
    got = np.array(result.persons[0].keypoints)  # (17, 3)
    want = mp[f"{key}_landmarks"][list(BLAZEPOSE_TO_COCO)]  # (17, 4) x, y, visibility, presence
    crop_px = 256 / (rw * width)
    inside = (want[:, 0] >= 0) & (want[:, 0] < 1) & (want[:, 1] >= 0) & (want[:, 1] < 1)
    err = np.abs(got[:, :2] - want[:, :2] * [width, height]).max(-1) * crop_px
    assert err.max() < 3.0, err
    # our score: pose presence x visibility x presence; 0 outside the picture
    np.testing.assert_allclose(got[inside, 2], (want[:, 2] * want[:, 3])[inside], atol=0.05)
    assert (got[~inside, 2] == 0).all()
