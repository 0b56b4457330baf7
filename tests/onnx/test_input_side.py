"""BN -> Conv / ConvTranspose / Gemm / MatMul: the BN folded into the layer after it, checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import DTYPES, bn_node, bn_params, make_model, op_types, tensor
from tests.onnx.helpers import fold_and_compare, only_decision


def bn_conv_model(
    *,
    rank: int = 2,
    in_channels: int = 4,
    out_channels: int = 6,
    groups: int = 1,
    kernel: int = 1,
    bias: bool = True,
    pads: int = 0,
    strides: int = 1,
    dilations: int = 1,
    transpose: bool = False,
    auto_pad: str | None = None,
    output_padding: int = 0,
    dtype: str = "float32",
    seed: int = 0,
    before: str | None = None,
    spatial: int = 7,
) -> onnx.ModelProto:
    """x [-> before] -> BN -> Conv/ConvTranspose -> y; ``before`` is None (BN on the input) or an op."""
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    kernel_shape = [kernel] * rank
    if transpose:
        weight_shape = [in_channels, out_channels // groups, *kernel_shape]
    else:
        weight_shape = [out_channels, in_channels // groups, *kernel_shape]
    initializers = [tensor("W", rng.standard_normal(weight_shape) * 0.5, numpy_dtype)]
    inputs = ["bn_out", "W"]
    if bias:
        initializers.append(tensor("B", rng.standard_normal(out_channels), numpy_dtype))
        inputs.append("B")
    initializers += bn_params(rng, in_channels, numpy_dtype)
    nodes = []
    bn_input = "x"
    if before is not None:
        nodes.append(helper.make_node(before, ["x"], ["before_out"], name="before"))
        bn_input = "before_out"
    nodes.append(bn_node(bn_input, "bn_out"))
    attributes = dict(group=groups, strides=[strides] * rank, dilations=[dilations] * rank)
    if auto_pad is not None:
        attributes["auto_pad"] = auto_pad
    else:
        attributes["pads"] = [pads] * (2 * rank)
    if output_padding:
        attributes["output_padding"] = [output_padding] * rank
    op_type = "ConvTranspose" if transpose else "Conv"
    nodes.append(helper.make_node(op_type, inputs, ["y"], name="conv", **attributes))
    graph_inputs = [helper.make_tensor_value_info("x", onnx_dtype, ["N", in_channels, *[spatial] * rank])]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers)


def bn_gemm_model(
    *,
    in_features: int = 5,
    out_features: int = 7,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias_shape: tuple[int, ...] | None = (7,),
    dtype: str = "float32",
    seed: int = 0,
    batch: int = 3,
    opset: int = 17,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    weight_shape = [out_features, in_features] if trans_b else [in_features, out_features]
    initializers = [tensor("W", rng.standard_normal(weight_shape) * 0.5, numpy_dtype)]
    inputs = ["bn_out", "W"]
    if bias_shape is not None:
        initializers.append(tensor("C", rng.standard_normal(bias_shape), numpy_dtype))
        inputs.append("C")
    bn_channels = batch if trans_a else in_features
    initializers += bn_params(rng, bn_channels, numpy_dtype)
    gemm = helper.make_node(
        "Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    a_shape = [in_features, batch] if trans_a else [batch, in_features]
    nodes = [bn_node("a", "bn_out"), gemm]
    graph_inputs = [helper.make_tensor_value_info("a", onnx_dtype, a_shape)]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, [batch, out_features])]
    return make_model(nodes, graph_inputs, graph_outputs, initializers, opset=opset)


def bn_matmul_model(
    *, in_features: int = 5, out_features: int = 7, dtype: str = "float32", seed: int = 0, left_shape=None
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    left_shape = left_shape or ["N", in_features]
    initializers = [tensor("W", rng.standard_normal((in_features, out_features)) * 0.5, numpy_dtype)]
    initializers += bn_params(
        rng, left_shape[1] if isinstance(left_shape[1], int) else in_features, numpy_dtype
    )
    nodes = [bn_node("a", "bn_out"), helper.make_node("MatMul", ["bn_out", "W"], ["y"], name="matmul")]
    graph_inputs = [helper.make_tensor_value_info("a", onnx_dtype, left_shape)]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers)


def conv_feeds(rank: int, channels: int, dtype=np.float32, spatial: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, channels, *[spatial] * rank)).astype(dtype)}


@st.composite
def unpadded_conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    return dict(
        rank=draw(st.integers(1, 3)),
        groups=groups,
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel=draw(st.sampled_from([1, 2, 3])),
        bias=draw(st.booleans()),
        strides=draw(st.integers(1, 2)),
        dilations=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 10_000)),
    )


@given(unpadded_conv_cases())
def test_bn_conv_without_padding_folds_exactly_for_any_rank_groups_strides_dilations(case):
    model = bn_conv_model(**case)
    result = fold_and_compare(model, conv_feeds(case["rank"], case["in_channels"]))
    assert op_types(result.model) == ["Conv"]
    decision = only_decision(result)
    assert (decision.rule, decision.into, decision.node) == ("bn-conv", "conv", "bn")


def test_bn_conv_1x1_depthwise_and_valid_auto_pad():
    model = bn_conv_model(in_channels=6, out_channels=12, groups=6, kernel=3, auto_pad="VALID", seed=5)
    fold_and_compare(model, conv_feeds(2, 6))
    fold_and_compare(bn_conv_model(kernel=1, bias=False, seed=6), conv_feeds(2, 4))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_bn_conv_in_every_float_dtype_ort_runs(dtype):
    model = bn_conv_model(dtype=dtype, groups=2, kernel=3, seed=7)
    result = fold_and_compare(model, conv_feeds(2, 4, DTYPES[dtype][0]))
    weights = {t.name: t for t in result.model.graph.initializer}
    assert weights[result.model.graph.node[0].input[1]].data_type == DTYPES[dtype][1]


@pytest.mark.parametrize(
    ("case", "shown"),
    [
        (dict(pads=1, kernel=3), "pads=[1, 1, 1, 1]"),
        (dict(pads=1, kernel=1), "pads=[1, 1, 1, 1]"),
        (dict(auto_pad="SAME_UPPER", kernel=3), "auto_pad=SAME_UPPER"),
    ],
)
def test_bn_conv_with_padding_is_refused(case, shown):
    model = bn_conv_model(**case)
    result = fold_onnx(model)
    decision = only_decision(result)
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.PADDING_AFTER_BN
    assert decision.rule == "bn-conv" and shown in decision.detail
    assert result.model.SerializeToString() == model.SerializeToString()


def test_pre_activation_bn_relu_conv_is_kept_and_says_nothing_folds_on_either_side():
    model = bn_conv_model(before="Sigmoid")
    relu = helper.make_node("Relu", ["bn_out"], ["relu_out"], name="relu")
    model.graph.node.insert(2, relu)
    model.graph.node[3].input[0] = "relu_out"
    decision = only_decision(fold_onnx(model))
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.NO_FOLDABLE_PRODUCER
    assert decision.detail == (
        "between Sigmoid `before` and Relu `relu`: no exact fold exists (Sigmoid is not linear; Relu is "
        "not linear); --rewrite-standalone-bn (rewrite_standalone=True) turns it into Mul + Add, which "
        "runtimes fuse into the next op; otherwise nothing to do"
    )


def test_producer_refusal_falls_back_to_the_consumer():
    # Conv -> BN -> Conv(pads 0), where the first conv's output is also a graph output: the BN cannot go
    # into its producer, but it can go into its consumer.
    rng = np.random.default_rng(3)
    initializers = [
        tensor("W0", rng.standard_normal((4, 3, 3, 3)), np.float32),
        tensor("W1", rng.standard_normal((5, 4, 1, 1)), np.float32),
        *bn_params(rng, 4, np.float32),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        bn_node("c0", "n"),
        helper.make_node("Conv", ["n", "W1"], ["y"], name="conv1"),
    ]
    float_type = onnx.TensorProto.FLOAT
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", float_type, [2, 3, 6, 6])],
        [
            helper.make_tensor_value_info("y", float_type, None),
            helper.make_tensor_value_info("c0", float_type, None),
        ],
        initializers,
    )
    result = fold_and_compare(model, conv_feeds(2, 3, spatial=6))
    decision = only_decision(result)
    assert (decision.rule, decision.into) == ("bn-conv", "conv1")


def test_both_sides_refusing_reports_the_producer_reason_and_the_consumer_one_in_the_detail():
    model = bn_conv_model(before="Relu", pads=1, kernel=3)
    model.graph.node[0].op_type = "Conv"  # a Conv without a weight input: producer-side refusal
    model.graph.node[0].input.append("W")
    model.graph.node[0].attribute.extend([helper.make_attribute("pads", [0, 0, 0, 0])])
    model.graph.output.append(
        helper.make_tensor_value_info("before_out", onnx.TensorProto.FLOAT, ["N", 6, 7, 7])
    )
    decision = only_decision(fold_onnx(model))
    assert decision.reason is Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT and decision.rule == "conv-bn"
    assert "also bn-conv: padding-after-bn" in decision.detail


def test_bn_output_with_another_reader_is_refused():
    model = bn_conv_model()
    model.graph.output.append(helper.make_tensor_value_info("bn_out", onnx.TensorProto.FLOAT, None))
    decision = only_decision(fold_onnx(model))
    assert decision.reason is Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS and "graph output" in decision.detail


def test_shared_weight_is_copied_not_edited():
    model = bn_conv_model(kernel=1)
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["z"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 6, 7, 7]))
    result = fold_and_compare(model, conv_feeds(2, 4))
    assert result.model.graph.node[1].input[1] == "W"
    assert result.model.graph.node[0].input[1] != "W"


@given(
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    pads=st.integers(0, 1),
    seed=st.integers(0, 10_000),
)
def test_bn_convtranspose_1x1_stride_1_folds(groups, bias, pads, seed):
    model = bn_conv_model(
        transpose=True, groups=groups, in_channels=4, out_channels=6, bias=bias, pads=pads, seed=seed
    )
    result = fold_and_compare(model, conv_feeds(2, 4))
    assert only_decision(result).rule == "bn-convtranspose"


@pytest.mark.parametrize(
    "case",
    [dict(kernel=3), dict(strides=2), dict(strides=2, output_padding=1), dict(kernel=2, pads=0)],
    ids=["kernel3", "stride2", "output_padding", "kernel2"],
)
def test_bn_convtranspose_with_uneven_taps_is_refused(case):
    model = bn_conv_model(transpose=True, **case)
    decision = only_decision(fold_onnx(model))
    assert decision.reason is Reason.UNEVEN_TAPS_AFTER_BN and decision.rule == "bn-convtranspose"


@given(
    trans_b=st.integers(0, 1),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.0, -3.0]),
    bias_shape=st.sampled_from([None, (), (7,), (1, 7), (3, 7), (3, 1)]),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 10_000),
)
def test_bn_gemm_respects_alpha_beta_trans_b_and_any_c(trans_b, alpha, beta, bias_shape, dtype, seed):
    model = bn_gemm_model(
        trans_b=trans_b, alpha=alpha, beta=beta, bias_shape=bias_shape, dtype=dtype, seed=seed
    )
    feeds = {"a": np.random.default_rng(seed).standard_normal((3, 5)).astype(DTYPES[dtype][0])}
    result = fold_and_compare(model, feeds)
    assert op_types(result.model) == ["Gemm"]
    assert (only_decision(result).rule, only_decision(result).into) == ("bn-gemm", "gemm")


@pytest.mark.parametrize("opset", [7, 9, 13])
def test_bn_gemm_across_opsets(opset):
    model = bn_gemm_model(opset=opset, beta=0.5, seed=opset)
    fold_and_compare(model, {"a": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)})


def test_bn_gemm_with_trans_a_is_refused():
    decision = only_decision(fold_onnx(bn_gemm_model(trans_a=1)))
    assert decision.reason is Reason.CHANNEL_AXIS_MISMATCH and decision.rule == "bn-gemm"


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (3, 5)])
def test_bn_gemm_with_a_c_that_does_not_fit_its_outputs_is_refused(bias_shape):
    # An invalid model (found by the fuzzer): C cannot broadcast to the 7 output columns.
    decision = only_decision(fold_onnx(bn_gemm_model(bias_shape=bias_shape)))
    assert decision.reason is Reason.PARAM_SHAPE_MISMATCH and decision.rule == "bn-gemm"
    assert f"bias has shape {list(bias_shape)}" in decision.detail


@pytest.mark.parametrize("transpose", [False, True])
def test_bn_conv_with_a_bias_of_the_wrong_length_is_refused(transpose):
    model = bn_conv_model(transpose=transpose)
    bias = next(t for t in model.graph.initializer if t.name == "B")
    bias.CopyFrom(tensor("B", np.ones(5), np.float32))  # 6 output channels, 5 biases
    decision = only_decision(fold_onnx(model))
    assert decision.reason is Reason.PARAM_SHAPE_MISMATCH
    assert decision.rule == ("bn-convtranspose" if transpose else "bn-conv")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_bn_matmul_on_2d_input_folds_with_a_bias_add(dtype):
    model = bn_matmul_model(dtype=dtype, seed=11)
    feeds = {"a": np.random.default_rng(2).standard_normal((4, 5)).astype(DTYPES[dtype][0])}
    result = fold_and_compare(model, feeds)
    assert op_types(result.model) == ["MatMul", "Add"]
    assert result.model.graph.node[1].output[0] == "y"
    assert only_decision(result).rule == "bn-matmul"


def test_bn_matmul_on_3d_input_is_refused():
    model = bn_matmul_model(in_features=5, left_shape=[2, 3, 5])
    decision = only_decision(fold_onnx(model))
    assert decision.reason is Reason.CHANNEL_AXIS_MISMATCH and decision.rule == "bn-matmul"


def test_bn_before_conv_and_after_conv_both_fold_to_a_fixed_point():
    # BN0 (on the input) -> Conv 1x1 -> BN1: BN1 goes into the conv's output channels, BN0 into its inputs.
    model = bn_conv_model(kernel=1, seed=9)
    rng = np.random.default_rng(4)
    model.graph.initializer.extend(bn_params(rng, 6, np.float32, prefix="bn1"))
    model.graph.node[-1].output[0] = "conv_out"
    model.graph.node.append(bn_node("conv_out", "y", prefix="bn1"))
    result = fold_and_compare(model, conv_feeds(2, 4), folded=2)
    assert op_types(result.model) == ["Conv"]
    assert {d.rule for d in result.report.decisions} == {"bn-conv", "conv-bn"}
