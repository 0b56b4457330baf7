"""Fold rules for ONNX graphs: a BatchNormalization absorbed by the linear layer that feeds it.

Each rule answers ``accepts(graph, producer)`` (is this the kind of layer I handle?), then
``match(graph, bn, params)`` with either a :class:`Match` — the new weights, already computed and
rounded, so applying cannot fail — or a :class:`Refusal` the report shows. Checks read top to bottom
as refusals; the happy path is last. ``RULES`` is the registry, in the order rules are tried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, helper, numpy_helper

from bnfold.affine import (
    WeightLayout,
    fold_bias,
    is_supported_float,
    output_channel_count,
    round_scaled_output_channels,
    round_to_dtype,
)
from bnfold.onnx.batchnorm import BatchNormParams, Refusal
from bnfold.onnx.graph import DEFAULT_DOMAINS, GraphIndex
from bnfold.report import Reason

__all__ = ["Match", "Rule", "ConvThenBN", "ConvTransposeThenBN", "GemmThenBN", "MatMulThenBN", "RULES"]


@dataclass
class Match:
    """Everything a fold writes: the layer, its new constant inputs by slot, attribute updates."""

    producer: NodeProto
    new_inputs: dict[int, np.ndarray]
    attributes: dict[str, float | int] = field(default_factory=dict)
    # MatMul -> Add -> BN: the Add, and its constant inputs by slot (the folded bias).
    bias_add: NodeProto | None = None
    bias_add_inputs: dict[int, np.ndarray] = field(default_factory=dict)
    # MatMul without a bias gets one: an Add node of this value takes over the BN's output.
    new_bias: np.ndarray | None = None


def _attribute(node: NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _set_attribute(node: NodeProto, name: str, value) -> None:
    for position, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[position]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _sole_consumer_refusal(
    graph: GraphIndex, tensor: str, reader: NodeProto, *, shape_readers_ok: bool = False
) -> Refusal | None:
    """Refuse when anything besides ``reader`` sees ``tensor``: it would see the folded values.

    With ``shape_readers_ok``, ``Shape``/``Size`` readers are allowed: they see only the shape, which a
    fold that keeps ``tensor``'s name (one through a Reshape) leaves as it is.
    """
    if graph.is_graph_output(tensor):
        return Refusal(Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"`{tensor}` is a graph output")
    others = graph.other_consumers(tensor, reader)
    if shape_readers_ok:
        others = [
            node
            for node in others
            if not (node.op_type in ("Shape", "Size") and node.domain in DEFAULT_DOMAINS)
        ]
    if others:
        labels = ", ".join(graph.node_label(node) for node in others[:3])
        return Refusal(Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"`{tensor}` also feeds {labels}")
    return None


def _constant_input(graph: GraphIndex, node: NodeProto, slot: int, role: str) -> np.ndarray | Refusal | None:
    """The constant at ``node.input[slot]``; None when the optional input is absent."""
    if slot >= len(node.input) or not node.input[slot]:
        return None
    lookup = graph.constant(node.input[slot])
    if not lookup.is_constant:
        reason = (
            Reason.PARAM_IS_GRAPH_INPUT
            if lookup.reason is Reason.PARAM_IS_GRAPH_INPUT
            else Reason.WEIGHT_NOT_CONSTANT
        )
        return Refusal(reason, f"{role} of {graph.node_label(node)}: {lookup.detail}")
    if not is_supported_float(lookup.value.dtype):
        return Refusal(Reason.UNSUPPORTED_DTYPE, f"{role} is {lookup.value.dtype.name}")
    return lookup.value


def _broadcasts_to_columns(bias: np.ndarray, columns: int) -> bool:
    """Whether a bias broadcasts against a ``[rows, columns]`` output (its last axis is 1 or ``columns``)."""
    return bias.ndim == 0 or bias.shape[-1] in (1, columns)


def _layer_constants(
    rule: Rule, graph: GraphIndex, bn: NodeProto, producer: NodeProto, weight_role: str, bias_role: str
) -> tuple[np.ndarray, np.ndarray | None] | Refusal:
    """The layer's constant weight (input 1) and optional bias (input 2), once the BN is its only reader."""
    refusal = rule.output_refusal(graph, bn, producer.output[0])
    if refusal:
        return refusal
    weight = _constant_input(graph, producer, 1, weight_role)
    if weight is None or isinstance(weight, Refusal):
        return weight or Refusal(Reason.WEIGHT_NOT_CONSTANT, f"{producer.op_type} has no {weight_role} input")
    bias = _constant_input(graph, producer, 2, bias_role)
    if isinstance(bias, Refusal):
        return bias
    return weight, bias


