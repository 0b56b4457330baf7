"""The layers a per-channel map after them folds into (output side): Conv, ConvTranspose, Gemm, MatMul.

Each :class:`OutputLayer` knows its ONNX layout: which node heads it (``MatMul -> Add(bias)`` is one
layer), where its weight and bias are, how many output channels it has, and how to plan the fold of
a per-channel affine map on its output (:func:`bnfold.folds.fold_output_side` does the arithmetic).
Rules (:mod:`bnfold.onnx.rules_output`, :mod:`bnfold.onnx.rules_reshape`,
:mod:`bnfold.onnx.rules_affine`) combine one with a site; :func:`write_output_fold` writes the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import NodeProto, helper

from bnfold.affine import WeightLayout, output_channel_count
from bnfold.core.refuse import Refuse
from bnfold.folds import fold_output_side, require_channels
from bnfold.onnx.batchnorm import NormParams
from bnfold.onnx.checks import constant_input, require_sole_reader, required_constant_input
from bnfold.onnx.graph import GraphIndex
from bnfold.onnx.nodes import attribute, is_op, set_attribute
from bnfold.report import Reason

__all__ = [
    "OutputFold",
    "OutputLayer",
    "CONV",
    "CONV_TRANSPOSE",
    "GEMM",
    "MATMUL",
    "gemm_folded_bias_attributes",
    "write_output_fold",
]


@dataclass
class OutputFold:
    """Everything an output-side fold writes: the layer's new constant inputs by slot (and the base
    names of the new tensors), attribute updates, a MatMul's bias Add, or a new bias to add."""

    layer: NodeProto
    new_inputs: dict[int, np.ndarray]
    names: dict[int, str]
    attributes: dict[str, Any] = field(default_factory=dict)
    # MatMul -> Add -> BN: the Add, and its constant inputs by slot (the folded bias).
    bias_add: NodeProto | None = None
    bias_add_inputs: dict[int, np.ndarray] = field(default_factory=dict)
    # MatMul without a bias gets one: an Add node of this value takes over the subject's output.
    new_bias: np.ndarray | None = None


def gemm_folded_bias_attributes(view: GraphIndex) -> dict[str, float | int]:
    """Gemm attributes once C holds the whole folded bias: ``beta = 1`` (and ``broadcast`` before opset 7)."""
    attributes: dict[str, float | int] = {"beta": 1.0}
    if (view.opset or 0) < 7:
        attributes["broadcast"] = 1  # Gemm-6 and older broadcast C only when asked
    return attributes


def _broadcasts_to_columns(bias: np.ndarray, columns: int) -> bool:
    """Whether a bias broadcasts against a ``[rows, columns]`` output (its last axis is 1 or ``columns``)."""
    return bias.ndim == 0 or bias.shape[-1] in (1, columns)


class OutputLayer:
    """A layer kind whose output channels can absorb a per-channel affine map."""

    op_type: str = ""

    def head(self, view: GraphIndex, tensor: str) -> NodeProto | None:
        """The node of this layer kind that writes ``tensor``, or None."""
        node = view.producer.get(tensor)
        return node if node is not None and is_op(node, self.op_type) else None

    def output_rank(self, view: GraphIndex, head: NodeProto) -> int | None:
        """The rank of the layer's output, where the layer fixes it."""
        return view.rank(head.output[0])

    def plan(
        self,
        view: GraphIndex,
        head: NodeProto,
        params: NormParams,
        *,
        keep_exact: bool,
        axis_checked: bool = False,
    ) -> OutputFold:
        """The fold of ``params`` into the layer's output channels (raises Refuse). ``axis_checked``:
        the caller showed that the map's axis is the layer's channel axis (through a Reshape)."""
        raise NotImplementedError


