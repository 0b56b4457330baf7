"""Layer-then-affine rules on FX graphs: a per-channel ``*`` / ``+`` / ``-`` / ``/`` by a constant after a
Conv, ConvTranspose or Linear, folded into the layer (the torch side of :mod:`bnfold.onnx.rules_affine`).

    Before:  x -Conv(W, b)-> c -mul(s)-> -add(t)-> y      After:  x -Conv(W*s, b*s + t)-> y

What torchvision's FrozenBatchNorm2d or hand-written "scale and shift" code leaves after a conv once
its constants are parameters or buffers: ``c * scale + shift`` with ``scale`` of shape ``[C, 1, 1]``
or ``[1, C, 1, 1]`` (or a number); after a Linear, whose features are the last axis of an output of
any rank, ``[F]``, ``[1, F]``, ``[1, 1, F]`` (or a number). Only constants read from the model
(``get_attr``) or Python numbers, of the layer's dtype and device, that broadcast along the channel
axis alone: the result must have the layer output's shape for every input (a ``[1, C, 1, 1]``
constant after an unbatched conv would add an axis, so its rank must be proven batched; a ``[1, F]``
constant after a Linear needs an output of rank 2 or more). Refuses (not reported; only folds are):
anything else reading the layer's output, a layer that cannot be edited, constants of another shape
or dtype.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from bnfold.affine import Affine, output_channel_count
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import AffineChain
from bnfold.folds import fold_output_side
from bnfold.fx.checks import require_editable, require_sole_reader
from bnfold.fx.nodes import get_attr_tensor
from bnfold.fx.reading import Layer, layer_at
from bnfold.fx.state import numpy64
from bnfold.fx.view import FxView
from bnfold.fx.writing import write_layer_tensors
from bnfold.report import Reason

__all__ = ["LayerThenAffine", "AffinePlan"]

_OPERATIONS = {
    operator.mul: "mul",
    operator.add: "add",
    operator.sub: "sub",
    operator.truediv: "div",
    torch.mul: "mul",
    torch.add: "add",
    torch.sub: "sub",
    torch.div: "div",
    "mul": "mul",
    "add": "add",
    "sub": "sub",
    "div": "div",
    # torch.export's spelling (alpha / rounding_mode would come as kwargs, which find() refuses)
    torch.ops.aten.mul.Tensor: "mul",
    torch.ops.aten.add.Tensor: "add",
    torch.ops.aten.sub.Tensor: "sub",
    torch.ops.aten.div.Tensor: "div",
}


@dataclass(frozen=True)
class AffinePlan:
    site: AffineChain
    layer: Layer
    weight: torch.Tensor
    bias: torch.Tensor
    assumes: frozenset[str] = frozenset()  # graph inputs whose example rank the fold relies on


class LayerThenAffine:
    """``layer -> mul/add/sub/div(constant)`` for layers of one kind."""

    site = AffineChain

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind

    def find(self, view: FxView, node: fx.Node) -> AffineChain | None:
        operation = _operation(node)
        if operation is None or len(node.args) != 2 or node.kwargs:
            return None
        for data_slot in (0, 1):
            layer = view.layer_node(node.args[data_slot], (self.kind,))
            constant = node.args[1 - data_slot]
            number = isinstance(constant, int | float) and not isinstance(constant, bool)
            if number and _is_identity(operation, constant, data_slot):
                continue  # nothing to fold; branch-merge absorbs the `out = 0 + conv(x)` that starts a sum
            if layer is not None and (number or _is_attribute(constant)):
                return AffineChain(node=node, layer=layer, data_slot=data_slot, constant_slot=1 - data_slot)
        return None

    def plan(self, view: FxView, site: AffineChain) -> AffinePlan:
        node, operation = site.node, _operation(site.node)
        layer = layer_at(view, site.layer)
        require_editable(view, layer, copy_if_shared=True)
        require_sole_reader(layer, node)
        channels = output_channel_count(tuple(layer.weight.shape), layer.layout, layer.groups)
        values, assumes = _per_channel(view, node.args[site.constant_slot], layer, channels)
        if operation == "div" and site.data_slot == 1:
            raise Refuse(
                Reason.NO_FOLDABLE_PRODUCER, "a constant divided by the layer's output is not affine"
            )
        ones, zeros = np.ones(channels), np.zeros(channels)
        if operation == "mul":
            affine = Affine(values, zeros)
        elif operation == "div":
            affine = Affine(1.0 / values, zeros)
        elif operation == "add":
            affine = Affine(ones, values)
        elif site.data_slot == 0:  # layer - constant
            affine = Affine(ones, -values)
        else:  # constant - layer
            affine = Affine(-ones, values)
        if not np.all(np.isfinite(affine.scale)) or not np.all(np.isfinite(affine.shift)):
            raise Refuse(Reason.NONFINITE_STATISTICS, f"the constant of `{node.name}` is not finite")
        bias = view.exact.array(layer.bias) if layer.bias is not None else None
        weight, bias = fold_output_side(
            view.exact.array(layer.weight), bias, affine, layer.layout, groups=layer.groups, keep_exact=True
        )
        new_weight, new_bias = view.exact.tensor(weight, layer.weight), view.exact.tensor(bias, layer.weight)
        return AffinePlan(site, layer, new_weight, new_bias, assumes)

    def apply(self, view: FxView, plan: AffinePlan) -> Applied:
        into = write_layer_tensors(view, plan.layer, plan.weight, plan.bias)
        view.assume(plan.assumes)
        node, graph = plan.site.node, view.graph_module.graph
        constant = node.args[plan.site.constant_slot]
        node.replace_all_uses_with(plan.layer.node)
        graph.erase_node(node)
        if isinstance(constant, fx.Node) and not constant.users:
            graph.erase_node(constant)  # the tensor stays in the module's state (it may be read elsewhere)
        view.refresh()
        return Applied(into)


def _operation(node: fx.Node) -> str | None:
    if node.op == "call_method" or node.op == "call_function":
        try:
            return _OPERATIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def _is_identity(operation: str, number: float, data_slot: int) -> bool:
    """``x + 0``, ``0 + x``, ``x - 0``, ``x * 1``, ``1 * x``, ``x / 1``: the layer's output unchanged."""
    if operation in ("add", "sub"):
        return number == 0 and (operation == "add" or data_slot == 0)
    return number == 1 and (operation == "mul" or data_slot == 0)


