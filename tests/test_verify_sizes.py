"""Sizes verification picks for dynamic dimensions nobody sized: 1 first, and when the original
rejects that (a CNN with a dynamic height and width and a fixed pooling window), larger ones — the
result says which, and the fold is still checked at two sizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from bnfold.errors import InputSpecError
from tests.builders import bn_node, bn_params, make_model, tensor
from tests.test_cli import in_process


def dynamic_image_cnn(pool: int = 2) -> onnx.ModelProto:
    """x[N, 3, H, W] -> Conv 3x3 (no padding) -> BN -> MaxPool(pool) -> y: H and W must be at least 3."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        bn_node("c", "n"),
        helper.make_node("MaxPool", ["n"], ["y"], kernel_shape=[pool, pool], strides=[pool, pool]),
    ]
    initializers = [
        tensor("W", rng.standard_normal((4, 3, 3, 3)), np.float32),
        *bn_params(rng, 4),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])],
        initializers,
    )


def test_a_model_that_rejects_size_1_is_verified_at_larger_sizes():
    model = dynamic_image_cnn()
    folded = bnfold.fold_onnx(model).model

    result = bnfold.verify(model, folded, provider="cpu")

    assert result.passed, result.to_text()
    shapes = [run["input_shapes"]["x"] for run in result.runs]
    assert shapes == [
        [1, 3, 8, 8],
        [3, 3, 9, 9],
    ]  # the first size of the ladder the model runs, then one more
    assert any("rejects dynamic dimensions at 1" in note and "ran them at 8" in note for note in result.notes)


def test_a_wrong_fold_still_fails_at_the_larger_sizes():
    model = dynamic_image_cnn()
    folded = bnfold.fold_onnx(model).model
    weight = next(t for t in folded.graph.initializer if t.name == "W")
    values = onnx.numpy_helper.to_array(weight) * np.float32(1.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))

    assert not bnfold.verify(model, folded, provider="cpu").passed


def test_sizes_the_user_gave_are_not_replaced():
    model = dynamic_image_cnn()
    folded = bnfold.fold_onnx(model).model

    with pytest.raises(InputSpecError, match="input_shapes"):
        bnfold.verify(model, folded, provider="cpu", input_shapes={"x": [1, 3, 2, 2]})
    result = bnfold.verify(model, folded, provider="cpu", input_shapes={"x": [2, 3, 16, 12]})
    assert result.runs[0]["input_shapes"]["x"] == [2, 3, 16, 12]
    assert not any("rejects dynamic dimensions" in note for note in result.notes)


def test_the_cli_folds_a_dynamic_size_cnn_with_default_options(tmp_path):
    source = tmp_path / "cnn.onnx"
    onnx.save(dynamic_image_cnn(), source)

    ran = in_process(source, "-o", tmp_path / "folded.onnx", "--provider", "cpu")

    assert ran.code == 0, ran.output
    assert "verification passed" in ran.output and "ran them at 8" in ran.output
