"""bnfold.testing.assert_equivalent: passes on a faithful export, fails readably on a corrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

import bnfold  # noqa: E402
from bnfold.testing import assert_equivalent  # noqa: E402
from models import build  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    model, example = build("resnet_tiny")
    path = tmp_path_factory.mktemp("helper") / "resnet.onnx"
    bnfold.export(model, example, path)
    return model, example, path


def test_passes_on_a_good_export(exported) -> None:
    model, example, path = exported
    result = assert_equivalent(model, path, example)
    assert result.passed and [output.name for output in result.outputs] == ["output"]
    assert_equivalent(model, str(path), (torch.randn(2, 3, 16, 16),), atol=1e-4, rtol=1e-4)


def test_fails_with_a_per_output_table_on_a_corrupted_export(exported, tmp_path: Path) -> None:
    model, example, path = exported
    corrupted = onnx.load(str(path))
    initializer = next(t for t in corrupted.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    weights = numpy_helper.to_array(initializer).copy()
    weights.flat[0] += 0.5
    initializer.CopyFrom(numpy_helper.from_array(weights, initializer.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(corrupted, str(broken))

    with pytest.raises(AssertionError) as caught:
        assert_equivalent(model, broken, example)
    message = str(caught.value)
    lines = message.splitlines()
    assert lines[0] == f"{broken} does not match the PyTorch module (outputs output):"
    header = lines[1].split()
    assert header[:3] == ["output", "dtype", "shape"] and "err" in lines[1] and "atol" in header
    assert lines[2].startswith("output  float32  2x10") and "MISMATCH" in lines[2]
    assert "verification FAILED on cpu" in lines[3]


def test_tolerance_arguments_decide(exported) -> None:
    model, example, path = exported
    with pytest.raises(AssertionError, match="MISMATCH"):
        assert_equivalent(model, path, example, atol=0.0, rtol=0.0)
    assert_equivalent(model, path, example, atol=1.0, rtol=0.0)


def test_inputs_by_name_must_match_the_onnx_inputs(exported) -> None:
    model, example, path = exported
    # forward(inputs) is called with inputs=...; the ONNX model names its input "input".
    with pytest.raises(bnfold.InputSpecError, match=r"\['inputs'\] are not inputs of the ONNX model"):
        assert_equivalent(model, path, {"inputs": example})
