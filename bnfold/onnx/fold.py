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
from bnfold.report import ELEMENTWISE_AFFINE_OPS, Decision, Outcome, Reason, Report

__all__ = ["FoldResult", "fold_onnx", "rule_names"]

logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """The folded model, what happened to each normalization node, and whether anything changed."""

    model: ModelProto
    report: Report

    @property
    def changed(self) -> bool:
        return bool(self.report.folded or self.report.rewritten or self.report.merged)


def rule_names(rules: Sequence[Rule] = RULES) -> list[str]:
    return [rule.name for rule in rules]


def fold_onnx(
    model: ModelProto | str | os.PathLike,
    *,
    rules: Sequence[Rule] = RULES,
    skip_rules: Iterable[str] = (),
    inplace: bool = False,
    rewrite_standalone: bool = False,
) -> FoldResult:
    """Fold every BatchNormalization that a rule can absorb exactly, in all graphs and subgraphs.

    ``model`` is a ModelProto or a path. A given ModelProto is copied first unless ``inplace=True``;
    a path is loaded (external data included) and never written to. Kept BNs are reported with the
    reason; LayerNormalization, GroupNormalization and InstanceNormalization are reported as never
    foldable (they normalize with per-sample statistics computed at run time).

    A BN is folded into the layer before it when a producer-side rule can, else into the layer after
    it. Per-channel ``Mul``/``Add`` nodes after a layer are folded too (and reported when they are).
    With ``rewrite_standalone=True``, a BN nothing could absorb (its statistics readable, no rule
    disabled) becomes ``Mul`` + ``Add`` (rule ``bn-to-affine``, outcome ``rewritten``).
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
    _fold_graph(GraphIndex(model.graph, context), rules, skipped, report, rewrite_standalone)
    context.finalize()
    return FoldResult(model=model, report=report)


def _fold_graph(
    graph: GraphIndex, rules: Sequence[Rule], skipped: set[str], report: Report, rewrite_standalone: bool
) -> None:
    original_order = list(graph.nodes)
    decisions: dict[int, Decision] = {}
    progress = True
    while progress:
        progress = False
        for node in graph.live_nodes():
            if id(node) in graph.removed:
                continue
            if id(node) in decisions and decisions[id(node)].outcome is Outcome.FOLDED:
                continue
            if _is_default(node, BATCHNORM):
                decision = _try_fold(graph, node, rules, skipped)
            elif node.domain in DEFAULT_DOMAINS and node.op_type in ELEMENTWISE_AFFINE_OPS:
                decision = _try_fold_affine(graph, node, rules, skipped)
                if decision is None:
                    # Not a per-channel map: an Add may sum parallel branches of one input instead.
                    progress |= _try_merge_branches(graph, node, rules, skipped, decisions)
                    continue
            else:
                continue
            decisions[id(node)] = decision
            progress |= decision.outcome is Outcome.FOLDED
    if rewrite_standalone:
        # Only after the fixed point: a BN kept in one pass may fold in a later one.
        for node in graph.live_nodes():
            decision = decisions.get(id(node))
            if decision is not None and decision.outcome is Outcome.KEPT and _is_default(node, BATCHNORM):
                decisions[id(node)] = _rewrite_standalone(graph, node, decision, rules, skipped)

    for node in original_order:
        if id(node) in decisions:
            report.add(decisions[id(node)])
        elif any(_is_default(node, op_type) for op_type in PER_SAMPLE_NORMS):
            report.add(_decision(graph, node, Outcome.NEVER_FOLDABLE, reason=Reason.PER_SAMPLE_STATISTICS))
    for node in graph.live_nodes():
        for attribute_name, subgraph in subgraphs_of(node):
            path = f"{graph.path}/{graph.node_label(node)}.{attribute_name}"
            _fold_graph(
                GraphIndex(subgraph, graph.context, path, parent=graph),
                rules,
                skipped,
                report,
                rewrite_standalone,
            )


def _try_fold(graph: GraphIndex, bn: NodeProto, rules: Sequence[Rule], skipped: set[str]) -> Decision:
    """Fold ``bn`` into its producer if a producer-side rule can, else into its consumer.

    When every candidate refuses, the first refusal (the producer's, when there is one) is the reason
    and the others are added to its detail.
    """
    producer = graph.producer.get(bn.input[0]) if bn.input else None
    candidates = [
        rule
        for rule in rules
        if rule.side == "producer"
        and BATCHNORM in rule.absorbs
        and producer is not None
        and rule.accepts(graph, producer)
    ][:1]
    candidates += [
        rule for rule in rules if rule.side == "consumer" and rule.consumer_of(graph, bn) is not None
    ]
    if not candidates:
        return _kept(
            graph, bn, Refusal(Reason.NO_FOLDABLE_PRODUCER, _nothing_to_fold_into(graph, bn, producer))
        )
    params = None
    refusals: list[tuple[Rule, Refusal]] = []
    for rule in candidates:
        if rule.name in skipped:
            refusals.append((rule, Refusal(Reason.RULE_DISABLED, f"rule {rule.name} is skipped")))
            continue
        if params is None:
            params = read_batchnorm(graph, bn)
            if isinstance(params, Refusal):
                return _kept(graph, bn, params, rule)
        match = rule.match(graph, bn, params)
        if isinstance(match, Refusal):
            refusals.append((rule, match))
            continue
        # Record the BN's identity before apply() hands its output name to the layer.
        decision = _decision(graph, bn, Outcome.FOLDED, rule=rule.name)
        into = rule.apply(graph, bn, match)
        logger.debug("folded %s into %s by %s", decision.label, graph.node_label(into), rule.name)
        return Decision(**{**decision.__dict__, "into": graph.node_label(into)})
    rule, refusal = refusals[0]
    if len(refusals) > 1:
        also = "; ".join(
            f"{other.name}: {why.reason}" + (f" ({why.detail})" if why.detail else "")
            for other, why in refusals[1:]
        )
        detail = f"{refusal.detail}; also {also}" if refusal.detail else f"also {also}"
        refusal = Refusal(refusal.reason, detail)
    return _kept(graph, bn, refusal, rule)


def _nothing_to_fold_into(graph: GraphIndex, bn: NodeProto, producer: NodeProto | None) -> str:
    if producer is None:
        where = (
            "a graph input"
            if bn.input and bn.input[0] in graph.graph_inputs
            else "not produced in this graph"
        )
        detail = f"input `{bn.input[0] if bn.input else ''}` is {where}"
    else:
        detail = f"input comes from {producer.op_type} {graph.node_label(producer)}"
    readers = [node for node in graph.consumers.get(bn.output[0], []) if id(node) not in graph.removed]
    if readers:
        labels = ", ".join(f"{node.op_type} {graph.node_label(node)}" for node in readers[:3])
        detail += f"; output feeds {labels}, which no rule folds into"
    return detail


def _try_fold_affine(
    graph: GraphIndex, node: NodeProto, rules: Sequence[Rule], skipped: set[str]
) -> Decision | None:
    """Fold a per-channel Mul/Add into the layer before it; None (not reported) when no rule does."""
    for rule in rules:
        if rule.side != "producer" or node.op_type not in rule.absorbs or rule.name in skipped:
            continue
        producer = rule.producer_of(graph, node)
        if producer is None or not rule.accepts(graph, producer):
            continue
        params = rule.read_params(graph, node, producer)
        match = params if isinstance(params, Refusal) else rule.match(graph, node, params)
        if isinstance(match, Refusal):
            logger.debug(
                "%s not folded by %s: %s %s", graph.node_label(node), rule.name, match.reason, match.detail
            )
            return None
        decision = _decision(graph, node, Outcome.FOLDED, rule=rule.name)
        into = rule.apply(graph, node, match)
        return Decision(**{**decision.__dict__, "into": graph.node_label(into)})
    return None


def _try_merge_branches(
    graph: GraphIndex,
    add: NodeProto,
    rules: Sequence[Rule],
    skipped: set[str],
    decisions: dict[int, Decision],
) -> bool:
    """Merge the parallel branches an Add sums into one Conv; True when it did.

    A merged Add is reported (op ``Add``, outcome ``merged``), so that every change
    to the graph shows in the report; an Add that is not merged is not. An identity-branch BN it
    sums is: folded by the merge, or kept with the merge's refusal, which replaces the decision the
    BN got on its own (visited earlier in the same pass, since it feeds the Add) because it says more.
    """
    for rule in rules:
        if rule.side != "branches" or add.op_type not in rule.absorbs:
            continue
        branches = rule.read_branches(graph, add)
        if branches is None:
            continue
        bn = branches.identity_bn
        if rule.name in skipped:
            match = Refusal(Reason.RULE_DISABLED, f"rule {rule.name} is skipped")
        else:
            match = rule.match(graph, add, branches)
        if isinstance(match, Refusal):
            logger.debug("%s not merged: %s %s", graph.node_label(add), match.reason, match.detail)
            if bn is not None:
                detail = f"identity branch of Add {graph.node_label(add)}: {match.detail}"
                decisions[id(bn)] = _kept(graph, bn, Refusal(match.reason, detail), rule)
            return False
        # Record identities before apply() hands the Add's output name to the merged conv.
        folded = {id(add): _decision(graph, add, Outcome.MERGED, rule=rule.name)}
        if bn is not None:
            folded[id(bn)] = _decision(graph, bn, Outcome.FOLDED, rule=rule.name)
        into = rule.apply(graph, add, match)
        logger.debug("merged the branches of %s into %s", graph.node_label(add), graph.node_label(into))
        for key, decision in folded.items():
            decisions[key] = Decision(**{**decision.__dict__, "into": graph.node_label(into)})
        return True
    return False


def _rewrite_standalone(
    graph: GraphIndex, bn: NodeProto, kept: Decision, rules: Sequence[Rule], skipped: set[str]
) -> Decision:
    """Replace a kept BN by Mul + Add, unless its statistics are unusable or a rule was disabled."""
    rule = next((rule for rule in rules if rule.side == "standalone"), None)
    if rule is None or rule.name in skipped or kept.reason is Reason.RULE_DISABLED:
        return kept
    params = read_batchnorm(graph, bn)
    if isinstance(params, Refusal):
        return kept
    match = rule.match(graph, bn, params)
    if isinstance(match, Refusal):
        detail = f"{match.detail}; not foldable: {kept.reason}" + (f" ({kept.detail})" if kept.detail else "")
        return _kept(graph, bn, Refusal(match.reason, detail), rule)
    decision = _decision(graph, bn, Outcome.REWRITTEN, rule=rule.name, reason=kept.reason, detail=kept.detail)
    into = rule.apply(graph, bn, match)
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