def _folded(
    weight: np.ndarray,
    bias: np.ndarray | None,
    params: BatchNormParams,
    layout: WeightLayout,
    *,
    groups: int = 1,
    bias_multiplier: float = 1.0,
    keep_exact: bool = False,
) -> tuple[np.ndarray, np.ndarray] | Refusal:
    """New weight and bias in float64, rounded once into the weight's dtype; refused if not finite.

    ``keep_exact``: the results carry their float64 values, for a fold that may follow
    (:meth:`GraphIndex.may_fold_again`).
    """
    # A scale the weights' dtype cannot hold (e.g. over 65504 for float16 weights with float32
    # statistics) is degenerate even where the folded weights happen to fit: keep the BN.
    if round_to_dtype(params.affine.scale, weight.dtype) is None:
        return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, f"BatchNormalization scale overflows {weight.dtype.name}")
    scale = params.affine.scale
    new_weight = round_scaled_output_channels(weight, scale, layout, groups, keep_exact=keep_exact)
    bias64 = fold_bias(bias, params.affine, bias_multiplier)
    new_bias = round_to_dtype(bias64, weight.dtype, keep_exact=keep_exact)
    for role, value in (("weight", new_weight), ("bias", new_bias)):
        if value is None:
            return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, f"folded {role} overflows {weight.dtype.name}")
    return new_weight, new_bias


def gemm_folded_bias_attributes(graph: GraphIndex) -> dict[str, float | int]:
    """Gemm attributes once C holds the whole folded bias: ``beta = 1`` (and ``broadcast`` before opset 7)."""
    attributes: dict[str, float | int] = {"beta": 1.0}
    if (graph.context.opset or 0) < 7:
        attributes["broadcast"] = 1  # Gemm-6 and older broadcast C only when asked
    return attributes


class Rule:
    """Base of the fold rules; subclasses set ``name``, ``op_types`` and implement ``match``."""

    name: str = ""
    op_types: tuple[str, ...] = ()
    description: str = ""
    # "producer": folds into the layer that feeds the node; "consumer": into the layer it feeds
    # (bnfold.onnx.rules_input_side); "standalone": rewrites a BN nothing absorbed (opt-in).
    side: str = "producer"
    # The op types this rule removes (Mul/Add for the affine-chain rules in bnfold.onnx.rules_affine).
    absorbs: tuple[str, ...] = ("BatchNormalization",)

    def producer_of(self, graph: GraphIndex, bn: NodeProto) -> NodeProto | None:
        return graph.producer.get(bn.input[0]) if bn.input else None

    def accepts(self, graph: GraphIndex, producer: NodeProto) -> bool:
        return producer.op_type in self.op_types and producer.domain in DEFAULT_DOMAINS

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        raise NotImplementedError

    def output_refusal(self, graph: GraphIndex, bn: NodeProto, tensor: str) -> Refusal | None:
        """Why folding into the layer that writes ``tensor`` would change what another reader sees.

        Here the BN must be its only reader. Rules that fold through a Reshape between the layer and
        the BN (bnfold.onnx.rules_reshape) override this and :meth:`tail`.
        """
        return _sole_consumer_refusal(graph, tensor, bn)

    def tail(self, graph: GraphIndex, bn: NodeProto, layer: NodeProto) -> NodeProto:
        """The node whose output the BN reads once ``layer`` is folded: it takes over the BN's output."""
        return layer

    def bypass(self, graph: GraphIndex, bn: NodeProto, layer: NodeProto) -> None:
        """Remove the BN; the node it read from takes over its output name, so nothing downstream changes."""
        tail = self.tail(graph, bn, layer)
        graph.remove_node(bn)
        graph.take_over_output(tail, 0, bn.output[0])

    def apply(self, graph: GraphIndex, bn: NodeProto, match: Match) -> NodeProto:
        """Write the folded constants, then let the layer take over the BN's output name."""
        producer = match.producer
        label = producer.name or producer.op_type
        for slot, value in match.new_inputs.items():
            graph.set_constant_input(producer, slot, value, f"{label}_folded_{slot}")
        for name, value in match.attributes.items():
            _set_attribute(producer, name, value)
        self.bypass(graph, bn, producer)
        return producer


