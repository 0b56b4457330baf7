"""The PyTorch paths judge like the ONNX verifier: float64 reference, coverage of dynamic axes."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import bnfold
from bnfold.testing import assert_equivalent

MODES = ("auto", "always", "strict")


def sensitive_module(depth: int = 6, channels: int = 8, offset: float = 1e3) -> nn.Module:
    """Conv (bias near ``offset``) -> BN (running mean near ``offset``) -> ReLU, ``depth`` times:
    the BN cancels a large bias, so the float32 original carries rounding error far above the
    default tolerance, while the float64 fold does not."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        norm = nn.BatchNorm2d(channels)
        with torch.no_grad():
            conv.weight.mul_(1.6)
            conv.bias.copy_(offset + 0.1 * torch.randn(channels))
            norm.running_mean.copy_(offset + 0.5 * torch.randn(channels))
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_(0.0, 0.5)
        layers += [conv, norm, nn.ReLU()]
    return nn.Sequential(*layers).eval()


def test_fold_module_passes_a_sensitive_model_by_the_float64_judgment():
    model = sensitive_module()
    example = torch.randn(1, 8, 8, 8)

    strict = bnfold.fold_module(model, example, exact="strict").verification
    judged = bnfold.fold_module(model, example).verification

    assert not strict, strict.to_text()
    output = judged.outputs[0]
    assert judged.passed and output.decided_by == "float64 reference", judged.to_text()
    assert output.exact.folded_rms < output.exact.original_rms
    # The example, then the batch axis at a second size.
    assert [run["input_shapes"]["input_0"] for run in judged.runs] == [[1, 8, 8, 8], [3, 8, 8, 8]]


def test_fold_module_in_place_cannot_evaluate_the_original_later_unless_asked():
    model, example = sensitive_module(), torch.randn(1, 8, 8, 8)
    later = bnfold.fold_module(sensitive_module(), example, inplace=True).verification
    first = bnfold.fold_module(model, example, inplace=True, exact="always").verification
    assert not later and "in place" in later.reference["skipped"]
    assert first.passed and first.reference["computed"]


@pytest.fixture(scope="module")
def exported_sensitive(tmp_path_factory):
    model = sensitive_module()
    example = torch.randn(2, 8, 8, 8)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    result = bnfold.export(model, example, path, dynamic_axes={"input": {0: "batch"}})
    return model, example, path, result


def test_export_writes_a_sensitive_model_and_checks_a_second_batch(exported_sensitive):
    _, _, path, result = exported_sensitive
    assert result.written and path.exists(), result.verification.to_text()
    assert result.verification.outputs[0].decided_by == "float64 reference"
    shapes = [run["input_shapes"]["input_0"] for run in result.verification.runs]
    assert shapes == [[2, 8, 8, 8], [1, 8, 8, 8]]


def test_export_with_fixed_shapes_says_no_axis_was_varied(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    result = bnfold.export(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert result.written
    assert any("no axis is dynamic" in item for item in result.verification.uncovered)
    assert [run["seed"] for run in result.verification.runs] == [None, 1]


@pytest.mark.parametrize("mode", MODES)
def test_assert_equivalent_fails_a_one_percent_weight_error_in_every_mode(exported_sensitive, tmp_path, mode):
    model, example, path, _ = exported_sensitive
    corrupted = onnx.load(str(path))
    weights = [tensor for tensor in corrupted.graph.initializer if len(tensor.dims) == 4]
    for index, tensor in enumerate([weights[0], weights[len(weights) // 2], weights[-1]]):
        changed = onnx.ModelProto()
        changed.CopyFrom(corrupted)
        target = next(t for t in changed.graph.initializer if t.name == tensor.name)
        target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.01, tensor.name))
        broken = tmp_path / f"broken{index}.onnx"
        onnx.save(changed, str(broken))
        with pytest.raises(AssertionError, match="MISMATCH"):
            assert_equivalent(model, broken, example, exact=mode)


def test_assert_equivalent_passes_the_correct_sensitive_export_and_strict_does_not(exported_sensitive):
    model, example, path, _ = exported_sensitive
    result = assert_equivalent(model, path, example)
    assert result.outputs[0].decided_by == "float64 reference"
    with pytest.raises(AssertionError, match="MISMATCH"):
        assert_equivalent(model, path, example, exact="strict")


class FixedBatch(nn.Module):
    """Accepts batch 1 only (a view to a fixed size): the second size is rejected and reported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x)).view(4, 16)


def test_a_second_size_the_module_rejects_is_reported():
    result = bnfold.fold_module(FixedBatch().eval(), torch.randn(1, 3, 4, 4)).verification
    assert result.passed
    assert any("rejects" in item for item in result.uncovered)
    assert [run["input_shapes"]["input_0"] for run in result.runs] == [[1, 3, 4, 4], [1, 3, 4, 4]]


class ViewsBatchAsChannels(nn.Module):
    """Right only when T == 1: ``bn(linear(x).view(B, 4, T))`` reads features as channels.

    The fold is done by hand (this test is about verification, not the rules): a wrong fold that
    the example alone (T = 1) cannot tell from a right one."""

    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.wrong = wrong

    def forward(self, x):
        batch, steps, _ = x.shape
        y = self.linear(x)
        return y.transpose(1, 2) if not self.wrong else y.reshape(batch, 4, steps)


def test_the_second_size_of_a_size_one_axis_catches_a_shape_reliant_difference():
    torch.manual_seed(0)
    right, wrong = ViewsBatchAsChannels(False).eval(), ViewsBatchAsChannels(True).eval()
    wrong.linear.load_state_dict(right.linear.state_dict())
    example = torch.randn(2, 1, 4)
    from bnfold.fx.compare import covered_runs, module_outputs

    runs, _ = covered_runs(right, (example,))
    assert [list(run.args[0].shape) for run in runs] == [[2, 1, 4], [1, 3, 4]]
    same_at_example = torch.equal(module_outputs(wrong, (example,))[0], runs[0].expected[0])
    differs_at_second = not torch.allclose(module_outputs(wrong, runs[1].args)[0], runs[1].expected[0])
    assert same_at_example and differs_at_second


def test_an_onnx_model_failing_at_the_second_size_is_a_mismatch_not_an_input_error() -> None:
    """The second run (a second size of a dynamic axis, which the module runs) fails in ONNX Runtime
    when the file fixed the batch size in a Reshape: every output fails, saying why."""
    from onnx import TensorProto, helper

    from bnfold.fx.compare import compare_runs_with_onnx, covered_runs

    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False)).eval()
    weight = module[1].weight.detach().numpy().T.copy()
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weight"], ["output"]),
        ],
        "baked_batch",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(weight, "weight"),
            helper.make_tensor("shape", TensorProto.INT64, [2], [2, 12]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    runs, _ = covered_runs(module, (torch.randn(2, 3, 4),), axes={0: {0}})

    result = compare_runs_with_onnx(runs, model)

    assert [run["input_shapes"] for run in result.runs] == [{"input_0": [2, 3, 4]}, {"input_0": [1, 3, 4]}]
    assert not result.passed
    (output,) = result.outputs
    assert output.note.startswith("the ONNX model fails on input_0=1x3x4, which the module runs")
    # At the example's batch the same file matches: the first run alone passes.
    assert compare_runs_with_onnx(runs[:1], model).passed
