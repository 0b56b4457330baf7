"""A BN no rule can fold says where it sits, why no exact fold exists there and what a user can do
(issue 13): the real cases of pre-activation blocks (DenseNet, DPN, ResNetV2), ConvMixer's residual,
a BN read twice, a BN on the model input. The reason code stays ``no-foldable-producer``; each kept
model still computes the original function in ONNX Runtime, and ``--rewrite-standalone-bn`` does
what the detail promises."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from bnfold import Outcome, Reason, fold_onnx
from bnfold.core.kept import REMEDY_ONNX
from tests.builders import bn_node, bn_params, make_model, run, tensor

C = 4


def _model(nodes, outputs, extra=()):
    rng = np.random.default_rng(0)
    initializers = [
        *bn_params(rng, C, np.float32),
        *bn_params(rng, 2 * C, np.float32, prefix="wide"),  # after DenseNet's Concat
        tensor("W", rng.standard_normal((C, C, 1, 1)), np.float32),
        tensor("W2", rng.standard_normal((C, 2 * C, 1, 1)), np.float32),
        *extra,
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C, 5, 5])]
    declared = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    return make_model(nodes, inputs, declared, initializers)


def _conv(x, y, weight="W", name=None):
    return helper.make_node("Conv", [x, weight], [y], name=name or y)


def densenet():  # Concat -> BN -> Relu -> Conv
    nodes = [
        _conv("x", "a"),
        helper.make_node("Relu", ["a"], ["r"], name="r"),
        helper.make_node("Concat", ["x", "r"], ["cat"], name="cat", axis=1),
        bn_node("cat", "bn_out", prefix="wide"),
        helper.make_node("Relu", ["bn_out"], ["act"], name="act"),
        _conv("act", "y", "W2"),
    ]
    return _model(nodes, ["y"]), (
        "between Concat `cat` and Relu `act`: no exact fold exists (Concat combines several tensors; Relu "
        "is not linear)"
    )


def resnetv2():  # Add -> BN -> Relu -> Conv
    nodes = [
        _conv("x", "a"),
        helper.make_node("Relu", ["a"], ["r"], name="r"),
        helper.make_node("Add", ["r", "x"], ["sum"], name="sum"),
        bn_node("sum", "bn_out"),
        helper.make_node("Relu", ["bn_out"], ["act"], name="act"),
        _conv("act", "y"),
    ]
    return _model(nodes, ["y"]), "between Add `sum` and Relu `act`: no exact fold exists (Add combines"


def dpn():  # MaxPool -> BN -> Relu
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="r"),
        helper.make_node("MaxPool", ["r"], ["pool"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        bn_node("pool", "bn_out"),
        helper.make_node("Relu", ["bn_out"], ["act"], name="act"),
        _conv("act", "y"),
    ]
    return _model(nodes, ["y"]), "between MaxPool `pool` and Relu `act`: no exact fold exists (MaxPool is not"


def convmixer():  # Conv -> Relu -> BN -> residual Add
    nodes = [
        _conv("x", "a"),
        helper.make_node("Relu", ["a"], ["r"], name="r"),
        bn_node("r", "bn_out"),
        helper.make_node("Add", ["bn_out", "x"], ["y"], name="residual"),
    ]
    return _model(nodes, ["y"]), (
        "between Relu `r` and Add `residual`: no exact fold exists (Relu is not linear; Add combines "
        "several tensors)"
    )


def two_readers():  # Relu -> BN -> (Relu, residual Add)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="r"),
        bn_node("r", "bn_out"),
        helper.make_node("Relu", ["bn_out"], ["y1"], name="act"),
        helper.make_node("Add", ["bn_out", "x"], ["y2"], name="residual"),
    ]
    return _model(nodes, ["y1", "y2"]), (
        "between Relu `r` and Relu `act`, Add `residual`: no exact fold exists (Relu is not linear; its "
        "output has 2 readers, so no one of them can absorb it)"
    )


def on_the_input():  # x -> BN -> Relu
    nodes = [bn_node("x", "bn_out"), helper.make_node("Relu", ["bn_out"], ["y"], name="act")]
    return _model(nodes, ["y"]), (
        "between graph input `x` and Relu `act`: no exact fold exists (graph input `x` is no layer's "
        "output; Relu is not linear)"
    )


@pytest.mark.parametrize("build", [densenet, resnetv2, dpn, convmixer, two_readers, on_the_input])
def test_a_kept_bn_says_why_no_exact_fold_exists_and_what_to_do(build):
    model, expected = build()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, C, 5, 5)).astype(np.float32)}
    result = fold_onnx(model)
    (decision,) = [d for d in result.report.decisions if d.op_type == "BatchNormalization"]
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.NO_FOLDABLE_PRODUCER
    assert decision.detail.startswith(expected), decision.detail
    assert decision.detail.endswith("; " + REMEDY_ONNX)
    for before, after in zip(run(model, feeds), run(result.model, feeds), strict=True):
        np.testing.assert_array_equal(before, after)

    # What the detail promises: the rewrite takes it, and its detail no longer offers the rewrite.
    rewritten = fold_onnx(model, rewrite_standalone=True)
    (decision,) = [d for d in rewritten.report.decisions if d.op_type == "BatchNormalization"]
    assert decision.outcome is Outcome.REWRITTEN and decision.reason is Reason.NO_FOLDABLE_PRODUCER
    assert decision.detail.startswith(expected) and "--rewrite-standalone-bn" not in decision.detail
    for before, after in zip(run(model, feeds), run(rewritten.model, feeds), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("attributes", "variance", "reason"),
    [
        ({"training_mode": 1}, 1.0, Reason.TRAINING_MODE),
        ({}, -1.0, Reason.NONPOSITIVE_VARIANCE),
    ],
    ids=["training mode", "negative variance"],
)
@pytest.mark.parametrize("rewrite_standalone", [False, True])
def test_a_bn_no_rule_can_use_gives_its_own_reason_not_a_remedy(
    attributes, variance, reason, rewrite_standalone
):
    # Between a Relu and the output no rule finds a site, but this BN could not be folded or rewritten
    # anywhere: the report says why (not "no-foldable-producer ... --rewrite-standalone-bn turns it
    # into Mul + Add", which that rewrite would not do).
    rng = np.random.default_rng(2)
    initializers = bn_params(rng, C, np.float32)
    initializers[3] = tensor("bn_var", np.full(C, variance), np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="r"), bn_node("r", "y", **attributes)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C, 5, 5])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    result = fold_onnx(
        make_model(nodes, inputs, outputs, initializers), rewrite_standalone=rewrite_standalone
    )
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, reason)
    assert "rewrite" not in decision.detail, decision.detail
