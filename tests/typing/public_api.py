"""How a typed pipeline uses bnfold's public API; ``mypy`` checks this file (``scripts/test.sh``).

Not a test pytest runs: it is type-checked only, with ``strict`` (so a call into an unannotated
public function is an error) and ``warn_unused_ignores`` (so each ``type: ignore`` below proves
that mypy *does* reject a wrong argument: were the parameter untyped, the ignore would be unused).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx import ModelProto

import bnfold
from bnfold.errors import BnfoldError
from bnfold.report import Decision, Outcome, Reason, Report, Summary
from bnfold.verify import OutputComparison, VerificationResult

if TYPE_CHECKING:  # bnfold.export's result (importing bnfold.fx imports torch)
    from bnfold.fx.onnx_export import ExportResult


def fold_a_file(source: Path, output: Path) -> bool:
    result: bnfold.FileFoldResult = bnfold.fold_file(
        source,
        output,
        provider="cpu",
        input_shapes={"input": [1, 3, 224, 224]},
        skip_rules=["conv-bn"],
        report_path=output.with_suffix(".json"),
    )
    model: ModelProto = result.model
    written: bool = result.written
    text: str = result.to_text()
    if result.after is not None:
        counts: dict[str, int] = result.after.op_counts
        parameter_bytes: int = result.after.parameter_bytes
        del counts, parameter_bytes
    del model, text
    return written and result.passed


def read_a_report(source: str) -> tuple[int, list[str]]:
    result: bnfold.FoldResult = bnfold.fold_onnx(source, skip_rules=("bn-conv",))
    report: Report = result.report
    summary: Summary = report.summary()
    as_dict: dict[str, int] = summary.to_dict()
    kept: list[Decision] = report.kept
    reasons: list[Reason | None] = [decision.reason for decision in kept]
    outcomes: list[Outcome] = [decision.outcome for decision in report.decisions]
    del as_dict, reasons, outcomes
    return summary.folded, [decision.label for decision in kept]


def verify_two(original: ModelProto, folded: ModelProto) -> float:
    check: VerificationResult = bnfold.verify(
        original, folded, provider="cpu", inputs={"x": np.zeros((1, 3), np.float32)}, seed=1
    )
    worst: list[OutputComparison] = [output for output in check.outputs if not output.passed]
    return max((output.max_abs_error for output in worst), default=0.0)


def save_and_load(model: ModelProto, path: Path) -> ModelProto:
    bnfold.save_model(model, path, external_data=False)
    return bnfold.load_model(path).model


def fold_large(path: Path, out: Path) -> int:
    """A service's loop body: one weight store (one memory budget) for its folds, closed after."""
    with bnfold.WeightStore(memory_budget=64 * 2**20) as store:
        with bnfold.load_model(path, lazy=True, store=store) as loaded:
            result: bnfold.FoldResult = bnfold.fold_onnx(loaded.model, inplace=True, store=store)
            bnfold.save_model(result.model, out)
        kept: int = store.memory_bytes + store.spill_bytes
    file_result = bnfold.fold_file(path, out, verify=False, store=None)
    return kept + (file_result.store.memory_bytes if file_result.store is not None else 0)


def describe(result: bnfold.PipelineResult) -> str:
    """One function for the results of both pipelines (ONNX file, PyTorch export)."""
    state = "written" if result.written else "not written"
    return f"{result.path}: {state}, {result.report.summary()}, passed={result.passed}"


def describe_both(source: Path, exported: ExportResult) -> list[str]:
    return [describe(bnfold.fold_file(source)), describe(exported)]


def errors() -> str:
    try:
        bnfold.fold_file("model.onnx")
    except BnfoldError as error:
        return str(error)
    return ""


def wrong_arguments_are_rejected(model: ModelProto) -> None:
    bnfold.fold_file(42)  # type: ignore[arg-type]
    bnfold.fold_onnx(model, skip_rules=7)  # type: ignore[arg-type]
    bnfold.verify(model, model, seed="zero")  # type: ignore[arg-type]
    bnfold.save_model(model, 3.5)  # type: ignore[arg-type]
    bnfold.fold_file("model.onnx", benchmark_runs="many")  # type: ignore[arg-type]
    count: str = bnfold.fold_onnx(model).report.summary().folded  # type: ignore[assignment]
    describe(bnfold.fold_onnx(model))  # type: ignore[arg-type]
    del count
