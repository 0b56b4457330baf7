"""The reference models export to valid ONNX that keeps every BatchNorm and matches torch.

These files are the inputs of bnfold's own tests, so an exporter that silently folded
BN, dropped a layer or changed the numbers would make those tests meaningless.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402

from models import REFERENCE_MODELS, build, count_batchnorms  # noqa: E402
from models.export import count_ops, export_onnx, main  # noqa: E402

MODEL_NAMES = list(REFERENCE_MODELS)
BATCHNORM_MODEL_NAMES = [name for name in MODEL_NAMES if REFERENCE_MODELS[name].expected_batchnorms]
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def run_onnxruntime(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run the file with all ORT graph optimizations off, so ORT cannot fuse BN itself."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": inputs})
    return output


def run_torch(module: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(inputs).numpy()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_matches_modules(name: str) -> None:
    spec = REFERENCE_MODELS[name]
    module, example_input = build(name)
    assert spec.name == name
    assert count_batchnorms(module) == spec.expected_batchnorms
    assert tuple(example_input.shape) == spec.input_shape
    assert spec.input_shape[0] == 2
    assert not module.training


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_keeps_batchnorm_and_matches_torch(name: str, tmp_path: Path) -> None:
    spec = REFERENCE_MODELS[name]
    module, example_input = build(name)
    path = export_onnx(module, example_input, tmp_path / f"{name}.onnx")

    assert path == tmp_path / f"{name}.onnx"
    assert sorted(tmp_path.iterdir()) == [path], "expected one self-contained file"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    op_counts = count_ops(model)
    assert op_counts["BatchNormalization"] == spec.expected_batchnorms
    if spec.expected_batchnorms == 0:
        assert op_counts["LayerNormalization"] > 0
    np.testing.assert_allclose(
        run_onnxruntime(path, example_input.numpy()),
        run_torch(module, example_input),
        **TOLERANCE,
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dynamic_batch_export_runs_other_batch_sizes(name: str, tmp_path: Path) -> None:
    module, example_input = build(name)
    path = export_onnx(module, example_input, tmp_path / "model.onnx", dynamic_batch=True)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    generator = torch.Generator().manual_seed(1)
    other_batch = torch.randn((5, *example_input.shape[1:]), generator=generator)
    np.testing.assert_allclose(
        run_onnxruntime(path, other_batch.numpy()), run_torch(module, other_batch), **TOLERANCE
    )


@pytest.mark.parametrize("name", BATCHNORM_MODEL_NAMES)
def test_batchnorm_statistics_are_randomized(name: str) -> None:
    module, _ = build(name)
    layers = [layer for layer in module.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)]
    assert layers
    for layer in layers:
        assert not torch.all(layer.running_var == 1.0)
        assert not torch.all(layer.running_mean == 0.0)
        assert torch.all(layer.running_var > 0.0)
        assert torch.any(layer.weight < 0.0), "want negative gammas in every layer"
        assert not torch.all(layer.bias == 0.0)


def test_build_is_deterministic_per_seed() -> None:
    first_module, first_input = build("resnet_tiny", seed=3)
    second_module, second_input = build("resnet_tiny", seed=3)
    other_module, other_input = build("resnet_tiny", seed=4)
    torch.testing.assert_close(first_input, second_input)
    for key, value in first_module.state_dict().items():
        torch.testing.assert_close(value, second_module.state_dict()[key])
    assert not torch.equal(first_input, other_input)
    assert not torch.equal(
        first_module.state_dict()["stem.1.running_var"],
        other_module.state_dict()["stem.1.running_var"],
    )


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build("mlp_batchnorm", seed=9)
    torch.testing.assert_close(torch.rand(4), expected)


def test_build_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown reference model"):
        build("no_such_model")


def test_export_rejects_training_mode(tmp_path: Path) -> None:
    module, example_input = build("mlp_batchnorm")
    module.train()
    with pytest.raises(ValueError, match="eval"):
        export_onnx(module, example_input, tmp_path / "model.onnx")


def test_dynamo_exporter_rejects_old_opset(tmp_path: Path) -> None:
    module, example_input = build("mlp_batchnorm")
    with pytest.raises(ValueError, match="opset >= 18"):
        export_onnx(module, example_input, tmp_path / "model.onnx", exporter="dynamo")


@pytest.mark.slow
def test_dynamo_exporter_keeps_batchnorm(tmp_path: Path) -> None:
    """Slower alternative path; conv3d_net is the model where raw dynamo output is broken."""
    pytest.importorskip("onnxscript")
    module, example_input = build("conv3d_net")
    path = export_onnx(module, example_input, tmp_path / "model.onnx", opset=18, exporter="dynamo")
    model = onnx.load(str(path))
    op_counts = count_ops(model)
    assert op_counts["BatchNormalization"] == 3
    assert "Expand" not in op_counts, "run-time zero biases should have been removed"
    np.testing.assert_allclose(
        run_onnxruntime(path, example_input.numpy()),
        run_torch(module, example_input),
        **TOLERANCE,
    )


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == MODEL_NAMES


def test_cli_exports_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "out.onnx"
    assert main(["decoder_tiny", "-o", str(path), "--seed", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0]
    assert "3 BatchNormalization" in lines[0]
    assert "0 LayerNormalization" in lines[0]
    assert path.is_file()


def test_cli_unknown_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no_such_model", "-o", str(tmp_path / "out.onnx")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1
    assert "unknown model 'no_such_model'" in error_lines[0]
    assert not (tmp_path / "out.onnx").exists()
