"""Every reference architecture folds completely in torch, through both tracers, and exports exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402
from bnfold.testing import assert_equivalent  # noqa: E402
from models import REFERENCE_MODELS, build  # noqa: E402

# Models that keep some BNs by design (expected_kept, e.g. pre-activation BN -> ReLU -> Conv) cannot
# fold completely; the ONNX path's tests/test_models.py pins their exact counts.
MODEL_NAMES = [name for name, spec in REFERENCE_MODELS.items() if not spec.expected_kept]


def split_folds(report) -> tuple[list, list[tuple[str, str]]]:
    """(folded BN decisions, (op, rule) of the folded per-channel Mul/Add rows)."""
    affine = [(d.op_type, d.rule) for d in report.folded if d.op_type in ("Mul", "Add")]
    return [d for d in report.folded if d.op_type not in ("Mul", "Add")], affine


# Per-channel Mul/Add the torch fold folds into a layer: ConvNeXt's layer scale after its second Linear.
AFFINE_FOLDS = {"convnext_downsample": [("Mul", "linear-affine")]}


def batchnorm_left(module: torch.nn.Module) -> list[str]:
    """BN modules and BN calls still in a folded module."""
    batchnorm = torch.nn.modules.batchnorm._BatchNorm
    layers = [name for name, layer in module.named_modules() if isinstance(layer, batchnorm)]
    calls = [node.name for node in module.graph.nodes if "batch_norm" in str(node.target)]
    return layers + calls


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_model_folds_completely(name: str, tracer: str) -> None:
    spec = REFERENCE_MODELS[name]
    model, example = build(name)
    result = bnfold.fold_module(model, example, tracer=tracer)

    # BNs only the ONNX fold can fold (folded_in_onnx_only; none today) are kept by the torch fold.
    kept = spec.expected_kept + spec.folded_in_onnx_only
    assert result.tracer == ("torch.fx.symbolic_trace" if tracer == "fx" else "torch.export")
    folded_bns, affine = split_folds(result.report)
    assert len(folded_bns) == spec.expected_batchnorms - kept
    assert affine == AFFINE_FOLDS.get(name, [])
    assert len(result.report.kept) == kept
    assert len(batchnorm_left(result.module)) == kept
    never = result.report.never_foldable
    assert all(decision.reason is Reason.PER_SAMPLE_STATISTICS for decision in never)
    assert len(never) == (4 if name == "convnext_downsample" else 0)
    assert result.verification, result.verification.to_text()
    # An independent check on a fresh batch, not the example the fold was verified on.
    fresh = torch.randn_like(example) if tracer == "fx" else torch.randn(example.shape)
    with torch.no_grad():
        torch.testing.assert_close(result.module(fresh), model(fresh), rtol=1e-5, atol=1e-5)


def test_reports_agree_across_tracers() -> None:
    model, example = build("resnet_tiny")
    by_fx = bnfold.fold_module(model, example, tracer="fx").report
    by_export = bnfold.fold_module(model, example, tracer="export").report
    rows = [(d.node, d.op_type, d.outcome, d.rule, d.into) for d in by_fx.decisions]
    assert rows == [(d.node, d.op_type, d.outcome, d.rule, d.into) for d in by_export.decisions]
    assert rows[0] == ("stem.1", "BatchNorm2d", Outcome.FOLDED, "conv-bn", "stem.0")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_writes_a_verified_folded_onnx(name: str, tmp_path: Path) -> None:
    model, example = build(name)
    path = tmp_path / f"{name}.onnx"
    result = bnfold.export(model, example, path)

    spec = REFERENCE_MODELS[name]
    kept = spec.expected_kept
    assert result.written and result.verification
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    assert [node.op_type for node in written.graph.node].count("BatchNormalization") == kept
    in_torch = spec.expected_batchnorms - kept - spec.folded_in_onnx_only
    folded_bns, affine = split_folds(result.report)
    assert len(folded_bns) == in_torch
    assert affine == AFFINE_FOLDS.get(name, [])
    assert result.onnx_report.count(Outcome.FOLDED) == spec.folded_in_onnx_only
    assert result.report.extras["verification"]["passed"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert_equivalent(model, path, example)
