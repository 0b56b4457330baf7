"""Conv -> BN and ConvTranspose -> BN, checked numerically in ONNX Runtime against the unfolded model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import conv_bn_model, op_types
from tests.onnx.helpers import fold_and_compare, only_decision


def feeds_for(rank: int, in_channels: int, dtype=np.float32, batch: int = 2, seed: int = 1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, in_channels, *[7] * rank)).astype(dtype)}


@st.composite
def conv_cases(draw, transpose: bool):
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_per_group = draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))
    return dict(
        rank=rank,
        groups=groups,
        in_channels=groups * in_per_group,
        out_channels=groups * out_per_group,
        kernel=draw(st.sampled_from([1, 2, 3])),
        bias=draw(st.booleans()),
        transpose=transpose,
        strides=draw(st.integers(1, 2)),
        dilations=draw(st.integers(1, 2)),
        pads=draw(st.integers(0, 1)),
        seed=draw(st.integers(0, 10_000)),
    )


@given(conv_cases(transpose=False))
def test_conv_bn_folds_exactly_for_any_rank_groups_and_bias(case):
    model = conv_bn_model(**case)
    result = fold_and_compare(model, feeds_for(case["rank"], case["in_channels"]))
    assert op_types(result.model) == ["Conv"]
    assert only_decision(result).rule == "conv-bn"


@given(conv_cases(transpose=True))
def test_convtranspose_bn_respects_the_grouped_weight_layout(case):
    model = conv_bn_model(**case)
    result = fold_and_compare(model, feeds_for(case["rank"], case["in_channels"]))
    assert op_types(result.model) == ["ConvTranspose"]
    assert only_decision(result).rule == "convtranspose-bn"


def test_grouped_convtranspose_regression_scaling_axis_1_alone_would_be_wrong():
    # 2 groups, 3 output channels per group: a fold that scales weight axis 1 by scale[:3] only
    # (ignoring the group layout) gives wrong channels 3..5 — this pins the grouped layout.
    model = conv_bn_model(transpose=True, groups=2, in_channels=4, out_channels=6, seed=3)
    fold_and_compare(model, feeds_for(2, 4))


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15, 17, 21])
@pytest.mark.parametrize("dtype", ["float32", "float16"])  # ORT's CPU Conv has no float64 kernel
@pytest.mark.parametrize("transpose", [False, True])
def test_conv_bn_across_opsets_and_dtypes(opset, dtype, transpose):
    model = conv_bn_model(dtype=dtype, opset=opset, groups=2, seed=opset, transpose=transpose)
    numpy_dtype = {"float32": np.float32, "float64": np.float64, "float16": np.float16}[dtype]
    result = fold_and_compare(model, feeds_for(2, 4, numpy_dtype))
    weights = {t.name: t for t in result.model.graph.initializer}
    conv = result.model.graph.node[0]
    assert weights[conv.input[1]].data_type == model.graph.initializer[0].data_type
    assert weights[conv.input[2]].data_type == model.graph.initializer[0].data_type


def test_mixed_precision_float16_conv_with_float32_statistics_folds_into_float16_weights():
    model = conv_bn_model(dtype="float16", bn_dtype="float32", opset=15, groups=2, seed=4)
    result = fold_and_compare(model, feeds_for(2, 4, np.float16))
    conv = result.model.graph.node[0]
    weights = {t.name: t for t in result.model.graph.initializer}
    assert weights[conv.input[1]].data_type == model.graph.initializer[0].data_type  # FLOAT16
    assert all(t.data_type != 1 for t in result.model.graph.initializer)  # no float32 left behind


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_fold_is_computed_in_float64_and_rounded_once(dtype):
    # ORT's CPU Conv runs neither float64 nor bfloat16, so here the folded tensors are checked
    # against the exact math: float64 products, rounded once into the weight dtype.
    import ml_dtypes
    from onnx import numpy_helper

    model = conv_bn_model(seed=5, dtype="float32")
    target = {"bfloat16": ml_dtypes.bfloat16}.get(dtype, np.dtype(dtype))
    for position, initializer in enumerate(model.graph.initializer):
        value = numpy_helper.to_array(initializer).astype(target)
        model.graph.initializer[position].CopyFrom(numpy_helper.from_array(value, initializer.name))
    result = fold_onnx(model)
    assert only_decision(result).outcome is Outcome.FOLDED
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    epsilon = float(np.float32(1e-5))  # the attribute is stored as float32
    scale = values["bn_gamma"] / np.sqrt(values["bn_var"] + epsilon)
    shift = values["bn_beta"] - values["bn_mean"] * scale
    folded = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    conv = result.model.graph.node[0]
    assert folded[conv.input[1]].dtype == target and folded[conv.input[2]].dtype == target
    expected_weight = (values["W"] * scale.reshape(-1, 1, 1, 1)).astype(target)
    expected_bias = (values["B"] * scale + shift).astype(target)
    np.testing.assert_array_equal(folded[conv.input[1]], expected_weight)
    np.testing.assert_array_equal(folded[conv.input[2]], expected_bias)


def test_conv_bn_bn_chain_folds_both():
    model = conv_bn_model(seed=6)
    rng = np.random.default_rng(7)
    from tests.builders import bn_node, bn_params

    model.graph.node[1].output[0] = "mid"
    model.graph.node.append(bn_node("mid", "y", prefix="bn2"))
    model.graph.initializer.extend(bn_params(rng, 6, prefix="bn2"))
    result = fold_and_compare(model, feeds_for(2, 4), folded=2)
    assert op_types(result.model) == ["Conv"]
    assert result.model.graph.node[0].output[0] == "y"
    assert {t.name for t in result.model.graph.initializer} == {"W", "B"}


def test_folded_node_keeps_name_and_takes_over_the_bn_output():
    model = conv_bn_model()
    model.graph.node[0].doc_string = "keep me"
    result = fold_onnx(model)
    (conv,) = result.model.graph.node
    assert conv.name == "conv" and conv.output[0] == "y" and conv.doc_string == "keep me"
    decision = only_decision(result)
    assert decision.outcome is Outcome.FOLDED and decision.into == "conv" and decision.node == "bn"


def test_input_model_is_not_mutated_unless_inplace():
    model = conv_bn_model()
    before = model.SerializeToString()
    fold_onnx(model)
    assert model.SerializeToString() == before
    result = fold_onnx(model, inplace=True)
    assert result.model is model and op_types(model) == ["Conv"]


def test_skip_rule_keeps_the_bn_with_rule_disabled():
    result = fold_onnx(conv_bn_model(), skip_rules=["conv-bn"])
    assert only_decision(result).reason is Reason.RULE_DISABLED
    assert op_types(result.model) == ["Conv", "BatchNormalization"]
