"""Layer-then-BN rules on FX graphs: a BatchNorm call absorbed by the Conv / ConvTranspose / Linear before it.

    Before:  x ─Conv(W, b)─▶ c ─BN(γ, β, μ, σ², ε)─▶ y
    After:   x ─Conv(W·s, (b−μ)·s + β)─▶ y          where s = γ / √(σ² + ε)

``conv-bn``, ``convtranspose-bn`` and ``linear-bn`` take a torch BN layer (a module, or torch.export's
ATen call made by one); ``functional-bn`` takes ``F.batch_norm`` called from other code (timm's
BatchNormAct2d). Refuses: anything but the BN (or readers of its shape) seeing the layer's output;
a shared, hooked, non-constant or non-float layer; channel counts that differ; a BN axis 1 that is not
the layer's channel axis for every input (ranks proven, see :mod:`bnfold.fx.shapes`).
"""

from __future__ import annotations

from torch import fx

from bnfold.affine import output_channel_count
from bnfold.core.protocol import Applied
from bnfold.core.sites import LayerThenNorm
from bnfold.folds import fold_output_side
from bnfold.fx.checks import (
    batchnorm_map,
    channels_on_axis_one,
    require_channel_count,
    require_foldable_pair,
    require_sole_reader,
)
from bnfold.fx.reading import BatchNorm, Layer, identify, layer_at, norm_input, read_batchnorm
from bnfold.fx.view import FxView
from bnfold.fx.writing import LayerFold, apply_layer_fold

__all__ = ["LayerThenBN", "plan_output_fold"]


class LayerThenBN:
    """``layer -> BN`` for BN calls of some forms and layers of some kinds."""

    site = LayerThenNorm

    def __init__(self, name: str, kinds: tuple[str, ...], forms: tuple[str, ...]) -> None:
        self.name = name
        self.kinds = kinds
        self.forms = forms

    def find(self, view: FxView, node: fx.Node) -> LayerThenNorm | None:
        call = identify(view, node)
        if call is None or call.kind != "batchnorm" or call.form not in self.forms:
            return None
        source = norm_input(call)
        layer = view.layer_node(source, self.kinds)
        return LayerThenNorm(norm=node, layer=layer) if layer is not None else None

    def plan(self, view: FxView, site: LayerThenNorm) -> LayerFold:
        batchnorm = read_batchnorm(view, identify(view, site.norm))
        layer = layer_at(view, site.layer)
        require_foldable_pair(view, batchnorm, layer)
        require_sole_reader(layer, batchnorm.node)
        return plan_output_fold(view, batchnorm, layer, batchnorm.input)

    def apply(self, view: FxView, plan: LayerFold) -> Applied:
        return Applied(apply_layer_fold(view, plan))


def plan_output_fold(
    view: FxView,
    batchnorm: BatchNorm,
    layer: Layer,
    normalized: fx.Node,
    assumes: frozenset[str] | None = None,
) -> LayerFold:
    """The layer's output channels scaled by the BN's map, once its channels are proven on the BN's
    axis 1 (``assumes`` given: the caller proved it otherwise, e.g. through a reshape)."""
    channels = output_channel_count(tuple(layer.weight.shape), layer.layout, layer.groups)
    require_channel_count(batchnorm, layer, channels, "output")
    if assumes is None:
        assumes = channels_on_axis_one(view, batchnorm, normalized, layer, "output")
    affine = batchnorm_map(batchnorm, channels)
    bias = view.exact.array(layer.bias) if layer.bias is not None else None
    weight, bias = fold_output_side(
        view.exact.array(layer.weight), bias, affine, layer.layout, groups=layer.groups, keep_exact=True
    )
    new_weight, new_bias = view.exact.tensor(weight, layer.weight), view.exact.tensor(bias, layer.weight)
    return LayerFold(batchnorm, layer, new_weight, new_bias, "output", assumes)
