"""The PyTorch fold driver: trace, run the rules over every normalization node, report, check.

``fold_module`` is the public entry: a function over a value that returns a :class:`ModuleFoldResult`
with the folded GraphModule and the same :class:`~bnfold.report.Report` the ONNX path produces.
"""

from __future__ import annotations

import copy
import logging
import operator
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from bnfold.comparison import ReferenceUnavailable
from bnfold.core.driver import run_rules
from bnfold.core.protocol import Rule
from bnfold.core.table import TORCH, check_skip_rules
from bnfold.errors import BnfoldError
from bnfold.fx.compare import (
    TorchRun,
    covered_runs,
    float64_outputs,
    judged_result,
    module_copier,
    module_outputs,
    output_names,
)
from bnfold.fx.local_check import check_subgraphs, snapshot_subgraphs
from bnfold.fx.no_ops import remove_no_ops
from bnfold.fx.rules import RULES
from bnfold.fx.subgraphs import lift_constants, localize_constants
from bnfold.fx.trace import as_args, is_exported_module, trace
from bnfold.fx.view import FxView
from bnfold.report import Outcome, Report
from bnfold.verify import VerificationResult
from bnfold.verify_local import UNCOVERED, LocalCheck

__all__ = ["ModuleFoldResult", "fold_module", "rule_names"]

logger = logging.getLogger(__name__)


@dataclass
class ModuleFoldResult:
    """The folded module, what happened to each normalization, which tracer made the graph, the check."""

    module: fx.GraphModule
    report: Report
    tracer: str
    verification: VerificationResult | None = None

    @property
    def changed(self) -> bool:
        return bool(self.report.folded or self.report.merged)


def rule_names(rules: Sequence[Rule] = RULES) -> list[str]:
    return [rule.name for rule in rules]


def fold_module(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    rules: Sequence[Rule] = RULES,
    skip_rules: Iterable[str] = (),
    inplace: bool = False,
    tracer: str = "auto",
    dynamic_shapes: Any = None,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    exact: str = "auto",
) -> ModuleFoldResult:
    """Fold every BatchNorm that a Conv / ConvTranspose / Linear before it can absorb exactly.

    ``model`` must be in ``eval()`` mode (folding uses the running statistics; a model in training
    mode raises :class:`BnfoldError`). It may be any ``nn.Module``, a GraphModule, or an
    ``ExportedProgram``. ``example_inputs`` (a tensor or a tuple of positional inputs) is optional but
    recommended: it lets bnfold check the rank of each layer's output (a Linear's features are on
    axis 1 only for 2-D output), enables the ``torch.export`` fallback for models that
    ``symbolic_trace`` cannot trace, and with ``verify=True`` the folded module is run against the
    original on it and at a second size of its dynamic axes (those of ``dynamic_shapes``; else the
    batch axis and the axes of size 1), judged as :func:`bnfold.verify` judges (``exact``: ``auto``
    evaluates the original in float64 for an output over tolerance, ``always``, ``strict``; see
    :mod:`bnfold.comparison`). ``result.verification`` says what was covered; a mismatch is a
    result, not an exception.

    The original model is never modified. Unless ``inplace=True`` it is deep-copied first; with
    ``inplace=True`` the result shares every unfolded parameter with it (no copy of a big model),
    while folded layers still get new tensors. Every fold is computed in float64 and rounded once
    into the layer's dtype (float16, bfloat16, float32, float64).
    """
    skipped = check_skip_rules(skip_rules, TORCH)
    fresh = isinstance(model, torch.export.ExportedProgram)
    program = model if fresh else None
    if fresh:
        model = model.module()  # a new module: nothing of the user's to protect by copying
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"expected a torch.nn.Module or ExportedProgram, not {type(model).__name__}")
    if model.training and not is_exported_module(model):
        raise BnfoldError(
            f"{type(model).__name__} is in training mode; call model.eval() first: folding uses the "
            "running statistics, which only eval mode computes with"
        )
    args = as_args(example_inputs)
    checking = args is not None and verify
    runs, uncovered = (
        covered_runs(model, args, axes=dynamic_axes_of(dynamic_shapes, args)) if checking else ([], [])
    )
    reference = _reference_factory(model, program, runs, inplace=inplace, exact=exact) if checking else None
    working = model if inplace or fresh else _deepcopy(model)
    traced = trace(working, args, tracer=tracer, dynamic_shapes=dynamic_shapes)
    # torch.cond branches (and loop / map bodies) get their parameters as operands: make them
    # constants of each subgraph, so the rules fold there too (the driver visits subgraphs last).
    localize_constants(traced.graph_module)
    originals = snapshot_subgraphs(traced.graph_module) if checking else {}
    context = FxView(traced.graph_module, root=working, trusted_shapes=traced.trusted_shapes)
    report = Report(source=type(model).__name__)
    report.extras["tracer"] = traced.tracer
    if traced.fallback_reason:
        report.extras["symbolic_trace_error"] = traced.fallback_reason
    removed = remove_no_ops(context)  # eval no-ops (Identity, dropout) must not hide a BN's neighbour
    if removed:
        context.refresh()
        report.extras["eval_no_ops_removed"] = removed
    run_rules(context, rules, report, skipped=skipped)
    local = []
    if originals and _changed_graphs(report):
        local = check_subgraphs(
            context.graph_module,
            originals,
            _changed_graphs(report),
            [tuple(tree_leaves(run.args)) for run in runs],
            atol=atol,
            rtol=rtol,
            exact=exact,
        )
    lift_constants(context.graph_module)  # back to torch.export's form: subgraph tensors as operands
    if traced.trusted_shapes and (report.folded or report.merged):
        context.assumed_ranks.update(_exported_input_ranks(context.graph_module))
    if context.assumed_ranks:
        _insert_rank_checks(context.graph_module, context.assumed_ranks)
        report.extras["input_rank_checks"] = dict(context.assumed_ranks)
    graph_module = context.graph_module
    graph_module.graph.lint()
    graph_module.recompile()
    result = ModuleFoldResult(module=graph_module, report=report, tracer=traced.tracer)
    if checking:
        uncovered = [*uncovered, *_subgraph_coverage(report, local)]
        result.verification = _check(graph_module, runs, uncovered, reference, atol, rtol, exact)
        result.verification.local = local
        report.extras["verification"] = result.verification.to_dict()
        if not result.verification:
            logger.warning("folded module does not match the original:\n%s", result.verification.to_text())
    return result


