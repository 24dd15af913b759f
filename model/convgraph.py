"""A feed-forward convolution graph as a plain ``torch.nn.Module``.

The foreign model files of the reference models (the ``.tflite`` flatbuffers of BlazePose and its
pose detector, the SSDLite person detector's frozen TensorFlow ``GraphDef``) are converted into this
one small form: an ordered list of nodes (convolution, add, pooling, padding, bilinear resize,
depth-to-space, reshape, concat, activations) over numbered values, plus named parameters. It is
also the form cached on disk: the node list goes into a JSON document (``GraphSpec.to_json``), the
parameters into a safetensors file, and ``ConvGraph(spec)`` + ``load_state_dict(strict=True)``
rebuilds the module without the original file or its runtime.

Layout: every 4-D value is NCHW (TensorFlow's NHWC is converted when a graph is read: weights are
transposed, axes remapped); ``reshape`` nodes say whether their input was NHWC in the original graph
so that flattening keeps TensorFlow's element order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("none", "relu", "relu6")
OPS = (
    "conv2d",
    "add",
    "max_pool2d",
    "pad",
    "resize_bilinear",
    "depth_to_space",
    "reshape",
    "concat",
    "squeeze",
    "sigmoid",
    "relu",
    "relu6",
)


@dataclass(frozen=True)
class GraphNode:
    """One operation. Value 0 is the graph input; node ``i`` of a spec produces value ``i + 1``.

    attrs (JSON-able) by op:
        conv2d: weight_shape [O, I/groups, kh, kw], bias (bool), stride [sh, sw], dilation [dh, dw],
            groups, padding ("same" | "valid" | [top, bottom, left, right]), activation.
        add: activation.  max_pool2d: kernel [kh, kw], stride [sh, sw], padding ("same" | "valid").
        pad: pads in ``F.pad`` order for NCHW [left, right, top, bottom, c_before, c_after].
        resize_bilinear: size [h, w], align_corners, half_pixel_centers (TensorFlow's flags).
        depth_to_space: block_size (TensorFlow's DCR channel order, not ``F.pixel_shuffle``'s CRD).
        reshape: shape (without the batch dimension), nhwc (bool: permute NCHW -> NHWC first).
        concat: dim.  squeeze: dim.  sigmoid / relu / relu6: none.
    """

    op: str
    inputs: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GraphSpec:
    """The structure of a ``ConvGraph``: nodes in execution order and the named output values."""

    nodes: list[GraphNode]
    outputs: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the cache's metadata file holds it)."""
        return {
            "nodes": [{"op": n.op, "inputs": list(n.inputs), "attrs": n.attrs} for n in self.nodes],
            "outputs": dict(self.outputs),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GraphSpec:
        """Inverse of ``to_json``; unknown ops are rejected."""
        nodes = []
        for item in data["nodes"]:
            if item["op"] not in OPS:
                raise ValueError(f"unknown graph op {item['op']!r}")
            nodes.append(
                GraphNode(item["op"], tuple(int(i) for i in item["inputs"]), item["attrs"])
            )
        return cls(nodes, {str(k): int(v) for k, v in data["outputs"].items()})


def prune(
    spec: GraphSpec, params: dict[str, torch.Tensor]
) -> tuple[GraphSpec, dict[str, torch.Tensor]]:
    """Keep only the nodes the outputs depend on; renumber values and parameter keys.

    Args:
        spec: a graph, possibly with dead nodes (e.g. outputs not wanted, folded layers).
        params: its parameters keyed ``layers.<node index>.<name>``.

    Returns:
        (spec, params) of the smaller graph.
    """
    needed: set[int] = set()
    stack = [v for v in spec.outputs.values() if v > 0]
    while stack:
        value = stack.pop()
        if value in needed:
            continue
        needed.add(value)
        stack.extend(v for v in spec.nodes[value - 1].inputs if v > 0)
    renumber = {0: 0}
    nodes: list[GraphNode] = []
    new_index: dict[int, int] = {}
    for i, node in enumerate(spec.nodes):
        if i + 1 in needed:
            new_index[i] = len(nodes)
            nodes.append(GraphNode(node.op, tuple(renumber[v] for v in node.inputs), node.attrs))
            renumber[i + 1] = len(nodes)
    new_params = {}
    for key, tensor in params.items():
        _, index, name = key.split(".")
        if int(index) in new_index:
            new_params[f"layers.{new_index[int(index)]}.{name}"] = tensor
    outputs = {name: renumber[v] for name, v in spec.outputs.items()}
    return GraphSpec(nodes, outputs), new_params


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) of one dimension; an odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def tf_resize_bilinear(
    x: torch.Tensor, size: Sequence[int], *, align_corners: bool, half_pixel_centers: bool
) -> torch.Tensor:
    """TensorFlow's ``ResizeBilinear`` (no antialiasing) on an NCHW float tensor.

    ``half_pixel_centers=True`` is PyTorch's ``align_corners=False``; the legacy mode (both flags
    False, as in TF1 ``tf.image.resize_images``) samples at ``dst * in / out`` and is computed here.

    Args:
        x: (N, C, H, W) float; in the legacy mode also uint8 (the result is float32).
        size: output (h, w).
        align_corners: TensorFlow's flag.
        half_pixel_centers: TensorFlow's flag.

    Returns:
        (N, C, h, w): the dtype of ``x``, float32 for a uint8 input.
    """
    out_h, out_w = int(size[0]), int(size[1])
    if half_pixel_centers and not align_corners:
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    if align_corners:
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=True)
    in_h, in_w = x.shape[-2], x.shape[-1]

    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Legacy TF: src = dst * scale (float32), lower = floor, upper = min(lower + 1, n_in - 1).
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        lower = src.floor()
        frac = (src - lower).to(device=x.device)
        lo = lower.long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), frac

    y0, y1, fy = axis(in_h, out_h)
    x0, x1, fx = axis(in_w, out_w)
    # Gather the four neighbours in the input dtype (a large uint8 image is never converted
    # whole), then blend in float32: along x on both rows first, then along y, as TF does.
    rows0, rows1 = x[..., y0, :], x[..., y1, :]  # (N, C, h, W)
    corners = [r[..., c].to(torch.float32) for r in (rows0, rows1) for c in (x0, x1)]
    top_left, top_right, bottom_left, bottom_right = corners  # (N, C, h, w)
    fx_ = fx.view(1, 1, 1, -1)
    top = top_left + (top_right - top_left) * fx_
    bottom = bottom_left + (bottom_right - bottom_left) * fx_
    return top + (bottom - top) * fy.view(1, 1, -1, 1)


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu6":
        return F.relu6(x)
    if activation == "relu":
        return F.relu(x)
    return x


