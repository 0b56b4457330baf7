"""A BatchNormalization nothing can absorb, rewritten as ``Mul`` + ``Add`` (opt-in).

Some runtimes and quantizers want a graph without BatchNormalization even where no layer can take it
(a BN after a residual ``Add``, before a ``Relu``). The BN's inference-time map is exactly
``x * scale + shift`` per channel, so it becomes ``Mul(x, scale) -> Add(., shift)`` with constants of
shape ``[C, 1, ..., 1]`` (one trailing 1 per spatial axis), computed in float64 and rounded once into
the data's dtype. The driver uses this rule only for ``fold_onnx(..., rewrite_standalone=True)`` and
only after every fold rule said no.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper

from bnfold.affine import is_supported_float, round_to_dtype
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import Standalone
from bnfold.onnx.view import OnnxView
from bnfold.report import Reason

__all__ = ["BNToAffine"]


@dataclass(frozen=True)
class StandalonePlan:
    norm: NodeProto
    scale: np.ndarray
    shift: np.ndarray


class BNToAffine:
    """BN -> ``Mul(x, s) -> Add(., t)``; refuses when the input's rank or dtype is unknown."""

    name = "bn-to-affine"
    site = Standalone

    def find(self, view: OnnxView, node: NodeProto) -> Standalone | None:
        return Standalone(norm=node) if view.is_norm(node) else None

    def plan(self, view: OnnxView, site: Standalone) -> StandalonePlan:
        bn = site.norm
        params = view.norm_params(bn)
        data = bn.input[0]
        rank = view.rank(data)
        if rank is None or rank < 2:
            shown = "unknown" if rank is None else str(rank)
            raise Refuse(
                Reason.CHANNEL_AXIS_MISMATCH,
                f"input rank is {shown}: the per-channel constants cannot be shaped to broadcast on axis 1",
            )
        dtype = _data_dtype(view, bn)
        if dtype is None:
            raise Refuse(Reason.UNSUPPORTED_DTYPE, f"the dtype of `{data}` is unknown or not a float")
        shape = (params.channels,) + (1,) * (rank - 2)
        scale = round_to_dtype(params.affine.scale.reshape(shape), dtype)
        shift = round_to_dtype(params.affine.shift.reshape(shape), dtype)
        if scale is None or shift is None:
            raise Refuse(Reason.FOLD_OVERFLOWS_DTYPE, f"scale or shift overflows {np.dtype(dtype).name}")
        return StandalonePlan(bn, scale, shift)

    def apply(self, view: OnnxView, plan: StandalonePlan) -> Applied:
        bn = plan.norm
        label = bn.name or "BatchNormalization"
        scale_name = view.add_constant(plan.scale, f"{label}_scale")
        shift_name = view.add_constant(plan.shift, f"{label}_shift")
        scaled = view.context.fresh_name(f"{label}_scaled")
        mul = helper.make_node(
            "Mul", [bn.input[0], scale_name], [scaled], name=view.context.fresh_name(f"{label}_mul")
        )
        add = helper.make_node(
            "Add", [scaled, shift_name], [bn.output[0]], name=view.context.fresh_name(f"{label}_add")
        )
        mul = view.insert_node_at(mul, replacing=bn)
        view.insert_node_after(add, mul)
        return Applied(mul)


def _data_dtype(view: OnnxView, bn: NodeProto) -> np.dtype | None:
    elem_type = view.elem_type(bn.input[0]) or view.elem_type(bn.output[0])
    if elem_type is None and (view.opset or 0) < 15:
        # Before BatchNormalization-15 the data and every parameter share one type.
        elem_type = view.elem_type(bn.input[1])
    if elem_type is None:
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    return dtype if is_supported_float(dtype) else None
