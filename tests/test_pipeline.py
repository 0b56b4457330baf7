"""``bnfold.fold_file``: the CLI's file-to-file pipeline as an API call.

The CLI is a shell over it, so these check what a pipeline gets without the CLI: the written file,
the result value on success, mismatch, force and dry run, and errors worded with API parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
import bnfold.pipeline
from bnfold.cli import FLAGS
from tests.builders import conv_bn_model, op_types, run


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_model(), path)
    return path


def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).standard_normal((2, 4, 7, 7)).astype(np.float32)}


def break_the_fold(monkeypatch) -> None:
    """Make the fold wrong (one weight element off by 1): verification must catch it."""
    real_fold = bnfold.pipeline.fold_onnx

    def broken_fold(*args, **kwargs):
        result = real_fold(*args, **kwargs)
        (conv,) = [node for node in result.model.graph.node if node.op_type == "Conv"]
        (weight,) = [t for t in result.model.graph.initializer if t.name == conv.input[1]]
        values = numpy_helper.to_array(weight).copy()
        values.flat[0] += 1.0
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        return result

    monkeypatch.setattr(bnfold.pipeline, "fold_onnx", broken_fold)


def test_fold_file_writes_the_verified_fold_and_returns_what_it_did(model_path, tmp_path):
    output = tmp_path / "folded.onnx"
    report_path = tmp_path / "report.json"
    before = model_path.read_bytes()

    result = bnfold.fold_file(model_path, output, report_path=report_path, provider="cpu")

    assert isinstance(result, bnfold.FileFoldResult)
    assert result.written and result.passed and result.path == output
    assert result.verification is not None and result.verification.passed
    assert [d.outcome for d in result.report.decisions] == [bnfold.Outcome.FOLDED]
    folded = onnx.load(output)
    assert "BatchNormalization" not in op_types(folded)
    np.testing.assert_allclose(
        run(folded, feeds())[0], run(onnx.load(model_path), feeds())[0], rtol=1e-4, atol=1e-5
    )
    report = json.loads(report_path.read_text())
    assert report["verification"]["passed"] is True and report["output"] == str(output)
    assert model_path.read_bytes() == before
    assert f"wrote {output}" in result.to_text()


def test_fold_file_without_output_writes_no_model(model_path, tmp_path):
    result = bnfold.fold_file(model_path, provider="cpu")

    assert result.path is None and not result.written and result.passed
    assert "BatchNormalization" not in op_types(result.model)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_fold_file_mismatch_is_a_result_and_writes_nothing(model_path, tmp_path, monkeypatch):
    break_the_fold(monkeypatch)
    output = tmp_path / "folded.onnx"

    result = bnfold.fold_file(model_path, output, provider="cpu")

    assert not result.passed and not result.written
    assert result.verification is not None and not result.verification
    assert not output.exists()
    assert result.report.extras["output"] is None


def test_fold_file_force_writes_the_failing_fold(model_path, tmp_path, monkeypatch):
    break_the_fold(monkeypatch)
    output = tmp_path / "folded.onnx"

    result = bnfold.fold_file(model_path, output, force=True, provider="cpu")

    assert not result.passed and result.written and output.exists()


def test_fold_file_errors_name_api_parameters_not_cli_flags(model_path):
    with pytest.raises(bnfold.OutputError) as raised:
        bnfold.fold_file(model_path, model_path, verify=False)
    assert "verify=False" in str(raised.value) and "--" not in str(raised.value)
    assert "--no-verify/--force" in raised.value.worded(FLAGS)


def test_fold_file_over_its_own_input_replaces_it_only_when_verified(model_path):
    result = bnfold.fold_file(model_path, model_path, provider="cpu")

    assert result.written
    assert "BatchNormalization" not in op_types(onnx.load(model_path))
