"""Graph plumbing around a fold: constants, shared weights, subgraphs, pruning, metadata."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold import Outcome, fold_onnx, verify
from tests.builders import bn_node, bn_params, conv_bn_model, make_model, op_types, run
from tests.onnx.helpers import fold_and_compare


def feeds(seed: int = 0):
    return {"x": np.random.default_rng(seed).standard_normal((2, 4, 7, 7)).astype(np.float32)}


def test_weights_and_statistics_from_constant_nodes_fold():
    model = conv_bn_model(seed=2)
    constants = []
    for initializer in list(model.graph.initializer):
        constants.append(helper.make_node("Constant", [], [initializer.name], value=initializer))
    del model.graph.initializer[:]
    for position, node in enumerate(constants):
        model.graph.node.insert(position, node)
    result = fold_and_compare(model, feeds())
    assert op_types(result.model) == ["Constant", "Constant", "Conv"]  # BN's constants pruned


def test_shared_weight_is_copied_not_edited():
    # Two convs read the same weight; only the first feeds a BN. The second must keep the original.
    model = conv_bn_model(seed=3)
    model.graph.node.append(
        helper.make_node("Conv", ["x", "W", "B"], ["other"], pads=[1, 1, 1, 1], name="c2")
    )
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 6, 7, 7]))
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    result = fold_and_compare(model, feeds())
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(after["W"], before["W"])
    np.testing.assert_array_equal(after["B"], before["B"])
    folded_conv = result.model.graph.node[0]
    assert folded_conv.input[1] not in ("W", "B") and folded_conv.input[2] not in ("W", "B")


def test_unused_initializers_and_value_info_are_pruned_but_others_are_kept():
    model = conv_bn_model()
    model.graph.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, None))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unrelated"))
    result = fold_onnx(model)
    names = {t.name for t in result.model.graph.initializer}
    assert names == {"W", "B", "unrelated"}  # BN params gone; a pre-existing unused one stays
    assert [v.name for v in result.model.graph.value_info] == []


def test_bias_free_conv_gets_a_fresh_bias_name_that_collides_with_nothing():
    model = conv_bn_model(bias=False)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "conv_folded_2"))
    model.graph.node[0].doc_string = ""
    result = fold_onnx(model)
    conv = result.model.graph.node[0]
    assert conv.input[2] not in ("", "conv_folded_2")
    onnx.checker.check_model(result.model, full_check=True)


def test_metadata_opsets_and_docs_are_kept():
    model = conv_bn_model()
    model.producer_name = "unit-test"
    model.doc_string = "model doc"
    helper.set_model_props(model, {"author": "bnfold"})
    result = fold_onnx(model)
    assert result.model.producer_name == "unit-test" and result.model.doc_string == "model doc"
    assert {p.key: p.value for p in result.model.metadata_props} == {"author": "bnfold"}
    assert list(result.model.opset_import) == list(model.opset_import)


def _if_model_with_conv_bn_in_both_branches():
    rng = np.random.default_rng(4)

    def branch(tag: str):
        weight = numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), f"W_{tag}")
        nodes = [
            helper.make_node("Conv", ["x", f"W_{tag}"], [f"c_{tag}"], pads=[1, 1, 1, 1], name=f"conv_{tag}"),
            bn_node(f"c_{tag}", f"y_{tag}", prefix=f"bn_{tag}"),
        ]
        out = helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, None)
        return helper.make_graph(nodes, tag, [], [out], [weight, *bn_params(rng, 6, prefix=f"bn_{tag}")])

    nodes = [
        helper.make_node(
            "If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="choose"
        )
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 7, 7]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 7, 7])]
    return make_model(nodes, inputs, outputs, [])


def test_bns_inside_if_branches_are_folded():
    model = _if_model_with_conv_bn_in_both_branches()
    result = fold_onnx(model)
    assert [d.outcome for d in result.report.decisions] == [Outcome.FOLDED, Outcome.FOLDED]
    assert {d.graph for d in result.report.decisions} == {
        "main/choose.then_branch",
        "main/choose.else_branch",
    }
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(5).standard_normal((2, 4, 7, 7)).astype(np.float32)
    for flag in (True, False):
        inputs = {"x": x, "flag": np.array(flag)}
        np.testing.assert_allclose(run(result.model, inputs)[0], run(model, inputs)[0], rtol=1e-5, atol=1e-5)


def test_conv_output_read_implicitly_by_a_subgraph_is_another_consumer():
    model = conv_bn_model()
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["conv_out"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    model.graph.node.append(
        helper.make_node("If", ["flag"], ["z"], then_branch=then_graph, else_branch=else_graph)
    )
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    (decision,) = fold_onnx(model).report.decisions
    assert decision.outcome is Outcome.KEPT and str(decision.reason) == "producer-has-other-consumers"


def test_bn9_with_trailing_empty_outputs_verifies_without_crashing_onnxruntime():
    # ONNX Runtime 1.32 segfaults on this (legal) form with optimizations disabled; verify trims it.
    model = conv_bn_model(opset=9)
    model.graph.node[1].output.extend(["", "", "", ""])
    gemm_side = conv_bn_model(opset=9, seed=9)
    result = verify(model, gemm_side)  # different weights: must report a mismatch, not crash
    assert not result.passed
    folded = fold_onnx(model)
    assert op_types(folded.model) == ["Conv"]
    assert verify(model, folded.model).passed


def test_bn_inside_loop_body_with_outer_scope_weights_folds_into_a_body_copy():
    # The body reads W and the BN statistics from the main graph: the fold must give the body its
    # own folded weight and leave the outer initializers for any other reader.
    rng = np.random.default_rng(11)
    outer = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")]
    outer += bn_params(rng, 4)
    body = helper.make_graph(
        [
            helper.make_node("Conv", ["state_in", "W"], ["c"], pads=[1, 1, 1, 1], name="body_conv"),
            bn_node("c", "bn_out"),
            helper.make_node("Relu", ["bn_out"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, 4, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4, 5, 5]),
        ],
    )
    loop = helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="loop")
    model = make_model(
        [loop],
        [
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
        outer,
    )
    result = fold_onnx(model)
    (decision,) = result.report.decisions
    assert decision.outcome is Outcome.FOLDED and decision.graph == "main/loop.body"
    onnx.checker.check_model(result.model, full_check=True)
    inputs = {"trips": np.array(3, np.int64), "x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, inputs)[0], run(model, inputs)[0], rtol=1e-4, atol=1e-5)
