"""Fold rules on the other side of a BatchNormalization: into the linear layer that reads its output.

A BN in front of a linear layer (``BN -> Conv``, ``BN -> Gemm``, ``BN -> MatMul``) scales the
layer's *input* channels: ``layer(s * x + t) = layer'(x)`` with every weight tap that reads input
channel ``i`` multiplied by ``s[i]`` and a bias correction ``sum_{i,k} W[o, i, k] * t[i]`` per output
channel. The correction is one number per output channel only when every output position reads every
kernel tap from the real input: a zero-padded border would read ``0`` where the BN would have given
``t``. So a Conv after a BN folds only without padding, and a transposed conv only when it is a
per-pixel (1x1, stride 1) map.

The driver tries these rules when no rule on the BN's producer side folds it.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, helper, numpy_helper

from bnfold.affine import (
    WeightLayout,
    as_float64,
    input_channel_count,
    input_shift_bias,
    round_scaled_input_channels,
    round_to_dtype,
)
from bnfold.onnx.batchnorm import BatchNormParams, Refusal
from bnfold.onnx.graph import GraphIndex
from bnfold.onnx.rules import (
    Match,
    Rule,
    _attribute,
    _constant_input,
    _set_attribute,
    gemm_folded_bias_attributes,
)
from bnfold.report import Reason

__all__ = ["ConsumerRule", "BNThenConv", "BNThenConvTranspose", "BNThenGemm", "BNThenMatMul"]


def _auto_pad(node: NodeProto) -> str:
    value = _attribute(node, "auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


class ConsumerRule(Rule):
    """Base of the rules that fold a BN into the layer after it (the BN's output is the layer's input 0)."""

    side = "consumer"

    def consumer_of(self, graph: GraphIndex, bn: NodeProto) -> NodeProto | None:
        """The first live reader of the BN's output that this rule handles, reading it as its data input."""
        if not bn.output or not bn.output[0]:
            return None
        for node in graph.consumers.get(bn.output[0], []):
            if id(node) in graph.removed or not self.accepts(graph, node):
                continue
            if node.input and node.input[0] == bn.output[0]:
                return node
        return None

    def _layer(
        self, graph: GraphIndex, bn: NodeProto, weight_role: str, bias_role: str
    ) -> tuple[NodeProto, np.ndarray, np.ndarray | None] | Refusal:
        """The layer, its constant weight (input 1) and bias (input 2), if it alone reads the BN."""
        consumer = self.consumer_of(graph, bn)
        output = bn.output[0]
        if graph.is_graph_output(output):
            return Refusal(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"`{output}` is a graph output")
        others = graph.other_consumers(output, consumer)
        if others:
            labels = ", ".join(graph.node_label(node) for node in others[:3])
            return Refusal(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"`{output}` also feeds {labels}")
        weight = _constant_input(graph, consumer, 1, weight_role)
        if weight is None or isinstance(weight, Refusal):
            return weight or Refusal(Reason.WEIGHT_NOT_CONSTANT, f"{consumer.op_type} has no {weight_role}")
        bias = _constant_input(graph, consumer, 2, bias_role)
        if isinstance(bias, Refusal):
            return bias
        return consumer, weight, bias

    def apply(self, graph: GraphIndex, bn: NodeProto, match: Match) -> NodeProto:
        """Write the folded constants, then let the layer read the BN's input; the BN goes."""
        consumer = match.producer
        label = consumer.name or consumer.op_type
        for slot, value in match.new_inputs.items():
            graph.set_constant_input(consumer, slot, value, f"{label}_folded_{slot}")
        for name, value in match.attributes.items():
            _set_attribute(consumer, name, value)
        graph.replace_input(consumer, 0, bn.input[0])
        graph.remove_node(bn)
        return consumer


def _folded_input_side(
    weight: np.ndarray,
    bias: np.ndarray | None,
    params: BatchNormParams,
    layout: WeightLayout,
    *,
    groups: int = 1,
    bias_multiplier: float = 1.0,
    correction_multiplier: float = 1.0,
    bias_broadcasts: bool = False,
    keep_exact: bool = False,
) -> tuple[np.ndarray, np.ndarray] | Refusal:
    """``W * s`` along input channels and ``bias_multiplier * b + correction_multiplier * W t``.

    Both in float64 from the original weight, rounded once into the weight's dtype. The bias must
    have one value per output channel, or (``bias_broadcasts``, Gemm's C) broadcast against them.
    """
    correction = input_shift_bias(weight, params.affine.shift, layout, groups) * correction_multiplier
    if bias is not None and not _bias_fits(bias.shape, correction.shape, bias_broadcasts):
        return Refusal(
            Reason.PARAM_SHAPE_MISMATCH,
            f"bias has shape {list(bias.shape)}, the layer has {correction.shape[0]} output channels",
        )
    new_bias64 = correction if bias is None else as_float64(bias) * bias_multiplier + correction
    scale = params.affine.scale
    new_weight = round_scaled_input_channels(weight, scale, layout, groups, keep_exact=keep_exact)
    new_bias = round_to_dtype(new_bias64, weight.dtype, keep_exact=keep_exact)
    for role, value in (("weight", new_weight), ("bias", new_bias)):
        if value is None:
            return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, f"folded {role} overflows {weight.dtype.name}")
    return new_weight, new_bias


