"""The core driver over a toy backend: what any backend gets from ``run_rules`` without writing it.

The toy graph is a list of named nodes; a "norm" folds into the node before it when that node is a
"layer". It pins the driver's contract that both backends rely on: candidate order, refusal
aggregation, skipped rules, ``check_norm`` refusing for every rule, the fixed point, the standalone
post-pass, subgraphs after their graph, and decisions in graph order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bnfold.core import Applied, NodeIdentity, Refuse, check_skip_rules, run_rules
from bnfold.core.sites import LayerThenNorm, NormThenLayer, Standalone
from bnfold.errors import BnfoldError
from bnfold.report import Outcome, Reason, Report


@dataclass(eq=False)
class Node:
    name: str
    kind: str  # "layer", "norm", "bad-norm" (check_norm refuses), "other"
    accepts: bool = True  # whether a layer's plan succeeds


@dataclass
class ToyView:
    nodes: list[Node]
    path: str = "main"
    children: list[ToyView] = field(default_factory=list)
    removed: set[int] = field(default_factory=set)

    def live_nodes(self):
        return [node for node in self.nodes if id(node) not in self.removed]

    def is_removed(self, node):
        return id(node) in self.removed

    def is_norm(self, node):
        return node.kind in ("norm", "bad-norm")

    def is_per_sample_norm(self, node):
        return node.kind == "layernorm"

    def check_norm(self, norm):
        if norm.kind == "bad-norm":
            raise Refuse(Reason.TRAINING_MODE, "training")

    def identity(self, node):
        return NodeIdentity(node.name, node.kind, node.name)

    def label(self, node):
        return node.name

    def no_site_detail(self, norm):
        return f"nothing next to {norm.name}"

    def subgraphs(self):
        return self.children

    def neighbour(self, node, step):
        live = self.live_nodes()
        position = live.index(node) + step
        return live[position] if 0 <= position < len(live) else None


class Before:
    """Fold a norm into the layer before it."""

    name = "layer-norm"
    site = LayerThenNorm

    def find(self, view, node):
        before = view.neighbour(node, -1) if view.is_norm(node) else None
        return (
            LayerThenNorm(norm=node, layer=before) if before is not None and before.kind == "layer" else None
        )

    def plan(self, view, site):
        if not site.layer.accepts:
            raise Refuse(Reason.WEIGHT_NOT_CONSTANT, f"{site.layer.name} refuses")
        return site

    def apply(self, view, plan):
        view.removed.add(id(plan.norm))
        return Applied(plan.layer)


class After(Before):
    """Fold a norm into the layer after it."""

    name = "norm-layer"
    site = NormThenLayer

    def find(self, view, node):
        after = view.neighbour(node, 1) if view.is_norm(node) else None
        return NormThenLayer(norm=node, layer=after) if after is not None and after.kind == "layer" else None

    def plan(self, view, site):
        raise Refuse(Reason.PADDING_AFTER_BN, f"{site.layer.name} pads")


class Rewrite:
    name = "rewrite"
    site = Standalone

    def find(self, view, node):
        return Standalone(norm=node) if view.is_norm(node) else None

    def plan(self, view, site):
        return site

    def apply(self, view, plan):
        return Applied(plan.norm)


RULES = (Before(), After(), Rewrite())


def decisions(view, **options):
    report = Report()
    run_rules(view, RULES, report, **options)
    return {decision.node: decision for decision in report.decisions}


def test_a_norm_folds_into_the_layer_before_it_and_chains_fold_to_a_fixed_point():
    view = ToyView([Node("conv", "layer"), Node("bn1", "norm"), Node("bn2", "norm")])
    # bn2 folds only once bn1 is gone (its neighbour is then the layer): the fixed point.
    found = decisions(view)
    assert {name: (d.outcome, d.into) for name, d in found.items()} == {
        "bn1": (Outcome.FOLDED, "conv"),
        "bn2": (Outcome.FOLDED, "conv"),
    }


def test_all_refusals_are_aggregated_the_first_one_is_the_reason():
    view = ToyView([Node("conv", "layer", accepts=False), Node("bn", "norm"), Node("fc", "layer")])
    decision = decisions(view)["bn"]
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.WEIGHT_NOT_CONSTANT
    assert decision.rule == "layer-norm" and "also norm-layer: padding-after-bn (fc pads)" in decision.detail


def test_no_site_is_no_foldable_producer_with_the_view_detail():
    decision = decisions(ToyView([Node("bn", "norm")]))["bn"]
    assert (decision.reason, decision.detail, decision.rule) == (
        Reason.NO_FOLDABLE_PRODUCER,
        "nothing next to bn",
        None,
    )


def test_a_skipped_rule_refuses_with_rule_disabled_and_blocks_the_rewrite():
    view = ToyView([Node("conv", "layer"), Node("bn", "norm")])
    decision = decisions(view, skipped={"layer-norm"}, rewrite_standalone=True)["bn"]
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.RULE_DISABLED


def test_check_norm_refuses_for_every_rule_at_once():
    view = ToyView([Node("conv", "layer"), Node("bn", "bad-norm"), Node("fc", "layer")])
    decision = decisions(view, rewrite_standalone=True)["bn"]
    assert (decision.outcome, decision.reason, decision.rule) == (
        Outcome.KEPT,
        Reason.TRAINING_MODE,
        "layer-norm",
    )


def test_the_standalone_post_pass_rewrites_kept_norms_only_when_asked():
    view = ToyView([Node("relu", "other"), Node("bn", "norm")])
    assert decisions(view)["bn"].outcome is Outcome.KEPT
    rewritten = decisions(ToyView([Node("relu", "other"), Node("bn", "norm")]), rewrite_standalone=True)["bn"]
    assert (rewritten.outcome, rewritten.reason, rewritten.rule) == (
        Outcome.REWRITTEN,
        Reason.NO_FOLDABLE_PRODUCER,
        "rewrite",
    )


def test_subgraphs_are_folded_after_their_graph_and_report_their_path():
    inner = ToyView([Node("inner_conv", "layer"), Node("inner_bn", "norm")], path="main/if.then")
    view = ToyView([Node("ln", "layernorm"), Node("bn", "norm")], children=[inner])
    report = Report()
    run_rules(view, RULES, report)
    assert [(d.node, d.outcome, d.graph) for d in report.decisions] == [
        ("ln", Outcome.NEVER_FOLDABLE, "main"),
        ("bn", Outcome.KEPT, "main"),
        ("inner_bn", Outcome.FOLDED, "main/if.then"),
    ]


def test_unknown_skip_rules_are_a_user_error_naming_the_backend_rules():
    assert check_skip_rules(["conv-bn"], "onnx") == {"conv-bn"}
    with pytest.raises(BnfoldError, match="unknown rule"):
        check_skip_rules(["linear-bn"], "onnx")
