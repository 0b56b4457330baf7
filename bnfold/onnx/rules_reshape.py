"""Fold rules through a Reshape or Flatten between a linear layer and its BatchNormalization.

LeViT's ``Linear + BatchNorm1d`` runs the BN over the flattened tokens:
``bn(linear(x).flatten(0, 1)).reshape_as(...)``, which exports as
``MatMul [-> Add] -> Flatten/Reshape([B*N, C]) -> BN -> Reshape``. Reshapes only renumber elements in
row-major order, so the BN still scales every element by its own layer channel's factor exactly when
its channel axis (axis 1) maps one-to-one onto the layer's output channels:

- the BN input's axis 1 has the layer's channel count ``C``, and
- the BN input's axes after axis 1 hold as many elements as the layer output's axes after its channel
  axis (none for MatMul and Gemm, whose channels are the last axis; ``H*W`` for a Conv).

Then every flat position ``f`` is in layer channel ``(f // inner) mod C`` and BN channel
``(f // inner) mod C`` alike. The rules check that on the sizes, symbolically where they are unknown
(``[B, N, C] -> Reshape([-1, C])`` folds without knowing ``B`` or ``N``), and refuse with
``reshape-not-channel-preserving`` where it does not hold or cannot be shown (``Conv [N, C, H, W] ->
Flatten`` with ``H*W > 1`` is a BN per element of ``C*H*W``: the BN-then-Gemm rule may fold that one
into the layer after it instead). The fold is the same one the rules in :mod:`bnfold.onnx.rules` make;
the Reshape stays and takes over the BN's output name.
"""

from __future__ import annotations

from math import prod

import numpy as np
from onnx import NodeProto

from bnfold.onnx.batchnorm import BatchNormParams, Refusal
from bnfold.onnx.graph import DEFAULT_DOMAINS, GraphIndex
from bnfold.onnx.rules import (
    ConvThenBN,
    GemmThenBN,
    Match,
    MatMulThenBN,
    Rule,
    _attribute,
    _sole_consumer_refusal,
)
from bnfold.report import Reason

__all__ = ["ThroughReshape", "ConvReshapeBN", "GemmReshapeBN", "MatMulReshapeBN"]

RESHAPE_OPS = ("Reshape", "Flatten")

# A size as ``coefficient * product of symbols``: symbols are named dims (``dim_param``) or axes of
# unknown size, so ``[-1, C]`` of ``[B, N, C]`` is ``[B*N, C]`` without knowing ``B`` or ``N``.
Size = tuple[int, tuple[str, ...]]


def _product(sizes: list[Size]) -> Size:
    symbols = tuple(sorted(symbol for _, names in sizes for symbol in names))
    return prod(coefficient for coefficient, _ in sizes), symbols


def _quotient(total: Size, part: Size) -> Size | None:
    """``total / part`` when it is a size for every value of the symbols, else None."""
    remaining = list(total[1])
    for symbol in part[1]:
        if symbol not in remaining:
            return None
        remaining.remove(symbol)
    if part[0] == 0 or total[0] % part[0]:
        return None
    return total[0] // part[0], tuple(remaining)


def _shown(size: Size | None) -> str:
    if size is None:
        return "?"
    coefficient, symbols = size
    names = ["?" if symbol.startswith("\0") else symbol for symbol in symbols]
    return "*".join(([str(coefficient)] if coefficient != 1 or not names else []) + names)


def _layer_sizes(graph: GraphIndex, tensor: str, channel_axis: int, channels: int) -> list[Size] | Refusal:
    """The layer output's sizes where known, symbols elsewhere; ``channels`` on an unknown channel axis.

    Assuming the BN's channel count for the layer's is safe: the layer's own rule refuses the fold
    when its weight says otherwise.
    """
    dims = graph.dims(tensor)
    if not dims:
        return Refusal(Reason.RESHAPE_NOT_CHANNEL_PRESERVING, f"the rank of `{tensor}` is unknown")
    channel_axis %= len(dims)
    sizes: list[Size] = []
    for axis, dim in enumerate(dims):
        if axis == channel_axis and not isinstance(dim, int):
            sizes.append((channels, ()))
        elif isinstance(dim, int):
            sizes.append((dim, ()))
        else:
            sizes.append((1, (dim or f"\0{axis}",)))
    return sizes


