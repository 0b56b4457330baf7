"""Constant sub-expressions evaluate exactly as ONNX Runtime runs them (bnfold.onnx.expressions).

Random Slice / Transpose / Reshape / Squeeze / Unsqueeze / Concat / Cast nodes over random constants:
the value the graph index gives for the node's output must equal what ONNX Runtime computes, or the
index must say it is not a constant. Slice gets negative steps and out-of-range starts and ends.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold.onnx.graph import GraphIndex, ModelContext
from tests.builders import bn_node, bn_params, make_model, run, tensor


def _check(node: onnx.NodeProto, initializers: list[onnx.TensorProto], opset: int = 17) -> None:
    model = make_model(
        [node], [], [helper.make_tensor_value_info("out", TensorProto.UNDEFINED, None)], initializers
    )
    model.opset_import[0].version = opset
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    if node.op_type == "Cast":
        model.graph.output[0].type.tensor_type.elem_type = int(helper.get_attribute_value(node.attribute[0]))
    index = GraphIndex(model.graph, ModelContext(model))
    lookup = index.constant("out")
    (expected,) = run(model, {})
    assert lookup.is_constant
    assert lookup.value.dtype == expected.dtype
    np.testing.assert_array_equal(lookup.value, expected)


def _data(shape: tuple[int, ...]) -> onnx.TensorProto:
    return tensor("data", np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) - 3.5, np.float32)


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    data=st.data(),
)
def test_slice_matches_onnx_runtime(shape, data):
    count = data.draw(st.integers(1, len(shape)))
    axes = data.draw(st.permutations(range(len(shape)))).__getitem__(slice(0, count))
    starts = [data.draw(st.integers(-8, 8)) for _ in axes]
    ends = [data.draw(st.integers(-8, 8)) for _ in axes]
    steps = [data.draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    negative_axes = [axis - len(shape) if data.draw(st.booleans()) else axis for axis in axes]
    node = helper.make_node("Slice", ["data", "starts", "ends", "axes", "steps"], ["out"])
    initializers = [
        _data(shape),
        tensor("starts", starts, np.int64),
        tensor("ends", ends, np.int64),
        tensor("axes", negative_axes, np.int64),
        tensor("steps", steps, np.int64),
    ]
    _check(node, initializers)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple), data=st.data())
def test_transpose_reshape_squeeze_unsqueeze_match_onnx_runtime(shape, data):
    kind = data.draw(st.sampled_from(["Transpose", "Reshape", "Squeeze", "Unsqueeze"]))
    initializers = [_data(shape)]
    if kind == "Transpose":
        perm = data.draw(st.permutations(range(len(shape))))
        node = helper.make_node("Transpose", ["data"], ["out"], perm=list(perm))
    elif kind == "Reshape":
        target = [
            0 if data.draw(st.booleans()) and axis < len(shape) else size for axis, size in enumerate(shape)
        ]
        target[data.draw(st.integers(0, len(target) - 1))] = -1
        node = helper.make_node("Reshape", ["data", "target"], ["out"])
        initializers.append(tensor("target", target, np.int64))
    elif kind == "Squeeze":
        ones = [axis for axis, size in enumerate(shape) if size == 1]
        chosen = data.draw(st.lists(st.sampled_from(ones), unique=True)) if ones else []
        inputs = ["data", "axes"] if chosen else ["data"]
        node = helper.make_node("Squeeze", inputs, ["out"])
        if chosen:
            initializers.append(tensor("axes", chosen, np.int64))
    else:
        rank = len(shape) + 1
        axis = data.draw(st.integers(-rank, rank - 1))
        node = helper.make_node("Unsqueeze", ["data", "axes"], ["out"])
        initializers.append(tensor("axes", [axis], np.int64))
    _check(node, initializers)


@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
    to=st.sampled_from([TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT]),
    axis=st.integers(-1, 0),
)
def test_cast_and_concat_match_onnx_runtime(shape, to, axis):
    _check(helper.make_node("Cast", ["data"], ["out"], to=to), [_data(shape)])
    second = tensor("other", np.full(shape, 0.25), np.float32)
    _check(helper.make_node("Concat", ["data", "other"], ["out"], axis=axis), [_data(shape), second])


def test_an_expression_over_a_graph_input_is_not_a_constant():
    node = helper.make_node("Transpose", ["x"], ["out"])
    model = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 2])],
        [],
    )
    assert not GraphIndex(model.graph, ModelContext(model)).constant("out").is_constant


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    start=st.integers(-3, 3),
    end=st.one_of(st.none(), st.integers(-3, 3)),
    expand_to=st.lists(st.integers(1, 3), min_size=0, max_size=3),
)
def test_shape_and_expand_match_onnx_runtime(shape, start, end, expand_to):
    attributes = {"start": start} if end is None else {"start": start, "end": end}
    model_shape = helper.make_node("Shape", ["data"], ["out"], **attributes)
    check_int64(model_shape, [_data(shape)])
    # Expand broadcasts both ways: to `expand_to` aligned on the right, keeping the data's sizes
    target = [1] * max(0, len(shape) - len(expand_to)) + list(expand_to)
    target = [
        size if dim == 1 else dim
        for dim, size in zip(shape[-len(target) :] if target else (), target, strict=False)
    ]
    expand = helper.make_node("Expand", ["data", "to"], ["out"])
    _check(expand, [_data(shape), tensor("to", np.array(target, np.int64), np.int64)], opset=17)


def check_int64(node: onnx.NodeProto, initializers: list[onnx.TensorProto]) -> None:
    model = make_model(
        [node], [], [helper.make_tensor_value_info("out", TensorProto.INT64, None)], initializers
    )
    model.opset_import[0].version = 19
    lookup = GraphIndex(model.graph, ModelContext(model)).constant("out")
    (expected,) = run(model, {})
    assert lookup.is_constant
    np.testing.assert_array_equal(lookup.value, expected)


def test_the_dynamo_exporters_zero_bias_is_a_constant_and_the_bn_folds():
    # torch.onnx.export(dynamo=True, optimize=False) writes a bias-free conv's bias as
    # Expand(CastLike(0, x), Expand(Shape(W, 0, 1), [1])): the CastLike reads only x's type.
    from tests.onnx.helpers import fold_and_compare

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Shape", ["W"], ["channels"], start=0, end=1),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Expand", ["channels", "one"], ["bias_shape"]),
        helper.make_node("Constant", [], ["zero"], value=tensor("zero_value", np.array(0.0), np.float32)),
        helper.make_node("CastLike", ["zero", "x"], ["typed_zero"]),
        helper.make_node("Expand", ["typed_zero", "bias_shape"], ["bias"]),
        helper.make_node("Conv", ["x", "W", "bias"], ["c"]),
        bn_node("c", "y"),
    ]
    initializers = [
        tensor("W", rng.standard_normal((4, 3, 3, 3)), np.float32),
        *bn_params(rng, 4),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 4, 4])],
        initializers,
        opset=20,
    )
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)

    result = fold_and_compare(model, {"x": x})

    ops = [node.op_type for node in result.model.graph.node]
    assert ops == ["Conv"]  # the bias expression is pruned once the conv has its own bias


def test_a_castlike_to_an_unknown_type_is_not_a_constant():
    nodes = [helper.make_node("CastLike", ["zero", "x"], ["out"])]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.UNDEFINED, None)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [tensor("zero", np.array(0.0), np.float32)],
    )
    assert not GraphIndex(model.graph, ModelContext(model)).constant("out").is_constant
