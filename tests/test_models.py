"""Every reference architecture: exported with its BNs, folded, no foldable BN left, verified in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from bnfold import Outcome, Reason, fold_onnx, verify  # noqa: E402
from models.export import export_onnx  # noqa: E402
from models.registry import REFERENCE_MODELS, build  # noqa: E402


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_folds_every_bn_and_matches_torch(name, tmp_path):
    spec = REFERENCE_MODELS[name]
    module, example = build(name, seed=1)
    path = export_onnx(module, example, tmp_path / f"{name}.onnx")
    result = fold_onnx(path)
    report = result.report
    assert report.count(Outcome.FOLDED) == spec.expected_batchnorms, report.to_text()
    assert report.count(Outcome.KEPT) == 0, report.to_text()
    assert [n.op_type for n in result.model.graph.node].count("BatchNormalization") == 0
    onnx.checker.check_model(result.model, full_check=True)

    check = verify(path, result.model, provider="cpu", input_shapes={})
    assert check.passed, check.to_text()
    # And against torch itself, on the example input.
    import onnxruntime as ort

    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    with torch.no_grad():
        torch_output = module(example).numpy()
    np.testing.assert_allclose(onnx_output, torch_output, rtol=1e-4, atol=1e-4)


def test_convnext_block_has_nothing_to_fold_and_says_why(tmp_path):
    module, example = build("convnext_downsample", seed=0)
    path = export_onnx(module, example, tmp_path / "convnext.onnx")
    report = fold_onnx(path).report
    assert report.decisions, "the LayerNorms must be reported"
    assert {d.op_type for d in report.decisions} == {"LayerNormalization"}
    assert all(
        d.outcome is Outcome.NEVER_FOLDABLE and d.reason is Reason.PER_SAMPLE_STATISTICS
        for d in report.decisions
    )
