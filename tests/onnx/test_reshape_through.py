"""Layer -> Reshape/Flatten -> BN: folded into the layer when the BN's channels are the layer's.

LeViT's ``Linear + BatchNorm1d over flattened tokens``, a Linear's output reshaped for a BatchNorm2d,
a Conv's output flattened to ``[N, C, H*W]`` — each checked in ONNX Runtime against the unfolded model,
and every refusal by its reason code.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold import Outcome, Reason, fold_onnx
from tests.builders import DTYPES, bn_node, bn_params, gemm_bn_model, make_model, op_types, run, tensor
from tests.onnx.helpers import fold_and_compare, only_decision

NUMPY = {name: numpy_dtype for name, (numpy_dtype, _) in DTYPES.items()}

# How the MatMul output [..., C] becomes the BN's [tokens, C] (or [tokens, C, 1]).
FLATTENS = (
    "flatten",
    "flatten-negative-axis",
    "reshape-minus-one",
    "reshape-literal",
    "reshape-trailing-one",
)


def _shape_input(name: str, values: list[int]) -> onnx.TensorProto:
    return tensor(name, np.array(values, dtype=np.int64), np.int64)


def linear_bn_tokens_model(
    *,
    lead: tuple[int, ...] = (2, 3),
    in_features: int = 5,
    out_features: int = 4,
    bias: str | None = None,
    flatten: str = "flatten",
    back: str = "shape",
    dtype: str = "float32",
    opset: int = 17,
    seed: int = 0,
    symbolic: bool = True,
) -> onnx.ModelProto:
    """LeViT ``Linear_BN``: x [*lead, K] -> MatMul [-> Add bias] -> flatten to [tokens, C] -> BN -> back.

    ``bias`` is None, ``"after"`` (Add(mm, b)) or ``"before"`` (Add(b, mm)); ``back`` restores
    ``[*lead, C]`` with ``Reshape(bn, Shape(linear))`` as the TorchScript exporter writes
    ``reshape_as`` (``"shape"``) or with a constant shape (``"constant"``).
    """
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    channels = out_features
    initializers = [tensor("W", rng.standard_normal((in_features, channels)) * 0.5, numpy_dtype)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm_out"], name="linear")]
    linear_out = "mm_out"
    if bias is not None:
        initializers.append(tensor("b", rng.standard_normal(channels), numpy_dtype))
        inputs = ["mm_out", "b"] if bias == "after" else ["b", "mm_out"]
        nodes.append(helper.make_node("Add", inputs, ["linear_out"], name="linear_bias"))
        linear_out = "linear_out"
    rank = len(lead) + 1
    tokens = int(np.prod(lead))
    if flatten in ("flatten", "flatten-negative-axis"):
        axis = -1 if flatten == "flatten-negative-axis" else rank - 1
        nodes.append(helper.make_node("Flatten", [linear_out], ["flat"], name="flatten", axis=axis))
    else:
        shape = {
            "reshape-minus-one": [-1, channels],
            "reshape-literal": [tokens, channels],
            "reshape-trailing-one": [-1, channels, 1],
        }[flatten]
        initializers.append(_shape_input("flat_shape", shape))
        nodes.append(helper.make_node("Reshape", [linear_out, "flat_shape"], ["flat"], name="flatten"))
    initializers += bn_params(rng, channels, numpy_dtype)
    nodes.append(bn_node("flat", "bn_out"))
    if back == "shape":
        nodes.append(helper.make_node("Shape", [linear_out], ["linear_shape"], name="linear_shape"))
        nodes.append(helper.make_node("Reshape", ["bn_out", "linear_shape"], ["y"], name="back"))
    else:
        initializers.append(_shape_input("back_shape", [*lead, channels]))
        nodes.append(helper.make_node("Reshape", ["bn_out", "back_shape"], ["y"], name="back"))
    dims = [f"d{axis}" for axis in range(len(lead))] if symbolic else list(lead)
    graph_inputs = [helper.make_tensor_value_info("x", onnx_dtype, [*dims, in_features])]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers, opset=opset)


def _feeds(model: onnx.ModelProto, shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    numpy_dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    values = np.random.default_rng(seed).standard_normal(shape).astype(numpy_dtype)
    return {model.graph.input[0].name: values}


# -- MatMul -> Reshape/Flatten -> BN (LeViT Linear_BN) ------------------------------------------------


@given(
    lead=st.sampled_from([(2, 3), (6,), (2, 2, 3), (1, 1)]),
    bias=st.sampled_from([None, "after", "before"]),
    flatten=st.sampled_from(FLATTENS),
    back=st.sampled_from(["shape", "constant"]),
    dtype=st.sampled_from(["float32", "float16", "float64"]),
    symbolic=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_linear_bn_over_flattened_tokens_folds_into_the_matmul(
    lead, bias, flatten, back, dtype, symbolic, seed
):
    model = linear_bn_tokens_model(
        lead=lead, bias=bias, flatten=flatten, back=back, dtype=dtype, seed=seed, symbolic=symbolic
    )
    result = fold_and_compare(model, _feeds(model, (*lead, 5), seed))
    decision = only_decision(result)
    assert (decision.rule, decision.into) == ("matmul-reshape-bn", "linear")
    reshape_op = "Flatten" if flatten.startswith("flatten") else "Reshape"
    # A bias-free MatMul gets its shift as an Add where the BN was; the reshapes stay.
    layer = ["MatMul", "Add"] if bias else ["MatMul"]
    tail = [reshape_op] if bias else [reshape_op, "Add"]
    expected = [*layer, *tail, *(["Shape"] if back == "shape" else []), "Reshape"]
    assert op_types(result.model) == expected


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15, 17, 21])
@pytest.mark.parametrize("flatten", ["flatten", "reshape-minus-one"])
def test_linear_bn_over_flattened_tokens_across_opsets(opset, flatten):
    model = linear_bn_tokens_model(opset=opset, flatten=flatten, bias="after", back="constant", seed=opset)
    fold_and_compare(model, _feeds(model, (2, 3, 5)))


def test_bias_free_linear_with_trailing_one_gets_a_per_channel_shift_on_axis_1():
    model = linear_bn_tokens_model(flatten="reshape-trailing-one", bias=None)
    result = fold_and_compare(model, _feeds(model, (2, 3, 5)))
    shift = next(t for t in result.model.graph.initializer if t.name.endswith("folded_bias"))
    assert list(shift.dims) == [4, 1]  # broadcasts along the BN's [tokens, C, 1] axis 1, not its last


def test_pure_scale_adds_no_bias_add():
    model = linear_bn_tokens_model(bias=None)
    for initializer in model.graph.initializer:
        if initializer.name in ("bn_beta", "bn_mean"):
            initializer.CopyFrom(tensor(initializer.name, np.zeros(4), np.float32))
    result = fold_and_compare(model, _feeds(model, (2, 3, 5)))
    assert op_types(result.model) == ["MatMul", "Flatten", "Shape", "Reshape"]


# -- Gemm -> Reshape -> BN ----------------------------------------------------------------------------


def gemm_reshape_bn_model(*, shape: list[int], allowzero: int | None = None, **gemm) -> onnx.ModelProto:
    """a [M, 5] -> Gemm -> Reshape(shape) -> BN(4) -> y: ``gemm_bn_model`` with a Reshape put in."""
    gemm.setdefault("bias_shape", (4,))
    model = gemm_bn_model(out_features=4, **gemm)
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "M"  # rows unknown: sizes are symbolic
    graph.initializer.append(_shape_input("shape", shape))
    attributes = {} if allowzero is None else {"allowzero": allowzero}
    reshape = helper.make_node("Reshape", ["gemm_out", "shape"], ["reshaped"], name="reshape", **attributes)
    graph.node.insert(1, reshape)
    graph.node[2].input[0] = "reshaped"
    graph.output[0].type.tensor_type.ClearField("shape")  # y is no longer [3, 4]
    graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0])
    return model


@given(
    shape=st.sampled_from([[-1, 4, 1, 1], [-1, 4, 1], [0, -1], [-1, 4], [3, 4, 1, 1, 1]]),
    trans_b=st.integers(0, 1),
    beta=st.sampled_from([1.0, 0.5]),
    bias_shape=st.sampled_from([None, (4,), (1, 4), (3, 4)]),
    dtype=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 10_000),
)
def test_gemm_reshaped_for_a_batchnorm2d_folds_into_the_gemm(shape, trans_b, beta, bias_shape, dtype, seed):
    model = gemm_reshape_bn_model(
        shape=shape, trans_b=trans_b, beta=beta, bias_shape=bias_shape, dtype=dtype, seed=seed
    )
    result = fold_and_compare(model, _feeds(model, (3, 5), seed))
    assert op_types(result.model) == ["Gemm", "Reshape"]
    assert only_decision(result).rule == "gemm-reshape-bn"
    assert result.model.graph.node[-1].output[0] == "y"


def test_reshape_zero_copies_the_input_size_unless_allowzero():
    copying = gemm_reshape_bn_model(shape=[0, -1], allowzero=0, opset=14)
    assert only_decision(fold_and_compare(copying, _feeds(copying, (3, 5)))).rule == "gemm-reshape-bn"
    # With allowzero=1 a 0 is a literal size: the BN input would be [3, 0], not 4 channels.
    literal = gemm_reshape_bn_model(shape=[3, 0, 4], allowzero=1, opset=14)
    decision = only_decision(fold_onnx(literal))
    assert decision.reason is Reason.RESHAPE_NOT_CHANNEL_PRESERVING and "[3, 0, 4]" in decision.detail


# -- Conv -> Reshape/Flatten -> BN, and the Conv -> BN -> Flatten -> Gemm tails -----------------------


def conv_model(
    *,
    after: list[str],
    spatial: int = 5,
    kernel: int = 3,
    channels: int = 4,
    dtype: str = "float32",
    seed: int = 0,
    reshape: list[int] | None = None,
    symbolic: bool = False,
) -> onnx.ModelProto:
    """x [N, 3, s, s] -> Conv(k, no pad) -> ``after`` (ops among Flatten, Reshape, BN, Gemm) -> y."""
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    initializers = [
        tensor("W", rng.standard_normal((channels, 3, kernel, kernel)) * 0.3, numpy_dtype),
        tensor("B", rng.standard_normal(channels), numpy_dtype),
    ]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["t0"], name="conv")]
    positions = (spatial - kernel + 1) ** 2
    flat = channels  # features per sample once flattened
    for step, op in enumerate(after, start=1):
        source, target = f"t{step - 1}", f"t{step}"
        if op == "BN":
            width = channels if "Flatten" not in after[:step] else channels * positions
            initializers += bn_params(rng, width, numpy_dtype, prefix=f"bn{step}")
            nodes.append(bn_node(source, target, prefix=f"bn{step}"))
        elif op == "Flatten":
            nodes.append(helper.make_node("Flatten", [source], [target], name="flatten"))
            flat = channels * positions
        elif op == "Reshape":
            initializers.append(_shape_input("shape", reshape))
            nodes.append(helper.make_node("Reshape", [source, "shape"], [target], name="reshape"))
        elif op == "Gemm":
            initializers.append(tensor("G", rng.standard_normal((3, flat)) * 0.3, numpy_dtype))
            nodes.append(helper.make_node("Gemm", [source, "G"], [target], name="gemm", transB=1))
    nodes[-1].output[0] = "y"
    sizes = ["N", 3, "H", "W"] if symbolic else [2, 3, spatial, spatial]
    graph_inputs = [helper.make_tensor_value_info("x", onnx_dtype, sizes)]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [[0, 0, -1], [2, 4, 9], [-1, 4, 3, 3], [0, 4, 9, 1]])
def test_conv_output_reshaped_to_channels_by_positions_folds_into_the_conv(shape, dtype):
    model = conv_model(after=["Reshape", "BN"], reshape=shape, dtype=dtype)
    result = fold_and_compare(model, _feeds(model, (2, 3, 5, 5)))
    assert op_types(result.model) == ["Conv", "Reshape"]
    assert only_decision(result).rule == "conv-reshape-bn"


def test_conv_with_1x1_output_flattened_folds_when_its_size_is_known():
    # x [2, 3, 3, 3] -> 3x3 Conv -> [2, 4, 1, 1] -> Flatten -> [2, 4]: one position per channel.
    static = conv_model(after=["Flatten", "BN"], spatial=3)
    result = fold_and_compare(static, _feeds(static, (2, 3, 3, 3)))
    assert only_decision(result).rule == "conv-reshape-bn"
    # With x [N, 3, H, W] the output [N, 4, ?, ?] may have more than one position: cannot show it.
    symbolic = conv_model(after=["Flatten", "BN"], spatial=3, symbolic=True)
    decision = only_decision(fold_onnx(symbolic))
    assert decision.reason is Reason.RESHAPE_NOT_CHANNEL_PRESERVING
    assert "its axis 1 is not the layer's 4 channels" in decision.detail


def test_conv_bn_flatten_gemm_folds_the_bn_into_the_conv():
    model = conv_model(after=["BN", "Flatten", "Gemm"])
    result = fold_and_compare(model, _feeds(model, (2, 3, 5, 5)))
    assert only_decision(result).rule == "conv-bn"
    assert op_types(result.model) == ["Conv", "Flatten", "Gemm"]


def test_bn_over_flattened_conv_features_is_not_per_conv_channel_and_folds_into_the_gemm():
    # [2, 4, 3, 3] -> Flatten -> [2, 36]: the BN has one channel per (c, h, w), not per conv channel.
    model = conv_model(after=["Flatten", "BN", "Gemm"])
    result = fold_and_compare(model, _feeds(model, (2, 3, 5, 5)))
    assert only_decision(result).rule == "bn-gemm"
    assert op_types(result.model) == ["Conv", "Flatten", "Gemm"]

    without_gemm = conv_model(after=["Flatten", "BN"])
    decision = only_decision(fold_onnx(without_gemm))
    assert (decision.outcome, decision.rule) == (Outcome.KEPT, "conv-reshape-bn")
    assert decision.reason is Reason.RESHAPE_NOT_CHANNEL_PRESERVING
    assert "gives the BN input [2, 36]: its axis 1 is not the layer's 4 channels" in decision.detail


# -- refusals -----------------------------------------------------------------------------------------


def reshape_shape_computed_at_run_time() -> onnx.ModelProto:
    """The flatten's shape is ``Concat([-1], Gather(Shape(mm_out), 2))``: computed at run time."""
    model = linear_bn_tokens_model(flatten="reshape-minus-one")
    graph = model.graph
    shape_nodes = [
        helper.make_node("Shape", ["mm_out"], ["full_shape"], name="full_shape"),
        helper.make_node("Gather", ["full_shape", "last_axis"], ["channel_size"], name="channel_size"),
        helper.make_node("Concat", ["minus_one", "channel_size"], ["flat_shape_dynamic"], axis=0, name="cat"),
    ]
    graph.initializer.extend([_shape_input("last_axis", [2]), _shape_input("minus_one", [-1])])
    for node in graph.node:
        if node.name == "flatten":
            node.input[1] = "flat_shape_dynamic"
    for offset, node in enumerate(shape_nodes, start=1):
        graph.node.insert(offset, node)
    return model


