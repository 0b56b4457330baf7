"""Reading a BatchNormalization node into an affine map, across every opset, or refusing why not.

Opset differences that matter (see the ONNX operator changelog):
- 1 and 6: ``is_test`` (default 0 = training mode) and ``spatial``;
- 7 to 8: ``spatial`` (default 1); ``spatial=0`` keeps statistics per activation (``C x D1 x ...``),
  which cannot become a per-channel weight scale;
- 7 to 13: extra outputs (running/saved mean and variance) mean training mode;
- 14 on: ``training_mode`` attribute; 15 on: statistics may have another float type than the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bnfold.affine import Affine, batchnorm_affine, is_supported_float, statistics_problem
from bnfold.core.refuse import Refuse
from bnfold.onnx.graph import GraphIndex
from bnfold.onnx.nodes import attribute
from bnfold.report import Reason

__all__ = ["NormParams", "read_batchnorm", "BATCHNORM", "PER_SAMPLE_NORMS"]

BATCHNORM = "BatchNormalization"
PER_SAMPLE_NORMS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")
PARAM_NAMES = ("scale", "B", "input_mean", "input_var")


@dataclass(frozen=True)
class NormParams:
    """A per-channel affine map a fold absorbs: a BN's at inference, or a Mul/Add by a constant."""

    node: NodeProto
    affine: Affine
    channels: int


def read_batchnorm(graph: GraphIndex, node: NodeProto) -> NormParams:
    """The BN's inference-time affine map; raises :class:`Refuse` with the first reason it cannot be
    folded by any rule."""
    opset = graph.opset or 0
    extra_outputs = [name for name in node.output[1:] if name]
    if opset < 7 and attribute(node, "is_test", 0) == 0:
        raise Refuse(Reason.TRAINING_MODE, f"opset {opset} BatchNormalization without is_test=1")
    if opset >= 14 and attribute(node, "training_mode", 0) != 0:
        raise Refuse(Reason.TRAINING_MODE, "training_mode=1")
    if 7 <= opset < 14 and extra_outputs:
        raise Refuse(
            Reason.TRAINING_MODE,
            f"before opset 14, the extra outputs {extra_outputs} mean training mode",
        )
    if opset < 9 and attribute(node, "spatial", 1) == 0:
        raise Refuse(Reason.PER_ACTIVATION_STATISTICS, "spatial=0")
    used_extras = [name for name in extra_outputs if graph.consumers.get(name) or graph.is_graph_output(name)]
    if used_extras:
        raise Refuse(Reason.EXTRA_OUTPUTS_USED, f"{used_extras} are read")
    if len(node.input) < 5:
        raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"expected 5 inputs, found {len(node.input)}")

    values = []
    for param_name, tensor_name in zip(PARAM_NAMES, node.input[1:5], strict=True):
        lookup = graph.constant(tensor_name)
        if not lookup.is_constant:
            raise Refuse(lookup.reason or Reason.PARAM_NOT_CONSTANT, f"{param_name}: {lookup.detail}")
        values.append(lookup.value)
    gamma, beta, mean, var = values
    if not all(is_supported_float(value.dtype) for value in values):
        raise Refuse(Reason.UNSUPPORTED_DTYPE, "BatchNormalization parameters are not floats")
    shapes = {value.shape for value in values}
    if len(shapes) != 1 or gamma.ndim != 1:
        raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"parameter shapes {sorted(shapes)}")
    # Attributes are float32; the default must be too, or the fold uses a different epsilon than
    # the runtime (1e-5 vs float32(1e-5) differ in the 9th digit).
    epsilon = float(np.float32(attribute(node, "epsilon", 1e-5)))
    problem = statistics_problem(gamma, beta, mean, var, epsilon)
    if problem is not None:
        kind, channels = problem
        shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        reason = Reason.NONFINITE_STATISTICS if kind == "nonfinite" else Reason.NONPOSITIVE_VARIANCE
        raise Refuse(reason, f"channels {shown}")
    affine = batchnorm_affine(gamma, beta, mean, var, epsilon)
    # A scale gamma / sqrt(var + eps) that the statistics' own dtype cannot hold is degenerate: the
    # BN's outputs sit at the edge of overflow, where a folded layer and the unfolded pair overflow
    # (inf vs finite) on different elements, and folded weights fit only by accident (tiny weights).
    with np.errstate(over="ignore"):
        overflowing = ~np.isfinite(affine.scale.astype(gamma.dtype).astype(np.float64))
    if overflowing.any():
        channels = np.flatnonzero(overflowing).tolist()
        shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        detail = f"gamma / sqrt(var + epsilon) overflows {gamma.dtype.name} in channels {shown}"
        raise Refuse(Reason.FOLD_OVERFLOWS_DTYPE, detail)
    return NormParams(node=node, affine=affine, channels=int(np.asarray(gamma).shape[0]))
