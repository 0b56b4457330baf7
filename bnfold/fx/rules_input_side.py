"""BN-then-layer rules on FX graphs: a BatchNorm folded into the input channels of the layer after it.

    Before:  x -BN(s, t)-> n -Conv(W, b)-> y      After:  x -Conv(W*s, b + sum W*t)-> y

Tried when no rule folds the BN into the layer before it. Refuses: the BN's output read by anything
but the layer (readers of its shape excepted) or returned; padding (the border would read 0 where
the BN gives ``t``), ``padding="same"`` too; a transposed conv that is not a per-pixel map; a BN axis
1 that is not the layer's input-channel axis for every input; an in-place write into the BN's input
between the BN and the layer (the folded layer would read the written values).
"""

from __future__ import annotations

from torch import fx

from bnfold.affine import input_channel_count
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import NormThenLayer
from bnfold.folds import fold_input_side
from bnfold.fx.checks import (
    batchnorm_map,
    channels_on_axis_one,
    require_channel_count,
    require_even_taps,
    require_foldable_pair,
    require_no_write_between,
)
from bnfold.fx.reading import consumer_layer, identify, layer_at, read_batchnorm, value_readers_of
from bnfold.fx.view import FxView
from bnfold.fx.writing import LayerFold, apply_layer_fold
from bnfold.report import Reason

__all__ = ["BNThenLayer"]


class BNThenLayer:
    """``BN -> layer`` for layers of one kind (``conv``, ``conv_transpose`` or ``linear``)."""

    site = NormThenLayer

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind

    def find(self, view: FxView, node: fx.Node) -> NormThenLayer | None:
        call = identify(view, node)
        if call is None or call.kind != "batchnorm":
            return None
        outputs = _outputs(view, node)
        layer = consumer_layer(outputs, view)
        if layer is None or view.layer_node(layer, (self.kind,)) is None:
            return None
        return NormThenLayer(norm=node, layer=layer)

    def plan(self, view: FxView, site: NormThenLayer) -> LayerFold:
        batchnorm = read_batchnorm(view, identify(view, site.norm))
        consumer = layer_at(view, site.layer)
        others = [user for user in value_readers_of(batchnorm) if user is not consumer.node]
        if others:
            names = ", ".join(user.name for user in others[:3])
            where = "is returned" if any(user.op == "output" for user in others) else f"also feeds {names}"
            raise Refuse(
                Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"the output of `{batchnorm.call.name}` {where}"
            )
        require_foldable_pair(view, batchnorm, consumer)
        require_even_taps(consumer)
        channels = input_channel_count(tuple(consumer.weight.shape), consumer.layout, consumer.groups)
        require_channel_count(batchnorm, consumer, channels, "input")
        between = f"`{batchnorm.call.name}` and `{consumer.name}`"
        require_no_write_between(view, batchnorm.input, [batchnorm.node, consumer.node], between)
        assumes = channels_on_axis_one(view, batchnorm, batchnorm.input, consumer, "input")
        affine = batchnorm_map(batchnorm, channels)
        bias = view.exact.array(consumer.bias) if consumer.bias is not None else None
        weight, bias = fold_input_side(
            view.exact.array(consumer.weight),
            bias,
            affine,
            consumer.layout,
            groups=consumer.groups,
            keep_exact=True,
        )
        new_weight, new_bias = (
            view.exact.tensor(weight, consumer.weight),
            view.exact.tensor(bias, consumer.weight),
        )
        return LayerFold(batchnorm, consumer, new_weight, new_bias, "input", assumes)

    def apply(self, view: FxView, plan: LayerFold) -> Applied:
        return Applied(apply_layer_fold(view, plan))


def _outputs(view: FxView, node: fx.Node) -> list[fx.Node]:
    """The nodes holding a functional BN's normalized output (``getitem(call, 0)`` for tuple ones)."""
    try:
        return read_batchnorm(view, identify(view, node)).outputs
    except Refuse:
        return [node]
