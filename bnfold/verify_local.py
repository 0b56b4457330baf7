"""Check folds inside subgraphs locally, where end-to-end runs do not reach them.

An ``If`` branch the verification inputs never select is never run, and a ``Loop``/``Scan`` body runs
only as the inputs drive it: a wrong fold there would pass end to end. So for every subgraph the fold
changed (its proto, or an outer-scope initializer it reads, differs between the two models), the
original model is run once more with the values the subgraph needs (the node's inputs and the names
it reads from enclosing scopes) as extra outputs; the original and the folded subgraph are then run
as standalone models on those captured values (:mod:`bnfold.subgraph_models`) and every output is
judged as the end-to-end outputs are (:mod:`bnfold.comparison`: the tolerance, then the float64
reference where it applies). Subgraphs nested in a checked one are checked the same way, from values
captured in the standalone run of their enclosing subgraph. What cannot be checked (a capture that
fails or is too large, a value no graph input can take) is reported with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from onnx import GraphProto, ModelProto, TensorProto, numpy_helper

from bnfold.comparison import OutputComparison, failed_outputs, judge_runs
from bnfold.input_limits import available_memory
from bnfold.onnx.io import read_tensor
from bnfold.subgraph_models import (
    Site,
    Unsupported,
    default_opset,
    defined_names,
    extra_outputs,
    formal_values,
    free_names,
    graph_initializer,
    node_key,
    sites,
    standalone_model,
    subgraph_of,
)

__all__ = ["LocalCheck", "check_subgraphs", "CAPTURE_LIMIT_BYTES", "CHECKED", "UNCHANGED", "UNCOVERED"]

CHECKED, UNCHANGED, UNCOVERED = "checked", "unchanged", "uncovered"

CAPTURE_LIMIT_BYTES = 1 << 30
"""At most this many bytes of captured values (all runs together; less when less memory is free)."""

OpenSession = Callable[[ModelProto, str], Any]


@dataclass
class LocalCheck:
    """What happened to one subgraph: ``checked`` locally (``outputs`` judged over ``runs`` runs),
    ``unchanged`` by the fold (nothing to check), or ``uncovered`` (changed, not checked: ``reason``).

    ``path`` identifies the node from the main graph down (see
    :func:`bnfold.subgraph_models.control_nodes`), ``attribute`` the subgraph of that node.
    """

    subgraph: str
    path: tuple
    attribute: str
    status: str
    reason: str = ""
    runs: int = 0
    outputs: list[OutputComparison] = field(default_factory=list)
    reference: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.status != CHECKED or all(output.passed for output in self.outputs)

    def describe(self) -> str:
        """One line: ``If node gate else-branch: checked locally on captured values (2 runs)``."""
        if self.status == UNCOVERED:
            return f"{self.subgraph}: changed by the fold, not checked locally: {self.reason}"
        if self.status == UNCHANGED:
            return f"{self.subgraph}: unchanged by the fold"
        worst = max((output.max_abs_error for output in self.outputs), default=0.0)
        text = f"{self.subgraph}: checked locally on captured values ({self.runs} run(s))"
        if self.passed:
            return f"{text}, max abs err {worst:.3g}"
        failing = ", ".join(output.name for output in self.outputs if not output.passed)
        return f"{text}: MISMATCH in {failing}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "subgraph": self.subgraph,
            "status": self.status,
            "passed": self.passed,
            "reason": self.reason,
            "runs": self.runs,
            "outputs": [asdict(output) for output in self.outputs],
            "reference": self.reference,
        }


@dataclass
class _Context:
    open_session: OpenSession
    atol: float | None
    rtol: float | None
    exact: str
    reference_limit_bytes: int
    capture_limit_bytes: int
    checks: list[LocalCheck] = field(default_factory=list)


def check_subgraphs(
    original: ModelProto,
    folded: ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    open_session: OpenSession,
    atol: float | None = None,
    rtol: float | None = None,
    exact: str = "auto",
    reference_limit_bytes: int = 1 << 30,
    capture_limit_bytes: int | None = None,
) -> list[LocalCheck]:
    """One :class:`LocalCheck` per subgraph of ``original`` reached (changed ones checked locally).

    ``feeds`` are the verification runs' inputs, ``open_session(model, role)`` makes an ONNX Runtime
    session (``role`` ``original`` or ``folded``); ``atol``/``rtol``/``exact`` judge as end to end.
    ``original`` is left as it was (capture outputs are added only for the capture run).
    """
    limit = CAPTURE_LIMIT_BYTES if capture_limit_bytes is None else capture_limit_bytes
    free = available_memory()
    if free is not None and capture_limit_bytes is None:
        limit = min(limit, free // 4)
    context = _Context(open_session, atol, rtol, exact, reference_limit_bytes, limit)
    _check_scope(context, original, folded, [dict(case) for case in feeds], "", ())
    return context.checks


def _check_scope(
    context: _Context,
    original: ModelProto,
    folded: ModelProto,
    runs: list[dict[str, Any]],
    prefix: str,
    scope_path: tuple,
) -> None:
    """Check every changed subgraph of ``original``'s main graph (a model, or a standalone subgraph)."""
    counterparts = {node_key(node): node for node in folded.graph.node}
    pending: list[tuple[Site, GraphProto, str, tuple]] = []
    for site in sites(original.graph):
        label = prefix + site.label
        path = (*scope_path, node_key(site.node))
        counterpart = counterparts.get(node_key(site.node))
        folded_graph = None if counterpart is None else subgraph_of(counterpart, site.attribute)
        if folded_graph is None:
            reason = "the folded model has no such node (same op and outputs) with this subgraph"
            context.checks.append(LocalCheck(label, path, site.attribute, UNCOVERED, reason))
        elif _unchanged(original, site.graph, folded, folded_graph):
            _record_unchanged(context, site, label, path)
        elif not site.control_flow:
            reason = f"{site.node.op_type} is not a control-flow op bnfold checks locally"
            context.checks.append(LocalCheck(label, path, site.attribute, UNCOVERED, reason))
        else:
            pending.append((site, folded_graph, label, path))
    if not pending:
        return
    try:
        captured = _capture(context, original, pending, runs)
    except Unsupported as error:
        for site, _, label, path in pending:
            context.checks.append(LocalCheck(label, path, site.attribute, UNCOVERED, str(error)))
        return
    for site, folded_graph, label, path in pending:
        _check_site(context, original, folded, site, folded_graph, label, path, captured)


