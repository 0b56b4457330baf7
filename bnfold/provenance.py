"""Provenance in the written model: what bnfold did, where a user looks (Netron, ``onnx.load``).

A post-pass over the folded model driven by the report alone (so it knows nothing of how rules
work): ``metadata_props`` get the bnfold version, the rules applied, the summary counts and the
source file's digest; each node that absorbed a BatchNormalization, a Mul/Add or the branches of an
Add gets a line in its ``doc_string`` saying what and by which rule (appended to what was there).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from onnx import ModelProto, NodeProto

from bnfold.report import Decision, Outcome, Report
from bnfold.stats import node_label, walk_graphs

__all__ = ["METADATA_PREFIX", "record_provenance", "absorption_line"]

METADATA_PREFIX = "bnfold."
_ABSORBING = (Outcome.FOLDED, Outcome.MERGED, Outcome.REWRITTEN)


def record_provenance(
    model: ModelProto, report: Report, *, version: str, source_sha256: str | None = None
) -> int:
    """Write the metadata and the per-node doc strings; return how many nodes got a line.

    A key bnfold wrote before (``bnfold.*``, a model folded twice) is replaced; every other
    ``metadata_props`` entry is kept. A decision whose target node is no longer in the model (merged
    away later, removed by onnxsim) adds no line.
    """
    applied = sorted({d.rule for d in report.decisions if d.outcome in _ABSORBING and d.rule})
    entries = {
        "version": version,
        "rules_applied": ",".join(applied),
        "summary": json.dumps(report.summary().to_dict(), sort_keys=True),
    }
    if report.source:
        entries["source"] = report.source.replace("\\", "/").rsplit("/", 1)[-1]
    if source_sha256:
        entries["source_sha256"] = source_sha256
    kept = [prop for prop in model.metadata_props if not prop.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, value

    nodes = dict(_labelled_nodes(model))
    annotated = 0
    for decision in report.decisions:
        if decision.outcome not in _ABSORBING or decision.into is None:
            continue
        node = nodes.get((decision.graph, decision.into))
        if node is None:
            continue
        line = absorption_line(decision)
        node.doc_string = f"{node.doc_string}\n{line}" if node.doc_string else line
        annotated += 1
    return annotated


def absorption_line(decision: Decision) -> str:
    """``bnfold: absorbed BatchNormalization bn1 (output y1) by conv-bn``, and the like."""
    what = f"{decision.op_type} {decision.label}"
    if decision.node:
        what += f" (output {decision.output})"
    if decision.outcome is Outcome.MERGED:
        return f"bnfold: merged the branches summed by {what} by {decision.rule}"
    if decision.outcome is Outcome.REWRITTEN:
        return f"bnfold: rewritten from {what} by {decision.rule}"
    return f"bnfold: absorbed {what} by {decision.rule}"


def _labelled_nodes(model: ModelProto) -> Iterator[tuple[tuple[str, str], NodeProto]]:
    for path, graph in walk_graphs(model.graph):
        for node in graph.node:
            yield (path, node_label(node)), node