class _ConvLike(OutputLayer):
    layout: WeightLayout

    def output_rank(self, view: GraphIndex, head: NodeProto) -> int | None:
        weight = view.constant(head.input[1]) if len(head.input) > 1 else None
        if weight is not None and weight.is_constant:
            return weight.value.ndim
        return view.rank(head.output[0])

    def plan(
        self,
        view: GraphIndex,
        head: NodeProto,
        params: NormParams,
        *,
        keep_exact: bool,
        axis_checked: bool = False,
    ) -> OutputFold:
        weight = required_constant_input(view, head, 1, "weight")
        bias = constant_input(view, head, 2, "bias")
        groups = int(attribute(head, "group", 1))
        # Shapes the checker lets through but the operator forbids: the arithmetic below assumes
        # a weight of rank >= 3 whose first axis splits into ``group`` equal parts.
        if weight.ndim < 3:
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"weight has rank {weight.ndim}, expected 3 or more")
        if groups < 1 or weight.shape[0] % groups:
            detail = f"group={groups} does not divide weight shape {list(weight.shape)}"
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, detail)
        channels = output_channel_count(weight.shape, self.layout, groups)
        require_channels(channels, params.channels, "layer has {} output channels")
        if bias is not None and bias.shape != (channels,):
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"bias shape {list(bias.shape)}, expected [{channels}]")
        new_weight, new_bias = fold_output_side(
            weight, bias, params.affine, self.layout, groups=groups, keep_exact=keep_exact
        )
        label = head.name or head.op_type
        return OutputFold(
            head, {1: new_weight, 2: new_bias}, {1: f"{label}_folded_1", 2: f"{label}_folded_2"}
        )


class ConvLayer(_ConvLike):
    """Conv: weight ``[C_out, C_in/group, k...]``, bias ``[C_out]``."""

    op_type = "Conv"
    layout = WeightLayout.CONV


class ConvTransposeLayer(_ConvLike):
    """ConvTranspose: weight ``[C_in, C_out/group, k...]``: output channels are scaled per group."""

    op_type = "ConvTranspose"
    layout = WeightLayout.CONV_TRANSPOSE


class GemmLayer(OutputLayer):
    """Gemm ``alpha * A' B' + beta * C``: B' scaled per output column, ``C = beta * C * s + t`` and
    ``beta = 1``."""

    op_type = "Gemm"

    def output_rank(self, view: GraphIndex, head: NodeProto) -> int | None:
        return 2

    def plan(
        self,
        view: GraphIndex,
        head: NodeProto,
        params: NormParams,
        *,
        keep_exact: bool,
        axis_checked: bool = False,
    ) -> OutputFold:
        weight = required_constant_input(view, head, 1, "B")
        bias = constant_input(view, head, 2, "C")
        layout = WeightLayout.MATRIX_OUT_IN if attribute(head, "transB", 0) else WeightLayout.MATRIX_IN_OUT
        if weight.ndim != 2:
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"Gemm B has rank {weight.ndim}, expected 2")
        channels = output_channel_count(weight.shape, layout)
        require_channels(channels, params.channels, "Gemm has {} output columns")
        if bias is not None and (bias.ndim > 2 or not _broadcasts_to_columns(bias, channels)):
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"Gemm C shape {list(bias.shape)}")
        beta = float(attribute(head, "beta", 1.0))
        new_weight, new_bias = fold_output_side(
            weight, bias, params.affine, layout, bias_multiplier=beta, keep_exact=keep_exact
        )
        label = head.name or head.op_type
        names = {1: f"{label}_folded_1", 2: f"{label}_folded_2"}
        return OutputFold(head, {1: new_weight, 2: new_bias}, names, gemm_folded_bias_attributes(view))