def _unchanged(original: ModelProto, graph: GraphProto, folded: ModelProto, folded_graph: GraphProto) -> bool:
    """The same subgraph proto, reading the same outer-scope initializers."""
    if graph.SerializeToString() != folded_graph.SerializeToString():
        return False
    for name in free_names(graph):
        before, after = graph_initializer(original.graph, name), graph_initializer(folded.graph, name)
        if (before is None) != (after is None):
            return False
        if before is not None and before.SerializeToString() != after.SerializeToString():
            return False
    return True


def _record_unchanged(context: _Context, site: Site, label: str, path: tuple) -> None:
    """The site and every subgraph nested in it are unchanged (so is everything inside)."""
    context.checks.append(LocalCheck(label, path, site.attribute, UNCHANGED))
    for inner in sites(site.graph):
        inner_path = (*path, site.attribute, node_key(inner.node))
        _record_unchanged(context, inner, f"{label} > {inner.label}", inner_path)


def _capture(
    context: _Context,
    original: ModelProto,
    pending: list[tuple[Site, GraphProto, str, tuple]],
    runs: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per run, the values the pending subgraphs read from this scope: the scope's inputs from the
    feeds, the values its nodes compute from one run of ``original`` with them as extra outputs."""
    initializers = {tensor.name for tensor in original.graph.initializer}
    initializers |= {sparse.values.name for sparse in original.graph.sparse_initializer}
    inputs = {value.name for value in original.graph.input}
    computed = defined_names(original.graph) - inputs - initializers
    wanted: dict[str, None] = {}
    for site, folded_graph, _, _ in pending:
        for name in [*site.node.input, *free_names(site.graph), *free_names(folded_graph)]:
            if name and name not in initializers:
                wanted[name] = None
    fetch = [name for name in wanted if name in computed]
    captured = [{name: run[name] for name in wanted if name in run} for run in runs]
    # A node input that is a constant of this scope (a Loop's condition or initial carried value)
    # feeds the subgraph's formal inputs: its value, read once.
    for site, _, _, _ in pending:
        for name in site.node.input:
            tensor = graph_initializer(original.graph, name) if name else None
            if isinstance(tensor, TensorProto) and name not in captured[0]:
                value = _initializer_value(tensor)
                for values in captured:
                    values[name] = value
    if fetch:
        with extra_outputs(original, fetch):
            try:
                session = context.open_session(original, "original")
            except Exception as error:  # a BnfoldError from ort_session, or anything ONNX Runtime raises
                raise Unsupported(
                    f"the original with the needed values as outputs does not load ({_first_line(error)})"
                ) from None
            for run, values in zip(runs, captured, strict=True):
                try:
                    values.update(zip(fetch, session.run(fetch, run), strict=True))
                except Exception as error:  # ONNX Runtime raises several types
                    raise Unsupported(
                        f"capturing the values it needs failed ({_first_line(error)})"
                    ) from None
            del session
    total = sum(
        value.nbytes for values in captured for value in values.values() if isinstance(value, np.ndarray)
    )
    if total > context.capture_limit_bytes:
        raise Unsupported(
            f"the values it needs take {total / 2**20:.1f} MiB over the runs "
            f"(limit {context.capture_limit_bytes / 2**20:.1f} MiB)"
        )
    return captured


def _check_site(
    context: _Context,
    original: ModelProto,
    folded: ModelProto,
    site: Site,
    folded_graph: GraphProto,
    label: str,
    path: tuple,
    captured: list[dict[str, Any]],
) -> None:
    """Run the original and the folded subgraph standalone on the captured values, judge each output,
    then check the subgraphs nested in it from values captured in its own run."""

    def uncovered(reason: str) -> None:
        context.checks.append(LocalCheck(label, path, site.attribute, UNCOVERED, reason))

    try:
        formal = [formal_values(site, values, default_opset(original)) for values in captured]
        original_model = standalone_model(original, site, site.graph, formal[0], captured[0])
        folded_model = standalone_model(folded, site, folded_graph, formal[0], captured[0])
    except Unsupported as error:
        uncovered(str(error))
        return
    original_feeds = _standalone_feeds(original_model, formal, captured)
    folded_feeds = _standalone_feeds(folded_model, formal, captured)
    try:
        session = context.open_session(original_model, "original")
        expected = [session.run(None, feeds) for feeds in original_feeds]
    except Exception as error:  # ONNX Runtime cannot load or run the original subgraph on its own
        uncovered(f"ONNX Runtime cannot run the original subgraph standalone ({_first_line(error)})")
        return
    del session
    names = [value.name for value in site.graph.output]
    odd = [name for run in expected for name, value in zip(names, run, strict=True) if not _comparable(value)]
    if odd:
        uncovered(
            f"its output {odd[0]!r} is neither a tensor nor a sequence of tensors, which is not compared"
        )
        return
    failure = None
    if len(folded_graph.output) != len(names):
        failure = f"the folded subgraph has {len(folded_graph.output)} outputs, the original {len(names)}"
    else:
        try:
            session = context.open_session(folded_model, "folded")
            actual = [session.run(None, feeds) for feeds in folded_feeds]
            del session
        except Exception as error:  # values the original subgraph runs: the folded one must run them too
            failure = f"the folded subgraph fails on values the original runs ({_first_line(error)})"
        else:
            failure = _structure_mismatch(names, expected, actual)
    if failure is not None:
        outputs, reference = (
            failed_outputs(names, [_flat(expected[0][index]) for index in range(len(names))], failure),
            None,
        )
    else:
        outputs, reference = judge_runs(
            names,
            [[_flat(value) for value in run] for run in expected],
            [[_flat(value) for value in run] for run in actual],
            atol=context.atol,
            rtol=context.rtol,
            exact=context.exact,
            reference=lambda: _float64_outputs(original_model, original_feeds, context.reference_limit_bytes),
        )
    context.checks.append(
        LocalCheck(label, path, site.attribute, CHECKED, "", len(captured), outputs, reference)
    )
    _check_scope(
        context, original_model, folded_model, original_feeds, f"{label} > ", (*path, site.attribute)
    )


def _standalone_feeds(
    model: ModelProto, formal: list[list[np.ndarray]], captured: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per run: the formal inputs by position, then the captured outer values by name."""
    count = len(formal[0])
    names = [value.name for value in model.graph.input]
    return [
        {**dict(zip(names[:count], values, strict=True)), **{name: run[name] for name in names[count:]}}
        for values, run in zip(formal, captured, strict=True)
    ]


def _float64_outputs(
    model: ModelProto, feeds: list[dict[str, Any]], limit_bytes: int
) -> tuple[list[list[np.ndarray]], float]:
    from bnfold.reference import evaluate_float64

    run = evaluate_float64(model, feeds, limit_bytes=limit_bytes)
    return [[_flat(value) for value in outputs] for outputs in run.outputs], run.seconds


def _comparable(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (
        isinstance(value, list) and all(isinstance(item, np.ndarray) for item in value)
    )


def _flat(value: Any) -> np.ndarray:
    """A sequence output (a list of arrays) as one flat array of its elements, in order."""
    if not isinstance(value, list):
        return np.asarray(value)
    if not value:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(item).reshape(-1) for item in value])


