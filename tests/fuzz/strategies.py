"""Hypothesis strategies for the fuzzing harness: random valid ONNX graphs, and random mutations.

``graphs()`` draws the structure (layer kinds, channel counts, groups, dtypes, opsets 9..21, which
tensors are shared, read twice or exposed as graph outputs, which weights are ``Constant`` nodes,
which BN statistics are degenerate) and a seed for the numbers, so shrinking works on structure and
a failing example prints a small recipe. ``mutations()`` then breaks a valid model the ways broken
exporters and hand edits do: bad attributes, wrong-shaped or wrong-typed tensors, tensor data that
does not decode, names that are not UTF-8, rewired or dropped nodes, names defined twice, foreign
domains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.builders import make_model

FLOATS = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}

# How a BN's statistics may be broken. Those in BREAKS_THE_FOLD must keep the BN
# (nonpositive-variance, nonfinite-statistics, fold-overflows-dtype); "zero-variance" folds (var = 0
# is fine while epsilon > 0).
DEGENERACIES = ("none", "zero-variance", "negative-variance", "nan", "inf", "huge-gamma")
BREAKS_THE_FOLD = {"negative-variance", "nan", "inf", "huge-gamma"}


@dataclass
class Tensor:
    name: str
    shape: list[int]


@dataclass
class Recipe:
    """What a drawn graph is made of (printed by hypothesis when an example fails)."""

    model: onnx.ModelProto
    dtype: str
    opset: int
    steps: list[str] = field(default_factory=list)
    # BN node name -> its degeneracy, for the "never folded into inf/NaN" check.
    degenerate: dict[str, str] = field(default_factory=dict)


class _GraphBuilder:
    def __init__(self, draw, dtype: str, opset: int, rng: np.random.Generator) -> None:
        self.draw = draw
        self.dtype = dtype
        self.numpy_dtype, self.onnx_dtype = FLOATS[dtype]
        self.opset = opset
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.outputs: list[Tensor] = []
        self.tensors: list[Tensor] = []  # every activation so far, for residual Adds and side outputs
        self.weights: dict[tuple[int, ...], list[str]] = {}  # shape -> constant names, for sharing
        self.steps: list[str] = []
        self.degenerate: dict[str, str] = {}
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}{self.counter}"

    # -- constants -----------------------------------------------------------------------------
    def constant(self, base: str, values: np.ndarray, *, shareable: bool = True, dtype=None) -> str:
        """A weight: an initializer or a Constant node, possibly one already used by another layer."""
        values = np.asarray(values).astype(dtype or self.numpy_dtype)
        key = (values.dtype.str, *values.shape)
        if shareable and self.weights.get(key) and self.draw(st.integers(0, 4)) == 0:
            name = self.draw(st.sampled_from(self.weights[key]))
            self.steps.append(f"share {name}")
            return name
        name = self.fresh(base)
        tensor = numpy_helper.from_array(values, name)
        if self.draw(st.integers(0, 5)) == 0:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}", value=tensor))
            self.steps.append(f"Constant {name}")
        else:
            self.initializers.append(tensor)
        if shareable:
            self.weights.setdefault(key, []).append(name)
        return name

    def node(self, op_type: str, inputs: list[str], shape: list[int], **attributes) -> Tensor:
        output = Tensor(self.fresh(op_type.lower()), shape)
        self.nodes.append(helper.make_node(op_type, inputs, [output.name], name=output.name, **attributes))
        self.tensors.append(output)
        return output

    # -- layers --------------------------------------------------------------------------------
    def conv(self, x: Tensor, transpose: bool) -> Tensor:
        batch, in_channels, *spatial = x.shape
        groups = self.draw(st.sampled_from([g for g in (1, 2, 3, 4) if in_channels % g == 0]))
        out_channels = groups * self.draw(st.integers(1, 3))
        kernel = self.draw(st.sampled_from([1, 3]))
        rank = len(spatial)
        if transpose:
            weight_shape = [in_channels, out_channels // groups, *[kernel] * rank]
        else:
            weight_shape = [out_channels, in_channels // groups, *[kernel] * rank]
        inputs = [x.name, self.constant("W", self.rng.standard_normal(weight_shape) * 0.5)]
        if self.draw(st.booleans()):
            inputs.append(self.constant("B", self.rng.standard_normal(out_channels)))
        op_type = "ConvTranspose" if transpose else "Conv"
        self.steps.append(
            f"{op_type}(out={out_channels}, group={groups}, k={kernel}, bias={len(inputs) == 3})"
        )
        pads = [kernel // 2] * (2 * rank)
        return self.node(op_type, inputs, [batch, out_channels, *spatial], group=groups, pads=pads)

    def gemm(self, x: Tensor) -> Tensor:
        batch, features = x.shape
        out_features = self.draw(st.integers(1, 8))
        trans_b = self.draw(st.integers(0, 1))
        alpha = self.draw(st.sampled_from([1.0, 0.5, -2.0]))
        beta = self.draw(st.sampled_from([1.0, 0.5, 0.0, 3.0]))
        weight_shape = [out_features, features] if trans_b else [features, out_features]
        inputs = [x.name, self.constant("W", self.rng.standard_normal(weight_shape) * 0.5)]
        # Gemm before opset 11 requires C; it broadcasts unidirectionally to [batch, out_features].
        bias_shapes = [None, (out_features,), (1, out_features), (batch, out_features), (1,)]
        bias_shape = self.draw(st.sampled_from(bias_shapes[1:] if self.opset < 11 else bias_shapes))
        if bias_shape is not None:
            inputs.append(self.constant("C", self.rng.standard_normal(bias_shape)))
        self.steps.append(
            f"Gemm(out={out_features}, transB={trans_b}, alpha={alpha}, beta={beta}, C={bias_shape})"
        )
        return self.node("Gemm", inputs, [batch, out_features], transB=trans_b, alpha=alpha, beta=beta)

    def matmul(self, x: Tensor) -> Tensor:
        batch, features = x.shape
        out_features = self.draw(st.integers(1, 8))
        weight = self.constant("W", self.rng.standard_normal((features, out_features)) * 0.5)
        product = self.node("MatMul", [x.name, weight], [batch, out_features])
        self.steps.append(f"MatMul(out={out_features})")
        if self.draw(st.booleans()):
            bias = self.constant("bias", self.rng.standard_normal(out_features))
            inputs = [bias, product.name] if self.draw(st.booleans()) else [product.name, bias]
            self.steps.append("Add(bias)")
            return self.node("Add", inputs, product.shape)
        return product

    def batchnorm(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        # One BN in three has degenerate statistics.
        kind = "none" if self.draw(st.integers(0, 2)) else self.draw(st.sampled_from(DEGENERACIES[1:]))
        mixed = self.dtype == "float16" and self.opset >= 15 and self.draw(st.booleans())
        stats_dtype = np.float32 if mixed else self.numpy_dtype
        gamma = self.rng.uniform(-2.0, 2.0, channels)
        beta = self.rng.standard_normal(channels)
        mean = self.rng.standard_normal(channels)
        var = self.rng.uniform(0.3, 3.0, channels)
        channel = int(self.rng.integers(0, channels))
        if kind == "zero-variance":
            var[channel] = 0.0
        elif kind == "negative-variance":
            var[channel] = -1.0
        elif kind in ("nan", "inf"):
            target = (gamma, beta, mean, var)[self.draw(st.integers(0, 3))]
            target[channel] = math.nan if kind == "nan" else self.draw(st.sampled_from([math.inf, -math.inf]))
        elif kind == "huge-gamma":
            # The largest gamma the statistics' dtype holds over var + eps < 1: a scale
            # gamma / sqrt(var + eps) past what the dtype holds (float16: 65504, float32: 3.4e38).
            gamma[channel] = float(np.finfo(stats_dtype).max)
            var[channel] = 1e-3
        epsilon = self.draw(st.sampled_from([1e-5, 1e-3, 0.1]))
        names = [
            self.constant(role, values, shareable=False, dtype=stats_dtype)
            for role, values in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))
        ]
        self.steps.append(f"BN({kind}, eps={epsilon}, stats={np.dtype(stats_dtype).name})")
        output = self.node("BatchNormalization", [x.name, *names], x.shape, epsilon=epsilon)
        if kind != "none":
            self.degenerate[output.name] = kind
        return output

    def relu(self, x: Tensor) -> Tensor:
        self.steps.append("Relu")
        return self.node("Relu", [x.name], x.shape)

    def add(self, x: Tensor) -> Tensor:
        same_shape = [t for t in self.tensors if t.shape == x.shape and t.name != x.name]
        if same_shape and self.draw(st.booleans()):
            other = self.draw(st.sampled_from(same_shape))
            self.steps.append(f"Add(residual {other.name})")
            return self.node("Add", [x.name, other.name], x.shape)
        bias_shape = [x.shape[1]] + [1] * (len(x.shape) - 2)
        self.steps.append("Add(constant)")
        return self.node(
            "Add", [x.name, self.constant("shift", self.rng.standard_normal(bias_shape))], x.shape
        )

    def flatten(self, x: Tensor) -> Tensor:
        if self.draw(st.booleans()):
            self.steps.append("GlobalAveragePool")
            x = self.node("GlobalAveragePool", [x.name], [*x.shape[:2], *[1] * (len(x.shape) - 2)])
        self.steps.append("Flatten")
        return self.node("Flatten", [x.name], [x.shape[0], int(np.prod(x.shape[1:]))], axis=1)

    # -- extra readers of a tensor -------------------------------------------------------------
    def maybe_expose(self, x: Tensor) -> None:
        """Sometimes read ``x`` elsewhere: as a graph output, or through a side Relu that is one."""
        choice = self.draw(st.integers(0, 7))
        if choice == 0:
            self.steps.append(f"output {x.name}")
            self.outputs.append(x)
        elif choice == 1:
            self.steps.append(f"side Relu({x.name})")
            side = Tensor(self.fresh("side"), x.shape)
            self.nodes.append(helper.make_node("Relu", [x.name], [side.name], name=side.name))
            self.outputs.append(side)


@st.composite
def graphs(draw) -> Recipe:
    """A random valid model: a chain of layers and BNs, with every complication a fold must respect."""
    dtype = draw(st.sampled_from(sorted(FLOATS)))
    opset = draw(st.integers(9, 21))
    builder = _GraphBuilder(draw, dtype, opset, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    image = draw(st.booleans())
    if image:
        rank = draw(st.integers(1, 3))
        x = Tensor("x", [2, draw(st.integers(1, 6)), *[4] * rank])
    else:
        x = Tensor("x", [3, draw(st.integers(1, 8))])
    graph_input = helper.make_tensor_value_info("x", builder.onnx_dtype, x.shape)
    builder.tensors.append(x)

    current = x
    for _ in range(draw(st.integers(1, 6))):
        is_image = len(current.shape) > 2
        layers = ["conv", "convtranspose", "flatten"] if is_image else ["gemm", "matmul"]
        layer = draw(st.sampled_from([*layers, "relu", "add", "batchnorm"]))
        if layer in ("conv", "convtranspose"):
            current = builder.conv(current, transpose=layer == "convtranspose")
        elif layer == "gemm":
            current = builder.gemm(current)
        elif layer == "matmul":
            current = builder.matmul(current)
        elif layer == "flatten":
            current = builder.flatten(current)
            continue
        else:
            current = getattr(builder, layer)(current)
            continue
        builder.maybe_expose(current)
        for _ in range(draw(st.integers(0, 2))):  # BN, and sometimes BN -> BN
            current = builder.batchnorm(current)
    builder.outputs.append(current)

    outputs, seen = [], set()
    for tensor in builder.outputs:
        if tensor.name not in seen:
            seen.add(tensor.name)
            outputs.append(helper.make_tensor_value_info(tensor.name, builder.onnx_dtype, tensor.shape))
    model = make_model(builder.nodes, [graph_input], outputs, builder.initializers, opset=opset)
    return Recipe(model, dtype, opset, builder.steps, builder.degenerate)


# -- mutations -------------------------------------------------------------------------------------
def _names(model: onnx.ModelProto) -> list[str]:
    names = {info.name for info in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        names.update(name for name in node.output if name)
    return sorted(names)


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    for position, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[position]
            break
    node.attribute.append(helper.make_attribute(name, value))


ATTRIBUTE_VALUES = {
    "group": [0, -1, 2, 3, 5, 64],
    "epsilon": [math.nan, -1.0, 0.0, 1e30, math.inf],
    "transB": [0, 1, 2],
    "transA": [1],
    "alpha": [math.nan, 0.0, 1e30],
    "beta": [math.inf, 0.0],
    "training_mode": [1],
    "momentum": [0.5],
    "axis": [0, 2, -1],
    "pads": [[0], [1, 1, 1, 1, 1, 1, 1, 1]],
}

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "BatchNormalization")
REPLACEMENTS = ("scalar", "short", "long", "empty", "int64", "float64", "float16", "nan", "rank-up")


def _replacement(kind: str, tensor: TensorProto) -> TensorProto:
    try:
        values = numpy_helper.to_array(tensor)
    except (ValueError, KeyError, TypeError):  # an earlier mutation broke its encoding: keep that
        unchanged = TensorProto()
        unchanged.CopyFrom(tensor)
        return unchanged
    flat = values.reshape(-1)
    if kind == "scalar":
        new = np.asarray(flat[0] if flat.size else 1.0, dtype=values.dtype)
    elif kind == "short":
        new = flat[: max(flat.size - 1, 0)]
    elif kind == "long":
        new = np.concatenate([flat, flat[:1] if flat.size else np.ones(1, values.dtype)])
    elif kind == "empty":
        new = np.zeros((0,), values.dtype)
    elif kind in ("int64", "float64", "float16"):
        with np.errstate(invalid="ignore", over="ignore"):  # NaN or huge values: whatever the cast makes
            new = values.astype(kind)
    elif kind == "nan":
        new = np.full_like(values, np.nan) if values.dtype.kind == "f" else values
    else:  # rank-up
        new = values[np.newaxis]
    return numpy_helper.from_array(np.ascontiguousarray(new), tensor.name)


@st.composite
def mutations(draw, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with 1..3 random edits, and what they were."""
    mutated = onnx.ModelProto()
    mutated.CopyFrom(model)
    graph = mutated.graph
    done: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                [
                    "attribute",
                    "replace-tensor",
                    "replace-weight",
                    "corrupt-encoding",
                    "name-not-utf8",
                    "rewire",
                    "drop-node",
                    "drop-initializer",
                    "duplicate-output",
                    "initializer-as-input",
                    "bn-extra-outputs",
                    "foreign-domain",
                    "swap-nodes",
                    "identity-before-bn",
                ]
            )
        )
        nodes = list(graph.node)
        if not nodes:
            break
        node = draw(st.sampled_from(nodes))
        if kind == "attribute":
            name = draw(st.sampled_from(sorted(ATTRIBUTE_VALUES)))
            value = draw(st.sampled_from(ATTRIBUTE_VALUES[name]))
            _set_attribute(node, name, value)
            done.append(f"{node.name}.{name}={value}")
        elif kind == "replace-tensor" and graph.initializer:
            position = draw(st.integers(0, len(graph.initializer) - 1))
            how = draw(st.sampled_from(REPLACEMENTS))
            graph.initializer[position].CopyFrom(_replacement(how, graph.initializer[position]))
            done.append(f"{graph.initializer[position].name} -> {how}")
        elif kind == "replace-weight":
            # The weight of a foldable layer (the tensors the rules' arithmetic reads), reshaped.
            layers = [n for n in nodes if n.op_type in LAYERS and len(n.input) > 1]
            tensors = {t.name: t for t in graph.initializer}
            slots = [(n, i) for n in layers for i in (1, 2) if i < len(n.input) and n.input[i] in tensors]
            if slots:
                layer, slot = draw(st.sampled_from(slots))
                how = draw(st.sampled_from(REPLACEMENTS))
                tensors[layer.input[slot]].CopyFrom(_replacement(how, tensors[layer.input[slot]]))
                done.append(f"{layer.name}.input[{slot}] -> {how}")
        elif kind == "corrupt-encoding" and graph.initializer:
            # Data the checker lets through but that does not decode into the declared tensor.
            tensor = draw(st.sampled_from(list(graph.initializer)))
            how = draw(st.sampled_from(["raw-data-too-long", "unknown-data-type", "extra-float-data"]))
            if how == "raw-data-too-long":
                tensor.raw_data += b"\0" * 8
            elif how == "unknown-data-type":
                tensor.data_type = 99
            elif tensor.data_type == TensorProto.FLOAT and tensor.HasField("raw_data"):
                values = np.frombuffer(tensor.raw_data, np.float32)
                tensor.ClearField("raw_data")
                tensor.float_data.extend([*values.tolist(), 1.0])
            done.append(f"{tensor.name}: {how}")
        elif kind == "name-not-utf8":
            # Append a name field (number 3, length-delimited: tag 0x1a) whose bytes are not UTF-8.
            data = node.SerializeToString() + b"\x1a\x02\xce\xff"
            node.ParseFromString(data)
            done.append(f"{node.output[0] if node.output else '?'}: name not UTF-8")
        elif kind == "rewire" and node.input:
            slot = draw(st.integers(0, len(node.input) - 1))
            target = draw(st.sampled_from([*_names(mutated), "undefined_tensor", ""]))
            node.input[slot] = target
            done.append(f"{node.name}.input[{slot}] = {target!r}")
        elif kind == "drop-node":
            graph.node.remove(node)
            done.append(f"drop {node.name}")
        elif kind == "drop-initializer" and graph.initializer:
            position = draw(st.integers(0, len(graph.initializer) - 1))
            done.append(f"drop initializer {graph.initializer[position].name}")
            del graph.initializer[position]
        elif kind == "duplicate-output" and len(nodes) > 1:
            other = draw(st.sampled_from([n for n in nodes if n is not node]))
            node.output[0] = other.output[0]
            done.append(f"{node.name} also defines {other.output[0]}")
        elif kind == "initializer-as-input" and graph.initializer:
            tensor = draw(st.sampled_from(list(graph.initializer)))
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
            done.append(f"{tensor.name} is also a graph input")
        elif kind == "bn-extra-outputs" and node.op_type == "BatchNormalization":
            extras = draw(st.sampled_from([["m", "v"], ["", ""], ["m", "v", "sm", "sv"], ["", "", "", ""]]))
            node.output.extend(f"{node.name}_{name}" if name else "" for name in extras)
            done.append(f"{node.name} outputs {list(node.output)}")
        elif kind == "foreign-domain":
            node.domain = "com.example.fuzz"
            if not any(entry.domain == node.domain for entry in mutated.opset_import):
                mutated.opset_import.append(helper.make_opsetid(node.domain, 1))
            done.append(f"{node.name} in domain {node.domain}")
        elif kind == "swap-nodes" and len(nodes) > 1:
            first, second = sorted(draw(st.lists(st.integers(0, len(nodes) - 1), min_size=2, max_size=2)))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(graph.node[first])
            b.CopyFrom(graph.node[second])
            graph.node[first].CopyFrom(b)
            graph.node[second].CopyFrom(a)
            done.append(f"swap nodes {first} and {second}")
        elif kind == "identity-before-bn" and node.op_type == "BatchNormalization":
            copied = f"{node.input[0]}_copy"
            graph.node.insert(
                list(graph.node).index(node), helper.make_node("Identity", [node.input[0]], [copied])
            )
            node.input[0] = copied
            done.append(f"Identity before {node.name}")
    return mutated, done
