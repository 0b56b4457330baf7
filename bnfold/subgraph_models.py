"""Standalone models of one control-flow subgraph (an ``If`` branch, a ``Loop`` or ``Scan`` body).

End-to-end verification never runs an ``If`` branch its inputs do not select, and runs a loop body
only as the inputs drive it. To check a fold there, :mod:`bnfold.verify_local` turns the subgraph into
a model of its own: the subgraph's formal inputs (a Loop's iteration number, condition and carried
values; a Scan's states and one slice of each scanned input) and the names it reads from enclosing
scopes become graph inputs, fed with values captured from a run of the original; outer-scope
initializers it reads become initializers. Everything here is pure ONNX (no ONNX Runtime): finding
the subgraphs, the names they read, the capture outputs and the standalone models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import (
    AttributeProto,
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    TypeProto,
    ValueInfoProto,
    helper,
)

__all__ = [
    "Site",
    "Unsupported",
    "sites",
    "node_sites",
    "subgraph_of",
    "node_key",
    "free_names",
    "defined_names",
    "graph_initializer",
    "formal_values",
    "standalone_model",
    "extra_outputs",
    "default_opset",
    "control_nodes",
]

CONTROL_FLOW = ("If", "Loop", "Scan")
_BRANCH_NAMES = {"then_branch": "then-branch", "else_branch": "else-branch", "body": "body"}


class Unsupported(Exception):
    """The subgraph cannot be checked locally; the message says why, in one line."""


def node_key(node: NodeProto) -> tuple[str, tuple[str, ...]]:
    """What identifies a node in the original and the folded model alike: its op and output names
    (a fold keeps every downstream name, and node positions shift when a BN is removed)."""
    return node.op_type, tuple(node.output)


def node_label(node: NodeProto) -> str:
    return f"{node.op_type} node {node.name or node.output[0]}"


@dataclass(frozen=True)
class Site:
    """One subgraph attribute of one node: ``attribute`` of ``node`` is ``graph``."""

    node: NodeProto
    attribute: str
    graph: GraphProto

    @property
    def label(self) -> str:
        """``If node gate else-branch``, ``Loop node loop body``."""
        return f"{node_label(self.node)} {_BRANCH_NAMES.get(self.attribute, self.attribute)}"

    @property
    def control_flow(self) -> bool:
        return self.node.op_type in CONTROL_FLOW and self.node.domain in ("", "ai.onnx")


def sites(graph: GraphProto) -> Iterator[Site]:
    """Every subgraph attribute of the nodes of ``graph`` itself (not of nested graphs)."""
    for node in graph.node:
        yield from node_sites(node)


def node_sites(node: NodeProto) -> Iterator[Site]:
    """Every subgraph attribute of ``node``."""
    for entry in node.attribute:
        if entry.type == AttributeProto.GRAPH:
            yield Site(node, entry.name, entry.g)
        elif entry.type == AttributeProto.GRAPHS:
            for position, subgraph in enumerate(entry.graphs):
                yield Site(node, f"{entry.name}[{position}]", subgraph)


def subgraph_of(node: NodeProto, attribute: str) -> GraphProto | None:
    """The subgraph ``attribute`` of ``node`` (``name[i]`` for a list of graphs), or None."""
    name, _, position = attribute.partition("[")
    for entry in node.attribute:
        if entry.name != name:
            continue
        if entry.type == AttributeProto.GRAPH and not position:
            return entry.g
        if entry.type == AttributeProto.GRAPHS and position:
            index = int(position.rstrip("]"))
            return entry.graphs[index] if index < len(entry.graphs) else None
    return None


def defined_names(graph: GraphProto) -> set[str]:
    """Names ``graph`` itself defines: its inputs, initializers and node outputs."""
    names = {value.name for value in graph.input}
    names |= {tensor.name for tensor in graph.initializer}
    names |= {sparse.values.name for sparse in graph.sparse_initializer}
    names |= {output for node in graph.node for output in node.output}
    return names - {""}


def free_names(graph: GraphProto) -> list[str]:
    """Names ``graph`` (or a graph nested in it) reads from enclosing scopes, in first-read order."""
    defined = defined_names(graph)
    found: dict[str, None] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                found[name] = None
        for site in node_sites(node):
            for name in free_names(site.graph):
                if name not in defined:
                    found[name] = None
    for value in graph.output:
        if value.name and value.name not in defined:
            found[value.name] = None
    return list(found)


def graph_initializer(graph: GraphProto, name: str) -> TensorProto | Any | None:
    """The dense or sparse initializer ``name`` of ``graph`` itself, or None."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return tensor
    for sparse in graph.sparse_initializer:
        if sparse.values.name == name:
            return sparse
    return None


