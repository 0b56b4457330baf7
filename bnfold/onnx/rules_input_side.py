"""Norm-then-layer rules: a BatchNormalization folded into the linear layer that reads its output.

A BN in front of a linear layer (``BN -> Conv``, ``BN -> Gemm``, ``BN -> MatMul``) scales the
layer's *input* channels: ``layer(s * x + t) = layer'(x)`` with every weight tap that reads input
channel ``i`` multiplied by ``s[i]`` and a bias correction ``sum_{i,k} W[o, i, k] * t[i]`` per output
channel (:func:`bnfold.folds.fold_input_side`). The correction is one number per output channel only
when every output position reads every kernel tap from the real input: a zero-padded border would
read ``0`` where the BN would have given ``t``. So a Conv after a BN folds only without padding, and
a transposed conv only when it is a per-pixel (1x1, stride 1) map.

The driver tries these rules when no rule on the BN's producer side folds it (they come later in
the rule table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import NodeProto, helper

from bnfold.affine import WeightLayout, input_channel_count
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import NormThenLayer
from bnfold.folds import fold_input_side, require_channels
from bnfold.onnx.batchnorm import NormParams
from bnfold.onnx.checks import constant_input, require_norm_output_sole_reader, required_constant_input
from bnfold.onnx.layers import gemm_folded_bias_attributes
from bnfold.onnx.nodes import attribute, auto_pad, is_op, set_attribute
from bnfold.onnx.view import OnnxView
from bnfold.report import Reason

__all__ = ["InputFold", "BNThenLayer", "BNThenConv", "BNThenConvTranspose", "BNThenGemm", "BNThenMatMul"]


@dataclass
class InputFold:
    """What an input-side fold writes: the layer's new constants by slot, attributes, and (MatMul)
    a bias to add after it."""

    layer: NodeProto
    norm: NodeProto
    new_inputs: dict[int, np.ndarray]
    attributes: dict[str, Any] = field(default_factory=dict)
    new_bias: np.ndarray | None = None


class BNThenLayer:
    """Base of the norm-then-layer rules: find the layer reading the BN's output as its data input,
    check what every layer shares, and write the plan; subclasses plan their layer kind."""

    site = NormThenLayer
    name = ""
    op_type = ""
    weight_role = "weight"
    bias_role = "bias"

    def find(self, view: OnnxView, node: NodeProto) -> NormThenLayer | None:
        """The first live reader of the BN's output of this kind, reading it as its data input."""
        if not view.is_norm(node) or not node.output or not node.output[0]:
            return None
        for reader in view.live_consumers(node.output[0]):
            if is_op(reader, self.op_type) and reader.input and reader.input[0] == node.output[0]:
                return NormThenLayer(norm=node, layer=reader)
        return None

    def plan(self, view: OnnxView, site: NormThenLayer) -> InputFold:
        bn, layer = site.norm, site.layer
        require_norm_output_sole_reader(view, bn, layer)
        weight = required_constant_input(view, layer, 1, self.weight_role)
        bias = constant_input(view, layer, 2, self.bias_role)
        return self.plan_layer(view, bn, layer, weight, bias, view.norm_params(bn))

    def plan_layer(
        self,
        view: OnnxView,
        bn: NodeProto,
        layer: NodeProto,
        weight: np.ndarray,
        bias: np.ndarray | None,
        params: NormParams,
    ) -> InputFold:
        raise NotImplementedError

    def apply(self, view: OnnxView, plan: InputFold) -> Applied:
        """Write the folded constants, then let the layer read the BN's input; the BN goes."""
        layer, bn = plan.layer, plan.norm
        label = layer.name or layer.op_type
        for slot, value in plan.new_inputs.items():
            view.set_constant_input(layer, slot, value, f"{label}_folded_{slot}")
        for name, value in plan.attributes.items():
            set_attribute(layer, name, value)
        view.replace_input(layer, 0, bn.input[0])
        view.remove_node(bn)
        if plan.new_bias is not None:
            output = layer.output[0]
            inner = view.context.fresh_name(f"{label}_unbiased")
            view.take_over_output(layer, 0, inner)
            bias_name = view.add_constant(plan.new_bias, f"{label}_folded_bias")
            add = helper.make_node(
                "Add", [inner, bias_name], [output], name=view.context.fresh_name(f"{label}_bias_add")
            )
            view.insert_node_after(add, layer)
        return Applied(layer)