def bn_over_the_token_axis() -> onnx.ModelProto:
    """[2, 4, 4] kept as [2, 4, 4]: BN axis 1 is the token axis, as long as the channel axis."""
    model = linear_bn_tokens_model(lead=(2, 4), flatten="reshape-literal", back="constant")
    for initializer in model.graph.initializer:
        if initializer.name == "flat_shape":
            initializer.CopyFrom(_shape_input("flat_shape", [2, 4, 4]))
    return model


def _with_extra_output(model: onnx.ModelProto, name: str, elem_type: int | None = None) -> onnx.ModelProto:
    elem_type = elem_type or model.graph.output[0].type.tensor_type.elem_type
    model.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    return model


def _with_reader(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    model.graph.node.append(helper.make_node("Relu", [name], ["side"], name="side_relu"))
    return _with_extra_output(model, "side")


def _flatten_per_row() -> onnx.ModelProto:
    # [2, 3, 4] -> Flatten(axis=1) -> [2, 12]: BN over 12 = (token, channel) pairs.
    model = linear_bn_tokens_model(back="constant")
    model.graph.node[1].attribute[0].i = 1
    rng = np.random.default_rng(1)
    names = {"bn_gamma", "bn_beta", "bn_mean", "bn_var"}
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *bn_params(rng, 12, np.float32)])
    return model


