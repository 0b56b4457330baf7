"""Fold rules for affine chains other exporters write instead of a BatchNormalization.

TensorFlow-origin and hand-edited models often carry a BN as ``Conv -> Mul(gamma') -> Add(beta')``
with per-channel constants. A ``Mul`` by a per-channel constant is an affine map with ``shift = 0``,
an ``Add`` one with ``scale = 1``, so they fold into the layer before them exactly as a BN does
(:mod:`bnfold.onnx.layers`); the driver runs to a fixed point, so ``Conv -> Mul -> Add`` folds one
node at a time.

The constant must broadcast along the layer's output-channel axis only: for a conv output of rank
``r`` its shape, left-padded with ones to rank ``r``, is ``[1, C, 1, ..., 1]`` (``[C, 1, 1]``,
``[1, C, 1, 1]``); for a 2-D Gemm/MatMul output ``[C]`` or ``[1, C]``. Anything else (a scalar on a
layer with more than one channel, a per-position constant, a constant that would grow the output)
is not an affine map per channel and is left alone. Only folded Mul/Add nodes are reported: most
Mul/Add nodes in a model are not candidates at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bnfold.affine import Affine, is_supported_float
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import AffineChain
from bnfold.onnx.batchnorm import NormParams
from bnfold.onnx.checks import require_sole_reader
from bnfold.onnx.layers import MATMUL, OutputFold, OutputLayer, write_output_fold
from bnfold.onnx.nodes import is_op
from bnfold.onnx.view import OnnxView
from bnfold.report import Reason

__all__ = ["AFFINE_OPS", "LayerThenAffine", "affine_of_constant"]

AFFINE_OPS = ("Mul", "Add")


@dataclass(frozen=True)
class LayerThenAffinePlan:
    site: AffineChain
    fold: OutputFold


def affine_of_constant(op_type: str, value: np.ndarray, rank: int | None) -> Affine:
    """A ``Mul``/``Add`` by ``value`` on an output of rank ``rank`` as a per-channel map on axis 1,
    or Refuse when it is not one (a per-position constant, one that would grow the output)."""
    if not is_supported_float(value.dtype):
        raise Refuse(Reason.UNSUPPORTED_DTYPE, f"{op_type} constant is {value.dtype.name}")
    if rank is None or rank < 2 or value.ndim > rank:
        raise Refuse(
            Reason.CHANNEL_AXIS_MISMATCH, f"constant shape {list(value.shape)} on an output of rank {rank}"
        )
    padded = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(size != 1 for axis, size in enumerate(padded) if axis != 1):
        raise Refuse(
            Reason.CHANNEL_AXIS_MISMATCH,
            f"constant shape {list(value.shape)} is not per channel (axis 1) of a rank-{rank} output",
        )
    values = np.asarray(value, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise Refuse(Reason.NONFINITE_STATISTICS, f"{op_type} constant is not finite")
    if op_type == "Mul":
        return Affine(scale=values, shift=np.zeros_like(values))
    return Affine(scale=np.ones_like(values), shift=values)


class LayerThenAffine:
    """``layer -> Mul/Add(per-channel constant)`` for one layer kind: scale output channels and/or
    fold into the bias. For MatMul, a lone ``MatMul -> Add(constant)`` is already a MatMul with a bias
    and is left as it is (folding it would only write it again); an ``Add`` after that bias folds
    into it."""

    site = AffineChain

    def __init__(self, name: str, layer: OutputLayer) -> None:
        self.name = name
        self.layer = layer

    def find(self, view: OnnxView, node: NodeProto) -> AffineChain | None:
        """A two-input Mul/Add with exactly one constant input, whose other input this layer writes."""
        if not is_op(node, *AFFINE_OPS) or len(node.input) != 2:
            return None
        constant = [view.constant(name).is_constant for name in node.input]
        if constant == [False, True]:
            data_slot, constant_slot = 0, 1
        elif constant == [True, False]:
            data_slot, constant_slot = 1, 0
        else:
            return None
        head = self.layer.head(view, node.input[data_slot])
        if head is None:
            return None
        return AffineChain(node=node, layer=head, data_slot=data_slot, constant_slot=constant_slot)

    def plan(self, view: OnnxView, site: AffineChain) -> LayerThenAffinePlan:
        node, head = site.node, site.layer
        if self.layer is MATMUL and is_op(node, "Add") and is_op(head, "MatMul"):
            raise Refuse(Reason.NO_FOLDABLE_PRODUCER, "MatMul -> Add is already a MatMul with a bias")
        value = view.constant(node.input[site.constant_slot]).value
        affine = affine_of_constant(node.op_type, value, self.layer.output_rank(view, head))
        params = NormParams(node=node, affine=affine, channels=affine.scale.size)
        require_sole_reader(view, head.output[0], node)
        fold = self.layer.plan(view, head, params, keep_exact=view.may_fold_again(node.output[0]))
        return LayerThenAffinePlan(site, fold)

    def apply(self, view: OnnxView, plan: LayerThenAffinePlan) -> Applied:
        return Applied(write_output_fold(view, plan.fold, plan.site.node))