class MatMulLayer(OutputLayer):
    """MatMul with a constant 2-D right-hand side, optionally then an Add of a constant bias.

    Exact only when the map's channel axis (axis 1) is the MatMul output's last axis, i.e. the output
    is 2-D (or a Reshape after it showed the mapping: ``axis_checked``). Without a bias, the map's
    shift becomes an ``Add``.
    """

    op_type = "MatMul"

    def head(self, view: GraphIndex, tensor: str) -> NodeProto | None:
        node = view.producer.get(tensor)
        if node is None:
            return None
        if is_op(node, "MatMul"):
            return node
        return node if is_op(node, "Add") and self.behind_add(view, node) is not None else None

    def output_rank(self, view: GraphIndex, head: NodeProto) -> int | None:
        return 2  # plan() refuses outputs that are not 2-D

    @staticmethod
    def behind_add(view: GraphIndex, add: NodeProto) -> tuple[NodeProto, int] | None:
        """(MatMul, slot of the bias in the Add) when one Add input is a MatMul, the other constant."""
        if len(add.input) != 2:
            return None
        for matmul_slot, bias_slot in ((0, 1), (1, 0)):
            matmul = view.producer.get(add.input[matmul_slot])
            if (
                matmul is not None
                and is_op(matmul, "MatMul")
                and view.constant(add.input[bias_slot]).is_constant
            ):
                return matmul, bias_slot
        return None

    def plan(
        self,
        view: GraphIndex,
        head: NodeProto,
        params: NormParams,
        *,
        keep_exact: bool,
        axis_checked: bool = False,
    ) -> OutputFold:
        bias_add, bias, bias_slot = None, None, 0
        matmul = head
        if is_op(head, "Add"):
            matmul, bias_slot = self.behind_add(view, head)
            bias_add = head
            require_sole_reader(view, matmul.output[0], head)
            bias = constant_input(view, head, bias_slot, "bias")
        weight = constant_input(view, matmul, 1, "right-hand side")
        if weight is None:
            raise Refuse(Reason.WEIGHT_NOT_CONSTANT, "MatMul has no right-hand side")
        if weight.ndim != 2:
            raise Refuse(Reason.CHANNEL_AXIS_MISMATCH, f"MatMul right-hand side has rank {weight.ndim}")
        if not axis_checked:
            left_rank = view.rank(matmul.input[0])
            if left_rank != 2:
                shown = "unknown" if left_rank is None else str(left_rank)
                raise Refuse(
                    Reason.CHANNEL_AXIS_MISMATCH,
                    f"MatMul output rank is {shown}, not 2: BN axis 1 is not its column axis",
                )
        require_channels(weight.shape[1], params.channels, "MatMul has {} output columns")
        if bias is not None and (
            bias.ndim > 2 or bias.dtype != weight.dtype or not _broadcasts_to_columns(bias, params.channels)
        ):
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"bias shape {bias.shape} / dtype {bias.dtype}")
        new_weight, new_bias = fold_output_side(
            weight, bias, params.affine, WeightLayout.MATRIX_IN_OUT, keep_exact=keep_exact
        )
        label = matmul.name or "MatMul"
        names = {1: f"{label}_folded_weight"}
        if bias_add is None and not params.affine.shift.any():
            return OutputFold(matmul, {1: new_weight}, names)  # a pure scale: no bias to add
        if bias_add is None:
            return OutputFold(matmul, {1: new_weight}, names, new_bias=new_bias)
        return OutputFold(
            matmul, {1: new_weight}, names, bias_add=bias_add, bias_add_inputs={bias_slot: new_bias}
        )


CONV = ConvLayer()
CONV_TRANSPOSE = ConvTransposeLayer()
GEMM = GemmLayer()
MATMUL = MatMulLayer()


def write_output_fold(
    view: GraphIndex, fold: OutputFold, subject: NodeProto, tail: NodeProto | None = None
) -> NodeProto:
    """Write the folded constants, then let ``tail`` (the node ``subject`` reads: the layer, its bias
    Add, or a Reshape after it) take over the subject's output name, so nothing downstream changes;
    ``subject`` goes. A new bias becomes an ``Add`` where the subject was. Returns the layer."""
    layer = fold.layer
    label = layer.name or layer.op_type
    for slot, value in fold.new_inputs.items():
        view.set_constant_input(layer, slot, value, fold.names[slot])
    for name, value in fold.attributes.items():
        set_attribute(layer, name, value)
    for slot, value in fold.bias_add_inputs.items():
        view.set_constant_input(fold.bias_add, slot, value, f"{label}_folded_bias")
    tail = tail or fold.bias_add or layer
    if fold.new_bias is None:
        view.remove_node(subject)
        view.take_over_output(tail, 0, subject.output[0])
        return layer
    bias_name = view.add_constant(fold.new_bias, f"{label}_folded_bias")
    add = helper.make_node(
        "Add",
        [tail.output[0], bias_name],
        [subject.output[0]],
        name=view.context.fresh_name(f"{label}_bias_add"),
    )
    view.insert_node_at(add, replacing=subject)
    return layer