class GraphConv2d(nn.Module):
    """Convolution with TensorFlow's padding rules and a fused activation."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        super().__init__()
        self.stride = tuple(int(s) for s in attrs["stride"])
        self.dilation = tuple(int(d) for d in attrs["dilation"])
        self.groups = int(attrs["groups"])
        self.padding: str | tuple[int, ...] = (
            attrs["padding"] if isinstance(attrs["padding"], str) else tuple(attrs["padding"])
        )
        self.activation = str(attrs["activation"])
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}")
        self.weight = nn.Parameter(torch.empty(*attrs["weight_shape"]), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(attrs["weight_shape"][0]), requires_grad=False)
            if attrs["bias"]
            else None
        )

    def _pads(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            kh, kw = self.weight.shape[-2:]
            top, bottom = same_padding(x.shape[-2], kh, self.stride[0], self.dilation[0])
            left, right = same_padding(x.shape[-1], kw, self.stride[1], self.dilation[1])
            return top, bottom, left, right
        top, bottom, left, right = (int(p) for p in self.padding)
        return top, bottom, left, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, O, H', W')."""
        top, bottom, left, right = self._pads(x)
        if top == bottom and left == right:
            sym: tuple[int, int] = (top, left)
        else:
            x = F.pad(x, (left, right, top, bottom))
            sym = (0, 0)
        y = F.conv2d(x, self.weight, self.bias, self.stride, sym, self.dilation, self.groups)
        return _activate(y, self.activation)