def _conv_plan(
    view: OnnxView,
    bn: NodeProto,
    conv: NodeProto,
    weight: np.ndarray,
    bias: np.ndarray | None,
    params: NormParams,
    layout: WeightLayout,
) -> InputFold:
    """The fold of a BN into a (transposed) conv whose geometry has been checked: channels, then math."""
    groups = int(attribute(conv, "group", 1))
    channels = input_channel_count(weight.shape, layout, groups)
    require_channels(channels, params.channels, f"{conv.op_type} reads {{}} input channels")
    keep_exact = view.may_fold_again(conv.output[0])
    new_weight, new_bias = fold_input_side(
        weight, bias, params.affine, layout, groups=groups, keep_exact=keep_exact
    )
    return InputFold(conv, bn, {1: new_weight, 2: new_bias})


class BNThenConv(BNThenLayer):
    """BN followed by a Conv without padding (any rank, groups, strides, dilations, bias or not).

    Before:  x -BN(s, t)-> n -Conv(W, b)-> y      After:  x -Conv(W*s, b + sum W*t)-> y
    Refuses: any non-zero pad or ``auto_pad`` SAME_* (the border would read 0, not ``t``).
    """

    name = "bn-conv"
    op_type = "Conv"

    def plan_layer(
        self,
        view: OnnxView,
        bn: NodeProto,
        layer: NodeProto,
        weight: np.ndarray,
        bias: np.ndarray | None,
        params: NormParams,
    ) -> InputFold:
        padding = auto_pad(layer)
        pads = list(attribute(layer, "pads", []))
        if padding not in ("NOTSET", "VALID") or any(pads):
            shown = f"auto_pad={padding}" if padding not in ("NOTSET", "VALID") else f"pads={pads}"
            raise Refuse(Reason.PADDING_AFTER_BN, f"{view.node_label(layer)} has {shown}")
        if weight.ndim < 3:
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"Conv weight has rank {weight.ndim}")
        return _conv_plan(view, bn, layer, weight, bias, params, WeightLayout.CONV)


class BNThenConvTranspose(BNThenLayer):
    """BN followed by a ConvTranspose that is a per-pixel map: every kernel dim 1, strides 1.

    Anything else adds a varying number of input values per output position (borders, the gaps a
    stride leaves, ``output_padding``), so the shift is not one bias per channel: refused.
    The weight is ``[C_in, C_out/group, k...]``: input channel ``i`` is axis 0.
    """

    name = "bn-convtranspose"
    op_type = "ConvTranspose"

    def plan_layer(
        self,
        view: OnnxView,
        bn: NodeProto,
        layer: NodeProto,
        weight: np.ndarray,
        bias: np.ndarray | None,
        params: NormParams,
    ) -> InputFold:
        if weight.ndim < 3:
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"ConvTranspose weight has rank {weight.ndim}")
        kernel = list(weight.shape[2:])
        strides = list(attribute(layer, "strides", []))
        output_padding = list(attribute(layer, "output_padding", []))
        has_output_shape = any(entry.name == "output_shape" for entry in layer.attribute)
        if (
            any(k != 1 for k in kernel)
            or any(s != 1 for s in strides)
            or any(output_padding)
            or has_output_shape
        ):
            detail = f"kernel {kernel}, strides {strides or 1}, output_padding {output_padding or 0}"
            if has_output_shape:
                detail += ", output_shape set"
            raise Refuse(Reason.UNEVEN_TAPS_AFTER_BN, f"{view.node_label(layer)}: {detail}")
        return _conv_plan(view, bn, layer, weight, bias, params, WeightLayout.CONV_TRANSPOSE)


