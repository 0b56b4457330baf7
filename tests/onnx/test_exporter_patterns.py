"""What real exporters put in front of a weight, and around a branch sum (issue 13), folded exactly.

- the TorchScript exporter deduplicates identical initializers behind ``Identity`` nodes (zero conv
  biases, BN gammas of ones): a real export below, and the pattern by hand;
- timm's LeViT exports a Linear without bias as ``MatMul(x, Transpose(W))``;
- float16-stored weights come through ``Cast``; shapes and weights through ``Reshape``,
  ``Squeeze``/``Unsqueeze``, ``Concat`` and ``Slice`` of constants;
- MobileOne starts its branch sum with a constant zero: ``out = 0 + BN(conv_0(x)); out += ...``.

A constant a fold writes gets a new initializer when the expression (or what it reads) has other
readers; an expression left without readers is pruned with what only it read.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import Outcome, fold_onnx
from tests.builders import bn_node, bn_params, make_model, op_types, run, tensor

C = 4


def _same(model: onnx.ModelProto, folded: onnx.ModelProto, shapes: dict[str, list[tuple[int, ...]]]) -> None:
    for index in range(len(next(iter(shapes.values())))):
        rng = np.random.default_rng(index)
        feeds = {name: rng.standard_normal(sizes[index]).astype(np.float32) for name, sizes in shapes.items()}
        for expected, actual in zip(run(model, feeds), run(folded, feeds), strict=True):
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _outcomes(result) -> list[Outcome]:
    return [d.outcome for d in result.report.decisions if d.op_type == "BatchNormalization"]


def test_a_torchscript_export_with_deduplicated_initializers_folds_completely():
    torch = pytest.importorskip("torch")
    from torch import nn

    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )
    for layer in module:
        if isinstance(layer, nn.Conv2d):
            nn.init.zeros_(layer.bias)  # torchvision's VGG init: identical zero biases, deduplicated
    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(1, 3, 8, 8),),
            buffer,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "N"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    assert "Identity" in op_types(model)  # the pattern is really there
    result = fold_onnx(model)
    assert _outcomes(result) == [Outcome.FOLDED, Outcome.FOLDED], result.report.to_text()
    assert op_types(result.model) == ["Conv", "Relu", "Conv"]  # the Identity nodes went with the BNs
    onnx.checker.check_model(result.model, full_check=True)
    _same(model, result.model, {"x": [(1, 3, 8, 8), (2, 3, 8, 8)]})


def _conv_bn_pair(weight_nodes, bias_source: str, prefix: str, source: str, output: str):
    return [
        *weight_nodes,
        helper.make_node(
            "Conv", [source, f"{prefix}_W", bias_source], [f"{prefix}_c"], name=f"{prefix}_conv"
        ),
        bn_node(f"{prefix}_c", output, prefix=prefix),
    ]


def test_a_bias_shared_behind_identity_nodes_is_copied_for_each_layer_never_edited():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Identity", ["zeros"], ["a_bias"], name="dedup_a"),
        helper.make_node("Identity", ["zeros"], ["b_bias"], name="dedup_b"),
        *_conv_bn_pair([], "a_bias", "a", "x", "h"),
        *_conv_bn_pair([], "b_bias", "b", "h", "y"),
        helper.make_node("Add", ["y", "zeros_read"], ["z"], name="other_reader"),
        helper.make_node("Identity", ["zeros"], ["zeros_read"], name="dedup_c"),
    ]
    nodes.insert(len(nodes) - 2, nodes.pop())  # the third reader before its Add
    initializers = [
        tensor("zeros", np.zeros(C), np.float32),
        tensor("a_W", rng.standard_normal((C, C, 1, 1)), np.float32),
        tensor("b_W", rng.standard_normal((C, C, 1, 1)), np.float32),
        *bn_params(rng, C, prefix="a"),
        *bn_params(rng, C, prefix="b"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 1, 1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", C, 1, 1])],
        initializers,
    )
    result = fold_onnx(model)
    assert _outcomes(result) == [Outcome.FOLDED, Outcome.FOLDED]
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(weights["zeros"], np.zeros(C))  # still read by the third Identity
    assert op_types(result.model) == ["Conv", "Conv", "Identity", "Add"]
    _same(model, result.model, {"x": [(1, C, 1, 1), (3, C, 1, 1)]})


@pytest.mark.parametrize("reshape", ["Flatten", "Reshape"])
def test_levit_linear_as_matmul_of_a_transposed_weight_folds_through_the_flatten(reshape):
    """timm LeViT: ``bn(linear(x).flatten(0, 1)).reshape_as(...)`` with ``Linear`` exported as
    ``MatMul(x, Transpose(W))``."""
    rng = np.random.default_rng(2)
    flat = (
        helper.make_node("Flatten", ["mm"], ["flat"], name="flat", axis=2)  # [B, 5, C] -> [B*5, C]
        if reshape == "Flatten"
        else helper.make_node("Reshape", ["mm", "flat_shape"], ["flat"], name="flat")
    )
    nodes = [
        helper.make_node("Transpose", ["W"], ["W_t"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W_t"], ["mm"], name="linear"),
        flat,
        bn_node("flat", "normed", prefix="bn"),
        helper.make_node("Reshape", ["normed", "back_shape"], ["y"], name="back"),
    ]
    initializers = [
        tensor("W", rng.standard_normal((C, 6)), np.float32),
        tensor("flat_shape", [-1, C], np.int64),
        tensor("back_shape", [-1, 5, C], np.int64),
        *bn_params(rng, C, prefix="bn"),
    ]
    if (
        reshape == "Flatten"
    ):  # Flatten(axis=2) of [B, N, C] is [B*N, C] only with... rank 3: use axis 2 of [B*N?]
        nodes[2] = helper.make_node("Reshape", ["mm", "flat_shape"], ["flat"], name="flat")
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 5, C])],
        initializers,
    )
    result = fold_onnx(model)
    assert _outcomes(result) == [Outcome.FOLDED], result.report.to_text()
    assert "Transpose" not in op_types(result.model)  # folded into a new weight, then pruned
    assert "W" not in {t.name for t in result.model.graph.initializer}
    _same(model, result.model, {"x": [(1, 5, 6), (3, 5, 6)]})


def test_weights_behind_cast_reshape_concat_slice_and_unsqueeze_fold():
    """A float16-stored conv weight cast to float32; a bias sliced from a longer constant and reshaped
    through Unsqueeze/Squeeze; a BN mean concatenated from two halves."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Cast", ["W16"], ["W32"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["W32", "w_shape"], ["W"], name="reshape_w"),
        helper.make_node("Slice", ["long_bias", "starts", "ends", "axes", "steps"], ["sliced"], name="slice"),
        helper.make_node("Unsqueeze", ["sliced", "axis0"], ["bias_2d"], name="unsqueeze"),
        helper.make_node("Squeeze", ["bias_2d", "axis0"], ["bias"], name="squeeze"),
        helper.make_node("Concat", ["mean_a", "mean_b"], ["bn_mean"], name="concat", axis=0),
        helper.make_node("Conv", ["x", "W", "bias"], ["c"], name="conv"),
        bn_node("c", "y", prefix="bn"),
    ]
    params = [p for p in bn_params(rng, C, prefix="bn") if p.name != "bn_mean"]
    initializers = [
        tensor("W16", rng.standard_normal(C * 3 * 3 * 3), np.float16),
        tensor("w_shape", [C, 3, 3, 3], np.int64),
        tensor("long_bias", rng.standard_normal(2 * C + 3), np.float32),
        tensor("starts", [2 * C - 1], np.int64),
        tensor("ends", [-(2 * C + 5)], np.int64),  # clamped: runs to the beginning
        tensor("axes", [0], np.int64),
        tensor("steps", [-2], np.int64),
        tensor("axis0", [0], np.int64),
        tensor("mean_a", rng.standard_normal(C // 2), np.float32),
        tensor("mean_b", rng.standard_normal(C - C // 2), np.float32),
        *params,
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 3, 3])],
        initializers,
    )
    result = fold_onnx(model)
    assert _outcomes(result) == [Outcome.FOLDED], result.report.to_text()
    assert op_types(result.model) == ["Conv"]
    _same(model, result.model, {"x": [(1, 3, 5, 5), (2, 3, 5, 5)]})


def _mobileone(zero_first: bool, zero_shape: tuple[int, ...], identity: bool = True) -> onnx.ModelProto:
    """timm MobileOne as exported: ``out = 0 + BN(conv_0(x))`` (or ``scale + 0``), ``out += BN(conv_i(x))``,
    ``out += BN(x)``; the zero is a Constant node."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node(
            "Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros(zero_shape, np.float32))
        )
    ]
    initializers = []
    terms = []
    for index, kernel in enumerate((3, 1, 3)):
        prefix = f"branch{index}"
        initializers += [tensor(f"{prefix}_W", rng.standard_normal((C, C, kernel, kernel)), np.float32)]
        initializers += bn_params(rng, C, prefix=prefix)
        pad = kernel // 2
        nodes.append(
            helper.make_node(
                "Conv", ["x", f"{prefix}_W"], [f"{prefix}_c"], name=f"{prefix}_conv", pads=[pad] * 4
            )
        )
        nodes.append(bn_node(f"{prefix}_c", f"{prefix}_n", prefix=prefix))
        terms.append(f"{prefix}_n")
    if identity:
        initializers += bn_params(rng, C, prefix="identity")
        nodes.append(bn_node("x", "identity_n", prefix="identity"))
        terms.append("identity_n")
    first = ["zero", terms[0]] if zero_first else [terms[0], "zero"]
    nodes.append(helper.make_node("Add", first, ["sum0"], name="add0"))
    for index, term in enumerate(terms[1:], start=1):
        nodes.append(helper.make_node("Add", [f"sum{index - 1}", term], [f"sum{index}"], name=f"add{index}"))
    nodes.append(helper.make_node("Relu", [f"sum{len(terms) - 1}"], ["y"], name="relu"))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 6, 6])],
        initializers,
    )


@pytest.mark.parametrize("zero_first", [True, False], ids=["zero-plus-branch", "branch-plus-zero"])
@pytest.mark.parametrize("zero_shape", [(), (1,), (1, C, 1, 1)], ids=["scalar", "one", "per-channel"])
def test_mobileone_branch_sums_starting_from_a_constant_zero_merge_into_one_conv(zero_first, zero_shape):
    model = _mobileone(zero_first, zero_shape)
    result = fold_onnx(model)
    assert op_types(result.model) == ["Conv", "Relu"], result.report.to_text()
    assert all(outcome is Outcome.FOLDED for outcome in _outcomes(result))
    _same(model, result.model, {"x": [(1, C, 6, 6), (2, C, 6, 6)]})


def test_a_constant_added_to_a_branch_that_is_not_one_per_channel_blocks_the_merge():
    model = _mobileone(True, (1, 1, 6, 1), identity=False)
    result = fold_onnx(model)
    assert op_types(result.model).count("Conv") == 3, result.report.to_text()
    _same(model, result.model, {"x": [(1, C, 6, 6)]})
