"""Conv/Gemm/MatMul -> Mul -> Add by per-channel constants (other exporters' BN), checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

from bnfold import Outcome, fold_onnx
from tests.builders import DTYPES, conv_bn_model, make_model, op_types, tensor


def layer_then_affine_model(
    *,
    layer: str = "Conv",
    ops: tuple[str, ...] = ("Mul", "Add"),
    constant_shape: tuple[int, ...] | None = None,
    constant_first: bool = False,
    bias: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> onnx.ModelProto:
    """x -> layer -> ops... (each with a constant) -> y. Conv: 4 -> 6 channels on 7x7; Gemm/MatMul: 5 -> 6."""
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    channels = 6
    initializers = []
    if layer == "Conv":
        initializers.append(tensor("W", rng.standard_normal((channels, 4, 3, 3)) * 0.5, numpy_dtype))
        inputs = ["x", "W"] + (["B"] if bias else [])
        nodes = [helper.make_node("Conv", inputs, ["h0"], name="layer", pads=[1, 1, 1, 1])]
        input_shape = ["N", 4, 7, 7]
        constant_shape = constant_shape or (channels, 1, 1)
    elif layer == "Gemm":
        initializers.append(tensor("W", rng.standard_normal((channels, 5)) * 0.5, numpy_dtype))
        inputs = ["x", "W"] + (["B"] if bias else [])
        nodes = [helper.make_node("Gemm", inputs, ["h0"], name="layer", transB=1, alpha=0.5)]
        input_shape = [3, 5]
        constant_shape = constant_shape or (channels,)
    else:
        initializers.append(tensor("W", rng.standard_normal((5, channels)) * 0.5, numpy_dtype))
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"], name="layer")]
        if bias:
            nodes.append(helper.make_node("Add", ["h0", "B"], ["h0b"], name="bias_add"))
            nodes[0].output[0], nodes[1].input[0], nodes[1].output[0] = "h_mm", "h_mm", "h0"
        input_shape = [3, 5]
        constant_shape = constant_shape or (channels,)
    if bias:
        initializers.append(tensor("B", rng.standard_normal(channels), numpy_dtype))
    current = "h0"
    for position, op_type in enumerate(ops):
        name = f"c{position}"
        values = rng.uniform(0.5, 2.0, constant_shape) * rng.choice([-1, 1], constant_shape)
        initializers.append(tensor(name, values, numpy_dtype))
        output = "y" if position == len(ops) - 1 else f"h{position + 1}"
        operands = [name, current] if constant_first else [current, name]
        nodes.append(helper.make_node(op_type, operands, [output], name=f"{op_type.lower()}{position}"))
        current = output
    graph_inputs = [helper.make_tensor_value_info("x", onnx_dtype, input_shape)]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers)


def feeds_for(model: onnx.ModelProto, dtype=np.float32):
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(5).standard_normal(dims).astype(dtype)}


def assert_same_outputs(model, folded_model, dtype=np.float32):
    from tests.builders import run

    feeds = feeds_for(model, dtype)
    (expected,), (actual,) = run(model, feeds), run(folded_model, feeds)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=2e-5 * scale, atol=2e-5 * scale)


@given(
    layer=st.sampled_from(["Conv", "Gemm", "MatMul"]),
    ops=st.sampled_from([("Mul", "Add"), ("Mul",), ("Add",), ("Add", "Mul"), ("Mul", "Add", "Mul")]),
    constant_first=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_per_channel_mul_add_chains_fold_into_the_layer(layer, ops, constant_first, bias, seed):
    model = layer_then_affine_model(layer=layer, ops=ops, constant_first=constant_first, bias=bias, seed=seed)
    result = fold_onnx(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    rule = {"Conv": "conv-affine", "Gemm": "gemm-affine", "MatMul": "matmul-affine"}[layer]
    folded = [d for d in result.report.decisions if d.outcome is Outcome.FOLDED]
    if layer == "MatMul" and not bias and "Add" in ops:
        # MatMul -> Add(constant) is already a MatMul with a bias: the first Add the MatMul reaches
        # stays, and what follows folds into it.
        expected_folded = list(ops)
        expected_folded.remove("Add")
        assert [d.op_type for d in folded] == expected_folded
        assert op_types(result.model) == ["MatMul", "Add"]
    else:
        assert [d.op_type for d in folded] == list(ops)
        expected = {"Conv": ["Conv"], "Gemm": ["Gemm"], "MatMul": ["MatMul", "Add"] if bias else ["MatMul"]}
        assert op_types(result.model) == expected[layer]
    assert {d.rule for d in folded} <= {rule}
    assert result.model.graph.output[0].name == "y"
    if folded:
        assert str(result.report.summary()).endswith(f"{len(folded)} Mul/Add folded")


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1)])
def test_conv_constant_shapes_that_are_per_channel_fold(shape):
    model = layer_then_affine_model(constant_shape=shape)
    result = fold_onnx(model)
    assert op_types(result.model) == ["Conv"]
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize(
    "shape", [(6,), (1, 1, 1), (6, 7, 7), (1, 6, 7, 1), (1, 1, 6, 1, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_conv_constants_that_are_not_per_channel_are_left_alone(shape):
    model = layer_then_affine_model(constant_shape=shape, ops=("Mul",))
    if shape == (6,):
        # [6] broadcasts along the last axis: make the conv's width 6 so the model is valid.
        model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 6
    result = fold_onnx(model)
    assert result.report.decisions == []
    assert result.model.SerializeToString() == model.SerializeToString()


def test_conv_bn_then_mul_add_all_fold_to_a_fixed_point():
    model = conv_bn_model(seed=2)
    rng = np.random.default_rng(1)
    model.graph.node[-1].output[0] = "bn_out"
    model.graph.initializer.extend(
        [
            tensor("m", rng.uniform(0.5, 2, (1, 6, 1, 1)), np.float32),
            tensor("a", rng.standard_normal((6, 1, 1)), np.float32),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("Mul", ["bn_out", "m"], ["mul_out"], name="mul"),
            helper.make_node("Add", ["a", "mul_out"], ["y"], name="add"),
        ]
    )
    result = fold_onnx(model)
    assert op_types(result.model) == ["Conv"]
    assert [(d.op_type, d.rule, d.into) for d in result.report.decisions] == [
        ("BatchNormalization", "conv-bn", "conv"),
        ("Mul", "conv-affine", "conv"),
        ("Add", "conv-affine", "conv"),
    ]
    assert result.report.summary() == "1 BatchNormalization: 1 folded, 0 kept; 2 Mul/Add folded"
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def test_mul_whose_layer_output_has_another_reader_is_left_alone():
    model = layer_then_affine_model(ops=("Mul",))
    model.graph.output.append(helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, ["N", 6, 7, 7]))
    result = fold_onnx(model)
    assert result.report.decisions == [] and op_types(result.model) == ["Conv", "Mul"]


def test_skipping_the_affine_rule_keeps_the_chain():
    model = layer_then_affine_model()
    result = fold_onnx(model, skip_rules=["conv-affine"])
    assert op_types(result.model) == ["Conv", "Mul", "Add"]
