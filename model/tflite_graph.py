"""Read a TensorFlow Lite flatbuffer (``.tflite``) into a ``ConvGraph`` without a TFLite runtime.

Uses the pure-Python ``tflite`` package (generated flatbuffer accessors) to walk the first subgraph.
Supported builtin ops are those of the float conv nets converted here (BlazePose and its pose
detector): CONV_2D, DEPTHWISE_CONV_2D, ADD, MAX_POOL_2D, PAD, RESIZE_BILINEAR, DEPTH_TO_SPACE,
RESHAPE, LOGISTIC, CONCATENATION, RELU, RELU6, and on constants DENSIFY (sparse weights, e.g. the
pose detector's pruned 1x1 convolutions) and DEQUANTIZE of float16 weights, both resolved at
conversion. Anything else (quantised tensors, block-sparse weights, custom ops, control flow) raises
``ValueError``: a conversion is exact or fails.

Layout: TFLite tensors are NHWC; the graph is built NCHW. Conv weights OHWI -> OIHW, depthwise
weights 1HW(C*M) -> (C*M)1HW with ``groups = C``, PAD/CONCATENATION axes are remapped, RESHAPE of a
4-D tensor flattens in NHWC order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from model.convgraph import GraphNode, GraphSpec, prune

_PADDING = {0: "same", 1: "valid"}  # tflite.Padding: SAME = 0, VALID = 1
_ACTIVATION = {0: "none", 1: "relu", 3: "relu6"}  # tflite.ActivationFunctionType
_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}  # NHWC axis -> NCHW axis


def _numpy_dtype(tensor_type: int) -> np.dtype:
    import tflite

    table: dict[int, np.dtype[Any]] = {
        tflite.TensorType.FLOAT32: np.dtype("<f4"),
        tflite.TensorType.FLOAT16: np.dtype("<f2"),
        tflite.TensorType.INT32: np.dtype("<i4"),
        tflite.TensorType.INT64: np.dtype("<i8"),
    }
    if tensor_type not in table:
        raise ValueError(f"unsupported TFLite tensor type {tensor_type}")
    return table[tensor_type]


def _index_vector(kind: int, table: Any) -> np.ndarray:
    """The values of a ``SparseIndexVector`` union member, as int64."""
    import tflite

    classes = {
        tflite.SparseIndexVector.Int32Vector: tflite.Int32Vector,
        tflite.SparseIndexVector.Uint16Vector: tflite.Uint16Vector,
        tflite.SparseIndexVector.Uint8Vector: tflite.Uint8Vector,
    }
    if kind not in classes or table is None:
        raise ValueError(f"unsupported sparse index vector type {kind}")
    vector = classes[kind]()
    vector.Init(table.Bytes, table.Pos)
    return np.asarray(vector.ValuesAsNumpy(), dtype=np.int64)


def densify(values: np.ndarray, shape: list[int], sparsity: Any) -> np.ndarray:
    """A TFLite sparse constant as a dense array (TFLite's ``FormatConverter::SparseToDense``).

    Every dimension, taken in the tensor's traversal order, is DENSE (all ``dense_size`` indices)
    or SPARSE_CSR (the indices ``array_indices[segments[p]:segments[p + 1]]`` of parent position
    ``p``); the stored values follow the traversal, one per leaf. Block sparsity (a block map) is
    not supported.

    Args:
        values: (nnz,) the stored values, in traversal order.
        shape: the dense shape.
        sparsity: the tensor's ``tflite.SparsityParameters``.

    Returns:
        The dense array of ``shape``, zeros where nothing is stored.

    Raises:
        ValueError: block sparsity, an unknown dimension format, or values that do not fit.
    """
    import tflite

    rank = len(shape)
    order = [int(i) for i in sparsity.TraversalOrderAsNumpy()] if rank else []
    if sparsity.BlockMapLength():
        raise ValueError("block-sparse tensors are not supported")
    if sorted(order) != list(range(rank)) or sparsity.DimMetadataLength() != rank:
        raise ValueError("sparse tensor: expected one traversal index and metadata per dimension")
    coords = np.zeros((1, 0), dtype=np.int64)  # (P, level) indices of the positions so far
    parent = np.zeros(1, dtype=np.int64)  # (P,) position of each in its level's numbering
    for level in range(rank):
        meta = sparsity.DimMetadata(level)
        if meta.Format() == tflite.DimensionType.DENSE:
            size = int(meta.DenseSize())
            if size != shape[order[level]]:
                raise ValueError(f"sparse tensor: dense size {size} != {shape[order[level]]}")
            coords = np.concatenate(
                (np.repeat(coords, size, axis=0), np.tile(np.arange(size), len(parent))[:, None]),
                axis=1,
            )
            parent = (parent[:, None] * size + np.arange(size)).reshape(-1)
        elif meta.Format() == tflite.DimensionType.SPARSE_CSR:
            segments = _index_vector(meta.ArraySegmentsType(), meta.ArraySegments())
            indices = _index_vector(meta.ArrayIndicesType(), meta.ArrayIndices())
            counts = segments[parent + 1] - segments[parent]
            # the stored positions of every parent, in order: segments[p] .. segments[p + 1] - 1
            parent = np.concatenate(
                [np.arange(segments[p], segments[p + 1]) for p in parent.tolist()]
                or [np.zeros(0, dtype=np.int64)]
            )
            coords = np.concatenate((np.repeat(coords, counts, axis=0), indices[parent, None]), 1)
        else:
            raise ValueError(f"unsupported sparse dimension format {meta.Format()}")
    if len(coords) != values.size or (coords >= np.array([shape[d] for d in order])).any():
        raise ValueError(f"sparse tensor: {values.size} values for {len(coords)} positions")
    dense = np.zeros([shape[d] for d in order], dtype=values.dtype)
    dense[tuple(coords.T)] = values.reshape(-1)
    return dense.transpose(np.argsort(order))


def _options(op: Any, cls: Any) -> Any:
    table = op.BuiltinOptions()
    if table is None:
        raise ValueError("operator without builtin options")
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    return opts


def read_tflite(data: bytes, outputs: dict[str, str]) -> tuple[GraphSpec, dict[str, torch.Tensor]]:
    """Convert a float ``.tflite`` model into a graph spec and its parameters.

    Args:
        data: the flatbuffer bytes.
        outputs: our output name -> TFLite tensor name (e.g. ``{"heatmap": "Identity_3"}``); only
            the nodes these depend on are kept.

    Returns:
        (spec, params): ``params`` keyed ``layers.<node>.weight`` / ``.bias`` as ``ConvGraph``
        registers them, float32, NCHW layouts.

    Raises:
        ValueError: an unsupported op, tensor type or layout, or an unknown output name.
    """
    import tflite

    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() != 1:
        raise ValueError(f"expected one subgraph, found {model.SubgraphsLength()}")
    graph = model.Subgraphs(0)
    op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}

    def tensor_name(index: int) -> str:
        return graph.Tensors(index).Name().decode()

    def tensor_shape(index: int) -> list[int]:
        tensor = graph.Tensors(index)
        return [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []

    def constant(index: int) -> np.ndarray | None:
        tensor = graph.Tensors(index)
        buffer = model.Buffers(tensor.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            return None
        raw = buffer.DataAsNumpy().tobytes()
        values = np.frombuffer(raw, dtype=_numpy_dtype(tensor.Type()))
        if tensor.Sparsity() is not None:  # resolved by its DENSIFY op
            return values
        return values.reshape(tensor_shape(index))

    if graph.InputsLength() != 1:
        raise ValueError("expected a single graph input")
    input_index = int(graph.InputsAsNumpy()[0])
    if graph.Tensors(input_index).Type() != tflite.TensorType.FLOAT32:
        raise ValueError("expected a float32 input")

    consts: dict[int, np.ndarray] = {}
    value_of: dict[int, int] = {input_index: 0}  # TFLite tensor -> our value id
    layout: dict[int, str] = {0: "nchw" if len(tensor_shape(input_index)) == 4 else "plain"}
    nodes: list[GraphNode] = []
    params: dict[str, torch.Tensor] = {}

    def const_of(index: int) -> np.ndarray:
        if index in consts:
            return consts[index]
        value = constant(index)
        if value is None:
            raise ValueError(f"tensor {tensor_name(index)!r} is not a constant")
        consts[index] = value
        return value

    def emit(out_index: int, op: str, inputs: list[int], attrs: dict[str, Any], lay: str) -> int:
        nodes.append(GraphNode(op, tuple(value_of[i] for i in inputs), attrs))
        value_of[out_index] = len(nodes)
        layout[len(nodes)] = lay
        return len(nodes) - 1

    def spatial(index: int) -> None:
        if layout[value_of[index]] != "nchw":
            raise ValueError(f"tensor {tensor_name(index)!r}: spatial op on a non-image tensor")

    for op_index in range(graph.OperatorsLength()):
        op = graph.Operators(op_index)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        ins = [int(i) for i in op.InputsAsNumpy()]
        out = int(op.OutputsAsNumpy()[0])
        if name == "DENSIFY":
            sparsity = graph.Tensors(ins[0]).Sparsity()
            if sparsity is None:
                raise ValueError(f"DENSIFY of a dense tensor {tensor_name(ins[0])!r}")
            consts[out] = densify(const_of(ins[0]), tensor_shape(ins[0]), sparsity)
        elif name == "DEQUANTIZE":
            consts[out] = const_of(ins[0]).astype(np.float32)
        elif name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            spatial(ins[0])
            depthwise = name == "DEPTHWISE_CONV_2D"
            opts = _options(
                op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions
            )
            weight = const_of(ins[1]).astype(np.float32)
            if depthwise:
                # (1, kh, kw, C * M) -> (C * M, 1, kh, kw); output channel c * M + m uses input c.
                groups = tensor_shape(ins[0])[3]
                weight = weight.transpose(3, 0, 1, 2)
            else:
                groups = 1
                weight = weight.transpose(0, 3, 1, 2)  # OHWI -> OIHW
            has_bias = len(ins) > 2 and ins[2] >= 0
            activation = _ACTIVATION.get(opts.FusedActivationFunction())
            if activation is None:
                raise ValueError(f"unsupported fused activation {opts.FusedActivationFunction()}")
            attrs = {
                "weight_shape": list(weight.shape),
                "bias": has_bias,
                "stride": [opts.StrideH(), opts.StrideW()],
                "dilation": [opts.DilationHFactor(), opts.DilationWFactor()],
                "groups": groups,
                "padding": _PADDING[opts.Padding()],
                "activation": activation,
            }
            node = emit(out, "conv2d", ins[:1], attrs, "nchw")
            params[f"layers.{node}.weight"] = torch.from_numpy(np.ascontiguousarray(weight))
            if has_bias:
                bias = const_of(ins[2]).astype(np.float32)
                params[f"layers.{node}.bias"] = torch.from_numpy(bias.copy())
        elif name == "ADD":
            opts = _options(op, tflite.AddOptions)
            activation = _ACTIVATION.get(opts.FusedActivationFunction())
            if activation is None or any(i not in value_of for i in ins):
                raise ValueError("ADD: unsupported activation or constant operand")
            if tensor_shape(ins[0]) != tensor_shape(ins[1]):
                raise ValueError("ADD with broadcasting is not supported")
            emit(out, "add", ins, {"activation": activation}, layout[value_of[ins[0]]])
        elif name == "MAX_POOL_2D":
            spatial(ins[0])
            opts = _options(op, tflite.Pool2DOptions)
            if opts.FusedActivationFunction() != 0:
                raise ValueError("MAX_POOL_2D with a fused activation is not supported")
            attrs = {
                "kernel": [opts.FilterHeight(), opts.FilterWidth()],
                "stride": [opts.StrideH(), opts.StrideW()],
                "padding": _PADDING[opts.Padding()],
            }
            emit(out, "max_pool2d", ins[:1], attrs, "nchw")
        elif name == "PAD":
            spatial(ins[0])
            pads = const_of(ins[1]).astype(int)  # (4, 2) NHWC (before, after)
            if pads[0].any():
                raise ValueError("PAD over the batch dimension is not supported")
            torch_pads = [pads[2, 0], pads[2, 1], pads[1, 0], pads[1, 1], pads[3, 0], pads[3, 1]]
            emit(out, "pad", ins[:1], {"pads": [int(p) for p in torch_pads]}, "nchw")
        elif name == "RESIZE_BILINEAR":
            spatial(ins[0])
            opts = _options(op, tflite.ResizeBilinearOptions)
            attrs = {
                "size": [int(s) for s in const_of(ins[1])],
                "align_corners": bool(opts.AlignCorners()),
                "half_pixel_centers": bool(opts.HalfPixelCenters()),
            }
            emit(out, "resize_bilinear", ins[:1], attrs, "nchw")
        elif name == "DEPTH_TO_SPACE":
            spatial(ins[0])
            block = _options(op, tflite.DepthToSpaceOptions).BlockSize()
            emit(out, "depth_to_space", ins[:1], {"block_size": int(block)}, "nchw")
        elif name == "RESHAPE":
            shape = tensor_shape(out)
            nhwc = layout[value_of[ins[0]]] == "nchw"
            emit(out, "reshape", ins[:1], {"shape": shape[1:], "nhwc": nhwc}, "plain")
        elif name == "CONCATENATION":
            lays = {layout[value_of[i]] for i in ins}
            if len(lays) != 1:
                raise ValueError("CONCATENATION of mixed layouts")
            opts = _options(op, tflite.ConcatenationOptions)
            axis = opts.Axis() % len(tensor_shape(out))
            lay = lays.pop()
            dim = _NCHW_AXIS[axis] if lay == "nchw" else axis
            emit(out, "concat", ins, {"dim": dim}, lay)
        elif name in ("LOGISTIC", "RELU", "RELU6"):
            op_name = {"LOGISTIC": "sigmoid", "RELU": "relu", "RELU6": "relu6"}[name]
            emit(out, op_name, ins[:1], {}, layout[value_of[ins[0]]])
        else:
            raise ValueError(f"unsupported TFLite op {name}")

    by_name = {tensor_name(i): i for i in range(graph.TensorsLength())}
    wanted: dict[str, int] = {}
    for ours, theirs in outputs.items():
        if theirs not in by_name or by_name[theirs] not in value_of:
            raise ValueError(f"no computed tensor named {theirs!r}")
        wanted[ours] = value_of[by_name[theirs]]
    return prune(GraphSpec(nodes, wanted), params)
