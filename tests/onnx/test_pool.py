"""``layer -> pool -> BN``: a BN after a pooling folds into the layer before it when the pool commutes
with the BN's per-channel map (issue 13), and is kept with ``pool-does-not-commute`` when it does not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import bn_node, bn_params, make_model, op_types, run, tensor

CHANNELS = 4


def pool_model(
    pool: str, *, layer: str = "Conv", negative_scale: bool = False, indices: bool = False, **attributes
) -> onnx.ModelProto:
    """x -> Conv(3x3, pads 1) -> pool -> BN -> y, BN scales positive unless ``negative_scale``."""
    rng = np.random.default_rng(len(pool) + len(attributes))
    if layer == "Conv":
        weight = tensor("W", rng.standard_normal((CHANNELS, 3, 3, 3)), np.float32)
    else:
        weight = tensor("W", rng.standard_normal((3, CHANNELS, 3, 3)), np.float32)
    params = bn_params(rng, CHANNELS, prefix="bn")
    gamma = np.abs(rng.uniform(0.5, 2.0, CHANNELS))
    if negative_scale:
        gamma[1] = -gamma[1]
    params[0] = tensor("bn_gamma", gamma, np.float32)
    if pool in ("MaxPool", "AveragePool"):
        attributes.setdefault("kernel_shape", [2, 2])
    outputs = ["pooled", "indices"] if indices else ["pooled"]
    nodes = [
        helper.make_node(layer, ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(pool, ["c"], outputs, name="pool", **attributes),
        bn_node("pooled", "y", prefix="bn"),
    ]
    graph_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if indices:
        graph_outputs.append(helper.make_tensor_value_info("indices", TensorProto.INT64, None))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        graph_outputs,
        [weight, tensor("b", rng.standard_normal(CHANNELS), np.float32), *params],
    )


def _same(model: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    for shape in ((1, 3, 6, 6), (2, 3, 7, 5)):
        feeds = {"x": np.random.default_rng(shape[3]).standard_normal(shape).astype(np.float32)}
        for expected, actual in zip(run(model, feeds), run(folded, feeds), strict=True):
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("pool", "attributes"),
    [
        ("MaxPool", {"strides": [2, 2]}),
        ("MaxPool", {"pads": [1, 1, 1, 1], "ceil_mode": 1, "dilations": [1, 2]}),
        ("GlobalMaxPool", {}),
        ("GlobalAveragePool", {}),
        ("AveragePool", {"strides": [2, 2], "count_include_pad": 1}),
        ("AveragePool", {"pads": [1, 0, 1, 0], "ceil_mode": 1}),  # count_include_pad=0: real elements
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}{v}" for k, v in value.items()),
)
@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
def test_a_bn_after_a_commuting_pool_folds_into_the_layer(pool, attributes, layer):
    model = pool_model(pool, layer=layer, **attributes)
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    rule = "conv-pool-bn" if layer == "Conv" else "convtranspose-pool-bn"
    assert (decision.outcome, decision.rule, decision.into) == (Outcome.FOLDED, rule, "conv")
    assert op_types(result.model) == [layer, pool]
    assert result.model.graph.node[1].output[0] == "y"  # the pool takes over the BN's output
    onnx.checker.check_model(result.model)
    _same(model, result.model)


def maxpool_with_negative_scale() -> onnx.ModelProto:
    return pool_model("MaxPool", negative_scale=True, strides=[2, 2])


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (maxpool_with_negative_scale, "BN scale < 0 in channels 1"),
        (lambda: pool_model("GlobalMaxPool", negative_scale=True), "BN scale < 0"),
        (lambda: pool_model("AveragePool", pads=[1, 1, 1, 1], count_include_pad=1), "counts its padding"),
        (lambda: pool_model("AveragePool", auto_pad="SAME_UPPER", count_include_pad=1), "counts its padding"),
        (lambda: pool_model("MaxPool", indices=True), "Indices output"),
    ],
    ids=["negative-max", "negative-global-max", "padded-average", "same-average", "indices-read"],
)
def test_a_pool_that_does_not_commute_keeps_the_bn(build, words):
    model = build()
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.POOL_DOES_NOT_COMMUTE), decision
    assert words in decision.detail
    assert result.model.SerializeToString() == model.SerializeToString()


def test_a_layer_output_read_besides_the_pool_keeps_the_bn():
    model = pool_model("GlobalAveragePool")
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    (decision,) = fold_onnx(model).report.decisions
    assert decision.reason is Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT


@given(
    pool=st.sampled_from(["MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"]),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pads=st.tuples(*[st.integers(0, 1)] * 4),
    ceil_mode=st.integers(0, 1),
    count_include_pad=st.integers(0, 1),
    negative=st.booleans(),
    height=st.integers(3, 7),
)
def test_any_pool_either_folds_exactly_or_is_refused(
    pool, kernel, strides, pads, ceil_mode, count_include_pad, negative, height
):
    """Random pool geometries and BN signs: a fold is checked in ONNX Runtime at two input sizes; a
    refusal leaves the model as it was."""
    attributes = {}
    if pool in ("MaxPool", "AveragePool"):
        # ONNX requires pads smaller than the kernel on each axis.
        pads = tuple(min(pad, kernel[axis % 2] - 1) for axis, pad in enumerate(pads))
        attributes = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads)}
        attributes["ceil_mode"] = ceil_mode
        if pool == "AveragePool":
            attributes["count_include_pad"] = count_include_pad
    model = pool_model(pool, negative_scale=negative, **attributes)
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    if decision.outcome is Outcome.KEPT:
        assert decision.reason is Reason.POOL_DOES_NOT_COMMUTE, decision
        assert result.model.SerializeToString() == model.SerializeToString()
        return
    for shape in ((1, 3, height, height + 1), (2, 3, height + 2, height)):
        feeds = {"x": np.random.default_rng(height).standard_normal(shape).astype(np.float32)}
        for expected, actual in zip(run(model, feeds), run(result.model, feeds), strict=True):
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
