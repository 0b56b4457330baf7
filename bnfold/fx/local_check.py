"""Check folds inside torch.export's control-flow subgraphs locally, where end-to-end runs do not reach.

A ``torch.cond`` branch the verification inputs never select is never run, and a loop body runs
only as the inputs drive it: a wrong fold there would pass end to end. So, as the ONNX verifier does
(:mod:`bnfold.verify_local`), every subgraph a fold changed is run on its own: the values its
call passes in are captured from each verification run (both branches of a ``cond`` take the same
operands, whichever one the predicate selects), and the subgraph as it was before the fold and as
it is after run on them; each output is judged as the end-to-end outputs are (the tolerance, then
the float64 reference). Subgraphs nested in a checked one are captured from its local run. A loop
body is checked on the values of its first iteration, a ``map`` / ``scan`` body on the first slice.

The snapshot of the subgraphs (:func:`snapshot_subgraphs`) is taken after
:func:`~bnfold.fx.subgraphs.localize_constants` and before the fold, and the check runs before
:func:`~bnfold.fx.subgraphs.lift_constants`, so both take the same inputs. Snapshots share their
tensors with the graph being folded: folds write new tensors, never into old ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bnfold.fx.compare import TorchRun, float64_outputs, judged_result, module_outputs, output_names
from bnfold.fx.subgraphs import HigherOrderCall, own_calls
from bnfold.fx.trace import first_line
from bnfold.verify_local import CHECKED, UNCHANGED, UNCOVERED, LocalCheck

__all__ = ["snapshot_subgraphs", "check_subgraphs"]


def subgraph_path(parent: str, target: str) -> str:
    """How the report names a subgraph (:class:`~bnfold.fx.view.FxView`'s ``path``)."""
    return target if parent == "main" else f"{parent}/{target}"


def snapshot_subgraphs(graph_module: fx.GraphModule, parent: str = "main") -> dict[str, fx.GraphModule]:
    """A copy of every subgraph the fold may change (path -> module), sharing its tensors; a nested
    subgraph's copy is the one its enclosing copy calls."""
    found: dict[str, fx.GraphModule] = {}
    for call in own_calls(graph_module):
        for target in call.subgraph_targets:
            path = subgraph_path(parent, target)
            found[path] = _snapshot(getattr(graph_module, target), path, found)
    return found


def _snapshot(subgraph: fx.GraphModule, path: str, found: dict[str, fx.GraphModule]) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph: the tensors it reads are the same objects."""
    copied = fx.GraphModule(subgraph, copy.deepcopy(subgraph.graph), type(subgraph).__name__)
    for call in own_calls(subgraph):
        for target in call.subgraph_targets:
            inner_path = subgraph_path(path, target)
            found[inner_path] = _snapshot(getattr(subgraph, target), inner_path, found)
            setattr(copied, target, found[inner_path])
    return copied


@dataclass
class _Context:
    originals: dict[str, fx.GraphModule]
    changed: set[str]
    atol: float | None
    rtol: float | None
    exact: str


def check_subgraphs(
    graph_module: fx.GraphModule,
    originals: dict[str, fx.GraphModule],
    changed: Iterable[str],
    runs: Sequence[tuple[Any, ...]],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    exact: str = "auto",
) -> list[LocalCheck]:
    """One :class:`~bnfold.verify_local.LocalCheck` per snapshot subgraph: ``checked`` (changed by a
    fold: run before and after on captured values), ``unchanged``, or ``uncovered`` with the reason.

    ``runs`` are the top-level graph's flat inputs, one tuple per verification run.
    """
    context = _Context(originals, set(changed), atol, rtol, exact)
    checks: list[LocalCheck] = []
    _check_scope(context, graph_module, "main", [tuple(run) for run in runs], checks)
    return checks


def _check_scope(
    context: _Context,
    graph_module: fx.GraphModule,
    path: str,
    runs: list[tuple[Any, ...]],
    checks: list[LocalCheck],
) -> None:
    calls = [call for call in own_calls(graph_module) if _reaches_change(context, path, call)]
    captured, failure = _capture(graph_module, calls, runs) if calls else ({}, "")
    for call in own_calls(graph_module):
        for target in call.subgraph_targets:
            sub_path = subgraph_path(path, target)
            if sub_path not in context.originals:
                continue
            label = f"{call.node.name} {sub_path}"
            if not _changed_below(context, sub_path):
                checks.append(LocalCheck(label, (sub_path,), target, UNCHANGED))
                continue
            inputs = [call.subgraph_inputs(args) for args in captured.get(call.node, [])]
            if not inputs:
                reason = failure or "no verification run reached its call"
                checks.append(LocalCheck(label, (sub_path,), target, UNCOVERED, reason))
                continue
            folded = getattr(graph_module, target)
            folded.recompile()  # the driver edits graphs; their code is made when the fold ends
            if sub_path in context.changed:
                checks.append(_check_one(context, label, sub_path, target, folded, inputs))
            _check_scope(context, folded, sub_path, [tuple(values) for values in inputs], checks)


def _reaches_change(context: _Context, path: str, call: HigherOrderCall) -> bool:
    return any(_changed_below(context, subgraph_path(path, target)) for target in call.subgraph_targets)


def _changed_below(context: _Context, path: str) -> bool:
    return any(changed == path or changed.startswith(path + "/") for changed in context.changed)


class _Capture(fx.Interpreter):
    """Runs a graph and keeps the evaluated arguments of some higher-order calls."""

    def __init__(self, graph_module: fx.GraphModule, calls: list[HigherOrderCall]) -> None:
        super().__init__(graph_module)
        self.wanted = {call.node for call in calls}
        self.captured: dict[fx.Node, list[tuple]] = {}

    def run_node(self, node: fx.Node) -> Any:
        if node in self.wanted:
            args, _ = self.fetch_args_kwargs_from_env(node)
            self.captured.setdefault(node, []).append(args)
        return super().run_node(node)


def _capture(
    graph_module: fx.GraphModule, calls: list[HigherOrderCall], runs: list[tuple[Any, ...]]
) -> tuple[dict[fx.Node, list[tuple]], str]:
    """Each call's evaluated arguments over every run that ran (and why the first failing one failed)."""
    captured: dict[fx.Node, list[tuple]] = {}
    failure = ""
    for run in runs:
        interpreter = _Capture(graph_module, calls)
        try:
            with torch.no_grad():
                interpreter.run(*run)
        except Exception as error:  # a run the graph rejects (a guard) or cannot run: reported
            failure = failure or f"capturing its inputs failed ({first_line(error)})"
        for node, values in interpreter.captured.items():
            captured.setdefault(node, []).extend(values)
    return captured, failure


def _check_one(
    context: _Context,
    label: str,
    path: str,
    target: str,
    folded: fx.GraphModule,
    inputs: list[list[Any]],
) -> LocalCheck:
    original = context.originals[path]
    try:
        expected = [module_outputs(original, values) for values in inputs]
        actual = [module_outputs(folded, values) for values in inputs]
    except Exception as error:  # the subgraph run on its own: report, never crash the fold
        return LocalCheck(label, (path,), target, UNCOVERED, f"running it failed ({first_line(error)})")
    runs = [TorchRun(tuple(values), None, outputs) for values, outputs in zip(inputs, expected, strict=True)]

    def reference() -> tuple[list[list[Any]], float]:
        return float64_outputs(lambda: copy.deepcopy(original), runs)

    judged = judged_result(
        output_names(len(expected[0])),
        runs,
        actual,
        atol=context.atol,
        rtol=context.rtol,
        exact=context.exact,
        reference=reference,
        provider="torch",
        input_source="captured",
    )
    return LocalCheck(label, (path,), target, CHECKED, "", len(inputs), judged.outputs, judged.reference)
