"""Every refusal: the BN is kept, the model is left valid, and the report gives the exact reason code."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import conv_bn_model, gemm_bn_model, op_types


def _drop_initializers(model: onnx.ModelProto, *names: str) -> None:
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for initializer in model.graph.initializer:
        if initializer.name == name:
            initializer.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def bn_after_relu():
    model = conv_bn_model()
    model.graph.node.insert(1, helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"))
    model.graph.node[2].input[0] = "relu_out"
    return model


def bn_on_graph_input():
    model = conv_bn_model()
    model.graph.node[1].input[0] = "x"
    del model.graph.node[0]
    _drop_initializers(model, "W", "B")
    return model


def conv_output_feeds_another_node():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["conv_out"], ["side"], name="side_relu"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    return model


def conv_output_is_graph_output():
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, None))
    return model


def mean_computed_at_run_time():
    model = conv_bn_model()
    # Neg is computed by the runtime (bnfold evaluates only the constant expressions exporters write)
    model.graph.node.insert(0, helper.make_node("Neg", ["bn_mean"], ["mean_copy"], name="copy"))
    model.graph.node[2].input[3] = "mean_copy"
    return model


def variance_is_overridable_graph_input():
    model = conv_bn_model()
    model.graph.input.append(helper.make_tensor_value_info("bn_var", TensorProto.FLOAT, [6]))
    return model


def statistics_of_wrong_length():
    model = conv_bn_model()
    for name in ("bn_gamma", "bn_beta", "bn_mean", "bn_var"):
        _set_initializer(model, name, np.ones(5))
    return model


def training_mode():
    return conv_bn_model(opset=14, bn_attributes={"training_mode": 1})


def spatial_zero():
    return conv_bn_model(opset=7, bn_attributes={"spatial": 0})


def running_mean_output_used():
    model = conv_bn_model(opset=15)
    bn = model.graph.node[1]
    bn.output.extend(["running_mean", "running_var"])
    model.graph.node.append(helper.make_node("Identity", ["running_mean"], ["mean_out"]))
    return model


def negative_variance():
    model = conv_bn_model()
    _set_initializer(model, "bn_var", np.array([1.0, 1.0, -2.0, 1.0, 1.0, 1.0]))
    return model


def nan_mean():
    model = conv_bn_model()
    _set_initializer(model, "bn_mean", np.array([0.0, np.nan, 0.0, 0.0, 0.0, 0.0]))
    return model


def weight_is_graph_input():
    model = conv_bn_model()
    _drop_initializers(model, "W")
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 4, 3, 3]))
    return model


def integer_gemm_weight():
    model = gemm_bn_model()
    for initializer in model.graph.initializer:
        if initializer.name == "W":
            initializer.CopyFrom(numpy_helper.from_array(np.ones((5, 7), np.int32), "W"))
    return model


def bn_on_3d_matmul():
    from tests.builders import matmul_bn_model

    return matmul_bn_model(left_shape=[2, 7, 5])


def float16_overflow():
    model = conv_bn_model(dtype="float16")
    for initializer in model.graph.initializer:
        if initializer.name == "bn_var":
            initializer.CopyFrom(numpy_helper.from_array(np.full(6, 1e-7, np.float16), "bn_var"))
        if initializer.name == "bn_gamma":
            initializer.CopyFrom(numpy_helper.from_array(np.full(6, 6e4, np.float16), "bn_gamma"))
    model.graph.node[1].attribute.append(helper.make_attribute("epsilon", 1e-9))
    return model


def rule_disabled():
    return conv_bn_model()


def layer_norm():
    model = conv_bn_model()
    model.graph.node.append(
        helper.make_node("LayerNormalization", ["y", "ln_scale"], ["z"], axis=-1, name="ln")
    )
    model.graph.initializer.append(numpy_helper.from_array(np.ones(7, np.float32), "ln_scale"))
    model.graph.output[0].name = "z"
    return model


def bn_before_padded_conv():
    from tests.onnx.test_input_side import bn_conv_model

    return bn_conv_model(kernel=3, pads=1)


def bn_before_strided_convtranspose():
    from tests.onnx.test_input_side import bn_conv_model

    return bn_conv_model(transpose=True, kernel=1, strides=2)


def bn_output_also_feeds_relu():
    from tests.onnx.test_input_side import bn_conv_model

    model = bn_conv_model(kernel=1)
    model.graph.node.append(helper.make_node("Relu", ["bn_out"], ["side"], name="side_relu"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 4, 7, 7]))
    return model


def identity_beside_misaligned_dilated_conv():
    from tests.onnx.test_branch_merge import identity_beside_misaligned_dilated_conv as build

    return build()


def flatten_shape_computed_at_run_time():
    from tests.onnx.test_reshape_through import reshape_shape_computed_at_run_time

    return reshape_shape_computed_at_run_time()


def bn_over_the_token_axis():
    from tests.onnx.test_reshape_through import bn_over_the_token_axis as build

    return build()


def maxpool_with_negative_scale():
    from tests.onnx.test_pool import maxpool_with_negative_scale as build

    return build()


CASES = {
    Reason.NO_FOLDABLE_PRODUCER: [bn_after_relu, bn_on_graph_input],
    Reason.PRODUCER_HAS_OTHER_CONSUMERS: [conv_output_feeds_another_node],
    Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT: [conv_output_is_graph_output],
    Reason.PARAM_NOT_CONSTANT: [mean_computed_at_run_time],
    Reason.PARAM_IS_GRAPH_INPUT: [variance_is_overridable_graph_input],
    Reason.PARAM_SHAPE_MISMATCH: [statistics_of_wrong_length],
    Reason.TRAINING_MODE: [training_mode],
    Reason.PER_ACTIVATION_STATISTICS: [spatial_zero],
    Reason.EXTRA_OUTPUTS_USED: [running_mean_output_used],
    Reason.NONPOSITIVE_VARIANCE: [negative_variance],
    Reason.NONFINITE_STATISTICS: [nan_mean],
    Reason.WEIGHT_NOT_CONSTANT: [weight_is_graph_input],
    Reason.UNSUPPORTED_DTYPE: [integer_gemm_weight],
    Reason.CHANNEL_AXIS_MISMATCH: [bn_on_3d_matmul],
    Reason.FOLD_OVERFLOWS_DTYPE: [float16_overflow],
    Reason.RULE_DISABLED: [rule_disabled],
    Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS: [bn_output_also_feeds_relu],
    Reason.PADDING_AFTER_BN: [bn_before_padded_conv],
    Reason.UNEVEN_TAPS_AFTER_BN: [bn_before_strided_convtranspose],
    Reason.RESHAPE_SHAPE_NOT_CONSTANT: [flatten_shape_computed_at_run_time],
    Reason.RESHAPE_NOT_CHANNEL_PRESERVING: [bn_over_the_token_axis],
    Reason.BRANCHES_INCOMPATIBLE: [identity_beside_misaligned_dilated_conv],
    Reason.POOL_DOES_NOT_COMMUTE: [maxpool_with_negative_scale],
}


# Reasons only the PyTorch path gives (modules, hooks, traces); tests/fx covers them.
TORCH_ONLY = {
    Reason.SHARED_MODULE,
    Reason.NO_RUNNING_STATISTICS,
    Reason.UNKNOWN_SHAPE,
    Reason.HOOKS_REGISTERED,
    Reason.CUSTOM_FORWARD,
    Reason.SHAPE_DEPENDENT,  # PyTorch: a rank or size that only the example shows
    Reason.MUTATED_IN_PLACE,  # PyTorch: ONNX graphs have no in-place writes
}


def test_every_onnx_reason_code_has_a_negative_test():
    covered = set(CASES) | {Reason.PER_SAMPLE_STATISTICS}
    assert covered == set(Reason) - TORCH_ONLY


@pytest.mark.parametrize(
    ("reason", "build"),
    [(reason, build) for reason, builds in CASES.items() for build in builds],
    ids=lambda value: value.__name__ if callable(value) else str(value),
)
def test_refusal_keeps_the_bn_untouched_and_says_why(reason, build):
    model = build()
    skip = ["conv-bn"] if reason is Reason.RULE_DISABLED else []
    result = fold_onnx(model, skip_rules=skip)
    (decision,) = [d for d in result.report.decisions if d.op_type == "BatchNormalization"]
    assert decision.outcome is Outcome.KEPT
    assert decision.reason is reason, decision.message
    assert decision.message.startswith(str(reason))
    # Nothing changed: the kept BN and its producer are exactly as they were.
    assert result.model.SerializeToString() == model.SerializeToString()


def test_layer_norm_is_reported_never_foldable():
    result = fold_onnx(layer_norm())
    outcomes = {(d.op_type, d.outcome) for d in result.report.decisions}
    assert outcomes == {
        ("BatchNormalization", Outcome.FOLDED),
        ("LayerNormalization", Outcome.NEVER_FOLDABLE),
    }
    (never,) = result.report.never_foldable
    assert never.reason is Reason.PER_SAMPLE_STATISTICS and never.node == "ln"


def test_opset_6_without_is_test_is_training_mode_and_with_is_test_folds():
    training = conv_bn_model(opset=6)
    assert fold_onnx(training).report.decisions[0].reason is Reason.TRAINING_MODE
    inference = conv_bn_model(opset=6, bn_attributes={"is_test": 1})
    assert op_types(fold_onnx(inference).model) == ["Conv"]


def test_opset_9_extra_outputs_mean_training_mode():
    model = conv_bn_model(opset=9)
    model.graph.node[1].output.extend(["m", "v", "sm", "sv"])
    assert fold_onnx(model).report.decisions[0].reason is Reason.TRAINING_MODE