def _unknown_rank() -> onnx.ModelProto:
    model = linear_bn_tokens_model(back="constant")
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return model


@pytest.mark.parametrize(
    ("build", "reason", "detail"),
    [
        (reshape_shape_computed_at_run_time, Reason.RESHAPE_SHAPE_NOT_CONSTANT, "computed by Concat"),
        (bn_over_the_token_axis, Reason.RESHAPE_NOT_CHANNEL_PRESERVING, "elements per channel"),
        (
            _flatten_per_row,
            Reason.RESHAPE_NOT_CHANNEL_PRESERVING,
            "[d0, 4*d1]: its axis 1 is not the layer's 4",
        ),
        (_unknown_rank, Reason.RESHAPE_NOT_CHANNEL_PRESERVING, "rank of `mm_out` is unknown"),
        (
            lambda: _with_reader(linear_bn_tokens_model(), "flat"),
            Reason.PRODUCER_HAS_OTHER_CONSUMERS,
            "`flat` also feeds side_relu",
        ),
        (
            lambda: _with_extra_output(linear_bn_tokens_model(), "flat"),
            Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT,
            "`flat` is a graph output",
        ),
        (
            lambda: _with_reader(linear_bn_tokens_model(), "mm_out"),
            Reason.PRODUCER_HAS_OTHER_CONSUMERS,
            "`mm_out` also feeds side_relu",
        ),
        (
            lambda: _with_extra_output(linear_bn_tokens_model(bias="after"), "mm_out"),
            Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT,
            "`mm_out`",
        ),
        (
            lambda: _training(linear_bn_tokens_model()),
            Reason.TRAINING_MODE,
            "training_mode=1",
        ),
    ],
    ids=[
        "shape-not-constant",
        "token-axis",
        "flatten-tokens-into-features",
        "unknown-rank",
        "reshape-output-read-elsewhere",
        "reshape-output-is-graph-output",
        "linear-output-read-elsewhere",
        "matmul-output-is-graph-output",
        "training-mode",
    ],
)
def test_refusals_keep_the_bn_and_the_model_and_say_why(build, reason, detail):
    model = build()
    result = fold_onnx(model)
    decision = only_decision(result)
    assert decision.outcome is Outcome.KEPT
    assert decision.reason is reason, decision.message
    assert detail in decision.detail, decision.detail
    assert result.model.SerializeToString() == model.SerializeToString()