def _bias_fits(bias: tuple[int, ...], channels: tuple[int, ...], broadcasts: bool) -> bool:
    if not broadcasts:
        return bias == channels
    return len(bias) <= 2 and (not bias or bias[-1] in (1, channels[0]))


def _channel_refusal(layer: str, channels: int, params: BatchNormParams) -> Refusal | None:
    if channels == params.channels:
        return None
    return Refusal(
        Reason.PARAM_SHAPE_MISMATCH,
        f"{layer} reads {channels} input channels, BatchNormalization has {params.channels}",
    )


def _conv_input_side_match(
    graph: GraphIndex,
    conv: NodeProto,
    weight: np.ndarray,
    bias: np.ndarray | None,
    params: BatchNormParams,
    layout: WeightLayout,
) -> Match | Refusal:
    """The fold of a BN into a (transposed) conv whose geometry has been checked: channels, then math."""
    groups = int(_attribute(conv, "group", 1))
    refusal = _channel_refusal(conv.op_type, input_channel_count(weight.shape, layout, groups), params)
    if refusal:
        return refusal
    again = graph.may_fold_again(conv.output[0])
    folded = _folded_input_side(weight, bias, params, layout, groups=groups, keep_exact=again)
    if isinstance(folded, Refusal):
        return folded
    return Match(conv, {1: folded[0], 2: folded[1]})


class BNThenConv(ConsumerRule):
    """BN followed by a Conv without padding (any rank, groups, strides, dilations, bias or not).

    Before:  x -BN(s, t)-> n -Conv(W, b)-> y      After:  x -Conv(W*s, b + sum W*t)-> y
    Refuses: any non-zero pad or ``auto_pad`` SAME_* (the border would read 0, not ``t``).
    """

    name = "bn-conv"
    op_types = ("Conv",)
    description = "BatchNormalization -> Conv without padding: scale input channels, fold shift into bias"

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        layer = self._layer(graph, bn, "weight", "bias")
        if isinstance(layer, Refusal):
            return layer
        conv, weight, bias = layer
        auto_pad = _auto_pad(conv)
        pads = list(_attribute(conv, "pads", []))
        if auto_pad not in ("NOTSET", "VALID") or any(pads):
            shown = f"auto_pad={auto_pad}" if auto_pad not in ("NOTSET", "VALID") else f"pads={pads}"
            return Refusal(Reason.PADDING_AFTER_BN, f"{graph.node_label(conv)} has {shown}")
        if weight.ndim < 3:
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"Conv weight has rank {weight.ndim}")
        return _conv_input_side_match(graph, conv, weight, bias, params, WeightLayout.CONV)


class BNThenConvTranspose(ConsumerRule):
    """BN followed by a ConvTranspose that is a per-pixel map: every kernel dim 1, strides 1.

    Anything else adds a varying number of input values per output position (borders, the gaps a
    stride leaves, ``output_padding``), so the shift is not one bias per channel: refused.
    The weight is ``[C_in, C_out/group, k...]``: input channel ``i`` is axis 0.
    """

    name = "bn-convtranspose"
    op_types = ("ConvTranspose",)
    description = "BatchNormalization -> 1x1 stride-1 ConvTranspose: scale input channels, fold shift"

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        layer = self._layer(graph, bn, "weight", "bias")
        if isinstance(layer, Refusal):
            return layer
        deconv, weight, bias = layer
        if weight.ndim < 3:
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"ConvTranspose weight has rank {weight.ndim}")
        kernel = list(weight.shape[2:])
        strides = list(_attribute(deconv, "strides", []))
        output_padding = list(_attribute(deconv, "output_padding", []))
        has_output_shape = any(attribute.name == "output_shape" for attribute in deconv.attribute)
        if (
            any(k != 1 for k in kernel)
            or any(s != 1 for s in strides)
            or any(output_padding)
            or has_output_shape
        ):
            detail = f"kernel {kernel}, strides {strides or 1}, output_padding {output_padding or 0}"
            if has_output_shape:
                detail += ", output_shape set"
            return Refusal(Reason.UNEVEN_TAPS_AFTER_BN, f"{graph.node_label(deconv)}: {detail}")
        layout = WeightLayout.CONV_TRANSPOSE
        return _conv_input_side_match(graph, deconv, weight, bias, params, layout)


