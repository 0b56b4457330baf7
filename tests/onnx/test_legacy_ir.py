"""IR version 3 models (the ONNX Model Zoo's older exports: ResNet-v1, VGG, DenseNet from Caffe2 and
MXNet): the IR required every initializer to be listed as a graph input, and ONNX Runtime treats the
listing as a constant, so their BNs fold — and the folded model lists exactly its initializers again.
From IR 4 on, a listed initializer is an overridable input: kept with ``param-is-graph-input``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold import Outcome, fold_onnx
from bnfold.report import Reason
from tests.builders import bn_node, bn_params, conv_bn_model, gemm_bn_model, run, tensor
from tests.test_cli import in_process


def listed_like_ir3(model: onnx.ModelProto, ir_version: int = 3, opset: int = 7) -> onnx.ModelProto:
    """``model`` as an IR 3 exporter wrote it: every initializer also a graph input."""
    model.ir_version = ir_version
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    for initializer in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(initializer.name, initializer.data_type, list(initializer.dims))
        )
    return model


def initializer_listing(model: onnx.ModelProto, real: set[str]) -> tuple[set[str], set[str]]:
    inputs = {entry.name for entry in model.graph.input} - real
    return inputs, {tensor.name for tensor in model.graph.initializer}


def check_folded_ir3(model: onnx.ModelProto, feeds: dict[str, np.ndarray], folded: int):
    result = fold_onnx(model)
    outcomes = [d.outcome for d in result.report.decisions if d.op_type == "BatchNormalization"]
    assert outcomes.count(Outcome.FOLDED) == folded, result.report.to_text()
    assert result.model.ir_version == 3
    onnx.checker.check_model(result.model)  # IR 3: every initializer must be a graph input
    listed, initializers = initializer_listing(result.model, set(feeds))
    assert listed == initializers
    for entry in result.model.graph.input:
        if entry.name in initializers:
            (tensor_proto,) = [t for t in result.model.graph.initializer if t.name == entry.name]
            dims = [d.dim_value for d in entry.type.tensor_type.shape.dim]
            assert (
                dims == list(tensor_proto.dims) and entry.type.tensor_type.elem_type == tensor_proto.data_type
            )
    (expected,) = run(model, feeds)
    (actual,) = run(result.model, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    return result


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])  # no bias: the fold adds B
def test_an_ir3_conv_bn_folds_and_lists_its_initializers_again(bias):
    model = listed_like_ir3(conv_bn_model(bias=bias, opset=7))
    x = np.random.default_rng(0).standard_normal((2, 4, 7, 7)).astype(np.float32)

    result = check_folded_ir3(model, {"x": x}, folded=1)

    names = {t.name for t in result.model.graph.initializer}
    assert not {"bn_gamma", "bn_beta", "bn_mean", "bn_var"} & names  # pruned, and no longer listed


def test_an_ir3_bn_before_a_gemm_folds():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        bn_node("r", "n"),
        helper.make_node("Gemm", ["n", "W", "C"], ["y"], transB=1),
    ]
    initializers = [
        *bn_params(rng, 5),
        tensor("W", rng.standard_normal((3, 5)), np.float32),
        tensor("C", rng.standard_normal(3), np.float32),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        initializers,
    )
    model = listed_like_ir3(helper.make_model(graph))
    x = rng.standard_normal((4, 5)).astype(np.float32)

    check_folded_ir3(model, {"x": x}, folded=1)


def test_an_ir3_gemm_bn_folds():
    model = listed_like_ir3(gemm_bn_model(opset=7))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"a": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}

    check_folded_ir3(model, feeds, folded=1)


def test_from_ir4_on_a_listed_initializer_is_an_input_and_is_kept():
    model = listed_like_ir3(conv_bn_model(opset=9), ir_version=4, opset=9)

    result = fold_onnx(model)

    (decision,) = [d for d in result.report.decisions if d.op_type == "BatchNormalization"]
    assert decision.outcome is Outcome.KEPT and decision.reason is Reason.PARAM_IS_GRAPH_INPUT
    assert result.model.graph.input == model.graph.input


def test_the_cli_folds_and_verifies_an_ir3_model(tmp_path):
    source = tmp_path / "zoo.onnx"
    onnx.save(listed_like_ir3(conv_bn_model(opset=7)), source)

    ran = in_process(source, "-o", tmp_path / "folded.onnx", "--provider", "cpu")

    assert ran.code == 0, ran.output
    assert "1 folded, 0 kept" in ran.output and "verification passed" in ran.output
    folded = onnx.load(tmp_path / "folded.onnx")
    onnx.checker.check_model(folded)
    assert "BatchNormalization" not in [node.op_type for node in folded.graph.node]