def _training(model: onnx.ModelProto) -> onnx.ModelProto:
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    return model


def test_skipping_the_rule_keeps_the_bn():
    decision = only_decision(fold_onnx(linear_bn_tokens_model(), skip_rules=["matmul-reshape-bn"]))
    assert (decision.reason, decision.rule) == (Reason.RULE_DISABLED, "matmul-reshape-bn")


def test_a_shape_reader_of_the_linear_output_does_not_block_the_fold_but_one_of_the_reshape_does():
    model = linear_bn_tokens_model(back="shape")  # Shape(mm_out) feeds the Reshape back
    assert only_decision(fold_onnx(model)).outcome is Outcome.FOLDED
    reshape_read = linear_bn_tokens_model(back="constant")
    reshape_read.graph.node.append(helper.make_node("Shape", ["flat"], ["flat_shape_out"], name="flat_shape"))
    _with_extra_output(reshape_read, "flat_shape_out", TensorProto.INT64)
    # The Reshape hands its output name to the BN's readers: a Shape of it would lose its input.
    assert only_decision(fold_onnx(reshape_read)).reason is Reason.PRODUCER_HAS_OTHER_CONSUMERS


# -- declared shapes that are not what runs --------------------------------------------------------


def _stale_shape_model() -> onnx.ModelProto:
    """x [6, 3] [-> Relu] -> MatMul [6, 4] -> Reshape [2, 4, -1] -> BN(4) -> y, with value_info that
    declares the MatMul output [2, 4] (what it was before the batch size was edited on the input).

    ONNX Runtime only warns about such value_info. Trusted, it made the Reshape look like [2, 4, 1]
    (one element per channel, channel-preserving) where it gives [2, 4, 3] (found by the fuzz
    mutation ``stale-value-info``).
    """
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm")]
    nodes += [
        helper.make_node("Reshape", ["mm", "shape"], ["flat"], name="flat"),
        bn_node("flat", "y"),
    ]
    initializers = [
        tensor("W", rng.standard_normal((3, 4)), np.float32),
        _shape_input("shape", [2, 4, -1]),
        *bn_params(rng, 4),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])]
    model = make_model(nodes, inputs, outputs, initializers)
    model.graph.value_info.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, [2, 4]))
    return model


def test_stale_value_info_does_not_make_a_reshape_look_channel_preserving():
    model = _stale_shape_model()
    result = fold_onnx(model)
    decision = only_decision(result)
    assert decision.reason is Reason.RESHAPE_NOT_CHANNEL_PRESERVING, decision.message
    assert "[2, 4, 3]" in decision.detail
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_stale_value_info_rank_does_not_make_matmul_bn_fold_a_3d_output():
    """x [2, 4, 3] -> Relu -> MatMul [2, 4, 4] -> BN over axis 1 (the tokens, not the columns), with
    the Relu output declared 2-D: matmul-bn must still see a 3-D output and refuse."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["mm"], name="mm"),
        bn_node("mm", "y"),
    ]
    initializers = [tensor("W", rng.standard_normal((3, 4)), np.float32), *bn_params(rng, 4)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 4])]
    model = make_model(nodes, inputs, outputs, initializers)
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [8, 3]))
    result = fold_onnx(model)
    assert only_decision(result).reason is Reason.CHANNEL_AXIS_MISMATCH, only_decision(result).message
    x = np.random.default_rng(1).standard_normal((2, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
