"""Reading constant tensors: initializers (dense and sparse) and ``Constant`` nodes, read-only.

The answer to "is tensor X a constant?" is a :class:`ConstantLookup`: its value, or why it is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, SparseTensorProto, TensorProto, numpy_helper

from bnfold.errors import ModelLoadError
from bnfold.onnx.io import read_tensor
from bnfold.report import Reason

__all__ = ["ConstantLookup", "decoded", "sparse_value", "constant_node_value", "has_value_tensor"]


@dataclass(frozen=True)
class ConstantLookup:
    """The answer to "is tensor X a constant?": its value, or the reason it is not."""

    value: np.ndarray | None
    reason: Reason | None = None
    detail: str = ""

    @property
    def is_constant(self) -> bool:
        return self.value is not None


def decoded(tensor: TensorProto) -> np.ndarray:
    """A tensor's value, read-only; a clear error for data the checker lets through but numpy cannot
    read (raw_data longer than its shape, an unknown data_type, too many float_data values).

    A tensor left on disk by a lazy load is a read-only view of its mapped file range, a new weight
    of a lazily loaded model the (read-only) array in its weight store; every other
    value is made read-only too, so that a rule writing into a constant fails in every test, not
    only on lazily loaded models.
    """
    try:
        if tensor.data_location == TensorProto.EXTERNAL:
            value = read_tensor(tensor)  # left on disk by a lazy load: map this one tensor
        else:
            value = numpy_helper.to_array(tensor)
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise ModelLoadError(
            f"tensor `{tensor.name}` has data that does not match its type and shape ({error})"
        ) from None
    value.flags.writeable = False
    return value


def sparse_value(sparse: SparseTensorProto) -> np.ndarray:
    """A sparse tensor as the dense array it stands for (zeros where no value is given), read-only.

    ``indices`` are either ``[NNZ]`` positions in the flattened tensor or ``[NNZ, rank]`` coordinates.
    """
    values = decoded(sparse.values).reshape(-1)
    shape = tuple(int(size) for size in sparse.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if values.size:
        indices = np.asarray(decoded(sparse.indices), dtype=np.int64)
        try:
            if indices.ndim == 2:
                flat = np.ravel_multi_index(tuple(indices.T), shape)
            else:
                flat = indices.reshape(-1)
            dense.reshape(-1)[flat] = values
        except (ValueError, IndexError) as error:
            raise ModelLoadError(
                f"sparse tensor `{sparse.values.name}` has indices that do not fit its shape ({error})"
            ) from None
    dense.flags.writeable = False
    return dense


def has_value_tensor(node: NodeProto) -> bool:
    """Whether a ``Constant`` node holds its value as a dense tensor (one a fold can write in place)."""
    return any(attribute.name == "value" for attribute in node.attribute)


def constant_node_value(node: NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node in any of its attribute forms, sparse included; None when a
    function's call sites set it (``ref_attr_name``)."""
    for attribute in node.attribute:
        if attribute.ref_attr_name:
            return None  # in a function body: each call site sets the value
        if attribute.name == "value":
            return decoded(attribute.t)
        if attribute.name == "sparse_value":
            return sparse_value(attribute.sparse_tensor)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(list(attribute.floats), dtype=np.float32)
        if attribute.name == "value_int":
            return np.array(attribute.i, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.array(list(attribute.ints), dtype=np.int64)
    return None
