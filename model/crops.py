"""Top-down geometry, batched over every person of every image: boxes -> crops -> keypoints.

What the official DistilPose/mmpose (v0.22) test pipeline does per box in NumPy + OpenCV, done here
for all boxes at once with tensor operations on the pipeline's device:

* ``boxes_to_center_scale``: the official box -> (centre, scale) rule (aspect fixed to the model's
  input aspect, padding 1.25, scale in units of ``pixel_std`` = 200 px, float32, no -1 terms).
* ``image_to_crop_affine`` / ``crop_to_image_affine``: the affine of each box (optionally rotated
  per box), with the last bits of OpenCV's ``getAffineTransform`` solver and of ``warpAffine``'s
  inversion reproduced, because they decide OpenCV's 1/32-px rounding.
* ``warp_crops``: one gather over all boxes that reproduces ``cv2.warpAffine(INTER_LINEAR)`` of
  OpenCV 4.x on uint8 bit for bit: the source position is computed in 1/1024 px, rounded to 1/32
  px, and the four pixels are blended with integer weights and rounded back to uint8 (constant-0
  border, or OpenCV's replicated border: MediaPipe's landmark crops).
* ``normalize_crops``: ``(u8 / 255 - mean) / std`` in float32, mean/std from ``PoseModelInfo``.
* ``merge_flip``: flip test merge (coordinates flipped back; the official score quirk by default).
* ``decode_keypoints``: [0, 1] crop coordinates -> image pixels, the inverse of the warp.
* ``instance_scores``, ``oks_matrix``, ``greedy_suppression``: rescoring and OKS-NMS (evaluation).

Images of different sizes share one flat pixel buffer (``pack_images``): every image gets a 1-pixel
zero border, is flattened per channel and concatenated, and each box indexes its image through an
offset and a stride. No padding to the largest image, no per-box Python loop, no host round trip.

Pixel convention: as in OpenCV and mmpose, integer image coordinates are pixel centres; a keypoint
at (x, y) lies on pixel (round(x), round(y)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_INTER_BITS = 5  # OpenCV: sub-pixel positions are rounded to 1/32 px
_AB_BITS = 10  # OpenCV: the affine map is evaluated in 1/1024 px
_TAB = 1 << _INTER_BITS  # 32


def boxes_to_center_scale(
    boxes: torch.Tensor, aspect: float, padding: float = 1.25, pixel_std: float = 200.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official box -> centre and scale (mmpose ``_box2cs``, test mode).

    The box is grown to the crop aspect (width / height) around its centre, then enlarged by
    ``padding``. The arithmetic follows the official NumPy 1.x code: the aspect fix and the division
    by ``pixel_std`` in float64, rounded to float32, then the padding product in float32.

    Args:
        boxes: (N, >=4) [x, y, w, h, ...] in pixels, (x, y) the top-left corner.
        aspect: crop width / height, e.g. 192 / 256.
        padding: enlargement factor of the box.
        pixel_std: unit of the scale in pixels (200 in mmpose).

    Returns:
        centers (N, 2) float32 (cx, cy) in pixels and scales (N, 2) float32 (sw, sh) in units of
        ``pixel_std``, padding included.
    """
    b = boxes[:, :4].to(torch.float32)
    x, y, w, h = b.unbind(-1)
    centers = torch.stack((x + w * 0.5, y + h * 0.5), dim=-1)  # (N, 2), exact as float32
    w64, h64 = w.double(), h.double()
    wider = w64 > aspect * h64
    taller = w64 < aspect * h64
    new_h = torch.where(wider, w64 / aspect, h64)
    new_w = torch.where(taller, h64 * aspect, w64)
    scales = torch.stack((new_w / pixel_std, new_h / pixel_std), dim=-1).to(torch.float32)
    return centers, scales * padding


