"""Hypothesis strategies for the fuzzing harness: random valid ONNX graphs, and random mutations.

``graphs()`` draws the structure (layer kinds, channel counts, groups, dtypes, opsets 9..21, which
tensors are shared, read twice or exposed as graph outputs, which weights are ``Constant`` nodes,
which BN statistics are degenerate; parallel Conv branches summed by Adds for ``branch-merge``, and
Reshape/Flatten between a layer and its BN for the ``*-reshape-bn`` rules) and a seed for the
numbers, so shrinking works on structure and a failing example prints a small recipe.
``mutations()`` then breaks a valid model the ways broken exporters and hand edits do: bad
attributes, wrong-shaped or wrong-typed tensors, tensor data that does not decode, names that are
not UTF-8, rewired or dropped nodes, names defined twice, foreign domains, swapped weights, other
Reshape shapes, declared shapes that are not what runs.
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
    # The sizes the graph was built at, per input; its declared dims are symbolic where it allows.
    built_shapes: dict[str, list[int]] = field(default_factory=dict)


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
        self.reshapes_only = False  # reshape_bn draws no Flatten (graphs(first="reshape_bn"))

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
        expression = self.draw(st.sampled_from(["", "", "", "", "Identity", "Transpose", "Cast"]))
        if expression == "Transpose" and values.ndim < 2:
            expression = ""
        if expression == "Cast" and values.dtype.name not in ("float16", "float32", "float64"):
            expression = ""
        if expression:
            # What exporters leave in front of a weight (issue 13): a constant sub-expression.
            stored, attributes = values, {}
            if expression == "Transpose":
                stored, attributes = np.transpose(values), {"perm": list(range(values.ndim))[::-1]}
            elif expression == "Cast":
                stored = values.astype(np.float64)
                attributes = {"to": helper.np_dtype_to_tensor_dtype(values.dtype)}
            source = self.fresh(f"{base}_stored")
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(stored), source))
            self.nodes.append(
                helper.make_node(expression, [source], [name], name=f"{expression}_{name}", **attributes)
            )
            self.steps.append(f"{expression} {name}")
            if shareable:
                self.weights.setdefault(key, []).append(name)
            return name
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

    # -- parallel branches summed by Add (branch-merge) ------------------------------------------
    def _conv_geometry(self, spatial: list[int], stride: int, dilation: int) -> tuple[list[int], dict, str]:
        """A kernel, its padding attributes and a description, for a Conv of ``spatial`` input sizes."""
        rank = len(spatial)
        shape = self.draw(st.sampled_from(["1", "3", "1x3", "3x1", "5", "2", "4", "full"]))
        if shape == "1x3":
            kernel = [1] + [3] * (rank - 1) if rank > 1 else [3]
        elif shape == "3x1":
            kernel = [3] * (rank - 1) + [1] if rank > 1 else [1]
        elif shape == "full":  # as large as the input: VALID gives a 1-sized output (Add broadcasts it)
            kernel = list(spatial)
        else:
            kernel = [int(shape)] * rank
        totals = [dilation * (k - 1) for k in kernel]
        padding = self.draw(
            st.sampled_from(["centred", "asymmetric", "SAME_UPPER", "SAME_LOWER", "VALID", "shifted"])
        )
        if shape == "full":
            padding = "VALID" if dilation == 1 else "centred"
        elif dilation > 1 and padding.startswith("SAME"):  # ONNX Runtime runs SAME_* undilated only
            padding = "centred"
        attributes: dict = {"kernel_shape": kernel} if self.draw(st.booleans()) else {}
        if padding in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            attributes["auto_pad"] = padding
        else:
            begin = [total // 2 for total in totals]
            if padding == "asymmetric":  # the odd pad at the other end, or one more at one end
                begin = [total - b for b, total in zip(begin, totals, strict=True)]
            elif padding == "shifted":  # one step off the centre: misaligned under a dilation
                shift = self.draw(st.sampled_from([-1, 1]))
                begin = [min(max(b + shift, 0), total) for b, total in zip(begin, totals, strict=True)]
            attributes["pads"] = begin + [total - b for b, total in zip(begin, totals, strict=True)]
        return kernel, attributes, f"k={'x'.join(map(str, kernel))} {padding}"

    @staticmethod
    def _conv_output(
        spatial: list[int], kernel: list[int], attributes: dict, stride: int, dilation: int
    ) -> list[int]:
        auto_pad = attributes.get("auto_pad", "NOTSET")
        sizes = []
        for axis, (size, k) in enumerate(zip(spatial, kernel, strict=True)):
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                sizes.append(-(-size // stride))
                continue
            pads = attributes.get("pads", [0] * (2 * len(spatial)))
            padded = size + pads[axis] + pads[axis + len(spatial)] - dilation * (k - 1)
            sizes.append((padded - 1) // stride + 1 if padded >= 1 else 0)
        return sizes

    def branches(self, x: Tensor) -> Tensor:
        """Conv branches of ``x`` (each maybe then BN), maybe an identity branch, summed by Adds.

        RepVGG / ACNet / MobileOne blocks, and near misses: one branch with another stride, dilation,
        groups or channel count, misaligned pads, an output of another size the Add broadcasts.
        """
        batch, in_channels, *spatial = x.shape
        groups = self.draw(st.sampled_from([g for g in (1, 2, 3, 4) if in_channels % g == 0]))
        out_channels = in_channels if self.draw(st.booleans()) else groups * self.draw(st.integers(1, 3))
        stride = self.draw(st.sampled_from([1, 1, 1, 2]))
        dilation = self.draw(st.sampled_from([1, 1, 2]))
        identity = self.draw(st.sampled_from([None, None, "plain", "bn"]))
        count = self.draw(st.integers(1 if identity else 2, 3))
        self.steps.append(
            f"branches(out={out_channels}, group={groups}, stride={stride}, dilation={dilation}, "
            f"identity={identity})"
        )
        summands: list[Tensor] = []
        for _ in range(count):
            branch_groups, branch_out, branch_stride, branch_dilation = groups, out_channels, stride, dilation
            odd = self.draw(st.sampled_from(["", "", "", "", "stride", "dilation", "groups", "channels"]))
            if odd == "stride":
                branch_stride = max(spatial)  # a 1-sized output, which the Add broadcasts
            elif odd == "dilation":
                branch_dilation = 3 - dilation
            elif odd == "groups":
                others = [
                    g for g in (1, 2, 4) if g != groups and in_channels % g == 0 and out_channels % g == 0
                ]
                branch_groups = others[0] if others else groups
            elif odd == "channels":
                branch_out = 1
            if branch_out % branch_groups:
                branch_groups = 1
            kernel, attributes, shown = self._conv_geometry(spatial, branch_stride, branch_dilation)
            sizes = self._conv_output(spatial, kernel, attributes, branch_stride, branch_dilation)
            if min(sizes) < 1:  # a window larger than the padded input: pad it as SAME would
                attributes.pop("auto_pad", None)
                totals = [branch_dilation * (k - 1) for k in kernel]
                attributes["pads"] = [t // 2 for t in totals] + [t - t // 2 for t in totals]
                sizes = self._conv_output(spatial, kernel, attributes, branch_stride, branch_dilation)
            weight_shape = [branch_out, in_channels // branch_groups, *kernel]
            inputs = [x.name, self.constant("W", self.rng.standard_normal(weight_shape) * 0.5)]
            if self.draw(st.booleans()):
                inputs.append(self.constant("B", self.rng.standard_normal(branch_out)))
            for name, value in (("strides", branch_stride), ("dilations", branch_dilation)):
                if value != 1 or self.draw(st.booleans()):
                    attributes[name] = [value] * len(spatial)
            self.steps.append(
                f"  Conv(out={branch_out}, group={branch_groups}, {shown}, stride={branch_stride}, "
                f"dilation={branch_dilation}, bias={len(inputs) == 3}{', ' + odd if odd else ''})"
            )
            output = self.node("Conv", inputs, [batch, branch_out, *sizes], group=branch_groups, **attributes)
            if self.draw(st.booleans()):
                output = self.batchnorm(output)
            summands.append(output)
        if identity == "plain":
            summands.append(x)
        elif identity == "bn":
            summands.append(self.batchnorm(x))
        if not self.draw(st.integers(0, 9)):  # a branch summed with itself
            summands.append(summands[0])
            self.steps.append(f"  {summands[0].name} twice")
        # A branch read elsewhere, or a graph output: it cannot go.
        if self.draw(st.integers(0, 3)) == 0:
            self.maybe_expose(self.draw(st.sampled_from(summands)))
        order = self.draw(st.permutations(range(len(summands))))
        summands = [summands[i] for i in order]
        while len(summands) > 1:  # a random association: Add(Add(a, b), c), Add(a, Add(b, c)), ...
            position = self.draw(st.integers(0, len(summands) - 2))
            left, right = summands[position], summands[position + 1]
            try:
                shape = list(np.broadcast_shapes(tuple(left.shape), tuple(right.shape)))
            except ValueError:  # sizes the Add cannot broadcast: keep the first
                summands[position : position + 2] = [left]
                continue
            summands[position : position + 2] = [self.node("Add", [left.name, right.name], shape)]
        self.steps.append(f"  sum {summands[0].name}")
        return summands[0]

    # -- a Reshape or Flatten between a layer and its BN (conv/gemm/matmul-reshape-bn) -------------
    def _shape_constant(self, values: list[int]) -> str:
        """The shape input of a Reshape: constant, or (sometimes) computed at run time by an op bnfold
        does not evaluate (``Max(shape, shape)``; an Identity of a constant is a constant to bnfold)."""
        name = self.constant("shape", np.asarray(values, np.int64), shareable=False, dtype=np.int64)
        # Max takes int64 from opset 12 (ONNX Runtime refuses it earlier).
        if self.opset >= 12 and self.draw(st.integers(0, 7)) == 0:
            self.steps.append("shape computed at run time")
            computed = self.fresh("computed_shape")
            self.nodes.append(helper.make_node("Max", [name, name], [computed], name=computed))
            return computed
        return name

    def _reshape(self, x: Tensor, shape: list[int], allowzero: bool = False) -> Tensor:
        """``x`` reshaped; ``shape`` may hold 0 (copy) and -1 (infer), as Reshape reads them."""
        size = int(np.prod(x.shape))
        resolved = [
            x.shape[axis] if value == 0 and not allowzero else value for axis, value in enumerate(shape)
        ]
        if -1 in resolved:
            known = int(np.prod([v for v in resolved if v != -1]))
            resolved[resolved.index(-1)] = size // known if known else 0
        attributes = {"allowzero": 1} if allowzero else {}
        return self.node("Reshape", [x.name, self._shape_constant(shape)], resolved, **attributes)

    def reshape_bn(self, x: Tensor) -> Tensor:
        """Layer -> Reshape/Flatten -> BN [-> Reshape back]: LeViT's BatchNorm1d over flattened tokens,
        a Linear reshaped for a BatchNorm2d, a Conv's positions flattened; and channel-mixing ones."""
        if len(x.shape) > 2:
            layer = self.conv(x, transpose=False)
            channel_axis = 1
        elif self.draw(st.booleans()):
            layer = self.gemm(x)
            channel_axis = 1
        else:
            if self.draw(st.booleans()):  # tokens: [M, K] -> [1, M, K] (or [M, 1, K])
                lead = self.draw(st.sampled_from([[1, x.shape[0]], [x.shape[0], 1]]))
                self.steps.append(f"Reshape{lead + [x.shape[1]]}")
                x = self._reshape(x, [*lead, x.shape[1]])
            batch_shape, features = x.shape[:-1], x.shape[-1]
            out_features = self.draw(st.integers(1, 8))
            weight = self.constant("W", self.rng.standard_normal((features, out_features)) * 0.5)
            layer = self.node("MatMul", [x.name, weight], [*batch_shape, out_features])
            self.steps.append(f"MatMul(out={out_features})")
            if self.draw(st.booleans()):
                bias = self.constant("bias", self.rng.standard_normal(out_features))
                layer = self.node("Add", [layer.name, bias], layer.shape)
                self.steps.append("Add(bias)")
            channel_axis = len(layer.shape) - 1
        shape = layer.shape
        channels = shape[channel_axis]
        rank = len(shape)
        tokens = int(np.prod(shape)) // channels
        inner = int(np.prod(shape[channel_axis + 1 :]))
        lowest = -rank if self.opset >= 11 else 0  # negative Flatten axes from opset 11
        candidates: list[tuple[str, list[int] | int]] = [
            ("flatten", axis) for axis in range(lowest, rank + 1)
        ]
        if channel_axis == rank - 1:  # channels last: [..., C] -> [tokens, C]
            candidates += [("reshape", s) for s in ([-1, channels], [tokens, channels], [-1, channels, 1])]
        else:  # channels on axis 1: [N, C, ...] -> [N, C, positions] / [N, C, 1, 1]
            candidates += [
                ("reshape", s)
                for s in ([0, 0, -1], [0, channels, -1], [shape[0], channels, inner], [-1, channels, 1, 1])
            ]
        # Channel-mixing ones.
        # Channel-mixing ones (the last two keep the channels only when the leading size matches).
        mixing = ([channels, -1], [-1, 1], [1, -1], [0, -1, 1], [-1, 2], [1, channels, -1], [2, channels, -1])
        candidates += [("reshape", s) for s in mixing]
        if self.reshapes_only:  # the Reshapes, whose -1 and 0 make channel-preservation size-dependent
            candidates = [candidate for candidate in candidates if candidate[0] == "reshape"]
        kind, how = self.draw(st.sampled_from(candidates))
        allowzero = False
        if kind == "flatten":
            flat = self.node("Flatten", [layer.name], _flattened(shape, how), axis=how)
            self.steps.append(f"Flatten(axis={how})")
        else:
            how = list(how)
            if how == [-1, 2] and int(np.prod(shape)) % 2:
                how = [-1, 1]  # an odd size: a shape that divides it
            elif how == [2, channels, -1] and tokens % 2:
                how = [1, channels, -1]
            allowzero = self.opset >= 14 and 0 not in how and self.draw(st.booleans())
            flat = self._reshape(layer, how, allowzero=allowzero)
            self.steps.append(f"Reshape({how}{', allowzero' if allowzero else ''})")
        if len(flat.shape) < 2:
            return flat
        output = self.batchnorm(flat)
        back = self.draw(st.sampled_from(["none", "constant", "shape-of-layer"]))
        if back == "constant":  # all sizes, or the batch left to -1 (a graph with a dynamic batch)
            back_shape = self.draw(st.sampled_from([list(shape), [-1, *shape[1:]]]))
            self.steps.append(f"Reshape back {back_shape}")
            output = self._reshape(output, back_shape)
        elif back == "shape-of-layer":  # the TorchScript reshape_as: a Shape reader of the layer output
            self.steps.append("Reshape back (Shape of the layer)")
            layer_shape = self.fresh("layer_shape")
            self.nodes.append(helper.make_node("Shape", [layer.name], [layer_shape], name=layer_shape))
            output = self.node("Reshape", [output.name, layer_shape], list(shape))
        return output

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