def _structure_mismatch(names: list[str], expected: list[list[Any]], actual: list[list[Any]]) -> str | None:
    """Why the folded subgraph's outputs cannot be the original's: a sequence of another length, or
    elements of other shapes or types (tensors are compared by :func:`judge_runs` itself)."""
    for run_expected, run_actual in zip(expected, actual, strict=True):
        for name, before, after in zip(names, run_expected, run_actual, strict=True):
            if not isinstance(before, list):
                continue
            if not isinstance(after, list) or len(after) != len(before):
                return (
                    f"its output {name!r} is a sequence of {len(before)} tensors in the original, "
                    "not in the folded subgraph"
                )
            for item_before, item_after in zip(before, after, strict=True):
                if not isinstance(item_after, np.ndarray) or (item_before.shape, item_before.dtype) != (
                    item_after.shape,
                    item_after.dtype,
                ):
                    return (
                        f"its output {name!r} holds tensors of other shapes or types in the folded subgraph"
                    )
    return None


def _initializer_value(tensor: TensorProto) -> np.ndarray:
    try:
        if tensor.data_location == TensorProto.EXTERNAL:
            return read_tensor(tensor)
        return numpy_helper.to_array(tensor)
    except (ValueError, OSError, TypeError) as error:
        raise Unsupported(f"its input {tensor.name!r} cannot be read ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