class _OutputChannelRule(Rule):
    """Conv and ConvTranspose: scale output channels of ``W``, fold into bias ``B`` (slot 2)."""

    layout: WeightLayout

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        producer = self.producer_of(graph, bn)
        constants = _layer_constants(self, graph, bn, producer, "weight", "bias")
        if isinstance(constants, Refusal):
            return constants
        weight, bias = constants
        groups = int(_attribute(producer, "group", 1))
        # Shapes the checker lets through but the operator forbids: the arithmetic below assumes
        # a weight of rank >= 3 whose first axis splits into ``group`` equal parts.
        if weight.ndim < 3:
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"weight has rank {weight.ndim}, expected 3 or more")
        if groups < 1 or weight.shape[0] % groups:
            detail = f"group={groups} does not divide weight shape {list(weight.shape)}"
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, detail)
        channels = output_channel_count(weight.shape, self.layout, groups)
        if channels != params.channels:
            return Refusal(
                Reason.PARAM_SHAPE_MISMATCH,
                f"layer has {channels} output channels, BatchNormalization has {params.channels}",
            )
        if bias is not None and bias.shape != (channels,):
            detail = f"bias shape {list(bias.shape)}, expected [{channels}]"
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, detail)
        again = graph.may_fold_again(bn.output[0])
        folded = _folded(weight, bias, params, self.layout, groups=groups, keep_exact=again)
        if isinstance(folded, Refusal):
            return folded
        return Match(producer, {1: folded[0], 2: folded[1]})


class ConvThenBN(_OutputChannelRule):
    """Conv (any rank, groups, strides, dilations, pads, bias or not) followed by BN.

    Before:  x -Conv(W, b)-> c -BN-> y      After:  x -Conv(W*s, b*s + t)-> y
    """

    name = "conv-bn"
    op_types = ("Conv",)
    layout = WeightLayout.CONV
    description = "Conv -> BatchNormalization: scale output channels, fold into bias"


class ConvTransposeThenBN(_OutputChannelRule):
    """ConvTranspose followed by BN; the weight is ``[C_in, C_out/group, k...]``, groups respected."""

    name = "convtranspose-bn"
    op_types = ("ConvTranspose",)
    layout = WeightLayout.CONV_TRANSPOSE
    description = "ConvTranspose -> BatchNormalization: scale output channels per group"


