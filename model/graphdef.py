"""Read a frozen TensorFlow ``GraphDef`` (``.pb``) without TensorFlow, and convert its conv part.

The protobuf wire format is decoded by hand (about a hundred lines, no generated code, no dependency
on the protobuf runtime's version): ``GraphDef.node`` -> ``NodeDef`` (name, op, input, attr) ->
``AttrValue`` (list, s, i, f, b, type, shape, tensor) -> ``TensorProto`` (dtype, shape, content or
typed values). Field numbers are those of tensorflow/core/framework/{graph,node_def,attr_value,
tensor,tensor_shape}.proto.

``convert_subgraph`` turns the feed-forward part between an input tensor and some output tensors
into a ``ConvGraph`` spec: Conv2D / DepthwiseConv2dNative with FusedBatchNorm folded in, BiasAdd,
Relu / Relu6 fused into the preceding layer, Add / AddV2, Identity, Reshape (static shape apart from
the batch), ConcatV2, Squeeze, Sigmoid. Anything else on the path raises ``ValueError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.convgraph import GraphNode, GraphSpec, prune

# tensorflow DataType enum values -> numpy dtypes (the ones a conv graph's constants use).
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    6: np.dtype("i1"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    19: np.dtype("<f2"),
}
_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


@dataclass
class TFNode:
    """One ``NodeDef``: inputs as written (``name``, ``name:1``, ``^control``), attrs decoded."""

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedTensor:
    """A ``TensorProto`` attribute, decoded on demand (most of a graph's are never needed)."""

    data: bytes

    def numpy(self) -> np.ndarray:
        """Decode to an array (float, int, uint8, bool or half tensors)."""
        return _tensor(self.data)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value): int for varint/fixed, bytes for length-delimited."""
    pos, end = 0, len(buf)
    value: Any
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value = buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value = buf[pos : pos + length]
            pos += length
        elif wire == 5:
            value = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _packed_varints(value: Any, wire: int) -> list[int]:
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out


def _packed_floats(value: Any, wire: int) -> list[float]:
    return list(struct.unpack(f"<{len(value) // 4}f", value))


def _shape(buf: bytes) -> list[int] | None:
    dims: list[int] = []
    for number, _, value in _fields(buf):
        if number == 2:  # Dim
            size = 0
            for n, _, v in _fields(value):
                if n == 1:
                    size = _signed64(v)
            dims.append(size)
        elif number == 3 and value:  # unknown_rank
            return None
    return dims


def _tensor(buf: bytes) -> np.ndarray:
    dtype_enum, shape, content = 1, [], b""
    values: list[Any] = []
    for number, wire, value in _fields(buf):
        if number == 1:
            dtype_enum = value
        elif number == 2:
            shape = _shape(value) or []
        elif number == 4:
            content = bytes(value)
        elif number == 5:  # float_val
            values.extend(_packed_floats(value, wire))
        elif number in (7, 10, 11):  # int_val, int64_val, bool_val
            values.extend(_signed64(v) for v in _packed_varints(value, wire))
        elif number == 13:  # half_val (bit patterns)
            values.extend(_packed_varints(value, wire))
    if dtype_enum not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype enum {dtype_enum}")
    dtype = _DTYPES[dtype_enum]
    count = int(np.prod(shape)) if shape else 1
    if content:
        return np.frombuffer(content, dtype=dtype).reshape(shape).copy()
    if dtype_enum == 19:
        array = np.array(values, dtype=np.uint16).view(np.float16)
    else:
        array = np.array(values, dtype=dtype)
    if array.size == count:
        return array.reshape(shape)
    # TensorProto repeats the last value to fill the shape (an empty list means zeros).
    filled = np.zeros(count, dtype=dtype)
    filled[:] = array[-1] if array.size else 0
    filled[: array.size] = array
    return filled.reshape(shape)


def _attr(buf: bytes) -> Any:
    for number, _, value in _fields(buf):
        if number == 1:  # ListValue
            items: list[Any] = []
            for n, w, v in _fields(value):
                if n == 2:
                    items.append(bytes(v))
                elif n in (3, 5, 6):
                    items.extend(_signed64(i) for i in _packed_varints(v, w))
                elif n == 4:
                    items.extend(_packed_floats(v, w))
            return items
        if number == 2:
            return bytes(value)
        if number == 3:
            return _signed64(value)
        if number == 4:
            return struct.unpack("<f", value)[0]
        if number in (5, 6):
            return value
        if number == 7:
            return _shape(value)
        if number == 8:
            return EncodedTensor(bytes(value))
    return None


def parse_graphdef(data: bytes) -> dict[str, TFNode]:
    """Decode a serialised ``GraphDef`` into its nodes by name (functions/versions are ignored)."""
    nodes: dict[str, TFNode] = {}
    for number, _, node_buf in _fields(data):
        if number != 1:
            continue
        node = TFNode(name="", op="")
        for n, _, value in _fields(node_buf):
            if n == 1:
                node.name = bytes(value).decode()
            elif n == 2:
                node.op = bytes(value).decode()
            elif n == 3:
                node.inputs.append(bytes(value).decode())
            elif n == 5:  # map<string, AttrValue> entry
                key, attr_value = "", None
                for m, _, v in _fields(value):
                    if m == 1:
                        key = bytes(v).decode()
                    elif m == 2:
                        attr_value = _attr(v)
                node.attrs[key] = attr_value
        nodes[node.name] = node
    return nodes


class _Converter:
    """Walks a GraphDef backwards from the outputs, emitting ConvGraph nodes."""

    def __init__(self, nodes: dict[str, TFNode], input_name: str) -> None:
        self.tf = nodes
        self.values: dict[str, int] = {input_name: 0}
        self.layout: dict[int, str] = {0: "nchw"}
        self.nodes: list[GraphNode] = []
        self.params: dict[str, torch.Tensor] = {}

    def const(self, name: str) -> np.ndarray:
        node = self.tf[name.split(":")[0]]
        while node.op == "Identity":
            node = self.tf[node.inputs[0].split(":")[0]]
        if node.op != "Const":
            raise ValueError(f"{name}: expected a constant, found {node.op}")
        value = node.attrs["value"]
        if not isinstance(value, EncodedTensor):
            raise ValueError(f"{name}: constant without a tensor value")
        return value.numpy()

    def emit(self, op: str, inputs: list[int], attrs: dict[str, Any], lay: str) -> int:
        self.nodes.append(GraphNode(op, tuple(inputs), attrs))
        self.layout[len(self.nodes)] = lay
        return len(self.nodes)

    def conv_node(self, value: int) -> GraphNode | None:
        return self.nodes[value - 1] if value > 0 and self.nodes[value - 1].op == "conv2d" else None

    def replace_conv(self, value: int, weight: torch.Tensor, bias: torch.Tensor, act: str) -> int:
        """Emit a copy of conv ``value`` with new parameters (the old node is pruned later)."""
        old = self.nodes[value - 1]
        attrs = dict(old.attrs, bias=True, activation=act)
        new = self.emit("conv2d", list(old.inputs), attrs, "nchw")
        self.params[f"layers.{new - 1}.weight"] = weight
        self.params[f"layers.{new - 1}.bias"] = bias
        return new

    def conv_params(self, value: int) -> tuple[torch.Tensor, torch.Tensor]:
        node = self.nodes[value - 1]
        weight = self.params[f"layers.{value - 1}.weight"]
        bias = self.params.get(f"layers.{value - 1}.bias")
        if bias is None:
            bias = torch.zeros(node.attrs["weight_shape"][0], dtype=torch.float64)
        return weight, bias

    def value(self, tensor: str) -> int:
        if tensor in self.values:
            return self.values[tensor]
        if tensor.startswith("^"):
            raise ValueError(f"control input {tensor} on the converted path")
        name, _, port = tensor.partition(":")
        if port not in ("", "0"):
            raise ValueError(f"{tensor}: only first outputs are supported")
        node = self.tf[name]
        result = self.convert(node)
        self.values[tensor] = result
        return result

    def convert(self, node: TFNode) -> int:
        op, a = node.op, node.attrs
        if op == "Identity":
            return self.value(node.inputs[0])
        if op in ("Conv2D", "DepthwiseConv2dNative"):
            if a.get("data_format", b"NHWC") != b"NHWC":
                raise ValueError(f"{node.name}: only NHWC graphs are supported")
            x = self.value(node.inputs[0])
            kernel = self.const(node.inputs[1]).astype(np.float64)  # (kh, kw, in, out or mult)
            if op == "Conv2D":
                oihw = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
                groups = 1
            else:
                kh, kw, cin, mult = kernel.shape
                oihw = kernel.reshape(kh, kw, cin * mult, 1).transpose(2, 3, 0, 1)
                groups = cin
            attrs = {
                "weight_shape": list(oihw.shape),
                "bias": False,
                "stride": [int(a["strides"][1]), int(a["strides"][2])],
                "dilation": [int(d) for d in a.get("dilations", [1, 1, 1, 1])[1:3]],
                "groups": groups,
                "padding": a["padding"].decode().lower(),
                "activation": "none",
            }
            out = self.emit("conv2d", [x], attrs, "nchw")
            self.params[f"layers.{out - 1}.weight"] = torch.from_numpy(oihw.copy())
            return out
        if op in ("FusedBatchNorm", "FusedBatchNormV3", "BiasAdd"):
            x = self.value(node.inputs[0])
            conv = self.conv_node(x)
            if conv is None or conv.attrs["activation"] != "none":
                raise ValueError(f"{node.name}: {op} must follow a convolution")
            weight, bias = self.conv_params(x)
            if op == "BiasAdd":
                return self.replace_conv(
                    x, weight, bias + torch.from_numpy(self.const(node.inputs[1])).double(), "none"
                )
            if a.get("is_training", False):
                raise ValueError(f"{node.name}: training-mode batch norm")
            gamma, beta, mean, var = (
                torch.from_numpy(self.const(i).astype(np.float64)) for i in node.inputs[1:5]
            )
            scale = gamma / torch.sqrt(var + float(a.get("epsilon", 1e-3)))
            return self.replace_conv(
                x, weight * scale.view(-1, 1, 1, 1), (bias - mean) * scale + beta, "none"
            )
        if op in ("Relu", "Relu6"):
            x = self.value(node.inputs[0])
            act = op.lower()
            conv = self.conv_node(x)
            if conv is not None and conv.attrs["activation"] == "none":
                weight, bias = self.conv_params(x)
                return self.replace_conv(x, weight, bias, act)
            return self.emit(act, [x], {}, self.layout[x])
        if op in ("Add", "AddV2"):
            x, y = (self.value(i) for i in node.inputs)
            if self.layout[x] != self.layout[y]:
                raise ValueError(f"{node.name}: Add of mixed layouts")
            return self.emit("add", [x, y], {"activation": "none"}, self.layout[x])
        if op == "Sigmoid":
            x = self.value(node.inputs[0])
            return self.emit("sigmoid", [x], {}, self.layout[x])
        if op == "Reshape":
            x = self.value(node.inputs[0])
            return self.emit(
                "reshape",
                [x],
                {"shape": self.static_shape(node.inputs[1]), "nhwc": self.layout[x] == "nchw"},
                "plain",
            )
        if op == "ConcatV2":
            xs = [self.value(i) for i in node.inputs[:-1]]
            lays = {self.layout[x] for x in xs}
            if len(lays) != 1:
                raise ValueError(f"{node.name}: concat of mixed layouts")
            lay = lays.pop()
            axis = int(self.const(node.inputs[-1]))
            dim = _NCHW_AXIS[axis % 4] if lay == "nchw" else axis
            return self.emit("concat", xs, {"dim": dim}, lay)
        if op == "Squeeze":
            x = self.value(node.inputs[0])
            dims = a.get("squeeze_dims", [])
            if len(dims) != 1 or self.layout[x] != "plain":
                raise ValueError(f"{node.name}: only a one-axis squeeze of a plain tensor")
            return self.emit("squeeze", [x], {"dim": int(dims[0])}, "plain")
        raise ValueError(f"{node.name}: unsupported op {op} on the converted path")

    def static_shape(self, tensor: str) -> list[int]:
        """A reshape target without its batch dimension; the batch may be computed at run time."""
        node = self.tf[tensor.split(":")[0]]
        if node.op == "Const":
            return [int(v) for v in self.const(tensor).reshape(-1)[1:]]
        if node.op != "Pack":
            raise ValueError(f"{tensor}: reshape target must be a constant or a packed shape")
        return [int(self.const(i)) for i in node.inputs[1:]]


def convert_subgraph(
    nodes: dict[str, TFNode], input_name: str, outputs: dict[str, str]
) -> tuple[GraphSpec, dict[str, torch.Tensor]]:
    """Convert the part of a frozen graph between one NHWC image tensor and some outputs.

    Args:
        nodes: ``parse_graphdef`` result.
        input_name: the tensor that becomes the graph input (fed NCHW, float).
        outputs: our output name -> tensor name.

    Returns:
        (spec, params): float32 parameters keyed as ``ConvGraph`` registers them; batch norms are
        folded into the convolutions (in float64, then rounded once).
    """
    converter = _Converter(nodes, input_name)
    wanted = {ours: converter.value(theirs) for ours, theirs in outputs.items()}
    spec, params = prune(GraphSpec(converter.nodes, wanted), converter.params)
    return spec, {k: v.float().contiguous() for k, v in params.items()}