def _changed_graphs(report: Report) -> list[str]:
    """The subgraphs (by path) in which a fold changed something."""
    changed = (Outcome.FOLDED, Outcome.MERGED)
    return sorted({d.graph for d in report.decisions if d.graph != "main" and d.outcome in changed})


def _subgraph_coverage(report: Report, local: list[LocalCheck]) -> list[str]:
    """What the runs may not reach: changed subgraphs that a local check did not cover, and why."""
    lines = [check.describe() for check in local if check.status == UNCOVERED]
    checked = {check.path[0] for check in local}
    graphs = [graph for graph in _changed_graphs(report) if graph not in checked]
    if graphs:
        lines.append(
            f"folds inside control-flow subgraphs ({', '.join(graphs)}) are checked only where these "
            "runs take the model (a torch.cond branch runs only when its predicate selects it)"
        )
    return lines


def _exported_input_ranks(graph_module: fx.GraphModule) -> dict[str, int]:
    """The rank of each tensor input of a torch.export graph, which every fold in it relies on.

    torch.export's guards check the size of each axis the example had, but not the rank (torch 2.13):
    the exported module also runs an input with more axes, e.g. ``[N, F, F]`` through a Linear ->
    BatchNorm1d exported from a 2-D ``[N, F]`` example, where the BN normalizes another axis and the
    folded module would compute something else. A folded module checks these ranks.
    """
    return {
        node.name: node.meta["val"].dim()
        for node in graph_module.graph.nodes
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor)
    }


