"""Linear -> flatten/reshape/view -> BatchNorm: LeViT's ``Linear_BN``, folded through the reshape.

The PyTorch side of ``bnfold.onnx.rules_reshape``. LeViT runs a BatchNorm1d over flattened tokens:
``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))`` with ``linear(x)`` of shape ``[B, N, C]``.
Reshapes only renumber elements in row-major order, so flat element ``f`` is in Linear feature
``f mod C``; the BN input ``[M, C', 1, ...]`` puts it in BN channel ``f mod C'``. The BN scales every
element by its own Linear feature's factor exactly when ``C' = C`` and every axis after the BN's
axis 1 has size 1 — then the fold is linear-bn's (the Linear's rows scaled, the bias folded) and
the reshapes stay (a no-op round trip).

    Before:  x -Linear(W, b)-> [B, N, C] -flatten(0, 1)-> [B*N, C] -BN(s, t)-> y
    After:   x -Linear(W*s, b*s + t)-> [B, N, C] -flatten(0, 1)-> y

The shapes are the graph's symbolic ones (:mod:`bnfold.fx.shapes`): sizes read from ``x.shape`` stay
symbols, so ``view(B, C, T)`` is refused even where the example has ``T = 1`` (``shape-dependent``).
Refuses: shapes unknown (``unknown-shape``); a BN axis 1 that is not the Linear's features, e.g.
``linear(x).reshape(B, C, N)`` (``reshape-not-channel-preserving``); a Linear or reshape output read by
anything but the next step (reading only its shape, as ``reshape_as(features)`` does, is fine).
"""

from __future__ import annotations

import torch
from torch import fx

from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import ThroughReshape
from bnfold.fx.checks import require_channel_count, require_foldable_pair
from bnfold.fx.nodes import output_shape, reads_only_metadata
from bnfold.fx.reading import BatchNorm, Layer, identify, layer_at, norm_input, read_batchnorm
from bnfold.fx.rules_output import plan_output_fold
from bnfold.fx.shapes import proven_equal
from bnfold.fx.view import FxView
from bnfold.fx.writing import LayerFold, apply_layer_fold
from bnfold.report import Reason

__all__ = ["LinearReshapeBN", "reshape_chain"]

aten = torch.ops.aten
_RESHAPE_METHODS = frozenset({"flatten", "reshape", "view", "reshape_as", "view_as", "unflatten"})
_RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.unflatten})
_RESHAPE_OPS = frozenset(
    {aten.flatten, aten.reshape, aten.view, aten._unsafe_view, aten.reshape_as, aten.view_as, aten.unflatten}
)


def _packet(node: fx.Node):
    target = node.target
    return target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target


def _is_reshape(node: fx.Node) -> bool:
    """A node that only renumbers its first argument's elements (row-major order kept)."""
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS or _packet(node) in _RESHAPE_OPS
    return False


def reshape_chain(normalized: object) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the node before the reshapes, the reshapes from the BN's input back), or None without one."""
    node, chain = normalized, []
    while isinstance(node, fx.Node) and _is_reshape(node) and node.args:
        chain.append(node)
        node = node.args[0]
    if not chain or not isinstance(node, fx.Node):
        return None
    return node, chain


class LinearReshapeBN:
    """Linear -> flatten/reshape/view -> BatchNorm with the Linear's features on the BN's axis 1."""

    name = "linear-reshape-bn"
    site = ThroughReshape

    def find(self, view: FxView, node: fx.Node) -> ThroughReshape | None:
        call = identify(view, node)
        if call is None or call.kind != "batchnorm":
            return None
        found = reshape_chain(norm_input(call))
        if found is None or view.layer_node(found[0], ("linear",)) is None:
            return None
        return ThroughReshape(norm=node, reshape=tuple(found[1]), layer=found[0])

    def plan(self, view: FxView, site: ThroughReshape) -> LayerFold:
        batchnorm = read_batchnorm(view, identify(view, site.norm))
        layer = layer_at(view, site.layer)
        require_foldable_pair(view, batchnorm, layer)
        chain = list(site.reshape)
        # Each step, the last reshape included, may feed only the next one (or shape reads).
        steps = [layer.node, *reversed(chain), batchnorm.node]
        for step, following in zip(steps, steps[1:], strict=False):
            _require_only_reader(step, following, layer)
        channels = layer.weight.shape[0]
        require_channel_count(batchnorm, layer, channels, "output")
        assumes = _axis_facts(view, batchnorm, layer, chain[0], channels)
        return plan_output_fold(view, batchnorm, layer, chain[0], assumes)

    def apply(self, view: FxView, plan: LayerFold) -> Applied:
        return Applied(apply_layer_fold(view, plan))


def _require_only_reader(step: fx.Node, following: fx.Node, layer: Layer) -> None:
    """Refuse when anything besides the next reshape sees ``step``'s values (they would be folded)."""
    others = [user for user in step.users if user is not following and not reads_only_metadata(user, step)]
    if any(user.op == "output" for user in others):
        raise Refuse(
            Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"`{step.name}` (from `{layer.name}`) is returned"
        )
    if others:
        names = ", ".join(user.name for user in others[:3])
        detail = f"`{step.name}` (from `{layer.name}`) also feeds {names}"
        raise Refuse(Reason.PRODUCER_HAS_OTHER_CONSUMERS, detail)


def _axis_facts(
    view: FxView, batchnorm: BatchNorm, layer: Layer, reshaped: fx.Node, channels: int
) -> frozenset[str]:
    """The BN's axis 1 must be the Linear's features for every input: ``[M, C]`` or ``[M, C, 1, ...]``.

    Proven on the graph's symbolic shapes (sizes read from ``x.shape`` stay symbols), never on the
    example's sizes: ``view(B, 4, T)`` keeps the features on axis 1 only while ``T`` is 1. Returns the
    graph inputs whose example rank the proof assumes.
    """
    example = output_shape(reshaped)
    shown = [size if isinstance(size, int) else "?" for size in example] if example is not None else None
    facts = view.facts.shape(reshaped)
    if facts is None:
        if example is None:
            detail = (
                f"the shape of `{reshaped.name}` (reshaped `{layer.name}`) is unknown; pass example_inputs"
            )
            raise Refuse(Reason.UNKNOWN_SHAPE, detail)
        detail = (
            f"the shape of `{reshaped.name}` (reshaped `{layer.name}`) is {shown} in the example, but the "
            "graph does not fix it for every input"
        )
        raise Refuse(Reason.SHAPE_DEPENDENT, detail)
    dims = facts.dims
    if len(dims) >= 2 and proven_equal(dims[1], channels) and all(proven_equal(size, 1) for size in dims[2:]):
        return facts.assumes
    held_in_example = (
        shown is not None
        and len(shown) >= 2
        and shown[1] == channels
        and all(size == 1 for size in shown[2:])
    )
    if held_in_example:
        sizes = ", ".join(str(size) for size in dims)
        detail = (
            f"`{batchnorm.call.name}` normalizes axis 1 of `{reshaped.name}` [{sizes}]: `{layer.name}`'s "
            f"{channels} features are there one-to-one for the example {shown} only, not for every input size"
        )
        raise Refuse(Reason.SHAPE_DEPENDENT, detail)
    detail = (
        f"`{batchnorm.call.name}` normalizes axis 1 of `{reshaped.name}` {shown or list(dims)}, which is not "
        f"`{layer.name}`'s {channels} features (its last axis) one-to-one"
    )
    raise Refuse(Reason.RESHAPE_NOT_CHANNEL_PRESERVING, detail)
