"""Gemm -> BN and MatMul [-> Add] -> BN, checked numerically in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import gemm_bn_model, matmul_bn_model, op_types
from tests.onnx.helpers import fold_and_compare, only_decision

NUMPY = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


@given(
    trans_a=st.integers(0, 1),
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.0, 0.25, -3.0]),
    bias_shape=st.sampled_from([None, (), (7,), (1, 7), (3, 7), (3, 1)]),
    dtype=st.sampled_from(["float32", "float64", "float16"]),
    seed=st.integers(0, 10_000),
)
def test_gemm_bn_respects_alpha_beta_transposes_and_any_bias_shape(
    trans_a, trans_b, alpha, beta, bias_shape, dtype, seed
):
    model = gemm_bn_model(
        trans_a=trans_a,
        trans_b=trans_b,
        alpha=alpha,
        beta=beta,
        bias_shape=bias_shape,
        dtype=dtype,
        seed=seed,
    )
    a_shape = (5, 3) if trans_a else (3, 5)
    feeds = {"a": np.random.default_rng(seed).standard_normal(a_shape).astype(NUMPY[dtype])}
    result = fold_and_compare(model, feeds)
    assert op_types(result.model) == ["Gemm"]
    assert only_decision(result).rule == "gemm-bn"


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 15, 17, 21])
def test_gemm_bn_across_opsets(opset):
    model = gemm_bn_model(opset=opset, beta=0.5, seed=opset)
    fold_and_compare(model, {"a": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)})


@given(
    with_add=st.booleans(),
    bias_first=st.booleans(),
    dtype=st.sampled_from(["float32", "float64", "float16"]),
    seed=st.integers(0, 10_000),
)
def test_matmul_bn_on_2d_outputs(with_add, bias_first, dtype, seed):
    model = matmul_bn_model(with_add=with_add, bias_first=bias_first, dtype=dtype, seed=seed)
    feeds = {"a": np.random.default_rng(seed).standard_normal((4, 5)).astype(NUMPY[dtype])}
    result = fold_and_compare(model, feeds)
    assert op_types(result.model) == ["MatMul", "Add"]
    assert only_decision(result).rule == "matmul-bn"
    assert result.model.graph.node[-1].output[0] == "y"


def test_matmul_bn_on_3d_output_is_refused_because_bn_axis_1_is_not_the_column_axis():
    model = matmul_bn_model(left_shape=[2, 7, 5])  # output [2, 7, 7]: BN axis 1 is the token axis
    result = fold_onnx(model)
    decision = only_decision(result)
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.CHANNEL_AXIS_MISMATCH


def test_matmul_bn_with_unknown_left_rank_is_refused():
    model = matmul_bn_model()
    del model.graph.input[0].type.tensor_type.shape.dim[:]
    model.graph.input[0].type.tensor_type.ClearField("shape")
    decision = only_decision(fold_onnx(model))
    assert decision.reason is Reason.CHANNEL_AXIS_MISMATCH and "unknown" in decision.detail
