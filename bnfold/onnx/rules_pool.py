"""Layer-then-pool-then-BN rules: a BatchNormalization after a pooling folded into the layer before it.

A pooling that commutes with the BN's per-channel map ``y = s * x + t`` lets the BN move in front of
it, where the layer absorbs it (:mod:`bnfold.onnx.layers`): ``BN(pool(conv(x))) = pool(conv'(x))``.

- ``GlobalAveragePool``, and ``AveragePool`` that averages only real elements (no padding, or
  ``count_include_pad=0``): any map (an average of ``s * x + t`` is ``s * average + t``);
- ``MaxPool`` and ``GlobalMaxPool`` (their padding never wins a max): only where ``s >= 0`` in every
  channel — a negative scale turns a max into a min, and the BN is kept (``pool-does-not-commute``).

An ``AveragePool`` that counts its zero padding (or ``ceil_mode`` windows) divides border sums by more
elements than it averages: ``t`` would be scaled down there, so it is refused. The pool stays and takes
over the BN's output name; the layer's output must feed only the pool, the pool's only the BN.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import NodeProto

from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import ThroughPool
from bnfold.folds import require_pool_commutes
from bnfold.onnx.checks import require_sole_reader
from bnfold.onnx.layers import OutputFold, OutputLayer, write_output_fold
from bnfold.onnx.nodes import attribute, auto_pad, is_op
from bnfold.onnx.view import OnnxView
from bnfold.report import Reason

__all__ = ["POOL_OPS", "LayerPoolBN"]

POOL_OPS = ("MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool")


@dataclass(frozen=True)
class LayerPoolBNPlan:
    site: ThroughPool
    fold: OutputFold


def pool_kind(view: OnnxView, pool: NodeProto) -> str:
    """``"average"`` or ``"max"``: how the pool combines one channel's values; Refuse an average that
    counts padding."""
    label = f"{pool.op_type} {view.node_label(pool)}"
    if pool.op_type in ("MaxPool", "GlobalMaxPool"):
        indices = pool.output[1] if len(pool.output) > 1 else ""
        if indices and (view.live_consumers(indices) or view.is_graph_output(indices)):
            raise Refuse(Reason.POOL_DOES_NOT_COMMUTE, f"the Indices output of {label} is read")
        return "max"
    if pool.op_type == "AveragePool" and attribute(pool, "count_include_pad", 0):
        padding = auto_pad(pool)
        pads = list(attribute(pool, "pads", []))
        if any(pads) or padding not in ("NOTSET", "VALID") or attribute(pool, "ceil_mode", 0):
            shown = f"pads={pads}, auto_pad={padding}, ceil_mode={attribute(pool, 'ceil_mode', 0)}"
            raise Refuse(Reason.POOL_DOES_NOT_COMMUTE, f"{label} counts its padding ({shown})")
    return "average"


class LayerPoolBN:
    """``layer -> pool -> BN`` for one layer kind; the pool stays and takes over the BN's output."""

    site = ThroughPool

    def __init__(self, name: str, layer: OutputLayer) -> None:
        self.name = name
        self.layer = layer

    def find(self, view: OnnxView, node: NodeProto) -> ThroughPool | None:
        if not view.is_norm(node) or not node.input:
            return None
        pool = view.producer.get(node.input[0])
        if pool is None or not is_op(pool, *POOL_OPS) or not pool.input or pool.output[0] != node.input[0]:
            return None
        head = self.layer.head(view, pool.input[0])
        return ThroughPool(norm=node, pool=pool, layer=head) if head is not None else None

    def plan(self, view: OnnxView, site: ThroughPool) -> LayerPoolBNPlan:
        bn, pool, head = site.norm, site.pool, site.layer
        # The pool's output name goes away (the pool takes over the BN's): the BN must be its only reader.
        require_sole_reader(view, pool.output[0], bn)
        params = view.norm_params(bn)
        require_pool_commutes(params.affine, pool_kind(view, pool), f"{pool.op_type} {view.node_label(pool)}")
        require_sole_reader(view, head.output[0], pool)
        fold = self.layer.plan(view, head, params, keep_exact=view.may_fold_again(bn.output[0]))
        return LayerPoolBNPlan(site, fold)

    def apply(self, view: OnnxView, plan: LayerPoolBNPlan) -> Applied:
        return Applied(write_output_fold(view, plan.fold, plan.site.norm, tail=plan.site.pool))
