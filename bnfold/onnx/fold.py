"""The ONNX fold driver: run the rules over every graph to a fixed point, report, prune.

``fold_onnx`` is the public entry: a function over a value that returns a :class:`FoldResult`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from onnx import ModelProto, NodeProto

from bnfold.errors import BnfoldError
from bnfold.onnx.batchnorm import BATCHNORM, PER_SAMPLE_NORMS, Refusal, read_batchnorm
from bnfold.onnx.graph import DEFAULT_DOMAINS, GraphIndex, ModelContext, subgraphs_of
from bnfold.onnx.io import load_model
from bnfold.onnx.rules import RULES, Rule
from bnfold.report import Decision, Outcome, Reason, Report

__all__ = ["FoldResult", "fold_onnx", "rule_names"]

logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """The folded model, what happened to each normalization node, and whether anything changed."""

    model: ModelProto
    report: Report

    @property
    def changed(self) -> bool:
        return bool(self.report.folded)


def rule_names(rules: Sequence[Rule] = RULES) -> list[str]:
    return [rule.name for rule in rules]


def fold_onnx(
    model: ModelProto | str | os.PathLike,
    *,
    rules: Sequence[Rule] = RULES,
    skip_rules: Iterable[str] = (),
    inplace: bool = False,
) -> FoldResult:
    """Fold every BatchNormalization that a rule can absorb exactly, in all graphs and subgraphs.

    ``model`` is a ModelProto or a path. A given ModelProto is copied first unless ``inplace=True``;
    a path is loaded (external data included) and never written to. Kept BNs are reported with the
    reason; LayerNormalization, GroupNormalization and InstanceNormalization are reported as never
    foldable (they normalize with per-sample statistics computed at run time).
    """
    skipped = set(skip_rules)
    unknown = skipped - set(rule_names(RULES))
    if unknown:
        raise BnfoldError(f"unknown rule(s) {sorted(unknown)}; choose from {rule_names(RULES)}")
    source = ""
    if isinstance(model, ModelProto):
        if not inplace:
            model = copy.deepcopy(model)
    else:
        source = os.fspath(model)
        model = load_model(source).model
    context = ModelContext(model)
    if context.opset is None:
        raise BnfoldError("the model imports no default-domain ONNX opset; is it an ONNX model?")
    report = Report(source=source)
    _fold_graph(GraphIndex(model.graph, context), rules, skipped, report)
    context.finalize()
    return FoldResult(model=model, report=report)


def _fold_graph(graph: GraphIndex, rules: Sequence[Rule], skipped: set[str], report: Report) -> None:
    original_order = list(graph.nodes)
    decisions: dict[int, Decision] = {}
    progress = True
    while progress:
        progress = False
        for node in graph.live_nodes():
            if not _is_default(node, BATCHNORM) or id(node) in graph.removed:
                continue
            if id(node) in decisions and decisions[id(node)].outcome is Outcome.FOLDED:
                continue
            decision = _try_fold(graph, node, rules, skipped)
            decisions[id(node)] = decision
            progress |= decision.outcome is Outcome.FOLDED

    for node in original_order:
        if id(node) in decisions:
            report.add(decisions[id(node)])
        elif any(_is_default(node, op_type) for op_type in PER_SAMPLE_NORMS):
            report.add(_decision(graph, node, Outcome.NEVER_FOLDABLE, reason=Reason.PER_SAMPLE_STATISTICS))
    for node in graph.live_nodes():
        for attribute_name, subgraph in subgraphs_of(node):
            path = f"{graph.path}/{graph.node_label(node)}.{attribute_name}"
            _fold_graph(GraphIndex(subgraph, graph.context, path, parent=graph), rules, skipped, report)


def _try_fold(graph: GraphIndex, bn: NodeProto, rules: Sequence[Rule], skipped: set[str]) -> Decision:
    producer = graph.producer.get(bn.input[0]) if bn.input else None
    if producer is None:
        where = (
            "a graph input"
            if bn.input and bn.input[0] in graph.graph_inputs
            else "not produced in this graph"
        )
        return _kept(graph, bn, Refusal(Reason.NO_FOLDABLE_PRODUCER, f"input `{bn.input[0]}` is {where}"))
    rule = next((rule for rule in rules if rule.accepts(graph, producer)), None)
    if rule is None:
        detail = f"input comes from {producer.op_type} {graph.node_label(producer)}"
        return _kept(graph, bn, Refusal(Reason.NO_FOLDABLE_PRODUCER, detail))
    if rule.name in skipped:
        return _kept(graph, bn, Refusal(Reason.RULE_DISABLED, f"rule {rule.name} is skipped"), rule)
    params = read_batchnorm(graph, bn)
    if isinstance(params, Refusal):
        return _kept(graph, bn, params, rule)
    match = rule.match(graph, bn, params)
    if isinstance(match, Refusal):
        return _kept(graph, bn, match, rule)
    # Record the BN's identity before apply() hands its output name to the layer.
    decision = _decision(graph, bn, Outcome.FOLDED, rule=rule.name)
    into = rule.apply(graph, bn, match)
    logger.debug("folded %s into %s by %s", decision.label, graph.node_label(into), rule.name)
    return Decision(**{**decision.__dict__, "into": graph.node_label(into)})


def _is_default(node: NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in DEFAULT_DOMAINS


def _kept(graph: GraphIndex, bn: NodeProto, refusal: Refusal, rule: Rule | None = None) -> Decision:
    return _decision(
        graph,
        bn,
        Outcome.KEPT,
        rule=rule.name if rule else None,
        reason=refusal.reason,
        detail=refusal.detail,
    )


def _decision(graph: GraphIndex, node: NodeProto, outcome: Outcome, **fields) -> Decision:
    return Decision(
        node=node.name,
        op_type=node.op_type,
        output=node.output[0] if node.output else "",
        outcome=outcome,
        graph=graph.path,
        **fields,
    )