def _is_attribute(value: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _per_channel(
    view: FxView, constant: object, layer: Layer, channels: int
) -> tuple[np.ndarray, frozenset[str]]:
    """The constant as one float64 value per output channel, or refuse one that is not per channel;
    and the graph inputs whose example rank that relies on (a constant with the output's rank)."""
    assumes: frozenset[str] = frozenset()
    if isinstance(constant, bool) or not isinstance(constant, int | float | fx.Node):
        raise Refuse(Reason.WEIGHT_NOT_CONSTANT, f"`{constant}` is not a constant")
    if isinstance(constant, int | float):
        return np.full(channels, float(constant)), assumes
    found = get_attr_tensor(view.graph_module, constant)
    if found is None:
        raise Refuse(Reason.WEIGHT_NOT_CONSTANT, f"`{constant.name}` is not a constant tensor")
    tensor = found[1]
    if tensor.dtype != layer.weight.dtype or tensor.device != layer.weight.device:
        raise Refuse(Reason.UNSUPPORTED_DTYPE, f"`{constant.name}` is {tensor.dtype} on {tensor.device}")
    # The channel axis counted from the end: a conv output [N, C, *spatial] (or [C, *spatial]), a
    # Linear output [..., F] (spatial_dims 0: the features are the last axis, at any rank).
    from_end = layer.spatial_dims + 1
    shape = tuple(tensor.shape)
    if len(shape) > from_end:
        # Leading ones beyond the channel axis broadcast away only where the output has that many axes
        # (a conv output of rank spatial + 1 is unbatched: a [1, C, 1, 1] constant would add one).
        rank = view.facts.rank(layer.node)
        if rank is None or len(shape) > rank[0]:
            raise Refuse(
                Reason.SHAPE_DEPENDENT, f"`{constant.name}` {list(shape)} may add axes to the output"
            )
        assumes = rank[1]
        if any(size != 1 for size in shape[: len(shape) - from_end]):
            raise Refuse(Reason.CHANNEL_AXIS_MISMATCH, f"`{constant.name}` {list(shape)} is not per channel")
    trailing = shape[-from_end:] if len(shape) >= from_end else ()
    if len(shape) >= from_end and any(size != 1 for size in trailing[1:]):
        raise Refuse(Reason.CHANNEL_AXIS_MISMATCH, f"`{constant.name}` {list(shape)} is not per channel")
    if tensor.numel() == 1:
        return np.full(channels, float(numpy64(tensor).reshape(-1)[0])), assumes
    if len(shape) < from_end or trailing[0] != channels:
        raise Refuse(Reason.CHANNEL_AXIS_MISMATCH, f"`{constant.name}` {list(shape)} is not per channel")
    return numpy64(tensor).reshape(-1), assumes
