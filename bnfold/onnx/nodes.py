"""Small facts about ONNX nodes: their domain, attributes, and the subgraphs they hold.

Shared by the graph index and every rule module, so that none of them reaches into another's
private helpers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from onnx import AttributeProto, GraphProto, NodeProto, helper

from bnfold.core.refuse import Refuse
from bnfold.report import Reason

__all__ = [
    "DEFAULT_DOMAINS",
    "is_op",
    "attribute",
    "set_attribute",
    "remove_attribute",
    "auto_pad",
    "subgraphs_of",
]

DEFAULT_DOMAINS = ("", "ai.onnx")


def is_op(node: NodeProto, *op_types: str) -> bool:
    """Whether ``node`` is one of ``op_types`` of the default ONNX domain."""
    return node.op_type in op_types and node.domain in DEFAULT_DOMAINS


def attribute(node: NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name``, or ``default`` when the node does not set it.

    Refuses (``param-not-constant``) an attribute that a model-local function's call sites set
    (``ref_attr_name``): its value differs per call, so no fold may rely on it.
    """
    for entry in node.attribute:
        if entry.name == name:
            if entry.ref_attr_name:
                detail = f"attribute {name} of {node.op_type} {node.name} is set by each call site"
                raise Refuse(Reason.PARAM_NOT_CONSTANT, detail)
            return helper.get_attribute_value(entry)
    return default


def set_attribute(node: NodeProto, name: str, value: Any) -> None:
    remove_attribute(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def remove_attribute(node: NodeProto, name: str) -> None:
    for position, entry in enumerate(node.attribute):
        if entry.name == name:
            del node.attribute[position]
            return


def auto_pad(node: NodeProto) -> str:
    value = attribute(node, "auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def subgraphs_of(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    """The (attribute name, graph) pairs of a control-flow node (If, Loop, Scan, ...)."""
    for entry in node.attribute:
        if entry.type == AttributeProto.GRAPH:
            yield entry.name, entry.g
        elif entry.type == AttributeProto.GRAPHS:
            for position, graph in enumerate(entry.graphs):
                yield f"{entry.name}[{position}]", graph