def _reshaped_sizes(graph: GraphIndex, node: NodeProto, sizes: list[Size]) -> list[Size | None] | Refusal:
    """The sizes of a Flatten's or Reshape's output (None where they cannot be worked out)."""
    not_preserving = Reason.RESHAPE_NOT_CHANNEL_PRESERVING
    label = graph.node_label(node)
    if node.op_type == "Flatten":
        axis = int(_attribute(node, "axis", 1))
        axis += len(sizes) if axis < 0 else 0
        if not 0 <= axis <= len(sizes):
            return Refusal(not_preserving, f"Flatten {label} has axis {axis} on rank {len(sizes)}")
        return [_product(sizes[:axis]), _product(sizes[axis:])]
    if len(node.input) > 1 and node.input[1]:
        lookup = graph.constant(node.input[1])
        if not lookup.is_constant:
            return Refusal(Reason.RESHAPE_SHAPE_NOT_CONSTANT, f"shape of Reshape {label}: {lookup.detail}")
        shape = [int(size) for size in np.asarray(lookup.value).reshape(-1)]
    else:  # Reshape-1 and -4 take the shape as an attribute
        shape = [int(size) for size in _attribute(node, "shape", [])]
        if not shape:
            return Refusal(Reason.RESHAPE_SHAPE_NOT_CONSTANT, f"Reshape {label} has no shape")
    copy_zeros = not _attribute(node, "allowzero", 0)
    result: list[Size | None] = []
    for axis, size in enumerate(shape):
        if size == 0 and copy_zeros:  # 0 copies the input's size on that axis
            if axis >= len(sizes):
                return Refusal(not_preserving, f"Reshape {label}: shape {shape} copies a missing axis")
            result.append(sizes[axis])
        elif size == -1 and None not in result:
            result.append(None)  # inferred below
        elif size < 0:
            return Refusal(not_preserving, f"Reshape {label} has shape {shape}")
        else:
            result.append((size, ()))
    if None in result:
        inferred = result.index(None)
        known = [size for size in result if size is not None]
        result[inferred] = _quotient(_product(sizes), _product(known))
    return result


def _bn_input_sizes(
    graph: GraphIndex, reshape: NodeProto, channel_axis: int, channels: int
) -> list[Size | None] | Refusal:
    """The sizes of the BN input that ``reshape`` writes, if its axis 1 is the layer's channel axis.

    ``channel_axis`` is the layer output's channel axis (1 for Conv and Gemm, -1 for MatMul); refused
    unless the BN's axis 1 has ``channels`` entries and the BN's axes after it as many elements as the
    layer's axes after its channel axis.
    """
    layer_sizes = _layer_sizes(graph, reshape.input[0], channel_axis, channels)
    if isinstance(layer_sizes, Refusal):
        return layer_sizes
    sizes = _reshaped_sizes(graph, reshape, layer_sizes)
    if isinstance(sizes, Refusal):
        return sizes
    label = f"{reshape.op_type} {graph.node_label(reshape)}"
    shown = "[" + ", ".join(_shown(size) for size in sizes) + "]"
    channel_axis %= len(layer_sizes)
    if len(sizes) < 2 or sizes[1] != layer_sizes[channel_axis]:
        return Refusal(
            Reason.RESHAPE_NOT_CHANNEL_PRESERVING,
            f"{label} gives the BN input {shown}: its axis 1 is not the layer's "
            f"{_shown(layer_sizes[channel_axis])} channels",
        )
    inner = None if None in sizes[2:] else _product(sizes[2:])
    layer_inner = _product(layer_sizes[channel_axis + 1 :])
    if inner != layer_inner:
        return Refusal(
            Reason.RESHAPE_NOT_CHANNEL_PRESERVING,
            f"{label} gives the BN input {shown}: {_shown(inner)} elements per channel and sample, "
            f"the layer has {_shown(layer_inner)}",
        )
    return sizes


