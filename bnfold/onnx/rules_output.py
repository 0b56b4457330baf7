"""Layer-then-BN rules: a BatchNormalization folded into the output channels of the layer before it.

    Before:  x -Conv(W, b)-> c -BN(s, t)-> y      After:  x -Conv(W*s, b*s + t)-> y

The layer takes over the BN's output name. Refuses when anything but the BN reads the layer's output
(it would see the folded values), when the layer's constants are not constant, shapes disagree, or
the folded values overflow the weight's dtype; :mod:`bnfold.onnx.layers` says what each layer kind
checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import NodeProto

from bnfold.core.protocol import Applied
from bnfold.core.sites import LayerThenNorm
from bnfold.onnx.checks import require_sole_reader
from bnfold.onnx.layers import OutputFold, OutputLayer, write_output_fold
from bnfold.onnx.view import OnnxView

__all__ = ["LayerThenBN", "LayerThenBNPlan"]


@dataclass(frozen=True)
class LayerThenBNPlan:
    site: LayerThenNorm
    fold: OutputFold


class LayerThenBN:
    """``layer -> BN`` for one layer kind (:class:`~bnfold.onnx.layers.OutputLayer`)."""

    site = LayerThenNorm

    def __init__(self, name: str, layer: OutputLayer) -> None:
        self.name = name
        self.layer = layer

    def find(self, view: OnnxView, node: NodeProto) -> LayerThenNorm | None:
        if not view.is_norm(node) or not node.input:
            return None
        head = self.layer.head(view, node.input[0])
        return LayerThenNorm(norm=node, layer=head) if head is not None else None

    def plan(self, view: OnnxView, site: LayerThenNorm) -> LayerThenBNPlan:
        bn, head = site.norm, site.layer
        require_sole_reader(view, head.output[0], bn)
        params = view.norm_params(bn)
        fold = self.layer.plan(view, head, params, keep_exact=view.may_fold_again(bn.output[0]))
        return LayerThenBNPlan(site, fold)

    def apply(self, view: OnnxView, plan: LayerThenBNPlan) -> Applied:
        return Applied(write_output_fold(view, plan.fold, plan.site.norm))
