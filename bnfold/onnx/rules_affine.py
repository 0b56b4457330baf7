"""Fold rules for affine chains other exporters write instead of a BatchNormalization.

TensorFlow-origin and hand-edited models often carry a BN as ``Conv -> Mul(gamma') -> Add(beta')``
with per-channel constants. A ``Mul`` by a per-channel constant is an affine map with ``shift = 0``,
an ``Add`` one with ``scale = 1``, so the producer-side rules fold them exactly as they fold a BN; the
driver runs to a fixed point, so ``Conv -> Mul -> Add`` folds one node at a time.

The constant must broadcast along the layer's output-channel axis only: for a conv output of rank
``r`` its shape, left-padded with ones to rank ``r``, is ``[1, C, 1, ..., 1]`` (``[C, 1, 1]``,
``[1, C, 1, 1]``); for a 2-D Gemm/MatMul output ``[C]`` or ``[1, C]``. Anything else (a scalar on a
layer with more than one channel, a per-position constant, a constant that would grow the output)
is not an affine map per channel and is left alone. Only folded Mul/Add nodes are reported: most
Mul/Add nodes in a model are not candidates at all.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from bnfold.affine import Affine, is_supported_float
from bnfold.onnx.batchnorm import BatchNormParams, Refusal
from bnfold.onnx.graph import DEFAULT_DOMAINS, GraphIndex
from bnfold.onnx.rules import ConvThenBN, ConvTransposeThenBN, GemmThenBN, MatMulThenBN, Rule
from bnfold.report import Reason

__all__ = [
    "AffineChainRule",
    "ConvThenAffine",
    "ConvTransposeThenAffine",
    "GemmThenAffine",
    "MatMulThenAffine",
]

AFFINE_OPS = ("Mul", "Add")


class AffineChainRule(Rule):
    """Mixin for a producer-side rule that absorbs a per-channel ``Mul`` or ``Add`` instead of a BN."""

    absorbs = AFFINE_OPS

    def split(self, graph: GraphIndex, node: NodeProto) -> tuple[int, int] | None:
        """(data slot, constant slot) of a two-input Mul/Add with exactly one constant input."""
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in AFFINE_OPS or len(node.input) != 2:
            return None
        constant = [graph.constant(name).is_constant for name in node.input]
        if constant == [False, True]:
            return 0, 1
        if constant == [True, False]:
            return 1, 0
        return None

    def producer_of(self, graph: GraphIndex, node: NodeProto) -> NodeProto | None:
        slots = self.split(graph, node)
        return graph.producer.get(node.input[slots[0]]) if slots else None

    def output_rank(self, graph: GraphIndex, producer: NodeProto) -> int | None:
        return graph.rank(producer.output[0])

    def read_params(
        self, graph: GraphIndex, node: NodeProto, producer: NodeProto
    ) -> BatchNormParams | Refusal:
        """The node as a per-channel affine map on the producer's output channels, or why not."""
        _, constant_slot = self.split(graph, node)
        value = graph.constant(node.input[constant_slot]).value
        if not is_supported_float(value.dtype):
            return Refusal(Reason.UNSUPPORTED_DTYPE, f"{node.op_type} constant is {value.dtype.name}")
        rank = self.output_rank(graph, producer)
        if rank is None or rank < 2 or value.ndim > rank:
            return Refusal(
                Reason.CHANNEL_AXIS_MISMATCH,
                f"constant shape {list(value.shape)} on an output of rank {rank}",
            )
        padded = (1,) * (rank - value.ndim) + tuple(value.shape)
        if any(size != 1 for axis, size in enumerate(padded) if axis != 1):
            return Refusal(
                Reason.CHANNEL_AXIS_MISMATCH,
                f"constant shape {list(value.shape)} is not per channel (axis 1) of a rank-{rank} output",
            )
        values = np.asarray(value, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            return Refusal(Reason.NONFINITE_STATISTICS, f"{node.op_type} constant is not finite")
        if node.op_type == "Mul":
            affine = Affine(scale=values, shift=np.zeros_like(values))
        else:
            affine = Affine(scale=np.ones_like(values), shift=values)
        return BatchNormParams(node=node, affine=affine, channels=values.size)


class ConvThenAffine(AffineChainRule, ConvThenBN):
    """Conv -> Mul/Add by a per-channel constant: scale output channels and/or fold into the bias."""

    name = "conv-affine"
    description = "Conv -> Mul/Add by per-channel constants: fold into weight and bias"

    def output_rank(self, graph: GraphIndex, producer: NodeProto) -> int | None:
        weight = graph.constant(producer.input[1]) if len(producer.input) > 1 else None
        if weight is not None and weight.is_constant:
            return weight.value.ndim
        return graph.rank(producer.output[0])


class ConvTransposeThenAffine(AffineChainRule, ConvTransposeThenBN):
    """ConvTranspose -> Mul/Add by a per-channel constant (grouped weight layout respected)."""

    name = "convtranspose-affine"
    description = "ConvTranspose -> Mul/Add by per-channel constants: fold into weight and bias"

    output_rank = ConvThenAffine.output_rank


class GemmThenAffine(AffineChainRule, GemmThenBN):
    """Gemm -> Mul/Add by a per-column constant ``[C]`` or ``[1, C]``."""

    name = "gemm-affine"
    description = "Gemm -> Mul/Add by per-column constants: fold into B and C"

    def output_rank(self, graph: GraphIndex, producer: NodeProto) -> int | None:
        return 2


class MatMulThenAffine(AffineChainRule, MatMulThenBN):
    """MatMul [-> Add bias] -> Mul/Add by a per-column constant, on 2-D outputs.

    A lone ``MatMul -> Add(constant)`` is already a MatMul with a bias and is left as it is (folding
    it would only write it again); an ``Add`` after that bias folds into it.
    """

    name = "matmul-affine"
    description = (
        "MatMul [-> Add] -> Mul/Add by per-column constants on 2-D outputs: fold into weight and bias"
    )

    def read_params(
        self, graph: GraphIndex, node: NodeProto, producer: NodeProto
    ) -> BatchNormParams | Refusal:
        if node.op_type == "Add" and producer.op_type == "MatMul":
            return Refusal(Reason.NO_FOLDABLE_PRODUCER, "MatMul -> Add is already a MatMul with a bias")
        return super().read_params(graph, node, producer)

    def output_rank(self, graph: GraphIndex, producer: NodeProto) -> int | None:
        return 2  # MatMulThenBN.match refuses outputs that are not 2-D