def default_opset(model: ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def formal_values(site: Site, values: Mapping[str, Any], opset: int) -> list[Any]:
    """Values for the subgraph's own inputs at its first step, from the captured ``values`` of the
    node's inputs: nothing for an If branch; iteration 0, the condition (True when the Loop has none)
    and the initial carried values for a Loop body; the initial states and the first slice of each
    scanned input (the last one for a reversed direction) for a Scan body."""
    node = site.node
    if node.op_type == "If":
        return []
    if node.op_type == "Loop":
        condition = (
            np.array(True) if len(node.input) < 2 or not node.input[1] else _value(values, node.input[1])
        )
        carried = [_carried(_value(values, name), name) for name in node.input[2:]]
        return [np.array(0, dtype=np.int64), np.asarray(condition).reshape(()), *carried]
    if node.op_type == "Scan":
        if opset < 9:
            raise Unsupported(
                "Scan before opset 9 (with sequence_lens and a batch axis) is not checked locally"
            )
        attributes = {entry.name: helper.get_attribute_value(entry) for entry in node.attribute}
        count = int(attributes["num_scan_inputs"])
        states = [_tensor(_value(values, name), name) for name in node.input[: len(node.input) - count]]
        scanned = node.input[len(node.input) - count :]
        axes = list(attributes.get("scan_input_axes", [0] * count))
        directions = list(attributes.get("scan_input_directions", [0] * count))
        slices = []
        for index, name in enumerate(scanned):
            value = _tensor(_value(values, name), name)
            axis = axes[index] + value.ndim if axes[index] < 0 else axes[index]
            if not 0 <= axis < value.ndim or value.shape[axis] == 0:
                raise Unsupported(
                    f"its scanned input {name!r} of shape {list(value.shape)} has no slice to check"
                )
            slices.append(np.take(value, -1 if directions[index] else 0, axis=axis))
        return [*states, *slices]
    raise Unsupported(f"{node.op_type} is not a control-flow op bnfold checks locally")


def _value(values: Mapping[str, Any], name: str) -> Any:
    if name not in values:
        raise Unsupported(f"the value of its input {name!r} could not be captured")
    return values[name]


def _carried(value: Any, name: str) -> np.ndarray | list:
    """A loop-carried value: a tensor, or a sequence of tensors (a list of arrays)."""
    if isinstance(value, list) and all(isinstance(item, np.ndarray) for item in value):
        return value
    return _tensor(value, name)


def _tensor(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        kind = "sequence" if isinstance(value, list) else type(value).__name__
        raise Unsupported(f"it reads {name!r}, a {kind} value, which a standalone model cannot take as input")
    return value


def _input_info(name: str, value: Any, declared: TypeProto | None = None) -> ValueInfoProto:
    """A graph input for ``value``: its element type and rank, every dimension left free (the runs
    of a check may have different sizes); a list of arrays is a sequence of tensors (the element
    type of an empty one from the subgraph's ``declared`` type)."""
    if isinstance(value, list) and all(isinstance(item, np.ndarray) for item in value):
        return helper.make_tensor_sequence_value_info(
            name, _sequence_element_type(name, value, declared), None
        )
    value = _tensor(value, name)
    try:
        element_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, TypeError, ValueError):
        raise Unsupported(
            f"it reads {name!r} of dtype {value.dtype}, which a standalone model cannot take"
        ) from None
    info = helper.make_tensor_value_info(name, element_type, [None] * value.ndim)
    return info


def _sequence_element_type(name: str, value: list, declared: TypeProto | None) -> int:
    if value:
        try:
            return helper.np_dtype_to_tensor_dtype(value[0].dtype)
        except (KeyError, TypeError, ValueError):
            raise Unsupported(
                f"it reads {name!r}, a sequence of {value[0].dtype}, which a standalone model cannot take"
            ) from None
    if declared is not None and declared.HasField("sequence_type"):
        element = declared.sequence_type.elem_type
        if element.HasField("tensor_type") and element.tensor_type.elem_type:
            return element.tensor_type.elem_type
    raise Unsupported(f"it reads {name!r}, an empty sequence whose element type is not declared")


def standalone_model(
    scope: ModelProto,
    site: Site,
    graph: GraphProto,
    formal: Sequence[Any],
    outer: Mapping[str, Any],
) -> ModelProto:
    """``graph`` (the original or the folded version of ``site``'s subgraph, enclosed by ``scope``'s
    main graph) as a model: its formal inputs and the outer names it reads that ``scope`` computes
    are inputs (typed from ``formal`` and ``outer``, values of the first run), the outer names that
    are ``scope``'s initializers are initializers. Raises :class:`Unsupported` for a name that is
    neither, or a value no graph input can take."""
    standalone = GraphProto()
    standalone.CopyFrom(graph)
    standalone.name = f"{graph.name or site.attribute} (standalone)"
    if len(graph.input) != len(formal):
        raise Unsupported(
            f"its {len(graph.input)} formal inputs do not match the node's {len(formal)} values"
        )
    del standalone.input[:]
    for declared, value in zip(graph.input, formal, strict=True):
        standalone.input.append(_input_info(declared.name, value, declared.type))
    for name in free_names(graph):
        initializer = graph_initializer(scope.graph, name)
        if isinstance(initializer, TensorProto):
            standalone.initializer.append(initializer)
        elif initializer is not None:
            standalone.sparse_initializer.append(initializer)
        elif name in outer:
            standalone.input.append(_input_info(name, outer[name]))
        else:
            raise Unsupported(
                f"it reads {name!r}, which the enclosing graph of the original does not compute"
            )
    for value in [*standalone.output, *standalone.value_info]:
        _drop_shape(value.type)  # declarations in a subgraph are not enforced, and may be stale
    model = ModelProto()
    model.ir_version = max(scope.ir_version, 4)  # initializers need not be listed as inputs
    model.opset_import.extend(scope.opset_import)
    model.functions.extend(scope.functions)
    model.graph.CopyFrom(standalone)
    return model


def _drop_shape(type_proto: TypeProto) -> None:
    if type_proto.HasField("tensor_type"):
        type_proto.tensor_type.ClearField("shape")


@contextlib.contextmanager
def extra_outputs(model: ModelProto, names: Sequence[str]) -> Iterator[None]:
    """``model`` with ``names`` added as graph outputs (untyped: ONNX Runtime infers them) for the
    duration of the block; the model is restored afterwards, so a caller's model is not changed."""
    present = {value.name for value in model.graph.output}
    added = [name for name in dict.fromkeys(names) if name not in present]
    for name in added:
        model.graph.output.append(ValueInfoProto(name=name))
    try:
        yield
    finally:
        if added:
            del model.graph.output[len(model.graph.output) - len(added) :]


def control_nodes(graph: GraphProto, prefix: tuple = ()) -> Iterator[tuple[tuple, NodeProto]]:
    """(path, node) for every node that holds a subgraph, at any depth. A path is the node keys and
    subgraph attributes from the main graph down to the node (``(key, "body", key)``): sibling
    branches may reuse names, so a key alone would not say which scope a node is in."""
    for node in graph.node:
        path = (*prefix, node_key(node))
        found = list(node_sites(node))
        if found:
            yield path, node
        for site in found:
            yield from control_nodes(site.graph, (*path, site.attribute))
