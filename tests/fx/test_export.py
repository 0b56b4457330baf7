"""bnfold.export: fold in torch, export, fold what is left in ONNX, verify against the original, write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import bnfold  # noqa: E402
from bnfold import BnfoldError, Outcome, OutputError, Reason  # noqa: E402
from tests.fx import nets  # noqa: E402

nn = torch.nn


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def run_onnx(path: Path, **feeds: np.ndarray) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_bn_kept_in_torch_is_folded_by_the_onnx_pass(tmp_path: Path) -> None:
    model = nets.randomized(nets.BNCalledTwice())
    example = torch.randn(2, 3, 5, 5)
    result = bnfold.export(model, example, tmp_path / "model.onnx")

    assert [d.reason for d in result.report.kept] == [Reason.SHARED_MODULE] * 2
    # In ONNX the two calls are two BatchNormalization nodes sharing statistics, each folded into its
    # Conv (and the two convs, parallel branches of one input, then merged).
    bns = [d for d in result.onnx_report.decisions if d.op_type == "BatchNormalization"]
    assert [(d.outcome, d.rule) for d in bns] == [(Outcome.FOLDED, "conv-bn")] * 2
    assert result.report.extras["onnx_fold"]["summary"]["folded"] == 2
    assert "BatchNormalization" not in op_types(tmp_path / "model.onnx")
    assert result.written and result.verification


def test_untraceable_and_functional_models_export(tmp_path: Path) -> None:
    for name, model, example in [
        ("branch", nets.randomized(nets.ShapeBranchNet()), torch.randn(2, 3, 10, 10)),
        ("functional", nets.randomized(nets.FunctionalBNNet()), torch.randn(2, 3, 6, 6)),
    ]:
        path = tmp_path / f"{name}.onnx"
        result = bnfold.export(model, example, path)
        assert result.written and result.verification, result.to_text()
        assert result.report.kept == [] and result.onnx_report.decisions == []
        assert "BatchNormalization" not in op_types(path)
    assert result.fold.tracer == "torch.fx.symbolic_trace"


def test_dynamic_axes_are_passed_through(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    path = tmp_path / "dynamic.onnx"
    axes = {"input": {0: "batch"}, "output": {0: "batch"}}
    bnfold.export(model, torch.randn(2, 4, 5, 5), path, dynamic_axes=axes)

    batch = torch.randn(7, 4, 5, 5)
    (output,) = run_onnx(path, input=batch.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(output, model(batch).numpy(), rtol=1e-5, atol=1e-5)


def test_mismatch_is_a_result_and_writes_nothing_unless_forced(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    example = torch.randn(2, 4, 5, 5)
    path = tmp_path / "strict.onnx"
    result = bnfold.export(model, example, path, atol=0.0, rtol=0.0)  # any rounding fails

    assert not result.written and not result.verification
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert "MISMATCH" in result.to_text()
    forced = bnfold.export(model, example, path, atol=0.0, rtol=0.0, force=True)
    assert forced.written and path.exists()


def test_names_and_several_outputs(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvOutputReturned())
    path = tmp_path / "two.onnx"
    result = bnfold.export(model, torch.randn(1, 3, 5, 5), path, input_names=["image"])
    graph = onnx.load(str(path)).graph
    assert [value.name for value in graph.input] == ["image"]
    assert [value.name for value in graph.output] == ["output_0", "output_1"]
    assert [output.name for output in result.verification.outputs] == ["output_0", "output_1"]


def test_usage_errors_are_one_line_bnfold_errors(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    example = torch.randn(1, 4, 5, 5)
    with pytest.raises(BnfoldError, match="unknown exporter"):
        bnfold.export(model, example, tmp_path / "a.onnx", exporter="tflite")
    with pytest.raises(BnfoldError, match="dynamic_shapes is for exporter='dynamo'"):
        bnfold.export(model, example, tmp_path / "a.onnx", dynamic_shapes={"inputs": {0: "batch"}})
    with pytest.raises(OutputError, match="does not exist"):
        bnfold.export(model, example, tmp_path / "missing" / "a.onnx")
    model.train()
    with pytest.raises(BnfoldError, match="training mode"):
        bnfold.export(model, example, tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


def test_dynamo_exporter(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    result = bnfold.export(
        model, torch.randn(2, 4, 5, 5), tmp_path / "dynamo.onnx", exporter="dynamo", opset=18
    )
    assert result.written and result.verification, result.to_text()
    assert "BatchNormalization" not in op_types(tmp_path / "dynamo.onnx")


def test_dry_run_and_skip_rules_of_either_backend(tmp_path: Path) -> None:
    model = nets.randomized(nets.ConvBN())
    example = torch.randn(1, 4, 5, 5)
    dry = bnfold.export(model, example, None)
    assert dry.path is None and not dry.written and dry.verification and list(tmp_path.iterdir()) == []

    skipped = bnfold.export(model, example, tmp_path / "kept.onnx", skip_rules=["conv-bn"])
    assert [d.reason for d in skipped.report.kept] == [Reason.RULE_DISABLED]
    assert [d.reason for d in skipped.onnx_report.kept] == [Reason.RULE_DISABLED]
    assert op_types(tmp_path / "kept.onnx").count("BatchNormalization") == 1
    bnfold.export(model, example, None, skip_rules=["gemm-bn", "linear-bn"])  # one backend's names
    with pytest.raises(BnfoldError, match="unknown rule"):
        bnfold.export(model, example, None, skip_rules=["fold-everything"])


class ProvenanceNet(nn.Module):
    """A nested conv -> BN (folds in torch), a conv -> BN pair called twice (torch keeps the shared BN,
    the ONNX fold folds both calls), and a bias-free Linear -> BN (folds in torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        )
        self.shared = nn.Conv2d(4, 4, 1)
        self.shared_bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.stage(inputs))
        features = self.shared_bn(self.shared(features)) + self.shared_bn(self.shared(-features))
        return self.head_bn(self.head(features.mean((2, 3))))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_writes_provenance_of_both_folds(exporter: str, tmp_path: Path) -> None:
    model = nets.randomized(ProvenanceNet())
    path = tmp_path / "model.onnx"

    result = bnfold.export(model, torch.randn(2, 3, 6, 6), path, exporter=exporter, opset=18)

    assert result.written and result.verification, result.to_text()
    written = onnx.load(str(path))
    metadata = {prop.key: prop.value for prop in written.metadata_props}
    assert metadata["bnfold.version"] == bnfold.__version__
    assert metadata["bnfold.exporter"] == exporter
    torch_folds = [d for d in result.report.decisions if d.outcome is Outcome.FOLDED]
    onnx_folds = [d for d in result.onnx_report.decisions if d.outcome is Outcome.FOLDED]
    assert "stage.0.0" in [d.into for d in torch_folds] and onnx_folds  # both folds absorbed something
    rules = sorted({d.rule for d in torch_folds + onnx_folds})
    assert metadata["bnfold.rules_applied"] == ",".join(rules)
    assert json.loads(metadata["bnfold.summary"]) == result.report.summary().to_dict()
    assert json.loads(metadata["bnfold.onnx_fold_summary"]) == result.onnx_report.summary().to_dict()
    # Each torch absorption is on the layer whose weight is the absorbing module's parameter.
    for decision in torch_folds:
        (node,) = [node for node in written.graph.node if f"{decision.into}.weight" in node.input]
        what = f"{decision.op_type} {decision.label}"
        assert node.doc_string == f"bnfold: absorbed {what} by {decision.rule} in torch before the export"
    # A BN torch kept is absorbed in ONNX by the node the ONNX report names.
    for decision in onnx_folds:
        (node,) = [node for node in written.graph.node if node.name == decision.into]
        what = f"{decision.op_type} {decision.label} (output {decision.output})"
        assert node.doc_string == f"bnfold: absorbed {what} by {decision.rule}"
    annotated = [node for node in written.graph.node if node.doc_string]
    assert len(annotated) == len(torch_folds) + len(onnx_folds)
    assert "BatchNormalization" not in op_types(path)


