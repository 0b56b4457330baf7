"""Provenance in the written model: what bnfold did, where a user looks (Netron, ``onnx.load``).

A post-pass over the folded model driven by the report alone (so it knows nothing of how rules
work): ``metadata_props`` get the bnfold version, the rules applied, the summary counts and the
source file's digest; each node that absorbed a BatchNormalization, a Mul/Add or the branches of an
Add gets a line in its ``doc_string`` saying what and by which rule (appended to what was there).
``bnfold.export`` records both of its folds with the same pieces
(:func:`bnfold.fx.onnx_export.record_export_provenance`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping

from onnx import ModelProto, NodeProto

from bnfold.report import Decision, Outcome, Report
from bnfold.stats import node_label, walk_graphs

__all__ = [
    "METADATA_PREFIX",
    "record_provenance",
    "record_metadata",
    "record_source",
    "annotate_nodes",
    "decisions_on_nodes",
    "rules_applied",
    "absorption_line",
]

METADATA_PREFIX = "bnfold."
ABSORBING = (Outcome.FOLDED, Outcome.MERGED, Outcome.REWRITTEN)
"""The outcomes that leave something absorbed in a node (the node gets a doc string line)."""


def record_provenance(
    model: ModelProto, report: Report, *, version: str, source_sha256: str | None = None
) -> int:
    """Write the metadata and the per-node doc strings; return how many nodes got a line.

    A key bnfold wrote before (``bnfold.*``, a model folded twice) is replaced; every other
    ``metadata_props`` entry is kept. A decision whose target node is no longer in the model (merged
    away later, removed by onnxsim) adds no line.
    """
    record_metadata(model, report, version=version)
    if report.source or source_sha256:
        record_source(model, report.source or None, source_sha256)
    return annotate_nodes(model, decisions_on_nodes(model, report))


def rules_applied(report: Report) -> list[str]:
    """The rules that absorbed something in ``report``, sorted."""
    return sorted({d.rule for d in report.decisions if d.outcome in ABSORBING and d.rule})


def record_metadata(
    model: ModelProto,
    report: Report,
    *,
    version: str,
    rules: Iterable[str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Replace every ``bnfold.*`` entry of ``metadata_props`` by the version, the rules applied
    (``rules``, default those of ``report``), ``report``'s summary counts and ``extra``."""
    entries = {
        "version": version,
        "rules_applied": ",".join(rules_applied(report) if rules is None else sorted(set(rules))),
        "summary": json.dumps(report.summary().to_dict(), sort_keys=True),
        **(extra or {}),
    }
    kept = [prop for prop in model.metadata_props if not prop.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    _set_entries(model, entries)


def record_source(model: ModelProto, source: str | None, source_sha256: str | None) -> None:
    """Set ``bnfold.source`` (the file's name, no folders) and ``bnfold.source_sha256``, leaving
    the other ``bnfold.*`` entries as they are (a pipeline adds them to what a fold recorded)."""
    entries = {}
    if source:
        entries["source"] = source.replace("\\", "/").rsplit("/", 1)[-1]
    if source_sha256:
        entries["source_sha256"] = source_sha256
    _set_entries(model, entries)


def _set_entries(model: ModelProto, entries: Mapping[str, str]) -> None:
    keys = {METADATA_PREFIX + key for key in entries}
    kept = [prop for prop in model.metadata_props if prop.key not in keys]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, value


def decisions_on_nodes(model: ModelProto, report: Report) -> Iterator[tuple[NodeProto, str]]:
    """Each node of ``model`` that absorbed something by ``report`` (found by graph path and
    label), with its doc string line. A decision whose node is gone yields nothing."""
    nodes = dict(_labelled_nodes(model))
    for decision in report.decisions:
        if decision.outcome not in ABSORBING or decision.into is None:
            continue
        node = nodes.get((decision.graph, decision.into))
        if node is not None:
            yield node, absorption_line(decision)


def annotate_nodes(model: ModelProto, lines: Iterable[tuple[NodeProto, str]]) -> int:
    """Append each line to its node's ``doc_string`` (after what was there; a line the node already
    carries is not repeated); return how many lines were added."""
    annotated = 0
    for node, line in lines:
        if line in node.doc_string.splitlines():
            continue
        node.doc_string = f"{node.doc_string}\n{line}" if node.doc_string else line
        annotated += 1
    return annotated


def absorption_line(decision: Decision, *, backend: str = "") -> str:
    """``bnfold: absorbed BatchNormalization bn1 (output y1) by conv-bn``, and the like.

    ``backend="torch"`` says the absorption happened in PyTorch before the export (the output named
    is then a torch.fx node's, which the ONNX file does not have, so it is left out).
    """
    what = f"{decision.op_type} {decision.label}"
    if decision.node and backend != "torch":
        what += f" (output {decision.output})"
    by = f"{decision.rule} in torch before the export" if backend == "torch" else decision.rule
    if decision.outcome is Outcome.MERGED:
        return f"bnfold: merged the branches summed by {what} by {by}"
    if decision.outcome is Outcome.REWRITTEN:
        return f"bnfold: rewritten from {what} by {by}"
    return f"bnfold: absorbed {what} by {by}"


def _labelled_nodes(model: ModelProto) -> Iterator[tuple[tuple[str, str], NodeProto]]:
    for path, graph in walk_graphs(model.graph):
        for node in graph.node:
            yield (path, node_label(node)), node