class GraphOp(nn.Module):
    """A parameter-free node (everything but convolutions)."""

    def __init__(self, op: str, attrs: dict[str, Any]) -> None:
        super().__init__()
        if op not in OPS or op == "conv2d":
            raise ValueError(f"unknown graph op {op!r}")
        self.op = op
        self.attrs = attrs

    def extra_repr(self) -> str:
        return f"{self.op}, {self.attrs}"

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        """Apply the op to its inputs (shapes as documented on ``GraphNode``)."""
        op, a = self.op, self.attrs
        if op == "add":
            return _activate(xs[0] + xs[1], a.get("activation", "none"))
        if op == "max_pool2d":
            x = xs[0]
            kernel, stride = tuple(a["kernel"]), tuple(a["stride"])
            if a["padding"] == "same":
                top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
                left, right = same_padding(x.shape[-1], kernel[1], stride[1])
                x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
            return F.max_pool2d(x, kernel, stride)
        if op == "pad":
            return F.pad(xs[0], tuple(a["pads"]))
        if op == "resize_bilinear":
            return tf_resize_bilinear(
                xs[0],
                a["size"],
                align_corners=a["align_corners"],
                half_pixel_centers=a["half_pixel_centers"],
            )
        if op == "depth_to_space":
            # TF: out[n, h*b + i, w*b + j, c] = in[n, h, w, (i*b + j)*C + c]; (N, b*b*C, H, W) ->
            # (N, b, b, C, H, W) -> (N, C, H, b, W, b) -> (N, C, H*b, W*b)
            x, b = xs[0], int(a["block_size"])
            n, c, h, w = x.shape
            x = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
            return x.reshape(n, c // (b * b), h * b, w * b)
        if op == "reshape":
            x = xs[0].permute(0, 2, 3, 1) if a["nhwc"] else xs[0]
            return x.reshape(x.shape[0], *a["shape"])
        if op == "concat":
            return torch.cat(xs, dim=a["dim"])
        if op == "squeeze":
            return xs[0].squeeze(a["dim"])
        if op == "sigmoid":
            return torch.sigmoid(xs[0])
        if op == "relu":
            return F.relu(xs[0])
        return F.relu6(xs[0])


class ConvGraph(nn.Module):
    """Runs a ``GraphSpec``: ``forward(x)`` returns its named outputs.

    Parameters are registered as ``layers.<node index>.weight`` / ``.bias``, so a spec plus a
    state dict (e.g. from safetensors) fully defines the module. ``use_channels_last()`` switches
    the convolutions to NHWC memory (same results; about 1.5-2x faster on CPU for these depthwise
    nets).
    """

    def __init__(self, spec: GraphSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(
            GraphConv2d(n.attrs) if n.op == "conv2d" else GraphOp(n.op, n.attrs) for n in spec.nodes
        )
        self._inputs = [n.inputs for n in spec.nodes]
        # Values no longer needed after node i are dropped to bound peak memory.
        last_use: dict[int, int] = {}
        for i, node in enumerate(spec.nodes):
            for v in node.inputs:
                last_use[v] = i
        keep = set(spec.outputs.values())
        self._free: list[list[int]] = [[] for _ in spec.nodes]
        for value, i in last_use.items():
            if value not in keep:
                self._free[i].append(value)
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> ConvGraph:
        """Keep weights and activations in channels-last memory format (values are unchanged)."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for layer in self.layers:
            if isinstance(layer, GraphConv2d):
                layer.weight.data = layer.weight.data.contiguous(memory_format=fmt)
        self.channels_last = enabled
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, C, H, W) graph input -> {output name: tensor}."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        values: list[torch.Tensor | None] = [x] + [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            args = [values[v] for v in self._inputs[i]]
            values[i + 1] = layer(*args)
            for v in self._free[i]:
                values[v] = None
        out: dict[str, torch.Tensor] = {}
        for name, v in self.spec.outputs.items():
            value = values[v]
            assert value is not None
            out[name] = value
        return out


def build_graph(spec: GraphSpec, params: dict[str, torch.Tensor]) -> ConvGraph:
    """Build a ``ConvGraph`` and load ``params`` strictly, checking every shape.

    Raises:
        ValueError: a missing, extra or mis-shaped parameter.
    """
    graph = ConvGraph(spec)
    expected = graph.state_dict()
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"graph parameters do not match: missing {missing[:5]}, extra {extra[:5]}")
    for key, value in expected.items():
        if tuple(params[key].shape) != tuple(value.shape):
            raise ValueError(
                f"parameter {key}: shape {tuple(params[key].shape)}, expected {tuple(value.shape)}"
            )
    graph.load_state_dict({k: v.float() for k, v in params.items()}, strict=True)
    return graph.eval()
