"""A BatchNormalization nothing can absorb, rewritten as ``Mul`` + ``Add`` (opt-in).

Some runtimes and quantizers want a graph without BatchNormalization even where no layer can take it
(a BN after a residual ``Add``, before a ``Relu``). The BN's inference-time map is exactly
``x * scale + shift`` per channel, so it becomes ``Mul(x, scale) -> Add(., shift)`` with constants of
shape ``[C, 1, ..., 1]`` (one trailing 1 per spatial axis), computed in float64 and rounded once into
the data's dtype. The driver uses this rule only for ``fold_onnx(..., rewrite_standalone=True)`` and
only after every fold rule said no.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, helper, numpy_helper

from bnfold.affine import is_supported_float, round_to_dtype
from bnfold.onnx.batchnorm import BatchNormParams, Refusal
from bnfold.onnx.graph import GraphIndex
from bnfold.onnx.rules import Match, Rule
from bnfold.report import Reason

__all__ = ["BNToAffine"]


class BNToAffine(Rule):
    """BN -> ``Mul(x, s) -> Add(., t)``; refuses when the input's rank or dtype is unknown."""

    name = "bn-to-affine"
    op_types = ("BatchNormalization",)
    side = "standalone"
    description = "BatchNormalization nothing absorbs -> Mul + Add (only with rewrite_standalone)"

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        data = bn.input[0]
        rank = graph.rank(data)
        if rank is None or rank < 2:
            shown = "unknown" if rank is None else str(rank)
            return Refusal(
                Reason.CHANNEL_AXIS_MISMATCH,
                f"input rank is {shown}: the per-channel constants cannot be shaped to broadcast on axis 1",
            )
        dtype = self._data_dtype(graph, bn)
        if dtype is None:
            return Refusal(Reason.UNSUPPORTED_DTYPE, f"the dtype of `{data}` is unknown or not a float")
        shape = (params.channels,) + (1,) * (rank - 2)
        scale = round_to_dtype(params.affine.scale.reshape(shape), dtype)
        shift = round_to_dtype(params.affine.shift.reshape(shape), dtype)
        if scale is None or shift is None:
            return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, f"scale or shift overflows {np.dtype(dtype).name}")
        return Match(bn, {1: scale, 2: shift})

    @staticmethod
    def _data_dtype(graph: GraphIndex, bn: NodeProto) -> np.dtype | None:
        elem_type = graph.elem_type(bn.input[0]) or graph.elem_type(bn.output[0])
        if elem_type is None and (graph.context.opset or 0) < 15:
            # Before BatchNormalization-15 the data and every parameter share one type.
            elem_type = graph.elem_type(bn.input[1])
        if elem_type is None:
            return None
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        return dtype if is_supported_float(dtype) else None

    def apply(self, graph: GraphIndex, bn: NodeProto, match: Match) -> NodeProto:
        label = bn.name or "BatchNormalization"
        names = []
        for slot, role in ((1, "scale"), (2, "shift")):
            name = graph.context.fresh_name(f"{label}_{role}")
            graph.graph.initializer.append(numpy_helper.from_array(match.new_inputs[slot], name))
            graph.initializers[name] = graph.graph.initializer[-1]
            names.append(name)
        scaled = graph.context.fresh_name(f"{label}_scaled")
        mul = helper.make_node(
            "Mul", [bn.input[0], names[0]], [scaled], name=graph.context.fresh_name(f"{label}_mul")
        )
        add = helper.make_node(
            "Add", [scaled, names[1]], [bn.output[0]], name=graph.context.fresh_name(f"{label}_add")
        )
        mul = graph.insert_node_at(mul, replacing=bn)
        graph.insert_node_after(add, mul)
        return mul