def _flattened(shape: list[int], axis: int) -> list[int]:
    axis += len(shape) if axis < 0 else 0
    return [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]


@st.composite
def graphs(draw, first: str | None = None) -> Recipe:
    """A random valid model: a chain of layers and BNs, with every complication a fold must respect.

    ``first`` forces the first step (``"reshape_bn"``: a layer -> Reshape/Flatten -> BN, the folds
    whose channel arithmetic depends on sizes)."""
    dtype = draw(st.sampled_from(sorted(FLOATS)))
    opset = draw(st.integers(9, 21))
    builder = _GraphBuilder(draw, dtype, opset, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    image = draw(st.booleans()) or first == "reshape_bn"  # its size-dependent cases are spatial
    if image:
        rank = draw(st.integers(1, 3))
        x = Tensor("x", [2, draw(st.integers(1, 6)), *[4] * rank])
    else:
        x = Tensor("x", [3, draw(st.integers(1, 8))])
    builder.tensors.append(x)
    builder.reshapes_only = first == "reshape_bn"

    current = x
    for step in range(draw(st.integers(1, 2 if first else 6))):
        is_image = len(current.shape) > 2
        layers = (
            ["conv", "convtranspose", "flatten", "branches", "branches"] if is_image else ["gemm", "matmul"]
        )
        layer = (
            first
            if first and not step
            else draw(st.sampled_from([*layers, "reshape_bn", "relu", "add", "batchnorm"]))
        )
        if layer == "branches":
            current = builder.branches(current)
        elif layer == "reshape_bn":
            current = builder.reshape_bn(current)
            continue
        elif layer in ("conv", "convtranspose"):
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
            outputs.append(tensor)
    # Dynamic dimensions (issue 12): a fold must hold at every size the model accepts, so the input
    # declares the batch and the spatial sizes symbolic wherever the graph runs at another size too
    # (fold_and_verify runs the built sizes, then every dynamic dim at 1).
    dynamic = _dynamic_axes(builder, _outputs(builder, outputs, ranks_only=True), x, opset)
    declared = [f"d{axis}" if axis in dynamic else size for axis, size in enumerate(x.shape)]
    builder.steps.append(f"input x{declared} built at {x.shape}")
    graph_input = helper.make_tensor_value_info("x", builder.onnx_dtype, declared)
    graph_outputs = _outputs(builder, outputs, ranks_only=bool(dynamic))
    model = make_model(builder.nodes, [graph_input], graph_outputs, builder.initializers, opset=opset)
    return Recipe(model, dtype, opset, builder.steps, builder.degenerate, {"x": list(x.shape)})


def _outputs(builder: _GraphBuilder, tensors: list[Tensor], ranks_only: bool) -> list[onnx.ValueInfoProto]:
    """Graph outputs declared with the built sizes, or (with dynamic inputs) with their ranks only."""
    return [
        helper.make_tensor_value_info(
            t.name, builder.onnx_dtype, [None] * len(t.shape) if ranks_only else t.shape
        )
        for t in tensors
    ]


def _dynamic_axes(builder: _GraphBuilder, outputs: list, x: Tensor, opset: int) -> list[int]:
    """The input axes the graph lets vary: batch and spatial sizes at 1 too, else the batch alone,
    else none (a Gemm bias, a Reshape or a Flatten feeding a layer may pin them). Asked of ONNX
    Runtime, on one session of the graph with every candidate axis symbolic."""
    import onnxruntime

    candidates = [0, *range(2, len(x.shape))] if len(x.shape) > 2 else [0]
    symbolic = [f"d{axis}" if axis in candidates else size for axis, size in enumerate(x.shape)]
    graph_input = helper.make_tensor_value_info("x", builder.onnx_dtype, symbolic)
    probe = make_model(builder.nodes, [graph_input], outputs, builder.initializers, opset=opset)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    try:
        session = onnxruntime.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception:  # noqa: BLE001 - a graph ONNX Runtime will not load with symbolic dims
        return []
    for axes in (candidates, [0]):
        shape = [1 if axis in axes else size for axis, size in enumerate(x.shape)]
        try:
            session.run(None, {"x": np.ones(shape, builder.numpy_dtype)})
        except Exception:  # noqa: BLE001 - the graph pins one of these sizes
            continue
        return axes
    return []


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
    "pads": [[0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0], [2, 0, 0, 2]],
    "strides": [[2, 2], [1], [3, 3, 3]],
    "dilations": [[2, 2], [0, 0], [1]],
    "auto_pad": ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "BOGUS"],
    "kernel_shape": [[1, 1], [3, 3], [5, 5, 5]],
    "allowzero": [1, 2],
}