class ThroughReshape(Rule):
    """Mixin: fold a BN into the layer behind the Reshape/Flatten that feeds it; the Reshape stays.

    ``Layer -> Reshape -> BN`` becomes ``Layer' -> Reshape``, where the Reshape takes over the BN's
    output name. Refuses when the Reshape's output is read by anything but the BN, when its shape is
    not constant or does not map the BN's channels one-to-one onto the layer's, and whatever the
    rule for ``Layer -> BN`` refuses. ``Shape``/``Size`` nodes may read the layer's output: it keeps
    its name and its shape.
    """

    channel_axis: int = 1

    def accepts(self, graph: GraphIndex, producer: NodeProto) -> bool:
        if producer.op_type not in RESHAPE_OPS or producer.domain not in DEFAULT_DOMAINS:
            return False
        layer = graph.producer.get(producer.input[0]) if producer.input else None
        return layer is not None and super().accepts(graph, layer)

    def producer_of(self, graph: GraphIndex, bn: NodeProto) -> NodeProto | None:
        reshape = graph.producer.get(bn.input[0]) if bn.input else None
        return graph.producer.get(reshape.input[0]) if reshape is not None and reshape.input else None

    def tail(self, graph: GraphIndex, bn: NodeProto, layer: NodeProto) -> NodeProto:
        return graph.producer[bn.input[0]]

    def output_refusal(self, graph: GraphIndex, bn: NodeProto, tensor: str) -> Refusal | None:
        reshape = graph.producer[bn.input[0]]
        return _sole_consumer_refusal(graph, tensor, reshape, shape_readers_ok=True)

    def match(self, graph: GraphIndex, bn: NodeProto, params: BatchNormParams) -> Match | Refusal:
        reshape = graph.producer[bn.input[0]]
        # The Reshape's output name goes away (the Reshape takes over the BN's): the BN must be its
        # only reader, Shape nodes included.
        refusal = _sole_consumer_refusal(graph, reshape.output[0], bn)
        if refusal:
            return refusal
        sizes = _bn_input_sizes(graph, reshape, self.channel_axis, params.channels)
        if isinstance(sizes, Refusal):
            return sizes
        match = super().match(graph, bn, params)
        if isinstance(match, Match) and match.new_bias is not None:
            # MatMul without a bias: the shift becomes an Add where the BN was, along its axis 1.
            match.new_bias = match.new_bias.reshape(-1, *[1] * (len(sizes) - 2))
        return match


class ConvReshapeBN(ThroughReshape, ConvThenBN):
    """Conv -> Reshape/Flatten -> BN: e.g. ``[N, C, H, W] -> [N, C, H*W]`` (BatchNorm1d), or a 1x1
    output flattened to ``[N, C]``. ``Flatten`` of ``H*W > 1`` positions is refused."""

    name = "conv-reshape-bn"
    description = "Conv -> channel-preserving Reshape/Flatten -> BatchNormalization: fold into the Conv"


class GemmReshapeBN(ThroughReshape, GemmThenBN):
    """Gemm -> Reshape -> BN, e.g. ``[M, C] -> [M, C, 1, 1]`` (BatchNorm2d after a Linear)."""

    name = "gemm-reshape-bn"
    description = "Gemm -> channel-preserving Reshape/Flatten -> BatchNormalization: fold into the Gemm"


class MatMulReshapeBN(ThroughReshape, MatMulThenBN):
    """MatMul [-> Add] of any rank -> Reshape/Flatten to ``[tokens, C]`` -> BN (LeViT ``Linear_BN``).

    Any MatMul output rank folds here: the Reshape, not the rank, decides whether BN axis 1 is the
    MatMul's column axis. Without a bias, the shift becomes an ``Add`` where the BN was.
    """

    name = "matmul-reshape-bn"
    channel_axis = -1
    description = "MatMul [-> Add] -> channel-preserving Reshape/Flatten -> BatchNormalization"

    def channel_axis_refusal(self, graph: GraphIndex, matmul: NodeProto) -> Refusal | None:
        return None  # _bn_input_sizes already checked it on the Reshape