def _insert_rank_checks(graph_module: fx.GraphModule, ranks: dict[str, int]) -> None:
    """Make the folded module refuse inputs of another rank than the example's, where a fold relied on it.

    A symbolic_trace graph accepts inputs of any rank, but whether a Linear's features (or a Conv1d's
    channels) sit on the BN's axis 1 depends on it: a Linear -> BatchNorm1d folded from a 2-D example
    would compute something else on a 3-D input. Like torch.export's guards, the check turns such an
    input into an error instead of a wrong result (an exported ONNX file fixes its input ranks anyway).
    """
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder" and node.name in ranks]
    if not placeholders:
        return
    with graph.inserting_after(placeholders[-1]):
        for placeholder in reversed(placeholders):
            rank = ranks[placeholder.name]
            message = (
                f"bnfold folded this module for a {rank}-D `{placeholder.target}` (the rank of the example "
                "input), which the folded layers rely on"
            )
            rank_node = graph.call_method("dim", (placeholder,))
            with graph.inserting_after(rank_node):
                equal = graph.call_function(operator.eq, (rank_node, rank))
            with graph.inserting_after(equal):
                graph.call_function(torch._assert, (equal, message))


def _deepcopy(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch 2.13 warns about its own pytree specs when an ExportedProgram.module() is copied.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(model)


# -- checking -----------------------------------------------------------------------------------
def _check(graph_module, runs: list[TorchRun], uncovered: list[str], reference, atol, rtol, exact: str):
    """The folded module on every run of the original, judged like the ONNX verifier judges."""
    actual, kept = [], []  # kept: positions of the runs the folded module accepted
    for position, run in enumerate(runs):
        try:
            outputs = module_outputs(graph_module, run.args)
        except Exception as error:
            if position == 0:
                raise
            # A module traced by torch.export at the example's shapes accepts only those.
            uncovered = [*uncovered, f"the folded module rejects {run.describe()['input_shapes']} ({error})"]
            continue
        if len(outputs) != len(run.expected):
            raise BnfoldError(
                f"the folded module returns {len(outputs)} tensors, the original {len(run.expected)}"
            )
        actual.append(outputs)
        kept.append(position)

    def kept_reference():
        outputs, seconds = reference()
        return [outputs[position] for position in kept], seconds

    return judged_result(
        output_names(len(runs[0].expected)),
        [runs[position] for position in kept],
        actual,
        atol=atol,
        rtol=rtol,
        exact=exact,
        reference=kept_reference,
        provider="torch",
        input_source="example",
        uncovered=uncovered,
    )


def _reference_factory(model: nn.Module, program, runs: list[TorchRun], *, inplace: bool, exact: str):
    """A function giving the original's float64 outputs on ``runs``, computable after the fold.

    An in-place fold leaves no original to evaluate later: with ``exact="always"`` it is evaluated
    now, else the judgment is reported as unavailable.
    """
    if program is not None:
        factory = program.module  # a fresh module each call
    elif not inplace:
        factory = module_copier(model)
    elif exact == "always":
        try:
            computed = float64_outputs(module_copier(model), runs)
        except ReferenceUnavailable as error:
            failure = error

            def unavailable():
                raise failure

            return unavailable
        return lambda: computed
    else:

        def in_place():
            raise ReferenceUnavailable(
                "the module was folded in place; pass exact='always' to evaluate it first"
            )

        return in_place
    cache: list = []

    def evaluate():
        if not cache:
            cache.append(float64_outputs(factory, runs))
        return cache[0]

    return evaluate


def dynamic_axes_of(dynamic_shapes: Any, args: tuple[Any, ...] | None) -> dict[int, set[int]] | None:
    """Positional input -> its dynamic axes, from torch.export-style ``dynamic_shapes`` (None: unknown).

    Accepts a tuple/list aligned with the inputs or a dict by argument name (in order); each entry a
    dict ``{axis: Dim}``, a tuple/list with a Dim or None per axis, or None.
    """
    if dynamic_shapes is None or args is None:
        return None
    entries = list(dynamic_shapes.values()) if isinstance(dynamic_shapes, dict) else list(dynamic_shapes)
    axes: dict[int, set[int]] = {}
    for index, entry in enumerate(entries[: len(args)]):
        if isinstance(entry, dict):
            axes[index] = {int(axis) for axis, dim in entry.items() if dim is not None}
        elif isinstance(entry, list | tuple):
            axes[index] = {axis for axis, dim in enumerate(entry) if dim is not None}
    return axes
