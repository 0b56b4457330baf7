"""``--simplify``: run onnxsim after folding, and make the report describe what onnxsim left.

onnxsim folds Conv->BN itself (in float32) and removes other nodes, so a BN bnfold kept may be gone
from the written file. The report must describe the file actually written: such a BN's decision
becomes outcome ``simplified`` (rule ``onnxsim``), with bnfold's reason for keeping it in the detail.
"""

from __future__ import annotations

from onnx import ModelProto

from bnfold.errors import BnfoldError, MissingDependencyError
from bnfold.report import Decision, Outcome, Report
from bnfold.stats import walk_graphs

__all__ = ["require_onnxsim", "simplify", "account_for_simplify"]

_NORMALIZATIONS = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization")


def require_onnxsim() -> None:
    """Fail before any work when onnxsim is missing."""
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "{simplify} needs onnxsim: pip install 'bnfold[simplify]'", parameters=("simplify",)
        ) from None


def simplify(model: ModelProto) -> ModelProto:
    """onnxsim's simplified copy of ``model`` (which it checks itself)."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise BnfoldError(
            "onnxsim could not validate its simplified model; fold without {simplify}",
            parameters=("simplify",),
        )
    return simplified


def account_for_simplify(report: Report, simplified: ModelProto) -> int:
    """Mark every kept or rewritten-away normalization node that onnxsim removed; return how many.

    A node is identified by its graph and its output name, which onnxsim keeps for the nodes it keeps.
    """
    present = {
        (path, output)
        for path, graph in walk_graphs(simplified.graph)
        for node in graph.node
        if node.op_type in _NORMALIZATIONS
        for output in node.output[:1]
    }
    removed = 0
    for index, decision in enumerate(report.decisions):
        if decision.outcome is not Outcome.KEPT or (decision.graph, decision.output) in present:
            continue
        detail = f"{decision.reason}: {decision.detail}" if decision.detail else str(decision.reason)
        report.decisions[index] = Decision(
            **{**decision.__dict__, "outcome": Outcome.SIMPLIFIED, "rule": "onnxsim", "detail": detail}
        )
        removed += 1
    return removed
