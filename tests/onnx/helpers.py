"""Assertions shared by the ONNX rule tests: fold, check the graph, compare in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import Outcome, fold_onnx
from tests.builders import op_types, run

TOLERANCE = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 1e-2}


def fold_and_compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, folded: int = 1):
    """Fold, assert exactly ``folded`` BNs folded and none left behind, and equal outputs in ORT."""
    result = fold_onnx(model)
    batchnorms = [d for d in result.report.decisions if d.op_type == "BatchNormalization"]
    assert [d.outcome for d in batchnorms].count(Outcome.FOLDED) == folded, result.report.to_text()
    assert op_types(result.model).count("BatchNormalization") == (
        op_types(model).count("BatchNormalization") - folded
    )
    onnx.checker.check_model(result.model, full_check=True)
    expected = run(model, feeds)
    actual = run(result.model, feeds)
    for reference, candidate in zip(expected, actual, strict=True):
        assert reference.dtype == candidate.dtype and reference.shape == candidate.shape
        scale = max(1.0, float(np.abs(reference.astype(np.float64)).max()))
        tolerance = TOLERANCE[reference.dtype.type] * scale
        np.testing.assert_allclose(
            candidate.astype(np.float64), reference.astype(np.float64), rtol=tolerance, atol=tolerance
        )
    return result


def only_decision(result):
    (decision,) = [d for d in result.report.decisions if d.op_type == "BatchNormalization"]
    return decision