def _source_points(
    centers: torch.Tensor, scales: torch.Tensor, pixel_std: float, rotations: torch.Tensor | None
) -> torch.Tensor:
    """The three image points of mmpose's ``get_affine_transform`` (float32, NumPy 1.x dtypes).

    The centre, the point half a box width "above" it (turned by the rotation), and a third point at
    right angles. Returns (N, 3, 2) float32.
    """
    c32 = centers.to(torch.float32)
    src_w = (scales[:, 0].to(torch.float32) * pixel_std).double()  # float32 product, then float64
    up = -(src_w * 0.5)  # (N,)
    if rotations is None:
        dir_x = torch.zeros_like(up)
        dir_y = up
    else:
        rad = (math.pi * rotations.double()) / 180.0
        sn, cs = torch.sin(rad), torch.cos(rad)
        dir_x = 0.0 * cs - up * sn
        dir_y = 0.0 * sn + up * cs
    p0 = c32
    p1 = (c32.double() + torch.stack((dir_x, dir_y), dim=-1)).to(torch.float32)
    p2 = _third_point(p0, p1)
    return torch.stack((p0, p1, p2), dim=1)


def _third_point(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mmpose ``_get_3rd_point``: ``b`` plus ``a - b`` turned by 90 degrees (float32)."""
    d = a - b
    return b + torch.stack((-d[..., 1], d[..., 0]), dim=-1)


def _solve_affine_like_opencv(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``cv2.getAffineTransform`` for N point triples, bit for bit.

    OpenCV solves the 6x6 system [x y 1 0 0 0; 0 0 0 x y 1] m = dst by Gaussian elimination with
    partial pivoting in float64 (``hal::LU64f``). The same steps, in the same order, are run here
    for all N systems at once (the loops are over the 6 matrix columns, not over boxes). A singular
    system gives the zero matrix, as OpenCV's ``solve`` does.

    Args:
        src: (N, 3, 2) source points.
        dst: (N, 3, 2) destination points.

    Returns:
        (N, 2, 3) float64 forward maps.
    """
    n = src.shape[0]
    dev = src.device
    s = src.double()
    a = torch.zeros((n, 6, 6), dtype=torch.float64, device=dev)
    a[:, 0::2, 0] = s[:, :, 0]
    a[:, 0::2, 1] = s[:, :, 1]
    a[:, 0::2, 2] = 1.0
    a[:, 1::2, 3] = s[:, :, 0]
    a[:, 1::2, 4] = s[:, :, 1]
    a[:, 1::2, 5] = 1.0
    b = dst.double().reshape(n, 6)  # (x0, y0, x1, y1, x2, y2)
    rows = torch.arange(6, device=dev)
    pivots = []
    for i in range(6):
        # pivot: first row (from i) with the largest |a[:, j, i]|, as OpenCV's strict '>' scan
        k = a[:, i:, i].abs().argmax(dim=1) + i  # (N,)
        perm = rows.expand(n, 6).clone()
        perm[:, i] = k
        perm.scatter_(1, k.view(-1, 1), torch.full((n, 1), i, device=dev, dtype=perm.dtype))
        a = a.gather(1, perm.view(n, 6, 1).expand(n, 6, 6))
        b = b.gather(1, perm)
        pivot = a[:, i, i]
        pivots.append(pivot)
        d = -1.0 / pivot
        alpha = a[:, i + 1 :, i] * d.view(-1, 1)  # (N, 5 - i)
        a[:, i + 1 :, i + 1 :] = (
            a[:, i + 1 :, i + 1 :] + alpha.unsqueeze(-1) * a[:, i : i + 1, i + 1 :]
        )
        b[:, i + 1 :] = b[:, i + 1 :] + alpha * b[:, i : i + 1]
    x = torch.zeros_like(b)
    for i in range(5, -1, -1):
        acc = b[:, i]
        for j in range(i + 1, 6):
            acc = acc - a[:, i, j] * x[:, j]
        x[:, i] = acc / a[:, i, i]
    # OpenCV gives up (and solve() returns zeros) when a pivot is below 100 * DBL_EPSILON
    singular = (torch.stack(pivots, dim=1).abs() < 100 * torch.finfo(torch.float64).eps).any(dim=1)
    x = torch.where(singular.view(-1, 1), torch.zeros_like(x), x)
    return x.view(n, 2, 3)


def image_to_crop_affine(
    centers: torch.Tensor,
    scales: torch.Tensor,
    input_size: tuple[int, int],
    pixel_std: float = 200.0,
    rotations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Official image -> crop affine per box (mmpose ``get_affine_transform``), bit for bit.

    The crop centre ``(W / 2, H / 2)`` is the box centre and one isotropic scale,
    ``W / (scale_w * pixel_std)`` crop pixels per image pixel, is taken from the scale's width (as
    mmpose does). A rotation turns the crop by ``angle`` degrees about the centre (mmpose's sign:
    the crop's up axis is the image's up axis turned clockwise on screen, image y pointing down).
    Without rotation the result is ``[[k, 0, W/2 - k cx], [0, k, H/2 - k cy]]`` up to the last bits
    of OpenCV's solver, which are reproduced because they decide OpenCV's 1/32-px rounding.

    Args:
        centers: (N, 2) box centres in pixels.
        scales: (N, 2) scales in units of ``pixel_std``.
        input_size: crop (W, H).
        pixel_std: unit of the scale in pixels.
        rotations: (N,) angles in degrees, or None for no rotation.

    Returns:
        (N, 2, 3) float64 matrices M with crop (u, v) = M @ (x, y, 1).
    """
    width, height = input_size
    n = centers.shape[0]
    src = _source_points(centers, scales, pixel_std, rotations)
    d0 = torch.tensor([width * 0.5, height * 0.5], dtype=torch.float32, device=centers.device)
    d1 = d0 + torch.tensor([0.0, width * -0.5], dtype=torch.float32, device=centers.device)
    dst = torch.stack((d0, d1, _third_point(d0, d1)), dim=0).expand(n, 3, 2)
    return _solve_affine_like_opencv(src, dst)


def crop_to_image_affine(
    centers: torch.Tensor,
    scales: torch.Tensor,
    input_size: tuple[int, int],
    pixel_std: float = 200.0,
    rotations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop -> image affine per box: ``image_to_crop_affine`` inverted as ``cv2.warpAffine`` does.

    Args:
        centers: (N, 2) box centres in pixels.
        scales: (N, 2) scales in units of ``pixel_std``.
        input_size: crop (W, H).
        pixel_std: unit of the scale in pixels.
        rotations: (N,) angles in degrees, or None.

    Returns:
        (N, 2, 3) float64 matrices A with image (x, y) = A @ (u, v, 1) for crop pixel (u, v).
    """
    return invert_affine(image_to_crop_affine(centers, scales, input_size, pixel_std, rotations))


def invert_affine(matrices: torch.Tensor) -> torch.Tensor:
    """Invert (N, 2, 3) affine maps, as OpenCV's ``warpAffine`` inverts its matrix (float64).

    Args:
        matrices: (N, 2, 3) affine maps.

    Returns:
        (N, 2, 3) float64 inverse maps.
    """
    m = matrices.double()
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    d = torch.where(det != 0, 1.0 / det, torch.zeros_like(det))
    a00, a11 = m[:, 1, 1] * d, m[:, 0, 0] * d
    a01, a10 = -m[:, 0, 1] * d, -m[:, 1, 0] * d
    b0 = -a00 * m[:, 0, 2] - a01 * m[:, 1, 2]
    b1 = -a10 * m[:, 0, 2] - a11 * m[:, 1, 2]
    return torch.stack(
        (torch.stack((a00, a01, b0), dim=-1), torch.stack((a10, a11, b1), dim=-1)), dim=1
    )


@dataclass
class PackedImages:
    """Images of any sizes in one flat pixel buffer, so that one gather serves every box.

    Each image gets a 1-pixel border of zeros, is flattened per channel and concatenated with the
    others: channel c of image i at pixel (x, y) is ``pixels[c, origins[i] + y * strides[i] + x]``
    for -1 <= x <= W_i and -1 <= y <= H_i (the border reads as 0, OpenCV's constant border).

    pixels: (3, P) uint8.
    origins: (B,) int32 position of pixel (0, 0) of each image.
    strides: (B,) int32 padded width W_i + 2.
    sizes: (B, 2) int32 (H, W) of each image.
    """

    pixels: torch.Tensor
    origins: torch.Tensor
    strides: torch.Tensor
    sizes: torch.Tensor


def pack_images(images: Sequence[torch.Tensor], device: torch.device | str) -> PackedImages:
    """Pad, flatten and concatenate (3, H, W) uint8 images on ``device`` (one copy per image).

    Args:
        images: B tensors (3, H_i, W_i) uint8.
        device: where the buffer lives (the pipeline's device).

    Returns:
        The packed images.
    """
    flat, origins, strides, sizes = [], [], [], []
    start = 0
    for img in images:
        c, h, w = img.shape
        padded = torch.nn.functional.pad(img.to(device, non_blocking=True), (1, 1, 1, 1))
        flat.append(padded.reshape(c, -1))  # (3, (H+2)(W+2))
        origins.append(start + (w + 2) + 1)
        strides.append(w + 2)
        sizes.append((h, w))
        start += (h + 2) * (w + 2)
    pixels = torch.cat(flat, dim=1) if flat else torch.zeros((3, 0), dtype=torch.uint8)
    meta = torch.tensor([*origins, *strides, *(v for hw in sizes for v in hw)], dtype=torch.int32)
    meta = meta.to(device, non_blocking=True)
    b = len(images)
    return PackedImages(
        pixels=pixels.to(device),
        origins=meta[:b],
        strides=meta[b : 2 * b],
        sizes=meta[2 * b :].view(b, 2),
    )


def _fixed_point(
    per_col: torch.Tensor, per_row_a: torch.Tensor, per_row_b: torch.Tensor, width: int, height: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's source coordinate of every crop pixel for one image axis, in 1/32 px.

    ``X(u, v) = (round(c*u * 1024) + round((a*v + b) * 1024) + 16) >> 5`` (cvRound: half to even).

    Args:
        per_col: (N,) coefficient of the crop column u.
        per_row_a: (N,) coefficient of the crop row v.
        per_row_b: (N,) constant term.
        width: crop W.
        height: crop H.

    Returns:
        integer part (N, H, W) int32 and fraction (N, H, W) float32 in {0, 1/32, ..., 31/32}.
    """
    dev = per_col.device
    us = torch.arange(width, device=dev, dtype=torch.float64)
    vs = torch.arange(height, device=dev, dtype=torch.float64)
    one = float(1 << _AB_BITS)
    col = torch.round((per_col.view(-1, 1) * us) * one).long()  # (N, W) in 1/1024 px
    row = torch.round((per_row_a.view(-1, 1) * vs + per_row_b.view(-1, 1)) * one).long()
    row += (1 << _AB_BITS) // _TAB // 2  # (N, H)
    # (row + col) >> 5 without an int64 (N, H, W) pass: split both into 1/32 px and remainder. The
    # clamp only touches coordinates beyond +-2**23 px, far outside any image.
    shift = _AB_BITS - _INTER_BITS
    lim = 1 << 28
    col_q, col_r = (col >> shift).clamp_(-lim, lim).int(), (col & ((1 << shift) - 1)).int()
    row_q, row_r = (row >> shift).clamp_(-lim, lim).int(), (row & ((1 << shift) - 1)).int()
    pos = row_q.unsqueeze(2) + col_q.unsqueeze(1)  # (N, H, W) int32
    pos += (row_r.unsqueeze(2) + col_r.unsqueeze(1)) >> shift
    return pos >> _INTER_BITS, (pos & (_TAB - 1)).float() * (1.0 / _TAB)


def warp_crops(
    packed: PackedImages,
    image_index: torch.Tensor,
    crop_to_image: torch.Tensor,
    input_size: tuple[int, int],
    border: str = "constant",
) -> torch.Tensor:
    """Bilinear crops of all boxes at once, equal to OpenCV 4.x ``warpAffine`` INTER_LINEAR (uint8).

    OpenCV evaluates the inverse map in fixed point (``_fixed_point``: 1/1024 px, then 1/32 px),
    blends the four neighbours with weights ``(32 - fx)(32 - fy)`` etc. (sum 1024) and rounds half
    up to uint8; pixels outside the image count as 0 (``BORDER_CONSTANT``) or as the nearest edge
    pixel (``BORDER_REPLICATE``: each tap's row and column clamped into the image). Every step is
    reproduced (the blend runs in float32, where all these integers are exact), so the crops equal
    the official ones bit for bit. Four gathers over all boxes; no per-box loop, no host round trip.

    Args:
        packed: the images (see ``pack_images``).
        image_index: (N,) int64 image of each box, into ``packed``.
        crop_to_image: (N, 2, 3) float64 crop -> image maps (``crop_to_image_affine``).
        input_size: crop (W, H).
        border: "constant" (zeros, mmpose's crops) or "replicate" (MediaPipe's landmark crops).

    Returns:
        (N, 3, H, W) uint8 crops on the device of ``packed``.
    """
    width, height = input_size
    device = packed.pixels.device
    n = crop_to_image.shape[0]
    if n == 0 or packed.pixels.shape[1] == 0:
        return torch.zeros((n, 3, height, width), dtype=torch.uint8, device=device)
    a = crop_to_image.to(device=device, dtype=torch.float64)
    x0, fx = _fixed_point(a[:, 0, 0], a[:, 0, 1], a[:, 0, 2], width, height)
    y0, fy = _fixed_point(a[:, 1, 0], a[:, 1, 1], a[:, 1, 2], width, height)

    idx = image_index.to(device=device, dtype=torch.int64)
    img_h = packed.sizes[idx, 0].view(n, 1, 1)
    img_w = packed.sizes[idx, 1].view(n, 1, 1)
    stride = packed.strides[idx].view(n, 1, 1)
    origin = packed.origins[idx].view(n, 1, 1)
    if border == "constant":  # clamp into the zero border: a tap outside lands on a 0 pixel
        low, high_w, high_h = -1, img_w, img_h
    elif border == "replicate":  # clamp into the image: a tap outside reads the edge pixel
        low, high_w, high_h = 0, img_w - 1, img_h - 1
    else:
        raise ValueError(f"unknown border {border!r}: 'constant' or 'replicate'")
    xa = torch.minimum(x0.clamp(min=low), high_w)
    xb = torch.minimum((x0 + 1).clamp_(min=low), high_w)
    row_a = torch.minimum(y0.clamp(min=low), high_h) * stride + origin
    row_b = torch.minimum((y0 + 1).clamp_(min=low), high_h) * stride + origin

    def tap(pos: torch.Tensor) -> torch.Tensor:
        # (3, N*H*W) float32 pixel values
        return packed.pixels.index_select(1, pos.view(-1)).float()

    # OpenCV's integer blend sum(w_i p_i) / 1024 with w_i = (32 - fx)(32 - fy) etc.: every value
    # here is a multiple of 1/1024 below 256, exact in float32, so lerp gives it without rounding.
    wx, wy = fx.view(1, -1), fy.view(1, -1)
    top = torch.lerp(tap(row_a + xa), tap(row_a + xb), wx)
    bottom = torch.lerp(tap(row_b + xa), tap(row_b + xb), wx)
    value = torch.lerp(top, bottom, wy).add_(0.5)  # round half up = truncate (value >= 0.5)
    return value.to(torch.uint8).view(3, n, height, width).permute(1, 0, 2, 3).contiguous()


def normalize_crops(
    crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``(crops / 255 - mean) / std`` in float32 (torchvision ``to_tensor`` + ``normalize``).

    Args:
        crops: (N, 3, H, W) uint8 RGB.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.

    Returns:
        (N, 3, H, W) float32.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=crops.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=crops.device).view(1, -1, 1, 1)
    return (crops.to(torch.float32) / 255.0 - m) / s


def flip_back(coords: torch.Tensor, flip_index: torch.Tensor) -> torch.Tensor:
    """Map coordinates predicted on a mirrored crop back to the crop (mmpose ``fliplr_regression``).

    Args:
        coords: (N, K, 2) [0, 1] crop coordinates from the mirrored crop.
        flip_index: (K,) int64 left/right permutation (``keypoints.flip_indices``).

    Returns:
        (N, K, 2): keypoints swapped left/right and x -> 1 - x (static centre 0.5, no pixel shift).
    """
    swapped = coords.index_select(1, flip_index.to(coords.device))
    return torch.stack((1.0 - swapped[..., 0], swapped[..., 1]), dim=-1)


def merge_flip(
    coords: torch.Tensor,
    scores: torch.Tensor,
    coords_flipped: torch.Tensor,
    scores_flipped: torch.Tensor,
    flip_index: torch.Tensor,
    swap_scores: bool | torch.Tensor = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official flip-test merge of a plain and a mirrored pass.

    Coordinates: ``(coords + flip_back(coords_flipped)) / 2``. Scores: the official code averages
    ``scores`` with ``scores_flipped`` WITHOUT the left/right swap (keypoint k is averaged with the
    mirrored joint); this quirk is the default so that the official numbers are reproduced.
    ``swap_scores=True`` gives the corrected merge (the flipped scores swapped first).

    Args:
        coords: (N, K, 2) plain pass, [0, 1] crop coordinates.
        scores: (N, K) plain pass scores.
        coords_flipped: (N, K, 2) mirrored pass, raw (not flipped back).
        scores_flipped: (N, K) mirrored pass, raw.
        flip_index: (K,) left/right permutation.
        swap_scores: bool, or (N,) bool per crop.

    Returns:
        coords (N, K, 2) and scores (N, K).
    """
    merged = (coords + flip_back(coords_flipped, flip_index)) / 2
    quirk = (scores + scores_flipped) / 2
    if isinstance(swap_scores, bool) and not swap_scores:
        return merged, quirk
    fixed = (scores + scores_flipped.index_select(1, flip_index.to(scores.device))) / 2
    if isinstance(swap_scores, bool):
        return merged, fixed
    return merged, torch.where(swap_scores.to(scores.device).view(-1, 1), fixed, quirk)


def decode_keypoints(
    coords: torch.Tensor,
    centers: torch.Tensor,
    scales: torch.Tensor,
    input_size: tuple[int, int],
    pixel_std: float = 200.0,
    rotations: torch.Tensor | None = None,
) -> torch.Tensor:
    """[0, 1] crop coordinates -> image pixels (official non-UDP decode).

    ``X = (x * W) * (sw / W) + cx - sw / 2`` with ``sw = scale_w * pixel_std`` (and Y with H and
    ``sh``), in the official operation order and, as the official NumPy code ends up doing, in
    float64 (this reproduces the official ``test_preds`` bit for bit). It is the inverse of
    ``warp_crops`` when ``sh / sw == H / W``, which ``boxes_to_center_scale`` guarantees up to
    float32 rounding. With rotations the offsets from the centre are turned back by the box angle.

    Args:
        coords: (N, K, 2) [0, 1] crop coordinates.
        centers: (N, 2) box centres in pixels.
        scales: (N, 2) scales in units of ``pixel_std``.
        input_size: crop (W, H).
        pixel_std: unit of the scale in pixels.
        rotations: (N,) degrees, or None.

    Returns:
        (N, K, 2) float32 image pixels.
    """
    wh = torch.tensor(input_size, dtype=torch.float64, device=coords.device)  # (W, H)
    c = centers.double().unsqueeze(1)  # (N, 1, 2)
    size = (scales.to(torch.float32) * pixel_std).double().unsqueeze(1)  # (N, 1, 2) box pixels
    px = coords.double() * wh  # (N, K, 2) crop pixels
    if rotations is None:
        return (px * (size / wh) + c - size * 0.5).to(torch.float32)
    d = px * (size / wh) - size * 0.5  # (N, K, 2) offsets in the crop frame
    rad = rotations.double().view(-1, 1) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    x = c[..., 0] + cos * d[..., 0] - sin * d[..., 1]
    y = c[..., 1] + sin * d[..., 0] + cos * d[..., 1]
    return torch.stack((x, y), dim=-1).to(torch.float32)


def sigmas_to_pixels(
    sigmas: torch.Tensor, scales: torch.Tensor, pixel_std: float = 200.0
) -> torch.Tensor:
    """Uncertainties in [0, 1] crop units -> image pixels (axes of the crop).

    Args:
        sigmas: (N, K, 2) (sx, sy) as fractions of the crop width / height.
        scales: (N, 2) scales in units of ``pixel_std``.
        pixel_std: unit of the scale in pixels.

    Returns:
        (N, K, 2) float32 in pixels.
    """
    return sigmas.to(torch.float32) * (scales.to(torch.float32) * pixel_std).unsqueeze(1)


def instance_scores(
    keypoint_scores: torch.Tensor, bbox_scores: torch.Tensor, threshold: float = 0.2
) -> torch.Tensor:
    """Official instance rescoring: box score x mean of the keypoint scores above ``threshold``.

    Args:
        keypoint_scores: (N, K) raw keypoint scores.
        bbox_scores: (N,) box scores.
        threshold: visibility threshold (``vis_thr`` 0.2).

    Returns:
        (N,) float32; 0 where no keypoint score is above the threshold (never NaN).
    """
    above = keypoint_scores > threshold  # NaN compares False
    count = above.sum(dim=1)
    total = torch.where(above, keypoint_scores, torch.zeros_like(keypoint_scores)).sum(dim=1)
    mean = total / count.clamp(min=1)
    return torch.where(count > 0, mean * bbox_scores, torch.zeros_like(mean)).to(torch.float32)


def oks_matrix(keypoints: torch.Tensor, areas: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Pairwise object keypoint similarity per group (mmpose ``oks_iou``, all keypoints).

    ``oks(i, j) = mean_k exp(-d_k^2 / (2 * (2 sigma_k)^2 * ((area_i + area_j) / 2 + eps)))``.

    Args:
        keypoints: (G, M, K, 2) keypoints in pixels.
        areas: (G, M) areas in px^2 (official: ``(sw * 200) * (sh * 200)``).
        sigmas: (K,) COCO OKS sigmas.

    Returns:
        (G, M, M) OKS between the persons of each group.
    """
    var = (sigmas.to(keypoints.dtype) * 2) ** 2  # (K,)
    d2 = (keypoints.unsqueeze(2) - keypoints.unsqueeze(1)).pow(2).sum(-1)  # (G, M, M, K)
    mean_area = (areas.unsqueeze(2) + areas.unsqueeze(1)) / 2 + torch.finfo(torch.float64).eps
    e = d2 / var / mean_area.unsqueeze(-1) / 2
    return torch.exp(-e).mean(-1)


def greedy_suppression(
    overlap: torch.Tensor, valid: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Greedy NMS on persons already sorted by descending score, for G groups at once.

    Person j is dropped when an earlier kept person i has ``overlap[i, j] > threshold`` (mmpose
    ``oks_nms`` keeps ``oks <= thr``). The loop runs over the M positions, batched over the groups.

    Args:
        overlap: (G, M, M) pairwise overlap (e.g. ``oks_matrix``).
        valid: (G, M) bool, False for padding.
        threshold: suppression threshold (official OKS 0.9).

    Returns:
        (G, M) bool: the persons kept.
    """
    m = overlap.shape[-1]
    later = torch.ones((m, m), dtype=torch.bool, device=overlap.device).triu(1)
    suppress = (overlap > threshold) & later  # (G, M, M), only i < j
    keep = valid.clone()
    for i in range(m):
        keep &= ~(suppress[:, i, :] & keep[:, i : i + 1])
    return keep