class BNThenGemm(ConsumerRule):
    """BN over a 2-D input's axis 1 followed by Gemm reading it as ``A`` with ``transA=0``.

    ``alpha * (A*s + t) B + beta * C = alpha * A (s B) + (beta * C + alpha * t B)``: the rows of ``B``
    (columns when ``transB=1``) are scaled, ``C`` becomes ``beta*C + alpha*t@B`` and ``beta = 1``.
    Refuses ``transA=1`` (the BN's axis 1 would be Gemm's row axis, not its input features).
    """

    name = "bn-gemm"
    op_types = ("Gemm",)
    description = "BatchNormalization -> Gemm (A side, transA=0): scale B's input rows, fold shift into C"

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        layer = self._layer(graph, bn, "B", "C")
        if isinstance(layer, Refusal):
            return layer
        gemm, weight, bias = layer
        if _attribute(gemm, "transA", 0):
            return Refusal(
                Reason.CHANNEL_AXIS_MISMATCH, "Gemm has transA=1: BN axis 1 is its row axis, not its features"
            )
        if weight.ndim != 2:
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"Gemm B has rank {weight.ndim}")
        if bias is not None and bias.ndim > 2:
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"Gemm C has rank {bias.ndim}")
        layout = WeightLayout.MATRIX_OUT_IN if _attribute(gemm, "transB", 0) else WeightLayout.MATRIX_IN_OUT
        refusal = _channel_refusal("Gemm", input_channel_count(weight.shape, layout), params)
        if refusal:
            return refusal
        folded = _folded_input_side(
            weight,
            bias,
            params,
            layout,
            bias_multiplier=float(_attribute(gemm, "beta", 1.0)),
            correction_multiplier=float(_attribute(gemm, "alpha", 1.0)),
            bias_broadcasts=True,
            keep_exact=graph.may_fold_again(gemm.output[0]),
        )
        if isinstance(folded, Refusal):
            return folded
        attributes = gemm_folded_bias_attributes(graph)
        return Match(gemm, {1: folded[0], 2: folded[1]}, attributes)


class BNThenMatMul(ConsumerRule):
    """BN over a 2-D input's axis 1 followed by MatMul with a constant 2-D right-hand side.

    The rows of the right-hand side are scaled; the shift's contribution ``t @ W`` becomes an ``Add``
    after the MatMul (none when the shift is zero). Refuses other ranks: BN's axis 1 is the
    contracted axis only when the input is 2-D.
    """

    name = "bn-matmul"
    op_types = ("MatMul",)
    description = "BatchNormalization -> MatMul on 2-D inputs: scale right-hand side rows, add the shift"

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        layer = self._layer(graph, bn, "right-hand side", "unused")
        if isinstance(layer, Refusal):
            return layer
        matmul, weight, _ = layer
        if weight.ndim != 2:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"MatMul right-hand side has rank {weight.ndim}")
        rank = graph.rank(bn.input[0])
        if rank != 2:
            shown = "unknown" if rank is None else str(rank)
            return Refusal(
                Reason.CHANNEL_AXIS_MISMATCH,
                f"BatchNormalization input rank is {shown}, not 2: axis 1 is not MatMul's contracted axis",
            )
        refusal = _channel_refusal("MatMul", weight.shape[0], params)
        if refusal:
            return refusal
        folded = _folded_input_side(weight, None, params, WeightLayout.MATRIX_IN_OUT)
        if isinstance(folded, Refusal):
            return folded
        new_weight, new_bias = folded
        bias = new_bias if params.affine.shift.any() else None
        return Match(matmul, {1: new_weight}, new_bias=bias)

    def apply(self, graph: GraphIndex, bn: NodeProto, match: Match) -> NodeProto:
        matmul = super().apply(graph, bn, match)
        if match.new_bias is None:
            return matmul
        label = matmul.name or "MatMul"
        output = matmul.output[0]
        inner = graph.context.fresh_name(f"{label}_unbiased")
        graph.take_over_output(matmul, 0, inner)
        bias_name = graph.context.fresh_name(f"{label}_folded_bias")
        graph.graph.initializer.append(numpy_helper.from_array(match.new_bias, bias_name))
        graph.initializers[bias_name] = graph.graph.initializer[-1]
        add = helper.make_node(
            "Add", [inner, bias_name], [output], name=graph.context.fresh_name(f"{label}_bias_add")
        )
        graph.insert_node_after(add, matmul)
        return matmul
