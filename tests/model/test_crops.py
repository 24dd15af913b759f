"""Geometry of ``model.crops``: box -> centre/scale -> affine -> crop -> image.

Round trips and independent re-implementations; no pose model and no golden file (those are in
test_crops_golden.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import crops
from model.keypoints import COCO_KEYPOINT_NAMES, COCO_OKS_SIGMAS, flip_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def opencv_warp_reference(
    image: np.ndarray, inverse: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """OpenCV 4.x warpAffine INTER_LINEAR on uint8 (HWC), written out per its source, in NumPy.

    ``inverse`` maps dst -> src (what warpAffine computes from M); positions in 1/1024 px rounded
    half to even, shifted to 1/32 px, integer weights summing to 1024, constant-0 border.
    """
    width, height = size
    h, w = image.shape[:2]
    m = inverse
    us = np.arange(width, dtype=np.float64)
    vs = np.arange(height, dtype=np.float64)
    adelta = np.rint(m[0, 0] * us * 1024).astype(np.int64)
    bdelta = np.rint(m[1, 0] * us * 1024).astype(np.int64)
    x0 = np.rint((m[0, 1] * vs + m[0, 2]) * 1024).astype(np.int64) + 16
    y0 = np.rint((m[1, 1] * vs + m[1, 2]) * 1024).astype(np.int64) + 16
    x = (x0[:, None] + adelta[None, :]) >> 5
    y = (y0[:, None] + bdelta[None, :]) >> 5
    sx, fx = x >> 5, x & 31
    sy, fy = y >> 5, y & 31
    padded = np.zeros((h + 4, w + 4, image.shape[2]), dtype=np.int64)
    padded[2:-2, 2:-2] = image

    def px(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        vals = padded[np.clip(yy, -2, h + 1) + 2, np.clip(xx, -2, w + 1) + 2]
        return vals * inside[..., None]

    acc = (
        px(sy, sx) * ((32 - fx) * (32 - fy))[..., None]
        + px(sy, sx + 1) * (fx * (32 - fy))[..., None]
        + px(sy + 1, sx) * ((32 - fx) * fy)[..., None]
        + px(sy + 1, sx + 1) * (fx * fy)[..., None]
    )
    return ((acc + 512) >> 10).astype(np.uint8)


def test_boxes_to_center_scale_fixes_the_aspect_and_pads() -> None:
    boxes = torch.tensor([[10.0, 20.0, 300.0, 100.0, 0.9], [0.0, 0.0, 30.0, 400.0, 0.1]])
    centers, scales = crops.boxes_to_center_scale(boxes, 192 / 256)
    assert centers.dtype == scales.dtype == torch.float32
    assert centers.tolist() == [[160.0, 70.0], [15.0, 200.0]]  # no -1 terms
    # wide box: h = w / 0.75; tall box: w = h * 0.75; then / 200 and * 1.25
    torch.testing.assert_close(scales[0], torch.tensor([1.875, 2.5]), rtol=0, atol=0)
    torch.testing.assert_close(scales[1], torch.tensor([1.875, 2.5]), rtol=0, atol=0)
    # square crop, no padding: the wide box grows to 300 x 300, the tall one to 400 x 400
    square_centers, square = crops.boxes_to_center_scale(boxes, 1.0, padding=1.0)
    assert square_centers.tolist() == centers.tolist()
    assert square.tolist() == [[1.5, 1.5], [2.0, 2.0]]
    # an exact-aspect box is left as it is (neither branch), then padded
    _, exact = crops.boxes_to_center_scale(torch.tensor([[0.0, 0.0, 150.0, 200.0]]), 0.75)
    assert exact.tolist() == [[0.75 * 1.25, 1.0 * 1.25]]


def test_affine_is_the_official_closed_form_without_rotation() -> None:
    centers = torch.tensor([[190.5, 215.25], [-30.0, 7.125]])
    scales = torch.tensor([[1.546875, 2.0625], [0.01, 0.013333]])
    m = crops.image_to_crop_affine(centers, scales, (192, 256))
    k = 192 / (scales[:, 0] * 200).double()  # the product is float32, as official
    expected = torch.zeros((2, 2, 3), dtype=torch.float64)
    expected[:, 0, 0] = k
    expected[:, 1, 1] = k
    expected[:, 0, 2] = 96 - k * centers[:, 0].double()
    expected[:, 1, 2] = 128 - k * centers[:, 1].double()
    # equal up to the float32 rounding of mmpose's source points
    torch.testing.assert_close(m, expected, rtol=1e-6, atol=1e-4)
    back = crops.crop_to_image_affine(centers, scales, (192, 256))
    # crop centre -> box centre; crop corners -> the padded box corners
    torch.testing.assert_close(
        back[:, :, 2] + back[:, :, :2] @ torch.tensor([96.0, 128.0]).double(),
        centers.double(),
        rtol=0,
        atol=1e-9,
    )


def test_rotation_turns_the_crop_clockwise_about_the_centre() -> None:
    centers = torch.tensor([[100.0, 100.0]])
    scales = torch.tensor([[0.96, 1.28]])  # 192 px wide: one image px per crop px
    a = crops.crop_to_image_affine(centers, scales, (192, 256), rotations=torch.tensor([90.0]))
    top_middle = a[0] @ torch.tensor([96.0, 0.0, 1.0]).double()  # 128 px above the crop centre
    torch.testing.assert_close(top_middle, torch.tensor([228.0, 100.0]).double(), atol=1e-9, rtol=0)
    m = crops.image_to_crop_affine(centers, scales, (192, 256), rotations=torch.tensor([90.0]))
    identity = m[0, :, :2] @ a[0, :, :2]
    torch.testing.assert_close(identity, torch.eye(2).double(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("rotation", [None, 0.0, 33.3, -75.0])
def test_keypoints_round_trip_box_to_crop_to_image(rotation: float | None) -> None:
    """Image points -> crop (forward affine) -> [0, 1] -> decode: back where they were."""
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor(
        [
            [100.5, 50.25, 180.0, 330.0],  # the golden box
            [400.0, 120.0, 300.0, 200.0],  # past the right border of a 640-px image
            [-50.0, -20.0, 80.0, 60.0],  # past the top-left corner
            [10.0, 10.0, 0.5, 0.75],  # tiny
            [3.0, 4.0, 5000.0, 20.0],  # huge and flat
        ]
    )
    n = boxes.shape[0]
    centers, scales = crops.boxes_to_center_scale(boxes, 0.75)
    rot = None if rotation is None else torch.full((n,), rotation)
    to_crop = crops.image_to_crop_affine(centers, scales, (192, 256), rotations=rot)
    uv = torch.rand((n, 17, 2), generator=gen, dtype=torch.float64) * torch.tensor([192.0, 256.0])
    to_image = crops.crop_to_image_affine(centers, scales, (192, 256), rotations=rot)
    points = torch.einsum("nij,nkj->nki", to_image[:, :, :2], uv) + to_image[:, None, :, 2]
    back = torch.einsum("nij,nkj->nki", to_crop[:, :, :2], points) + to_crop[:, None, :, 2]
    torch.testing.assert_close(back, uv, atol=1e-6, rtol=0)
    decoded = crops.decode_keypoints(
        uv / torch.tensor([192.0, 256.0]), centers, scales, (192, 256), rotations=rot
    )
    size = (scales.double() * 200).max(dim=1).values.view(-1, 1, 1)
    torch.testing.assert_close(decoded.double() / size, points / size, atol=2e-6, rtol=0)


def test_warp_matches_the_opencv_algorithm_on_mixed_sizes_and_borders() -> None:
    gen = torch.Generator().manual_seed(1)
    images = [
        torch.randint(0, 256, (3, 40, 50), generator=gen, dtype=torch.uint8),
        torch.randint(0, 256, (3, 17, 9), generator=gen, dtype=torch.uint8),
        torch.randint(0, 256, (3, 1, 1), generator=gen, dtype=torch.uint8),
    ]
    boxes = torch.tensor(
        [
            [5.3, 2.7, 20.1, 30.9],
            [-10.0, -4.0, 30.0, 20.0],  # past the top-left
            [35.5, 30.25, 40.0, 25.0],  # past the bottom-right
            [1.0, 2.0, 6.0, 11.0],
            [-0.5, -0.5, 1.0, 1.0],  # the whole 1x1 image
            [0.0, 0.0, 1e-3, 1e-3],  # tiny
            [-500.0, -500.0, 10.0, 10.0],  # wholly outside
        ]
    )
    image_index = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    rotations = torch.tensor([0.0, 12.5, -40.0, 90.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    size = (12, 16)
    centers, scales = crops.boxes_to_center_scale(boxes, size[0] / size[1])
    to_image = crops.crop_to_image_affine(centers, scales, size, rotations=rotations)
    out = crops.warp_crops(crops.pack_images(images, "cpu"), image_index, to_image, size)
    assert out.shape == (7, 3, 16, 12) and out.dtype == torch.uint8
    for j in range(7):
        img = images[int(image_index[j])].permute(1, 2, 0).numpy()
        expected = opencv_warp_reference(img, to_image[j].numpy(), size)
        np.testing.assert_array_equal(out[j].permute(1, 2, 0).numpy(), expected, err_msg=f"box {j}")
    assert int(out[6].max()) == 0  # outside the image: black


def test_warp_at_unit_scale_copies_pixels_and_pads_with_zeros() -> None:
    img = torch.arange(3 * 6 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 6, 8)
    # a 4x4 crop of a box whose padded size is 4 px: one image pixel per crop pixel
    centers = torch.tensor([[3.0, 2.0]])  # crop pixel (2, 2) -> image pixel (3, 2)
    scales = torch.tensor([[4 / 200, 4 / 200]])
    a = crops.crop_to_image_affine(centers, scales, (4, 4))
    out = crops.warp_crops(crops.pack_images([img], "cpu"), torch.tensor([0]), a, (4, 4))[0]
    assert torch.equal(out[:, 0:4, 0:4], img[:, 0:4, 1:5])
    a = crops.crop_to_image_affine(torch.tensor([[0.0, 0.0]]), scales, (4, 4))
    out = crops.warp_crops(crops.pack_images([img], "cpu"), torch.tensor([0]), a, (4, 4))[0]
    assert torch.equal(out[:, 2:, 2:], img[:, :2, :2])
    assert int(out[:, :2].max()) == 0 and int(out[:, :, :2].max()) == 0


def test_a_bright_dot_is_decoded_where_it_is() -> None:
    """Crop sampling and decode agree on the pixel-centre convention (no half-pixel shift)."""
    img = torch.zeros((3, 300, 400), dtype=torch.uint8)
    img[:, 123, 271] = 255
    boxes = torch.tensor([[200.0, 60.0, 150.0, 200.0]])  # padded crop scale ~ 1.3 px per crop px
    centers, scales = crops.boxes_to_center_scale(boxes, 0.75)
    a = crops.crop_to_image_affine(centers, scales, (192, 256))
    out = crops.warp_crops(crops.pack_images([img], "cpu"), torch.tensor([0]), a, (192, 256))
    weights = out[0, 0].double()
    vs, us = torch.meshgrid(torch.arange(256.0), torch.arange(192.0), indexing="ij")
    centroid = torch.stack(((weights * us).sum(), (weights * vs).sum())) / weights.sum()
    xy = crops.decode_keypoints(
        (centroid / torch.tensor([192.0, 256.0])).view(1, 1, 2).float(), centers, scales, (192, 256)
    )
    torch.testing.assert_close(xy[0, 0], torch.tensor([271.0, 123.0]), atol=0.05, rtol=0)


def test_pack_images_of_mixed_sizes_and_empty_batches() -> None:
    a = torch.full((3, 2, 3), 7, dtype=torch.uint8)
    b = torch.full((3, 4, 1), 9, dtype=torch.uint8)
    packed = crops.pack_images([a, b], "cpu")
    assert packed.pixels.shape == (3, 4 * 5 + 6 * 3)
    assert packed.sizes.tolist() == [[2, 3], [4, 1]]
    assert int(packed.pixels[0, packed.origins[1]]) == 9
    empty = crops.warp_crops(
        packed,
        torch.zeros(0, dtype=torch.long),
        torch.zeros((0, 2, 3), dtype=torch.float64),
        (4, 4),
    )
    assert empty.shape == (0, 3, 4, 4)


def test_normalize_uses_the_models_mean_and_std() -> None:
    black = torch.zeros((1, 3, 2, 2), dtype=torch.uint8)
    out = crops.normalize_crops(black, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(
        out[0, :, 0, 0], torch.tensor([-2.1179, -2.0357, -1.8044]), atol=1e-4, rtol=0
    )
    white = crops.normalize_crops(
        torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3
    )
    assert white.flatten().tolist() == [1.0, 1.0, 1.0]


def test_flip_back_swaps_pairs_and_mirrors_x() -> None:
    index = torch.tensor(flip_indices(COCO_KEYPOINT_NAMES))
    coords = torch.rand((2, 17, 2))
    back = crops.flip_back(coords, index)
    assert torch.equal(back[:, 5, 0], 1 - coords[:, 6, 0]) and torch.equal(
        back[:, 5, 1], coords[:, 6, 1]
    )
    assert torch.equal(back[:, 0], torch.stack((1 - coords[:, 0, 0], coords[:, 0, 1]), -1))
    torch.testing.assert_close(crops.flip_back(back, index), coords, atol=1e-7, rtol=0)


def test_merge_flip_score_quirk_and_per_crop_correction() -> None:
    index = torch.tensor(flip_indices(COCO_KEYPOINT_NAMES))
    gen = torch.Generator().manual_seed(3)
    c, cf = torch.rand((3, 17, 2), generator=gen), torch.rand((3, 17, 2), generator=gen)
    s, sf = torch.randn((3, 17), generator=gen), torch.randn((3, 17), generator=gen)
    coords, quirk = crops.merge_flip(c, s, cf, sf, index)
    assert torch.equal(quirk, (s + sf) / 2)  # no left/right swap: the official behaviour
    _, fixed = crops.merge_flip(c, s, cf, sf, index, swap_scores=True)
    assert torch.equal(fixed, (s + sf[:, index]) / 2)
    _, mixed = crops.merge_flip(c, s, cf, sf, index, swap_scores=torch.tensor([True, False, True]))
    assert torch.equal(mixed[0], fixed[0]) and torch.equal(mixed[1], quirk[1])
    # coordinates: the mirrored pass swapped left/right by hand (COCO pairs) and x -> 1 - x
    coco_swap = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    unflipped = torch.stack((1 - cf[:, coco_swap, 0], cf[:, coco_swap, 1]), dim=-1)
    torch.testing.assert_close(coords, (c + unflipped) / 2, rtol=0, atol=1e-7)
    assert coords[1, 5, 0].item() == pytest.approx((c[1, 5, 0] + 1 - cf[1, 6, 0]).item() / 2)


def test_instance_scores_official_rule_never_nan() -> None:
    kpts = torch.tensor(
        [
            [0.5, 0.1, 0.9] + [0.0] * 14,
            [0.1] * 17,  # none above 0.2
            [float("nan")] * 16 + [0.4],  # NaN is not above the threshold
        ]
    )
    out = crops.instance_scores(kpts, torch.tensor([0.8, 0.9, 0.5]))
    torch.testing.assert_close(out, torch.tensor([0.8 * 0.7, 0.0, 0.2]))
    assert torch.isfinite(out).all()


def test_oks_matrix_matches_the_mmpose_formula() -> None:
    gen = torch.Generator().manual_seed(5)
    kpts = torch.rand((1, 4, 17, 2), generator=gen, dtype=torch.float64) * 100
    areas = torch.rand((1, 4), generator=gen, dtype=torch.float64) * 5000 + 100
    sigmas = torch.tensor(COCO_OKS_SIGMAS, dtype=torch.float64)
    oks = crops.oks_matrix(kpts, areas, sigmas)[0]
    var = (np.array(COCO_OKS_SIGMAS) * 2) ** 2
    for i in range(4):
        for j in range(4):
            d = kpts[0, i].numpy() - kpts[0, j].numpy()
            e = (
                (d**2).sum(1)
                / var
                / ((areas[0, i].item() + areas[0, j].item()) / 2 + np.spacing(1))
                / 2
            )
            assert math.isclose(oks[i, j].item(), float(np.exp(-e).mean()), rel_tol=1e-12)


def test_greedy_suppression_matches_the_sequential_algorithm() -> None:
    gen = torch.Generator().manual_seed(9)
    overlap = torch.rand((5, 12, 12), generator=gen)
    overlap = (overlap + overlap.transpose(1, 2)) / 2
    valid = torch.rand((5, 12), generator=gen) > 0.2
    keep = crops.greedy_suppression(overlap, valid, 0.6)
    for g in range(5):
        order = [i for i in range(12) if valid[g, i]]
        kept: list[int] = []
        while order:
            i = order.pop(0)
            kept.append(i)
            order = [j for j in order if overlap[g, i, j] <= 0.6]
        assert keep[g].nonzero().flatten().tolist() == kept


def test_zero_size_box_gives_opencvs_zero_matrix_and_finite_output() -> None:
    """OpenCV's solver gives up on a singular system (zero matrix); warpAffine then samples pixel
    (0, 0) everywhere and the decode puts every keypoint on the box centre."""
    centers, scales = torch.tensor([[5.0, 6.0]]), torch.zeros((1, 2))
    assert torch.equal(
        crops.image_to_crop_affine(centers, scales, (8, 8)), torch.zeros((1, 2, 3)).double()
    )
    img = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(3, 4, 4)
    a = crops.crop_to_image_affine(centers, scales, (8, 8))
    out = crops.warp_crops(crops.pack_images([img], "cpu"), torch.tensor([0]), a, (8, 8))
    assert torch.equal(out[0], img[:, :1, :1].expand(3, 8, 8))
    xy = crops.decode_keypoints(torch.rand((1, 17, 2)), centers, scales, (8, 8))
    assert torch.equal(xy, centers.view(1, 1, 2).expand(1, 17, 2))
