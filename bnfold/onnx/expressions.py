"""Constant sub-expressions an exporter leaves in front of a weight or bias, evaluated on demand.

The TorchScript exporter deduplicates identical initializers behind ``Identity`` nodes (torchvision
VGG-BN's zero conv biases), timm's LeViT arrives as ``MatMul(x, Transpose(W))``, float16-stored
weights come through ``Cast``, and shapes through ``Reshape``/``Squeeze``/``Unsqueeze``/``Concat``/
``Slice``; the dynamo exporter (``optimize=False``) writes a bias-free conv's bias as
``Expand(CastLike(0, x), Shape(W)[0:1])``. When every input of such a node is a constant (for
``CastLike``, its second input's element type is enough), so is its output: :func:`evaluate` computes
it with numpy, exactly as ONNX defines the operator, only when a fold asks for that tensor (so a lazily
loaded model reads no weight a fold does not need). A fold that writes such a tensor gives its layer
a new initializer; the expression keeps feeding its other readers, or is pruned when it has none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import NodeProto, TensorProto, helper

from bnfold.affine import is_supported_float
from bnfold.core.refuse import Refuse
from bnfold.onnx.nodes import attribute

__all__ = ["EXPRESSION_OPS", "evaluate"]

EXPRESSION_OPS = (
    "Identity",
    "Transpose",
    "Cast",
    "CastLike",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Slice",
    "Shape",
    "Expand",
)
# An Expand that would make more elements than this is not evaluated (a bias or a shape is small).
EXPAND_ELEMENTS_LIMIT = 1 << 24

_INTEGERS = (TensorProto.INT64, TensorProto.INT32)


def evaluate(node: NodeProto, inputs: Sequence[np.ndarray | None], opset: int) -> np.ndarray | None:
    """The output of ``node`` (one of :data:`EXPRESSION_OPS`) on constant ``inputs`` (None for an
    absent optional input), read-only; None when this node is not one bnfold evaluates (an attribute
    its call sites set, a Cast to a type folds do not read, an input that does not fit)."""
    try:
        value = _evaluate(node, inputs, opset)
    except (Refuse, ValueError, IndexError, TypeError):
        return None
    if value is None:
        return None
    value = np.ascontiguousarray(value)
    value.flags.writeable = False
    return value


def _evaluate(node: NodeProto, inputs: Sequence[np.ndarray | None], opset: int) -> np.ndarray | None:
    if not inputs or inputs[0] is None:
        return None
    data = inputs[0]
    op = node.op_type
    if op == "Identity":
        return data
    if op == "Transpose":
        perm = attribute(node, "perm", None)
        return np.transpose(data, None if perm is None else [int(axis) for axis in perm])
    if op in ("Cast", "CastLike"):
        if op == "Cast":
            to = int(attribute(node, "to", 0))
            target = np.dtype(helper.tensor_dtype_to_np_dtype(to))
        elif len(inputs) > 1 and inputs[1] is not None:
            target = np.asarray(inputs[1]).dtype  # only its type is read
        else:
            return None
        if not (is_supported_float(target) or target in (np.dtype(np.int64), np.dtype(np.int32))):
            return None
        if not (is_supported_float(data.dtype) or data.dtype.kind in "iu"):
            return None
        return data.astype(target)
    if op == "Shape":
        rank = data.ndim
        start, end = int(attribute(node, "start", 0)), attribute(node, "end", None)
        end = rank if end is None else int(end)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        start, end = min(max(start, 0), rank), min(max(end, 0), rank)  # clamped, as ONNX says
        return np.array(data.shape[start:end], dtype=np.int64)
    if op == "Expand":
        if len(inputs) < 2 or inputs[1] is None:
            return None
        shape = np.broadcast_shapes(
            data.shape, tuple(int(size) for size in np.asarray(inputs[1]).reshape(-1))
        )
        if int(np.prod(shape, dtype=np.int64)) > EXPAND_ELEMENTS_LIMIT:
            return None
        return np.broadcast_to(data, shape).copy()
    if op == "Reshape":
        shape = _second(node, inputs, "shape")
        return _reshape(data, [int(size) for size in shape], bool(attribute(node, "allowzero", 0)))
    if op in ("Squeeze", "Unsqueeze"):
        axes = _second(node, inputs, "axes", optional=(op == "Squeeze"))
        if op == "Squeeze":
            if axes is None:
                return np.squeeze(data)
            return np.squeeze(data, axis=tuple(int(axis) for axis in axes))
        rank = data.ndim + len(axes)
        result = data
        for axis in sorted(int(axis) % rank for axis in axes):
            result = np.expand_dims(result, axis)
        return result
    if op == "Concat":
        if any(value is None for value in inputs):
            return None
        return np.concatenate(list(inputs), axis=int(attribute(node, "axis", 0)))
    if op == "Slice":
        return _slice(node, inputs, data, opset)
    return None


def _second(node: NodeProto, inputs: Sequence[np.ndarray | None], name: str, optional: bool = False):
    """An operand given as input 1 (newer opsets) or as an attribute (older ones)."""
    if len(inputs) > 1 and inputs[1] is not None:
        return np.asarray(inputs[1]).reshape(-1)
    value = attribute(node, name, None)
    if value is None and not optional:
        raise ValueError(f"{node.op_type} without {name}")
    return value


def _reshape(data: np.ndarray, shape: list[int], allowzero: bool) -> np.ndarray:
    target = [data.shape[axis] if size == 0 and not allowzero else size for axis, size in enumerate(shape)]
    return data.reshape(target)


def _slice(node: NodeProto, inputs: Sequence[np.ndarray | None], data: np.ndarray, opset: int) -> np.ndarray:
    if opset < 10:
        starts = list(attribute(node, "starts", []))
        ends = list(attribute(node, "ends", []))
        axes = list(attribute(node, "axes", range(len(starts))))
        steps = [1] * len(starts)
    else:

        def operand(slot: int) -> list[int] | None:
            if slot < len(inputs) and inputs[slot] is not None:
                return [int(value) for value in np.asarray(inputs[slot]).reshape(-1)]
            return None

        starts, ends = operand(1), operand(2)
        if starts is None or ends is None:
            raise ValueError("Slice without starts or ends")
        axes = operand(3) or list(range(len(starts)))
        steps = operand(4) or [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= data.ndim
        size = data.shape[axis]
        if step == 0:
            raise ValueError("Slice step 0")
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            index[axis] = slice(start, end, step)
        else:  # clamped to [0, size - 1] and [-1, size - 1]; an end of -1 runs to the beginning
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            index[axis] = slice(start, None if end < 0 else end, step)
    return data[tuple(index)]
