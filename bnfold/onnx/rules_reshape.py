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
into the layer after it instead). The fold is the same one the layer-then-BN rules make
(:mod:`bnfold.onnx.layers`); the Reshape stays and takes over the BN's output name.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
from onnx import NodeProto

from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import ThroughReshape
from bnfold.onnx.checks import require_sole_reader
from bnfold.onnx.layers import OutputFold, OutputLayer, write_output_fold
from bnfold.onnx.nodes import attribute, is_op
from bnfold.onnx.view import OnnxView
from bnfold.report import Reason

__all__ = ["LayerReshapeBN", "RESHAPE_OPS"]

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


def _layer_sizes(graph: OnnxView, tensor: str, channel_axis: int, channels: int) -> list[Size]:
    """The layer output's sizes where known, symbols elsewhere; ``channels`` on an unknown channel axis.

    Assuming the BN's channel count for the layer's is safe: the layer's own rule refuses the fold
    when its weight says otherwise.
    """
    dims = graph.dims(tensor)
    if not dims:
        raise Refuse(Reason.RESHAPE_NOT_CHANNEL_PRESERVING, f"the rank of `{tensor}` is unknown")
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


def _reshaped_sizes(graph: OnnxView, node: NodeProto, sizes: list[Size]) -> list[Size | None]:
    """The sizes of a Flatten's or Reshape's output (None where they cannot be worked out)."""
    not_preserving = Reason.RESHAPE_NOT_CHANNEL_PRESERVING
    label = graph.node_label(node)
    if node.op_type == "Flatten":
        axis = int(attribute(node, "axis", 1))
        axis += len(sizes) if axis < 0 else 0
        if not 0 <= axis <= len(sizes):
            raise Refuse(not_preserving, f"Flatten {label} has axis {axis} on rank {len(sizes)}")
        return [_product(sizes[:axis]), _product(sizes[axis:])]
    if len(node.input) > 1 and node.input[1]:
        lookup = graph.constant(node.input[1])
        if not lookup.is_constant:
            raise Refuse(Reason.RESHAPE_SHAPE_NOT_CONSTANT, f"shape of Reshape {label}: {lookup.detail}")
        shape = [int(size) for size in np.asarray(lookup.value).reshape(-1)]
    else:  # Reshape-1 and -4 take the shape as an attribute
        shape = [int(size) for size in attribute(node, "shape", [])]
        if not shape:
            raise Refuse(Reason.RESHAPE_SHAPE_NOT_CONSTANT, f"Reshape {label} has no shape")
    copy_zeros = not attribute(node, "allowzero", 0)
    result: list[Size | None] = []
    for axis, size in enumerate(shape):
        if size == 0 and copy_zeros:  # 0 copies the input's size on that axis
            if axis >= len(sizes):
                raise Refuse(not_preserving, f"Reshape {label}: shape {shape} copies a missing axis")
            result.append(sizes[axis])
        elif size == -1 and None not in result:
            result.append(None)  # inferred below
        elif size < 0:
            raise Refuse(not_preserving, f"Reshape {label} has shape {shape}")
        else:
            result.append((size, ()))
    if None in result:
        inferred = result.index(None)
        known = [size for size in result if size is not None]
        result[inferred] = _quotient(_product(sizes), _product(known))
    return result


def _bn_input_sizes(
    graph: OnnxView, reshape: NodeProto, channel_axis: int, channels: int
) -> list[Size | None]:
    """The sizes of the BN input that ``reshape`` writes, if its axis 1 is the layer's channel axis.

    ``channel_axis`` is the layer output's channel axis (1 for Conv and Gemm, -1 for MatMul); refused
    unless the BN's axis 1 has ``channels`` entries and the BN's axes after it as many elements as the
    layer's axes after its channel axis.
    """
    layer_sizes = _layer_sizes(graph, reshape.input[0], channel_axis, channels)
    sizes = _reshaped_sizes(graph, reshape, layer_sizes)
    label = f"{reshape.op_type} {graph.node_label(reshape)}"
    shown = "[" + ", ".join(_shown(size) for size in sizes) + "]"
    channel_axis %= len(layer_sizes)
    if len(sizes) < 2 or sizes[1] != layer_sizes[channel_axis]:
        raise Refuse(
            Reason.RESHAPE_NOT_CHANNEL_PRESERVING,
            f"{label} gives the BN input {shown}: its axis 1 is not the layer's "
            f"{_shown(layer_sizes[channel_axis])} channels",
        )
    inner = None if None in sizes[2:] else _product(sizes[2:])
    layer_inner = _product(layer_sizes[channel_axis + 1 :])
    if inner != layer_inner:
        raise Refuse(
            Reason.RESHAPE_NOT_CHANNEL_PRESERVING,
            f"{label} gives the BN input {shown}: {_shown(inner)} elements per channel and sample, "
            f"the layer has {_shown(layer_inner)}",
        )
    return sizes


@dataclass(frozen=True)
class LayerReshapeBNPlan:
    site: ThroughReshape
    fold: OutputFold


class LayerReshapeBN:
    """``layer -> Reshape/Flatten -> BN`` for one layer kind; the Reshape stays.

    ``Layer -> Reshape -> BN`` becomes ``Layer' -> Reshape``, where the Reshape takes over the BN's
    output name. Refuses when the Reshape's output is read by anything but the BN, when its shape is
    not constant or does not map the BN's channels one-to-one onto the layer's, and whatever the
    layer refuses. ``Shape``/``Size`` nodes may read the layer's output: it keeps its name and its
    shape. ``channel_axis`` is the layer output's channel axis (1 for Conv and Gemm, -1 for MatMul,
    where any output rank folds: the Reshape, not the rank, decides whether BN axis 1 is the
    MatMul's column axis; without a bias, the shift becomes an ``Add`` where the BN was).
    """

    site = ThroughReshape

    def __init__(self, name: str, layer: OutputLayer, channel_axis: int = 1) -> None:
        self.name = name
        self.layer = layer
        self.channel_axis = channel_axis

    def find(self, view: OnnxView, node: NodeProto) -> ThroughReshape | None:
        if not view.is_norm(node) or not node.input:
            return None
        reshape = view.producer.get(node.input[0])
        if reshape is None or not is_op(reshape, *RESHAPE_OPS) or not reshape.input:
            return None
        head = self.layer.head(view, reshape.input[0])
        return ThroughReshape(norm=node, reshape=reshape, layer=head) if head is not None else None

    def plan(self, view: OnnxView, site: ThroughReshape) -> LayerReshapeBNPlan:
        bn, reshape, head = site.norm, site.reshape, site.layer
        # The Reshape's output name goes away (the Reshape takes over the BN's): the BN must be its
        # only reader, Shape nodes included.
        require_sole_reader(view, reshape.output[0], bn)
        params = view.norm_params(bn)
        sizes = _bn_input_sizes(view, reshape, self.channel_axis, params.channels)
        require_sole_reader(view, head.output[0], reshape, shape_readers_ok=True)
        keep_exact = view.may_fold_again(bn.output[0])
        fold = self.layer.plan(view, head, params, keep_exact=keep_exact, axis_checked=True)
        if fold.new_bias is not None:
            # MatMul without a bias: the shift becomes an Add where the BN was, along its axis 1.
            fold.new_bias = fold.new_bias.reshape(-1, *[1] * (len(sizes) - 2))
        return LayerReshapeBNPlan(site, fold)

    def apply(self, view: OnnxView, plan: LayerReshapeBNPlan) -> Applied:
        return Applied(write_output_fold(view, plan.fold, plan.site.norm, tail=plan.site.reshape))
