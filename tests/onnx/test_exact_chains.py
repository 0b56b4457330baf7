"""A chain of folds on one weight rounds once: the float32 result is the float64 fold, rounded.

Folding a float32 model must give, bit for bit, what folding the same model widened to float64 gives
once rounded to float32 — through ``Conv -> BN -> BN``, folds followed by per-channel Mul/Add, a
BN on both sides of a conv, and a RepVGG block (two conv-bn folds, then merges). Without the exact
values carried between folds each step would round again.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.onnx.graph as graph_module
from bnfold import fold_onnx
from bnfold.core.driver import run_rules
from bnfold.onnx.rules import RULES
from bnfold.onnx.view import OnnxView
from bnfold.report import Report
from tests.builders import bn_node, bn_params, make_model, op_types, run, tensor

CHANNELS = 6


def conv(name: str, source: str, output: str, kernel: int, pads: int, rng) -> tuple:
    weight = tensor(f"{name}_w", rng.standard_normal((CHANNELS, CHANNELS, kernel, kernel)) * 0.3, np.float32)
    bias = tensor(f"{name}_b", rng.standard_normal(CHANNELS), np.float32)
    node = helper.make_node("Conv", [source, weight.name, bias.name], [output], name=name, pads=[pads] * 4)
    return node, [weight, bias]


def chain_model(kind: str, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    if kind == "conv-bn-bn":
        node, weights = conv("conv", "x", "c", 3, 1, rng)
        nodes += [node, bn_node("c", "n1", prefix="bn1"), bn_node("n1", "y", prefix="bn2")]
        initializers += weights + bn_params(rng, CHANNELS, prefix="bn1")
        initializers += bn_params(rng, CHANNELS, prefix="bn2")
    elif kind == "conv-bn-mul-add":
        node, weights = conv("conv", "x", "c", 3, 1, rng)
        initializers += weights + bn_params(rng, CHANNELS, prefix="bn1")
        initializers += [
            tensor("m", rng.uniform(0.5, 2.0, (1, CHANNELS, 1, 1)), np.float32),
            tensor("a", rng.standard_normal((1, CHANNELS, 1, 1)), np.float32),
        ]
        nodes += [
            node,
            bn_node("c", "n1", prefix="bn1"),
            helper.make_node("Mul", ["n1", "m"], ["p"], name="mul"),
            helper.make_node("Add", ["p", "a"], ["y"], name="add"),
        ]
    elif kind == "bn-conv-bn":
        node, weights = conv("conv", "n0", "c", 1, 0, rng)
        nodes += [bn_node("x", "n0", prefix="bn0"), node, bn_node("c", "y", prefix="bn1")]
        initializers += weights + bn_params(rng, CHANNELS, prefix="bn0")
        initializers += bn_params(rng, CHANNELS, prefix="bn1")
    elif kind == "repvgg":
        big, big_weights = conv("conv3", "x", "c3", 3, 1, rng)
        small, small_weights = conv("conv1", "x", "c1", 1, 0, rng)
        nodes += [
            big,
            bn_node("c3", "n3", prefix="bn3"),
            small,
            bn_node("c1", "n1", prefix="bn1"),
            bn_node("x", "nid", prefix="bnid"),
            helper.make_node("Add", ["n3", "n1"], ["s"], name="add1"),
            helper.make_node("Add", ["s", "nid"], ["y"], name="add2"),
        ]
        initializers += big_weights + small_weights
        for prefix in ("bn3", "bn1", "bnid"):
            initializers += bn_params(rng, CHANNELS, prefix=prefix)
    else:
        raise ValueError(kind)
    shape = ["N", CHANNELS, 5, 5]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializers,
    )


def widened(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in float64 (float32 values widened exactly)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for initializer in wide.graph.initializer:
        value = numpy_helper.to_array(initializer).astype(np.float64)
        initializer.CopyFrom(numpy_helper.from_array(value, initializer.name))
    for info in (*wide.graph.input, *wide.graph.output):
        info.type.tensor_type.elem_type = TensorProto.DOUBLE
    return wide


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The folded layers' constants by the node that reads them (names differ between folds)."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        f"{node.name}.{slot}": constants[name]
        for node in model.graph.node
        for slot, name in enumerate(node.input)
        if name in constants
    }


KINDS = ["conv-bn-bn", "conv-bn-mul-add", "bn-conv-bn", "repvgg"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_chain_of_folds_rounds_once(kind):
    model = chain_model(kind)
    folded = fold_onnx(model)
    assert not folded.report.kept, folded.report.to_text()
    exact = fold_onnx(widened(model))
    expected = {key: value.astype(np.float32) for key, value in weights(exact.model).items()}
    actual = weights(folded.model)
    assert expected.keys() == actual.keys()
    for key, value in actual.items():
        assert np.array_equal(value, expected[key]), f"{key} was rounded more than once"


@pytest.mark.parametrize("kind", KINDS)
def test_chains_fold_to_the_same_function(kind):
    model = chain_model(kind, seed=1)
    result = fold_onnx(model)
    assert not result.report.kept
    assert {"BatchNormalization", "Mul", "Add"}.isdisjoint(op_types(result.model))
    assert op_types(result.model) == ["Conv"]
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": np.random.default_rng(2).standard_normal((2, CHANNELS, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=2e-5, atol=2e-5)


def test_without_room_for_exact_values_a_chain_rounds_per_step_and_stays_correct(monkeypatch):
    monkeypatch.setattr(graph_module, "EXACT_VALUES_BUDGET", 0)
    model = chain_model("conv-bn-bn")
    folded = fold_onnx(model)
    exact = fold_onnx(widened(model))
    actual, expected = weights(folded.model)["conv.1"], weights(exact.model)["conv.1"].astype(np.float32)
    # One more rounding: at most an ulp or so away from the once-rounded value, never more.
    np.testing.assert_allclose(actual, expected, rtol=2.5e-7, atol=0)
    feeds = {"x": np.random.default_rng(3).standard_normal((1, CHANNELS, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(folded.model, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_a_fold_that_nothing_follows_keeps_no_float64_copy():
    # Conv -> BN -> Relu: the folded weight cannot be folded again, so none is kept in memory.
    rng = np.random.default_rng(0)
    node, conv_weights = conv("conv", "x", "c", 3, 1, rng)
    nodes = [node, bn_node("c", "n", prefix="bn"), helper.make_node("Relu", ["n"], ["y"], name="relu")]
    shape = ["N", CHANNELS, 5, 5]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        conv_weights + bn_params(rng, CHANNELS, prefix="bn"),
    )
    context = graph_module.ModelContext(model)
    index = OnnxView(model.graph, context)
    assert not index.may_fold_again("n")
    assert index.may_fold_again("c")  # the BN reads it
    run_rules(index, RULES, Report())
    assert len(context.exact_values) == 0


def test_an_exact_value_is_not_read_by_a_sibling_subgraph_weight_of_the_same_name():
    """An If whose two branches each hold an initializer ``W``: the else branch's ``Conv -> BN -> BN``
    keeps W's float64 value for a second fold that its degenerate BN then refuses, and the then
    branch's ``Conv(W) -> BN`` must fold its own W, not that one (the cache was keyed by name only)."""

    def branch(name: str, seed: int, chained: bool) -> onnx.GraphProto:
        rng = np.random.default_rng(seed)
        initializers = [tensor("W", rng.standard_normal((4, 4, 1, 1)), np.float32)]
        initializers += bn_params(rng, 4, prefix="bn1")
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "n1" if chained else "out", "bn1")]
        if chained:  # a second BN that is kept (negative variance): the chain ends on a Rounded W
            initializers += bn_params(rng, 4, prefix="bn2")
            initializers[-1] = tensor("bn2_var", -np.ones(4), np.float32)
            nodes.append(bn_node("n1", "out", prefix="bn2"))
        outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
        return helper.make_graph(nodes, name, [], outputs, initializers)

    node = helper.make_node(
        "If", ["cond"], ["y"], then_branch=branch("then", 1, False), else_branch=branch("else", 2, True)
    )
    inputs = [
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3]),
    ]
    model = make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [])
    result = fold_onnx(model)
    assert len(result.report.folded) == 2, result.report.to_text()
    x = np.random.default_rng(5).standard_normal((1, 4, 3, 3)).astype(np.float32)
    feeds = {"cond": np.array(True), "x": x}
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
