"""Small ONNX models the tests build themselves, and a helper that runs them in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {
    "float32": (np.float32, TensorProto.FLOAT),
    "float64": (np.float64, TensorProto.DOUBLE),
    "float16": (np.float16, TensorProto.FLOAT16),
}


def tensor(name: str, values: np.ndarray, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values).astype(dtype), name)


def bn_params(rng: np.random.Generator, channels: int, dtype=np.float32, prefix: str = "bn") -> list:
    """Random, non-trivial BN parameters: gamma of both signs, variance spread 0.3..3."""
    return [
        tensor(f"{prefix}_gamma", rng.uniform(-2.0, 2.0, channels), dtype),
        tensor(f"{prefix}_beta", rng.standard_normal(channels), dtype),
        tensor(f"{prefix}_mean", rng.standard_normal(channels), dtype),
        tensor(f"{prefix}_var", rng.uniform(0.3, 3.0, channels), dtype),
    ]


def bn_node(input_name: str, output_name: str, prefix: str = "bn", **attributes) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [input_name, f"{prefix}_gamma", f"{prefix}_beta", f"{prefix}_mean", f"{prefix}_var"],
        [output_name],
        name=prefix,
        **attributes,
    )


def make_model(nodes, inputs, outputs, initializers, opset: int = 17, ir_version: int | None = None):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    else:
        model.ir_version = min(model.ir_version, 10)  # what onnxruntime 1.32 accepts
    _declare_output_shapes(model)
    return model


def _declare_output_shapes(model: onnx.ModelProto) -> None:
    """Give outputs declared without a shape the one shape inference finds (checker full_check)."""
    inferred = {info.name: info for info in onnx.shape_inference.infer_shapes(model).graph.output}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape") and output.name in inferred:
            output.type.CopyFrom(inferred[output.name].type)


def conv_bn_model(
    *,
    rank: int = 2,
    in_channels: int = 4,
    out_channels: int = 6,
    groups: int = 1,
    kernel: int = 3,
    bias: bool = True,
    transpose: bool = False,
    dtype: str = "float32",
    bn_dtype: str | None = None,
    opset: int = 17,
    seed: int = 0,
    strides: int = 1,
    dilations: int = 1,
    pads: int = 1,
    bn_attributes: dict | None = None,
) -> onnx.ModelProto:
    """x -> Conv/ConvTranspose -> BN -> y, with every knob a fold must respect."""
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    bn_numpy_dtype, _ = DTYPES[bn_dtype or dtype]
    kernel_shape = [kernel] * rank
    if transpose:
        weight_shape = [in_channels, out_channels // groups, *kernel_shape]
    else:
        weight_shape = [out_channels, in_channels // groups, *kernel_shape]
    initializers = [tensor("W", rng.standard_normal(weight_shape) * 0.5, numpy_dtype)]
    inputs = ["x", "W"]
    if bias:
        initializers.append(tensor("B", rng.standard_normal(out_channels), numpy_dtype))
        inputs.append("B")
    initializers += bn_params(rng, out_channels, bn_numpy_dtype)
    conv = helper.make_node(
        "ConvTranspose" if transpose else "Conv",
        inputs,
        ["conv_out"],
        name="conv",
        group=groups,
        strides=[strides] * rank,
        dilations=[dilations] * rank,
        pads=[pads] * (2 * rank),
    )
    nodes = [conv, bn_node("conv_out", "y", **(bn_attributes or {}))]
    spatial = [7] * rank
    graph_inputs = [helper.make_tensor_value_info("x", onnx_dtype, ["N", in_channels, *spatial])]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers, opset=opset)


def gemm_bn_model(
    *,
    in_features: int = 5,
    out_features: int = 7,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias_shape: tuple[int, ...] | None = (7,),
    dtype: str = "float32",
    seed: int = 0,
    batch: int = 3,
    opset: int = 17,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    weight_shape = [out_features, in_features] if trans_b else [in_features, out_features]
    initializers = [tensor("W", rng.standard_normal(weight_shape) * 0.5, numpy_dtype)]
    inputs = ["a", "W"]
    if bias_shape is not None:
        initializers.append(tensor("C", rng.standard_normal(bias_shape), numpy_dtype))
        inputs.append("C")
    initializers += bn_params(rng, out_features, numpy_dtype)
    nodes = [
        helper.make_node(
            "Gemm", inputs, ["gemm_out"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
        ),
        bn_node("gemm_out", "y"),
    ]
    a_shape = [in_features, batch] if trans_a else [batch, in_features]
    graph_inputs = [helper.make_tensor_value_info("a", onnx_dtype, a_shape)]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, [batch, out_features])]
    return make_model(nodes, graph_inputs, graph_outputs, initializers, opset=opset)


def matmul_bn_model(
    *,
    in_features: int = 5,
    out_features: int = 7,
    with_add: bool = False,
    bias_first: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    left_shape: list | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    numpy_dtype, onnx_dtype = DTYPES[dtype]
    initializers = [tensor("W", rng.standard_normal((in_features, out_features)) * 0.5, numpy_dtype)]
    nodes = [helper.make_node("MatMul", ["a", "W"], ["mm_out"], name="matmul")]
    bn_input = "mm_out"
    if with_add:
        initializers.append(tensor("bias", rng.standard_normal(out_features), numpy_dtype))
        add_inputs = ["bias", "mm_out"] if bias_first else ["mm_out", "bias"]
        nodes.append(helper.make_node("Add", add_inputs, ["add_out"], name="add"))
        bn_input = "add_out"
    initializers += bn_params(rng, out_features, numpy_dtype)
    nodes.append(bn_node(bn_input, "y"))
    left_shape = left_shape or ["N", in_features]
    graph_inputs = [helper.make_tensor_value_info("a", onnx_dtype, left_shape)]
    graph_outputs = [helper.make_tensor_value_info("y", onnx_dtype, None)]
    return make_model(nodes, graph_inputs, graph_outputs, initializers, opset=opset)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` as written (graph optimizations off, so ONNX Runtime folds nothing itself)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]