class BNThenGemm(BNThenLayer):
    """BN over a 2-D input's axis 1 followed by Gemm reading it as ``A`` with ``transA=0``.

    ``alpha * (A*s + t) B + beta * C = alpha * A (s B) + (beta * C + alpha * t B)``: the rows of ``B``
    (columns when ``transB=1``) are scaled, ``C`` becomes ``beta*C + alpha*t@B`` and ``beta = 1``.
    Refuses ``transA=1`` (the BN's axis 1 would be Gemm's row axis, not its input features).
    """

    name = "bn-gemm"
    op_type = "Gemm"
    weight_role = "B"
    bias_role = "C"

    def plan_layer(
        self,
        view: OnnxView,
        bn: NodeProto,
        layer: NodeProto,
        weight: np.ndarray,
        bias: np.ndarray | None,
        params: NormParams,
    ) -> InputFold:
        if attribute(layer, "transA", 0):
            raise Refuse(
                Reason.CHANNEL_AXIS_MISMATCH, "Gemm has transA=1: BN axis 1 is its row axis, not its features"
            )
        if weight.ndim != 2:
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"Gemm B has rank {weight.ndim}")
        if bias is not None and bias.ndim > 2:
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"Gemm C has rank {bias.ndim}")
        layout = WeightLayout.MATRIX_OUT_IN if attribute(layer, "transB", 0) else WeightLayout.MATRIX_IN_OUT
        require_channels(
            input_channel_count(weight.shape, layout), params.channels, "Gemm reads {} input channels"
        )
        new_weight, new_bias = fold_input_side(
            weight,
            bias,
            params.affine,
            layout,
            bias_multiplier=float(attribute(layer, "beta", 1.0)),
            correction_multiplier=float(attribute(layer, "alpha", 1.0)),
            bias_broadcasts=True,
            keep_exact=view.may_fold_again(layer.output[0]),
        )
        return InputFold(layer, bn, {1: new_weight, 2: new_bias}, gemm_folded_bias_attributes(view))


class BNThenMatMul(BNThenLayer):
    """BN over a 2-D input's axis 1 followed by MatMul with a constant 2-D right-hand side.

    The rows of the right-hand side are scaled; the shift's contribution ``t @ W`` becomes an ``Add``
    after the MatMul (none when the shift is zero). Refuses other ranks: BN's axis 1 is the
    contracted axis only when the input is 2-D.
    """

    name = "bn-matmul"
    op_type = "MatMul"
    weight_role = "right-hand side"

    def plan(self, view: OnnxView, site: NormThenLayer) -> InputFold:
        bn, layer = site.norm, site.layer
        require_norm_output_sole_reader(view, bn, layer)
        weight = required_constant_input(view, layer, 1, self.weight_role)
        params = view.norm_params(bn)
        if weight.ndim != 2:
            raise Refuse(Reason.CHANNEL_AXIS_MISMATCH, f"MatMul right-hand side has rank {weight.ndim}")
        rank = view.rank(bn.input[0])
        if rank != 2:
            shown = "unknown" if rank is None else str(rank)
            raise Refuse(
                Reason.CHANNEL_AXIS_MISMATCH,
                f"BatchNormalization input rank is {shown}, not 2: axis 1 is not MatMul's contracted axis",
            )
        require_channels(weight.shape[0], params.channels, "MatMul reads {} input channels")
        new_weight, new_bias = fold_input_side(weight, None, params.affine, WeightLayout.MATRIX_IN_OUT)
        bias = new_bias if params.affine.shift.any() else None
        return InputFold(layer, bn, {1: new_weight}, new_bias=bias)