class GemmThenBN(Rule):
    """Gemm ``alpha * A' B' + beta * C`` followed by BN over its 2-D output's channel axis 1.

    After:  B' scaled per output column, ``C = beta * C * s + t`` and ``beta = 1``; ``alpha``,
    ``transA`` and ``transB`` are respected, any broadcastable ``C`` or none.
    """

    name = "gemm-bn"
    op_types = ("Gemm",)
    description = "Gemm -> BatchNormalization: scale B's output columns, fold beta*C into bias"

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        producer = self.producer_of(graph, bn)
        constants = _layer_constants(self, graph, bn, producer, "B", "C")
        if isinstance(constants, Refusal):
            return constants
        weight, bias = constants
        layout = (
            WeightLayout.MATRIX_OUT_IN if _attribute(producer, "transB", 0) else WeightLayout.MATRIX_IN_OUT
        )
        if weight.ndim != 2:
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"Gemm B has rank {weight.ndim}, expected 2")
        channels = output_channel_count(weight.shape, layout)
        if channels != params.channels:
            return Refusal(
                Reason.PARAM_SHAPE_MISMATCH,
                f"Gemm has {channels} output columns, BatchNormalization has {params.channels}",
            )
        if bias is not None and (bias.ndim > 2 or not _broadcasts_to_columns(bias, channels)):
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"Gemm C shape {list(bias.shape)}")
        beta = float(_attribute(producer, "beta", 1.0))
        again = graph.may_fold_again(bn.output[0])
        folded = _folded(weight, bias, params, layout, bias_multiplier=beta, keep_exact=again)
        if isinstance(folded, Refusal):
            return folded
        attributes = gemm_folded_bias_attributes(graph)
        return Match(producer, {1: folded[0], 2: folded[1]}, attributes)


class MatMulThenBN(Rule):
    """MatMul with a constant 2-D right-hand side (optionally then Add of a constant bias), then BN.

    Exact only when the BN's channel axis (axis 1) is the MatMul output's last axis, i.e. the output
    is 2-D; higher ranks are refused. Without a bias, the BN becomes an ``Add`` of the folded shift.
    """

    name = "matmul-bn"
    op_types = ("MatMul", "Add")
    description = "MatMul [-> Add] -> BatchNormalization on 2-D outputs: scale columns, fold bias"

    def accepts(self, graph: GraphIndex, producer: NodeProto) -> bool:
        if producer.domain not in DEFAULT_DOMAINS:
            return False
        if producer.op_type == "MatMul":
            return True
        return producer.op_type == "Add" and self._matmul_behind_add(graph, producer) is not None

    @staticmethod
    def _matmul_behind_add(graph: GraphIndex, add: NodeProto) -> tuple[NodeProto, int] | None:
        """(MatMul, slot of the bias in the Add) when one Add input is a MatMul, the other constant."""
        for matmul_slot, bias_slot in ((0, 1), (1, 0)):
            if len(add.input) != 2:
                return None
            matmul = graph.producer.get(add.input[matmul_slot])
            if matmul is not None and matmul.op_type == "MatMul" and matmul.domain in DEFAULT_DOMAINS:
                if graph.constant(add.input[bias_slot]).is_constant:
                    return matmul, bias_slot
        return None

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        head = self.producer_of(graph, bn)
        refusal = self.output_refusal(graph, bn, head.output[0])
        if refusal:
            return refusal
        bias_add, bias, bias_slot = None, None, None
        matmul = head
        if head.op_type == "Add":
            matmul, bias_slot = self._matmul_behind_add(graph, head)
            bias_add = head
            refusal = _sole_consumer_refusal(graph, matmul.output[0], head)
            if refusal:
                return refusal
            bias = _constant_input(graph, head, bias_slot, "bias")
            if isinstance(bias, Refusal):
                return bias
        weight = _constant_input(graph, matmul, 1, "right-hand side")
        if weight is None or isinstance(weight, Refusal):
            return weight or Refusal(Reason.WEIGHT_NOT_CONSTANT, "MatMul has no right-hand side")
        if weight.ndim != 2:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"MatMul right-hand side has rank {weight.ndim}")
        refusal = self.channel_axis_refusal(graph, matmul)
        if refusal:
            return refusal
        if weight.shape[1] != params.channels:
            return Refusal(
                Reason.PARAM_SHAPE_MISMATCH,
                f"MatMul has {weight.shape[1]} output columns, BatchNormalization has {params.channels}",
            )
        if bias is not None and (
            bias.ndim > 2 or bias.dtype != weight.dtype or not _broadcasts_to_columns(bias, params.channels)
        ):
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"bias shape {bias.shape} / dtype {bias.dtype}")
        again = graph.may_fold_again(bn.output[0])
        folded = _folded(weight, bias, params, WeightLayout.MATRIX_IN_OUT, keep_exact=again)
        if isinstance(folded, Refusal):
            return folded
        new_weight, new_bias = folded
        if bias_add is None and not params.affine.shift.any():
            return Match(matmul, {1: new_weight})  # a pure scale (e.g. a folded Mul): no bias to add
        if bias_add is None:
            return Match(matmul, {1: new_weight}, new_bias=new_bias)
        return Match(matmul, {1: new_weight}, bias_add=bias_add, bias_add_inputs={bias_slot: new_bias})

    def channel_axis_refusal(self, graph: GraphIndex, matmul: NodeProto) -> Refusal | None:
        """BN axis 1 is the MatMul's column axis only when its output is 2-D."""
        left_rank = graph.rank(matmul.input[0])
        if left_rank == 2:
            return None
        shown = "unknown" if left_rank is None else str(left_rank)
        return Refusal(
            Reason.CHANNEL_AXIS_MISMATCH,
            f"MatMul output rank is {shown}, not 2: BN axis 1 is not its column axis",
        )

    def apply(self, graph: GraphIndex, bn: NodeProto, match: Match) -> NodeProto:
        matmul = match.producer
        label = matmul.name or "MatMul"
        graph.set_constant_input(matmul, 1, match.new_inputs[1], f"{label}_folded_weight")
        if match.bias_add is not None:
            for slot, value in match.bias_add_inputs.items():
                graph.set_constant_input(match.bias_add, slot, value, f"{label}_folded_bias")
            self.bypass(graph, bn, match.bias_add)
            return matmul
        if match.new_bias is None:
            self.bypass(graph, bn, matmul)
            return matmul
        bias_name = graph.context.fresh_name(f"{label}_folded_bias")
        graph.graph.initializer.append(numpy_helper.from_array(match.new_bias, bias_name))
        graph.initializers[bias_name] = graph.graph.initializer[-1]
        add = helper.make_node(
            "Add",
            [self.tail(graph, bn, matmul).output[0], bias_name],
            [bn.output[0]],
            name=graph.context.fresh_name(f"{label}_bias_add"),
        )
        graph.insert_node_at(add, replacing=bn)
        return matmul