class SizeReadingNet(nn.Module):
    """A branch on the width (symbolic_trace cannot trace it) and a flatten that reads the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-1] > 8:
            inputs = inputs[..., :6, :6]
        features = self.bn(self.conv(inputs))
        return self.fc(features.view(inputs.shape[0], -1))


def test_dynamic_axes_of_a_torch_export_fold_stay_dynamic_in_the_file(tmp_path: Path) -> None:
    model = nets.randomized(nets.ShapeBranchNet())  # symbolic_trace fails: torch.export folds it
    path = tmp_path / "dynamic.onnx"
    axes = {"input": {0: "batch"}, "output": {0: "batch"}}

    result = bnfold.export(model, torch.randn(2, 3, 10, 10), path, dynamic_axes=axes)

    assert result.fold.tracer == "torch.export" and result.written and result.verification
    for batch in (1, 5):
        inputs = torch.randn(batch, 3, 10, 10)
        (output,) = run_onnx(path, input=inputs.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(output, model(inputs).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "example", "axes", "message"),
    [
        # The width branch fixes the width: it cannot be a dynamic axis of the file.
        (nets.ShapeBranchNet(), (2, 3, 10, 10), {0: "batch", 3: "width"}, "the module's code fixes them"),
        # torch.export treats an example size of 1 as fixed.
        (nets.ShapeBranchNet(), (1, 3, 10, 10), {0: "batch"}, "size 1 on input axis 0"),
        # The graph reads the batch size: the torchscript exporter would record the example's.
        (SizeReadingNet(), (2, 3, 10, 10), {0: "batch"}, "reads input sizes"),
    ],
)
def test_dynamic_axes_a_torch_export_fold_cannot_keep_are_refused(
    model: nn.Module, example: tuple[int, ...], axes: dict, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "dynamic.onnx"

    with pytest.raises(BnfoldError, match="dynamic_axes") as raised:
        bnfold.export(nets.randomized(model), torch.randn(*example), path, dynamic_axes={"input": axes})

    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
    # Without dynamic_axes the same module exports, verified at the example's sizes.
    assert bnfold.export(nets.randomized(model), torch.randn(*example), path).written


def test_a_size_reading_module_exports_dynamic_with_the_dynamo_exporter(tmp_path: Path) -> None:
    """What the refusal above advises works: the dynamo exporter keeps the size read as an op."""
    model = nets.randomized(SizeReadingNet())
    path = tmp_path / "dynamic.onnx"
    batch = torch.export.Dim("batch")

    result = bnfold.export(
        model, torch.randn(2, 3, 10, 10), path, exporter="dynamo", opset=18, dynamic_shapes=({0: batch},)
    )

    assert result.written and result.verification
    inputs = torch.randn(5, 3, 10, 10)
    (output,) = run_onnx(path, input=inputs.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(output, model(inputs).numpy(), rtol=1e-4, atol=1e-5)
