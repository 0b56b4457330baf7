"""A float64 evaluation of an ONNX model: the "exact function" verification judges a fold against.

A deep float32 network amplifies its own rounding noise, so the original and a correct fold can
differ by more than any fixed tolerance while both are close to the function the weights define.
Evaluating the *original* in float64 gives that function; a fold is then judged by whether it is
as close to it as the original is (see :func:`bnfold.verify.judge_against_reference`).

ONNX Runtime has no float64 kernels for Conv, ConvTranspose, pooling averages and several
activations on the CPU, so the evaluation uses ``onnx.reference`` on a float64 copy of the model
(every float tensor, type and ``Cast``/``dtype`` target rewritten to double), with our own numpy
Conv and ConvTranspose: onnx's reference ConvTranspose is wrong for ``group > 1``, and its Conv is
slow. Anything else it cannot evaluate raises :class:`ReferenceUnavailable` with a one-line reason.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, TypeProto, numpy_helper

from bnfold.comparison import ReferenceUnavailable
from bnfold.onnx.graph import subgraphs_of
from bnfold.onnx.io import load_model, read_tensor

__all__ = [
    "ReferenceUnavailable",
    "ReferenceRun",
    "float64_copy",
    "evaluate_float64",
    "float_weight_bytes",
    "DEFAULT_LIMIT_BYTES",
]

# The float64 copy of the weights at most this big (a 512 MB float32 model): above it the copy
# and onnx.reference's per-node evaluation cost more than a verification should.
DEFAULT_LIMIT_BYTES = 1 << 30

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_DTYPE_ATTRIBUTES = {"to", "dtype", "output_datatype"}


@dataclass(frozen=True)
class ReferenceRun:
    """float64 outputs per input case, in the model's output order, and the seconds they took."""

    outputs: list[list[np.ndarray]]
    seconds: float


def float_weight_bytes(model: ModelProto) -> int:
    """Bytes the model's float initializers take in float64."""
    return sum(
        8 * int(np.prod(tensor.dims, dtype=np.int64))
        for tensor in model.graph.initializer
        if tensor.data_type in _FLOAT_TYPES
    )


def float64_copy(model: ModelProto) -> ModelProto:
    """A copy of ``model`` computing in float64: float tensors, value types and cast targets double.

    Weights left on disk (a lazy load) are read into the copy; ``model`` is not modified.
    """
    copy = ModelProto()
    copy.CopyFrom(model)
    _to_float64_graph(copy.graph)
    for function in copy.functions:
        for node in function.node:
            _to_float64_node(node)
    return copy


def evaluate_float64(
    model: ModelProto | bytes | str | os.PathLike,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
) -> ReferenceRun:
    """The model's outputs in float64 for each of ``feeds`` (float inputs are cast to float64).

    Raises :class:`ReferenceUnavailable` when the model's float64 weights exceed ``limit_bytes``,
    or it uses an operator or a construct the evaluator cannot run.
    """
    from onnx.reference import ReferenceEvaluator

    start = time.perf_counter()
    if isinstance(model, bytes):
        parsed = ModelProto()
        parsed.ParseFromString(model)
        model = parsed
    elif not isinstance(model, ModelProto):
        model = load_model(model, lazy=True).model
    size = float_weight_bytes(model)
    if size > limit_bytes:
        raise ReferenceUnavailable(
            f"its float64 weights would take {size / 2**20:.0f} MiB (limit {limit_bytes / 2**20:.0f} MiB)"
        )
    for domain in {node.domain for node in _all_nodes(model.graph)} - {"", "ai.onnx"}:
        if domain not in {function.domain for function in model.functions}:
            raise ReferenceUnavailable(f"it uses operators of domain {domain!r}")
    try:
        copy = float64_copy(model)
    except (ValueError, OSError, TypeError) as error:  # a weight that cannot be read or converted
        raise ReferenceUnavailable(f"its weights cannot be read in float64 ({_first_line(error)})") from None
    try:
        evaluator = ReferenceEvaluator(copy, new_ops=[Conv, ConvTranspose, MaxPool])
    except Exception as error:  # onnx.reference raises many types for an op it lacks
        raise ReferenceUnavailable(f"onnx.reference cannot load it ({_first_line(error)})") from None
    outputs = []
    for case in feeds:
        inputs = {name: _as_float64(value) for name, value in case.items()}
        try:
            results = evaluator.run(None, inputs)
        except Exception as error:
            raise ReferenceUnavailable(f"onnx.reference failed to run it ({_first_line(error)})") from None
        outputs.append([np.asarray(value) for value in results])
    return ReferenceRun(outputs=outputs, seconds=time.perf_counter() - start)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:200]


