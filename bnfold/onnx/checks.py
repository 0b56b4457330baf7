"""Checks that several ONNX rules make, each raising :class:`~bnfold.core.refuse.Refuse`."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from bnfold.affine import is_supported_float
from bnfold.core.refuse import Refuse
from bnfold.onnx.graph import GraphIndex
from bnfold.onnx.nodes import is_op
from bnfold.report import Reason

__all__ = [
    "require_sole_reader",
    "require_norm_output_sole_reader",
    "constant_input",
    "required_constant_input",
]


def require_sole_reader(
    view: GraphIndex, tensor: str, reader: NodeProto, *, shape_readers_ok: bool = False
) -> None:
    """Refuse when anything besides ``reader`` sees ``tensor``: it would see the folded values.

    With ``shape_readers_ok``, ``Shape``/``Size`` readers are allowed: they see only the shape, which a
    fold that keeps ``tensor``'s name (one through a Reshape) leaves as it is.
    """
    if view.is_graph_output(tensor):
        raise Refuse(Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"`{tensor}` is a graph output")
    others = view.other_consumers(tensor, reader)
    if shape_readers_ok:
        others = [node for node in others if not is_op(node, "Shape", "Size")]
    if others:
        labels = ", ".join(view.node_label(node) for node in others[:3])
        raise Refuse(Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"`{tensor}` also feeds {labels}")


def require_norm_output_sole_reader(view: GraphIndex, norm: NodeProto, reader: NodeProto) -> None:
    """Refuse folding a norm into the layer after it when anything else reads the norm's output."""
    output = norm.output[0]
    if view.is_graph_output(output):
        raise Refuse(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"`{output}` is a graph output")
    others = view.other_consumers(output, reader)
    if others:
        labels = ", ".join(view.node_label(node) for node in others[:3])
        raise Refuse(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"`{output}` also feeds {labels}")


def constant_input(view: GraphIndex, node: NodeProto, slot: int, role: str) -> np.ndarray | None:
    """The float constant at ``node.input[slot]``; None when the optional input is absent."""
    if slot >= len(node.input) or not node.input[slot]:
        return None
    lookup = view.constant(node.input[slot])
    if not lookup.is_constant:
        reason = (
            Reason.PARAM_IS_GRAPH_INPUT
            if lookup.reason is Reason.PARAM_IS_GRAPH_INPUT
            else Reason.WEIGHT_NOT_CONSTANT
        )
        raise Refuse(reason, f"{role} of {view.node_label(node)}: {lookup.detail}")
    if not is_supported_float(lookup.value.dtype):
        raise Refuse(Reason.UNSUPPORTED_DTYPE, f"{role} is {lookup.value.dtype.name}")
    return lookup.value


def required_constant_input(view: GraphIndex, node: NodeProto, slot: int, role: str) -> np.ndarray:
    """Like :func:`constant_input`, refusing an absent input too."""
    value = constant_input(view, node, slot, role)
    if value is None:
        raise Refuse(Reason.WEIGHT_NOT_CONSTANT, f"{node.op_type} has no {role} input")
    return value
