"""fold_onnx(rewrite_standalone=True): a BN nothing absorbs becomes Mul + Add, checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import DTYPES, bn_node, bn_params, make_model, op_types, run


def relu_bn_model(
    *,
    rank: int = 4,
    channels: int = 5,
    dtype: str = "float32",
    bn_dtype: str | None = None,
    opset: int = 17,
    declared_shape: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    _, onnx_dtype = DTYPES[dtype]
    shape = ["N", channels, *[4] * (rank - 2)] if declared_shape else None
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y")]
    initializers = bn_params(rng, channels, DTYPES[bn_dtype or dtype][0])
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", onnx_dtype, shape)],
        [helper.make_tensor_value_info("y", onnx_dtype, shape)],
        initializers,
        opset=opset,
    )


def compare(model, folded, dtype, rank, channels=5, tolerance=2e-5):
    feeds = {"x": np.random.default_rng(3).standard_normal((2, channels, *[4] * (rank - 2))).astype(dtype)}
    (expected,), (actual,) = run(model, feeds), run(folded, feeds)
    assert expected.dtype == actual.dtype and expected.shape == actual.shape
    np.testing.assert_allclose(
        actual.astype(np.float64),
        expected.astype(np.float64),
        rtol=tolerance,
        atol=tolerance * max(1.0, float(np.abs(expected).max())),
    )


def test_standalone_bn_is_kept_by_default():
    model = relu_bn_model()
    result = fold_onnx(model)
    assert result.report.decisions[0].reason is Reason.NO_FOLDABLE_PRODUCER
    assert not result.changed


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_standalone_bn_becomes_mul_add_of_any_rank(rank, dtype):
    model = relu_bn_model(rank=rank, dtype=dtype, seed=rank)
    result = fold_onnx(model, rewrite_standalone=True)
    assert op_types(result.model) == ["Relu", "Mul", "Add"]
    (decision,) = result.report.decisions
    assert decision.outcome is Outcome.REWRITTEN and decision.rule == "bn-to-affine"
    assert decision.into == result.model.graph.node[1].name
    assert decision.reason is Reason.NO_FOLDABLE_PRODUCER  # why it could not be folded
    assert (
        result.changed
        and result.report.summary() == "1 BatchNormalization: 0 folded, 0 kept, 1 rewritten as Mul+Add"
    )
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert constants[result.model.graph.node[1].input[1]].shape == (5, *[1] * (rank - 2))
    onnx.checker.check_model(result.model, full_check=True)
    compare(model, result.model, DTYPES[dtype][0], rank, tolerance=1e-10 if dtype == "float64" else 2e-5)


def test_mixed_precision_rewrite_writes_constants_in_the_data_dtype():
    model = relu_bn_model(dtype="float16", bn_dtype="float32", opset=15)
    result = fold_onnx(model, rewrite_standalone=True)
    constants = {t.name: t for t in result.model.graph.initializer}
    assert constants[result.model.graph.node[1].input[1]].data_type == onnx.TensorProto.FLOAT16
    onnx.checker.check_model(result.model, full_check=True)
    compare(model, result.model, np.float16, 4, tolerance=1e-2)


def test_rewrite_refused_when_the_rank_is_unknown():
    model = relu_bn_model(declared_shape=False)
    result = fold_onnx(model, rewrite_standalone=True)
    (decision,) = result.report.decisions
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.CHANNEL_AXIS_MISMATCH
    assert decision.rule == "bn-to-affine" and "not foldable: no-foldable-producer" in decision.detail
    assert result.model.SerializeToString() == model.SerializeToString()


def test_training_mode_bn_is_never_rewritten():
    model = relu_bn_model(opset=14)
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    result = fold_onnx(model, rewrite_standalone=True)
    assert result.report.decisions[0].outcome is Outcome.KEPT
    assert op_types(result.model) == ["Relu", "BatchNormalization"]


def test_foldable_bns_fold_and_only_the_rest_are_rewritten():
    from tests.builders import conv_bn_model

    model = conv_bn_model()
    result = fold_onnx(model, rewrite_standalone=True)
    assert [d.outcome for d in result.report.decisions] == [Outcome.FOLDED]
    assert (
        fold_onnx(relu_bn_model(), rewrite_standalone=True, skip_rules=["bn-to-affine"])
        .report.decisions[0]
        .outcome
        is Outcome.KEPT
    )