# The other rule families live in their own modules and build on the helpers above, so they are
# imported here, once those exist; RULES stays the one explicit registry, in the order rules are tried.
from bnfold.onnx.rules_affine import (  # noqa: E402
    ConvThenAffine,
    ConvTransposeThenAffine,
    GemmThenAffine,
    MatMulThenAffine,
)
from bnfold.onnx.rules_branches import BranchMerge  # noqa: E402
from bnfold.onnx.rules_input_side import BNThenConv, BNThenConvTranspose, BNThenGemm, BNThenMatMul  # noqa: E402
from bnfold.onnx.rules_reshape import ConvReshapeBN, GemmReshapeBN, MatMulReshapeBN  # noqa: E402
from bnfold.onnx.rules_standalone import BNToAffine  # noqa: E402

RULES: tuple[Rule, ...] = (
    # BN -> the layer before it (output channels)
    ConvThenBN(),
    ConvTransposeThenBN(),
    GemmThenBN(),
    MatMulThenBN(),
    # ... through a channel-preserving Reshape/Flatten between the layer and the BN
    ConvReshapeBN(),
    GemmReshapeBN(),
    MatMulReshapeBN(),
    # BN -> the layer after it (input channels), tried when no producer-side rule folds it
    BNThenConv(),
    BNThenConvTranspose(),
    BNThenGemm(),
    BNThenMatMul(),
    # per-channel Mul/Add after a layer (affine chains from other exporters)
    ConvThenAffine(),
    ConvTransposeThenAffine(),
    GemmThenAffine(),
    MatMulThenAffine(),
    # Add of parallel Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet)
    BranchMerge(),
    # a BN nothing absorbed -> Mul + Add, only with fold_onnx(rewrite_standalone=True)
    BNToAffine(),
)
