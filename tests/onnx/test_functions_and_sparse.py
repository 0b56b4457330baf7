"""BNs inside model-local functions and weights given as sparse initializers (issue 12, items 6, 7).

A function body is folded where the fold holds for every call site: its constants are ``Constant``
nodes, while its inputs and the attributes its call sites set (``ref_attr_name``) are not constants.
Every BN in a function is reported, folded or kept with its reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import bn_params, make_model, run

CHANNELS = 3
DOMAIN = "local"


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name)
    )


def _function(
    name: str, *, weight_is_input: bool = False, epsilon_from_call_site: bool = False
) -> onnx.FunctionProto:
    """``y = BN(Conv(x, W))`` with W and the BN statistics as Constant nodes (or W an input)."""
    rng = np.random.default_rng(len(name))
    nodes = [] if weight_is_input else [_constant("W", rng.standard_normal((CHANNELS, CHANNELS, 3, 3)))]
    for tensor in bn_params(rng, CHANNELS, prefix="bn"):
        nodes.append(_constant(tensor.name, numpy_helper.to_array(tensor)))
    nodes.append(helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]))
    bn = helper.make_node(
        "BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["y"], name="bn"
    )
    attributes = []
    if epsilon_from_call_site:
        reference = helper.make_attribute_ref("epsilon", onnx.AttributeProto.FLOAT)
        bn.attribute.append(reference)
        attributes = ["eps"]
        bn.attribute[-1].ref_attr_name = "eps"
    nodes.append(bn)
    inputs = ["x", "W"] if weight_is_input else ["x"]
    return helper.make_function(
        DOMAIN, name, inputs, ["y"], nodes, [helper.make_opsetid("", 17)], attributes=attributes
    )


def _model(function: onnx.FunctionProto, calls: int = 2) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    nodes, initializers, previous = [], [], "x"
    for call in range(calls):
        inputs = [previous]
        if "W" in function.input:
            weight = f"w{call}"
            initializers.append(
                numpy_helper.from_array(
                    rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32), weight
                )
            )
            inputs.append(weight)
        node = helper.make_node(function.name, inputs, [f"h{call}"], name=f"call{call}", domain=DOMAIN)
        if function.attribute:
            node.attribute.append(helper.make_attribute("eps", 1e-3 * (call + 1)))
        nodes.append(node)
        previous = f"h{call}"
    graph = helper.make_graph(
        nodes,
        "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
        functions=[function],
    )
    model.ir_version = 10
    return model


def _check_same(model: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    for rows in (1, 2):
        feeds = {"x": np.random.default_rng(rows).standard_normal((rows, CHANNELS, 5, 5)).astype(np.float32)}
        np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_a_bn_in_a_function_folds_once_for_every_call_site():
    model = _model(_function("ConvBn"))
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.rule, decision.graph) == (
        Outcome.FOLDED,
        "conv-bn",
        "function local.ConvBn",
    )
    body = result.model.functions[0]
    assert [n.op_type for n in body.node if n.op_type != "Constant"] == ["Conv"]
    assert len(body.node) == 3  # Conv, its weight, its new bias: the BN statistics are pruned
    onnx.checker.check_model(result.model)
    _check_same(model, result.model)


def test_a_bn_on_a_function_input_weight_is_kept_and_reported():
    model = _model(_function("ConvBnInput", weight_is_input=True))
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.WEIGHT_NOT_CONSTANT), decision
    assert "input of the function" in decision.detail
    _check_same(model, result.model)


def test_a_bn_whose_epsilon_each_call_site_sets_is_kept():
    model = _model(_function("ConvBnEps", epsilon_from_call_site=True))
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.PARAM_NOT_CONSTANT), decision
    assert "call site" in decision.detail
    _check_same(model, result.model)


def _sparse(name: str, dense: np.ndarray) -> onnx.SparseTensorProto:
    flat = dense.reshape(-1)
    positions = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[positions].astype(np.float32), name)
    indices = numpy_helper.from_array(positions.astype(np.int64), f"{name}_indices")
    return helper.make_sparse_tensor(values, indices, list(dense.shape))


def test_a_sparse_initializer_weight_is_a_constant_and_folds():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) * (rng.random((CHANNELS, CHANNELS, 3, 3)) < 0.4)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["y"], name="bn"
        ),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        bn_params(rng, CHANNELS, prefix="bn"),
    )
    model.graph.sparse_initializer.append(_sparse("W", weight))
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.rule) == (Outcome.FOLDED, "conv-bn"), result.report.to_text()
    assert len(result.model.graph.sparse_initializer) == 0  # replaced by the dense folded weight
    onnx.checker.check_model(result.model, full_check=True)
    _check_same(model, result.model)


def test_a_sparse_bn_statistic_is_read_as_the_dense_tensor_it_stands_for():
    """A sparse mean (zeros where no value is given) is a constant too."""
    rng = np.random.default_rng(4)
    params = bn_params(rng, CHANNELS, prefix="bn")
    mean = np.array([0.0, 1.5, 0.0], np.float32)
    params = [p for p in params if p.name != "bn_mean"]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["y"], name="bn"
        ),
    ]
    weight = numpy_helper.from_array(rng.standard_normal((CHANNELS, CHANNELS, 1, 1)).astype(np.float32), "W")
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 5, 5])],
        [*params, weight],
    )
    model.graph.sparse_initializer.append(_sparse("bn_mean", mean))
    result = fold_onnx(model)
    assert [d.outcome for d in result.report.decisions] == [Outcome.FOLDED], result.report.to_text()
    _check_same(model, result.model)