# Shapes a Reshape may be given instead of its own: wrong sizes, two -1, copies of missing axes.
RESHAPE_SHAPES = ([-1], [-1, -1], [0, 0, 0, 0, 0], [-2, 1], [], [1, 1, 1], [0, -1], [-1, 0], [2, -1, 1])

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
                    "rewire-activation",
                    "swap-weights",
                    "reshape-shape",
                    "stale-value-info",
                ]
            )
        )
        nodes = list(graph.node)
        if not nodes:
            break
        node = draw(st.sampled_from(nodes))
        if kind == "attribute":
            # Mostly one the operator has (an unknown one fails the checker on load).
            known = [name for name in sorted(ATTRIBUTE_VALUES) if name in _schema_attributes(node, mutated)]
            name = draw(
                st.sampled_from(known if known and draw(st.integers(0, 3)) else sorted(ATTRIBUTE_VALUES))
            )
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
        elif kind == "rewire-activation" and node.input:
            # A data input (branch-merge's Add inputs, a Conv's x, a Reshape's data) to another
            # activation: branches of different tensors, a BN reading past its Reshape, a cycle.
            slot = draw(st.integers(0, len(node.input) - 1)) if node.op_type == "Add" else 0
            activations = sorted(
                {info.name for info in graph.input} | {o for n in nodes for o in n.output if o}
            )
            target = draw(st.sampled_from(activations))
            node.input[slot] = target
            done.append(f"{node.name}.input[{slot}] = {target!r}")
        elif kind == "swap-weights":
            layers = [n for n in nodes if n.op_type in LAYERS[:4] and len(n.input) > 1]
            if len(layers) > 1:
                first, second = draw(st.permutations(layers))[:2]
                first.input[1], second.input[1] = second.input[1], first.input[1]
                done.append(f"swap weights of {first.name} and {second.name}")
        elif kind == "reshape-shape":
            reshapes = [n for n in nodes if n.op_type == "Reshape" and len(n.input) > 1]
            if reshapes:
                reshape = draw(st.sampled_from(reshapes))
                values = draw(st.sampled_from(RESHAPE_SHAPES))
                name = f"{reshape.name}_mutated_shape"
                graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
                reshape.input[1] = name
                done.append(f"{reshape.name} shape {values}")
        elif kind == "stale-value-info" and node.output and node.output[0]:
            # A declared shape that is not what runs (ONNX Runtime only warns): a batch size edited
            # on the inputs alone, a rank from another export. Mostly a layer's output read by a Reshape.
            reshaped = {n.input[0] for n in nodes if n.op_type in ("Reshape", "Flatten") and n.input}
            layers = [n for n in nodes if n.op_type in LAYERS and n.output and n.output[0] in reshaped]
            if layers and draw(st.booleans()):
                node = draw(st.sampled_from(layers))
            dims = _inferred_dims(mutated).get(node.output[0])
            if dims:
                how = draw(st.sampled_from(["halve", "double", "drop-axis", "add-axis", "swap"]))
                if how in ("halve", "double"):
                    axis = draw(st.integers(0, len(dims) - 1))
                    dims[axis] = max(1, dims[axis] // 2) if how == "halve" else dims[axis] * 2
                elif how == "drop-axis" and len(dims) > 1:
                    dims = [dims[0] * dims[1], *dims[2:]]
                elif how == "add-axis":
                    dims = [1, *dims]
                else:
                    dims = dims[::-1]
                elem_type = graph.input[0].type.tensor_type.elem_type if graph.input else TensorProto.FLOAT
                graph.value_info.append(helper.make_tensor_value_info(node.output[0], elem_type, dims))
                done.append(f"{node.output[0]} declared {dims} ({how})")
    return mutated, done


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static sizes of the activations, as ONNX shape inference finds them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a mutation may have broken inference
        return {}
    dims = {}
    for info in inferred.graph.value_info:
        shape = info.type.tensor_type.shape
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape.dim):
            dims[info.name] = [d.dim_value for d in shape.dim]
    return dims


def _schema_attributes(node: onnx.NodeProto, model: onnx.ModelProto) -> set[str]:
    """The attributes the node's operator schema declares at the model's opset (none if unknown)."""
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)
    try:
        return set(onnx.defs.get_schema(node.op_type, opset, node.domain).attributes)
    except onnx.defs.SchemaError:
        return set()