def _as_float64(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
        return value.astype(np.float64)
    return value


def _all_nodes(graph: GraphProto) -> Iterator:
    for node in graph.node:
        yield node
        for _, subgraph in subgraphs_of(node):
            yield from _all_nodes(subgraph)


# -- the float64 copy ---------------------------------------------------------------------------
def _to_float64_tensor(tensor: TensorProto) -> None:
    """Rewrite ``tensor`` in place: float values become double; bytes on disk are read in."""
    on_disk = tensor.data_location == TensorProto.EXTERNAL
    if tensor.data_type not in _FLOAT_TYPES and not on_disk:
        return
    value = read_tensor(tensor) if on_disk else numpy_helper.to_array(tensor)
    if tensor.data_type in _FLOAT_TYPES:
        value = np.asarray(value).astype(np.float64)
    tensor.CopyFrom(numpy_helper.from_array(np.array(value, order="C"), tensor.name))  # keeps 0-d scalars 0-d


def _to_float64_type(type_proto: TypeProto) -> None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type" and type_proto.tensor_type.elem_type in _FLOAT_TYPES:
        type_proto.tensor_type.elem_type = TensorProto.DOUBLE
    elif kind == "sparse_tensor_type" and type_proto.sparse_tensor_type.elem_type in _FLOAT_TYPES:
        type_proto.sparse_tensor_type.elem_type = TensorProto.DOUBLE
    elif kind == "sequence_type":
        _to_float64_type(type_proto.sequence_type.elem_type)
    elif kind == "optional_type":
        _to_float64_type(type_proto.optional_type.elem_type)
    elif kind == "map_type":
        _to_float64_type(type_proto.map_type.value_type)


def _to_float64_graph(graph: GraphProto) -> None:
    for tensor in graph.initializer:
        _to_float64_tensor(tensor)
    for sparse in graph.sparse_initializer:
        _to_float64_tensor(sparse.values)
    for value_info in [*graph.input, *graph.output, *graph.value_info]:
        _to_float64_type(value_info.type)
    for node in graph.node:
        _to_float64_node(node)


def _to_float64_node(node) -> None:
    for attribute in node.attribute:
        if attribute.type == AttributeProto.TENSOR:
            _to_float64_tensor(attribute.t)
        elif attribute.type == AttributeProto.TENSORS:
            for tensor in attribute.tensors:
                _to_float64_tensor(tensor)
        elif attribute.type == AttributeProto.SPARSE_TENSOR:
            _to_float64_tensor(attribute.sparse_tensor.values)
        elif attribute.type == AttributeProto.GRAPH:
            _to_float64_graph(attribute.g)
        elif attribute.type == AttributeProto.GRAPHS:
            for graph in attribute.graphs:
                _to_float64_graph(graph)
        elif attribute.type == AttributeProto.TYPE_PROTO:
            _to_float64_type(attribute.tp)
        elif (
            attribute.type == AttributeProto.INT
            and attribute.name in _DTYPE_ATTRIBUTES
            and attribute.i in _FLOAT_TYPES
        ):
            attribute.i = TensorProto.DOUBLE


# -- Conv and ConvTranspose in numpy, any rank, groups, dilations ---------------------------------
def _spatial_defaults(x: np.ndarray, kernel: Sequence[int], strides, dilations):
    rank = len(kernel)
    return (
        list(strides) if strides is not None else [1] * rank,
        list(dilations) if dilations is not None else [1] * rank,
    )


def convolve(x: np.ndarray, weight: np.ndarray, bias, *, group: int, strides, pads, dilations) -> np.ndarray:
    """N-d grouped convolution (cross-correlation, as ONNX Conv) by one matmul per kernel tap."""
    batch, channels = x.shape[:2]
    out_channels, kernel = weight.shape[0], weight.shape[2:]
    rank = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    effective = [(kernel[i] - 1) * dilations[i] + 1 for i in range(rank)]
    out_spatial = [(x.shape[2 + i] - effective[i]) // strides[i] + 1 for i in range(rank)]
    if any(size <= 0 for size in out_spatial):
        raise ValueError(f"Conv output would be empty ({out_spatial})")
    grouped_x = x.reshape(batch, group, channels // group, *x.shape[2:])
    grouped_w = weight.reshape(group, out_channels // group, channels // group, *kernel)
    positions = batch * int(np.prod(out_spatial))
    out = np.zeros((group, out_channels // group, positions), dtype=np.float64)
    for tap in itertools.product(*(range(size) for size in kernel)):
        window = tuple(
            slice(
                tap[i] * dilations[i],
                tap[i] * dilations[i] + strides[i] * (out_spatial[i] - 1) + 1,
                strides[i],
            )
            for i in range(rank)
        )
        patch = grouped_x[(slice(None), slice(None), slice(None), *window)]  # n, g, c/g, *out
        patch = np.moveaxis(patch, 0, 2).reshape(group, channels // group, positions)
        out += np.matmul(grouped_w[(slice(None), slice(None), slice(None), *tap)], patch)
    out = out.reshape(out_channels, batch, *out_spatial)
    out = np.moveaxis(out, 0, 1)
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * rank))
    return np.ascontiguousarray(out)


def _same_pads(auto_pad: str, in_spatial, kernel, strides, dilations) -> list[int]:
    rank = len(kernel)
    begin, end = [0] * rank, [0] * rank
    for i in range(rank):
        output = -(-in_spatial[i] // strides[i])
        total = max(0, (output - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i])
        small, large = total // 2, total - total // 2
        begin[i], end[i] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    return begin + end


def transposed_convolve(
    x: np.ndarray,
    weight: np.ndarray,
    bias,
    *,
    group: int,
    strides,
    pads,
    dilations,
    output_padding,
) -> np.ndarray:
    """N-d grouped transposed convolution; the weight is ``[C_in, C_out/group, k...]``."""
    batch, channels = x.shape[:2]
    kernel = weight.shape[2:]
    rank = len(kernel)
    out_per_group = weight.shape[1]
    in_spatial = x.shape[2:]
    full = [
        (in_spatial[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + output_padding[i]
        for i in range(rank)
    ]
    out = np.zeros((batch, group, out_per_group, *full), dtype=np.float64)
    grouped_x = x.reshape(batch, group, channels // group, -1)  # n, g, c/g, positions
    grouped_w = weight.reshape(group, channels // group, out_per_group, *kernel)
    for tap in itertools.product(*(range(size) for size in kernel)):
        tap_weight = np.swapaxes(grouped_w[(slice(None), slice(None), slice(None), *tap)], 1, 2)  # g, o, c
        contribution = np.matmul(tap_weight[None], grouped_x)  # n, g, o, positions
        window = tuple(
            slice(
                tap[i] * dilations[i],
                tap[i] * dilations[i] + strides[i] * (in_spatial[i] - 1) + 1,
                strides[i],
            )
            for i in range(rank)
        )
        out[(slice(None), slice(None), slice(None), *window)] += contribution.reshape(
            batch, group, out_per_group, *in_spatial
        )
    out = out.reshape(batch, group * out_per_group, *full)
    crop = tuple(slice(pads[i], full[i] - pads[i + rank]) for i in range(rank))
    out = out[(slice(None), slice(None), *crop)]
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * rank))
    return np.ascontiguousarray(out)


def _reference_op_base():
    from onnx.reference.op_run import OpRun

    return OpRun


class Conv(_reference_op_base()):
    """ONNX Conv for onnx.reference, computed in the inputs' precision (float64 here)."""

    op_domain = ""

    def _run(
        self,
        X,
        W,
        B=None,
        auto_pad=None,
        dilations=None,
        group=None,
        kernel_shape=None,
        pads=None,
        strides=None,
    ):  # noqa: N803, PLR0913
        kernel = list(W.shape[2:])
        strides, dilations = _spatial_defaults(X, kernel, strides, dilations)
        rank = len(kernel)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(auto_pad, X.shape[2:], kernel, strides, dilations)
        elif auto_pad == "VALID" or pads is None:
            pads = [0] * (2 * rank)
        result = convolve(X, W, B, group=group or 1, strides=strides, pads=list(pads), dilations=dilations)
        return (result.astype(X.dtype, copy=False),)


class ConvTranspose(_reference_op_base()):
    """ONNX ConvTranspose for onnx.reference (its own is wrong for ``group > 1``)."""

    op_domain = ""

    def _run(  # noqa: PLR0913
        self,
        X,  # noqa: N803
        W,  # noqa: N803
        B=None,  # noqa: N803
        auto_pad=None,
        dilations=None,
        group=None,
        kernel_shape=None,
        output_padding=None,
        output_shape=None,
        pads=None,
        strides=None,
    ):
        kernel = list(W.shape[2:])
        rank = len(kernel)
        strides, dilations = _spatial_defaults(X, kernel, strides, dilations)
        output_padding = list(output_padding) if output_padding is not None else [0] * rank
        in_spatial = X.shape[2:]
        if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = (
                list(output_shape)[-rank:]
                if output_shape is not None
                else [in_spatial[i] * strides[i] for i in range(rank)]
            )
            begin, end = [0] * rank, [0] * rank
            for i in range(rank):
                total = (
                    strides[i] * (in_spatial[i] - 1)
                    + output_padding[i]
                    + (kernel[i] - 1) * dilations[i]
                    + 1
                    - target[i]
                )
                total = max(total, 0)  # as ONNX Runtime: never grows the full result
                if auto_pad == "SAME_UPPER":
                    begin[i], end[i] = total // 2, total - total // 2
                else:
                    begin[i], end[i] = total - total // 2, total // 2
            pads = begin + end
        elif pads is None:
            pads = [0] * (2 * rank)
        result = transposed_convolve(
            X,
            W,
            B,
            group=group or 1,
            strides=strides,
            pads=list(pads),
            dilations=dilations,
            output_padding=output_padding,
        )
        return (result.astype(X.dtype, copy=False),)


def pool_output_size(
    size: int, kernel: int, stride: int, dilation: int, begin: int, end: int, ceil: bool
) -> int:
    """ONNX Runtime's pooled size: with ``ceil``, rounded up, but the last window starts in the input.

    Without ``ceil`` ONNX Runtime divides as C does, toward zero: a window wider than the padded input
    by less than a stride still gives one output (the max of the taps that land inside), where the
    ONNX formula's floor would give none.
    """
    span = size + begin + end - dilation * (kernel - 1) - 1
    if not ceil:
        toward_zero = span // stride if span >= 0 else -(-span // stride)
        return toward_zero + 1
    count = -(-span // stride) + 1
    if (count - 1) * stride >= size + begin:
        count -= 1
    return count


def max_pool(x: np.ndarray, kernel, *, strides, pads, dilations, ceil: bool) -> np.ndarray:
    """N-d max pooling; padding and a ceil-mode overhang never win (they hold the lowest value)."""
    rank = len(kernel)
    in_spatial = x.shape[2:]
    out = [
        pool_output_size(in_spatial[i], kernel[i], strides[i], dilations[i], pads[i], pads[i + rank], ceil)
        for i in range(rank)
    ]
    if any(size < 0 for size in out):
        raise ValueError(f"MaxPool output size would be negative ({out})")
    if any(size == 0 for size in out):  # as ONNX Runtime: an empty result
        return np.zeros((*x.shape[:2], *out), dtype=x.dtype)
    lowest = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    ends = [
        max(
            pads[i + rank],
            (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i] - pads[i],
        )
        for i in range(rank)
    ]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], ends[i]) for i in range(rank)], constant_values=lowest)
    result = np.full((*x.shape[:2], *out), lowest, dtype=x.dtype)
    for tap in itertools.product(*(range(size) for size in kernel)):
        window = tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (out[i] - 1) + 1, strides[i])
            for i in range(rank)
        )
        np.maximum(result, padded[(slice(None), slice(None), *window)], out=result)
    return result


class MaxPool(_reference_op_base()):
    """ONNX MaxPool for onnx.reference, with ONNX Runtime's ceil-mode sizes (its own differ)."""

    op_domain = ""

    def _run(  # noqa: PLR0913
        self,
        X,  # noqa: N803
        auto_pad=None,
        ceil_mode=None,
        dilations=None,
        kernel_shape=None,
        pads=None,
        storage_order=None,
        strides=None,
    ):
        if len(self.onnx_node.output) > 1 and self.onnx_node.output[1]:
            raise NotImplementedError("MaxPool with its Indices output")
        kernel = list(kernel_shape)
        rank = len(kernel)
        strides, dilations = _spatial_defaults(X, kernel, strides, dilations)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(auto_pad, X.shape[2:], kernel, strides, dilations)
        elif auto_pad == "VALID" or pads is None:
            pads = [0] * (2 * rank)
        result = max_pool(
            X, kernel, strides=strides, pads=list(pads), dilations=dilations, ceil=bool(ceil_mode)
        )
        return (result,)
