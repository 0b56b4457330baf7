"""Scoped shape facts: the rank, sizes and element type of a tensor *in its scope*.

A fold may rely on a tensor's rank or sizes (a MatMul's output rank, the channel mapping of a
Reshape) only where the graph fixes them for every input the runtime accepts. So facts come from
one run of ONNX shape inference over a skeleton of the model in which everything the runtime does
not enforce is erased first:

- declared ``value_info`` and graph-output shapes (ONNX Runtime only warns when they are stale);
- declared shapes of subgraph inputs: a ``Loop`` body's carried inputs and a ``Scan`` body's state
  and scanned inputs (ONNX Runtime does not check them, and carried values may change shape between
  iterations); a ``Scan``'s initial state is hidden from inference behind an input without a shape,
  so its shape is not assumed to hold in later iterations either.

The declared shapes of the main graph's inputs stay: ONNX Runtime checks them on every run.

Facts are kept per graph (keyed by the identity of the model's own ``GraphProto``), never by name
across graphs: the two branches of an ``If`` and a ``Loop`` body legally reuse names. A name not
defined in a scope is looked up in the scope around it (:meth:`bnfold.onnx.graph.GraphIndex.facts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto

from bnfold.onnx.nodes import attribute, is_op, subgraphs_of

__all__ = ["TensorFacts", "ScopedShapes", "dim_values"]

logger = logging.getLogger(__name__)

Dim = int | str | None


@dataclass(frozen=True)
class TensorFacts:
    """What shape inference could show about one tensor: its sizes (None: rank unknown) and type."""

    dims: tuple[Dim, ...] | None = None
    elem_type: int | None = None

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)


def dim_values(shape: onnx.TensorShapeProto) -> tuple[Dim, ...]:
    """Per axis: its size, its symbolic name (``dim_param``), or None."""
    return tuple(
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param if dim.HasField("dim_param") else None)
        for dim in shape.dim
    )


class ScopedShapes:
    """Shape facts of every graph of a model, computed once (lazily, by the first question)."""

    def __init__(self, model: ModelProto) -> None:
        self.model = model
        # id(GraphProto) -> (the GraphProto, kept alive so the id stays its own; facts by name)
        self._scopes: dict[int, tuple[GraphProto, dict[str, TensorFacts]]] | None = None

    def scope(self, graph: GraphProto) -> dict[str, TensorFacts]:
        """The facts of the tensors defined in ``graph`` (empty when inference knew nothing)."""
        if self._scopes is None:
            self._scopes = {}
            inferred = _infer(self.model)
            if inferred is not None:
                self._collect(self.model.graph, inferred.graph)
        entry = self._scopes.get(id(graph))
        return entry[1] if entry is not None else {}

    def _collect(self, original: GraphProto, inferred: GraphProto) -> None:
        facts: dict[str, TensorFacts] = {}
        for info in (*inferred.input, *inferred.output, *inferred.value_info):
            tensor_type = info.type.tensor_type
            dims = dim_values(tensor_type.shape) if tensor_type.HasField("shape") else None
            facts[info.name] = TensorFacts(dims, tensor_type.elem_type or None)
        self._scopes[id(original)] = (original, facts)
        if len(original.node) != len(inferred.node):  # the skeleton copies every node: never expected
            return
        for node, inferred_node in zip(original.node, inferred.node, strict=True):
            pairs = zip(subgraphs_of(node), subgraphs_of(inferred_node), strict=False)
            for (_, subgraph), (_, inferred_subgraph) in pairs:
                self._collect(subgraph, inferred_subgraph)


def _infer(model: ModelProto) -> ModelProto | None:
    """Shape inference on a skeleton: large initializers become typed inputs (never copied), and what
    the runtime does not enforce is erased (see the module docstring)."""
    skeleton = ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    declared_inputs = {info.name for info in model.graph.input}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= 64:
            graph.initializer.append(tensor)
        elif tensor.name not in declared_inputs:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    for sparse in model.graph.sparse_initializer:
        if sparse.values.name not in declared_inputs:
            graph.input.append(
                onnx.helper.make_tensor_value_info(
                    sparse.values.name, sparse.values.data_type, list(sparse.dims)
                )
            )
    _forget_unenforced(graph, graph, [0])
    try:
        return onnx.shape_inference.infer_shapes(skeleton)
    except Exception as error:  # shape inference is best effort; rules refuse on unknown ranks
        logger.debug("shape inference failed: %s", error)
        return None


def _forget_unenforced(graph: GraphProto, main: GraphProto, counter: list[int]) -> None:
    """Drop ``value_info`` and output shapes (keeping types); for Loop/Scan bodies the input shapes,
    and a Scan's initial state goes through an unshaped input; in subgraphs too."""
    del graph.value_info[:]
    for info in graph.output:
        if info.type.HasField("tensor_type"):
            info.type.tensor_type.ClearField("shape")
    for node in graph.node:
        if is_op(node, "Loop", "Scan"):
            for _, body in subgraphs_of(node):
                for info in body.input:
                    if info.type.HasField("tensor_type"):
                        info.type.tensor_type.ClearField("shape")
        if is_op(node, "Scan"):
            _hide_scan_state(node, main, counter)
        for _, subgraph in subgraphs_of(node):
            _forget_unenforced(subgraph, main, counter)


def _hide_scan_state(node: NodeProto, main: GraphProto, counter: list[int]) -> None:
    """Feed the Scan's initial state from fresh main-graph inputs with the body's element types and no
    shape, so inference does not carry the first iteration's shape into the body."""
    bodies = [body for name, body in subgraphs_of(node) if name == "body"]
    if not bodies:
        return
    body = bodies[0]
    scan_inputs = int(attribute(node, "num_scan_inputs", 0))
    first = 1 if len(node.input) and len(body.input) + 1 == len(node.input) else 0  # Scan-8 sequence_lens
    states = len(body.input) - scan_inputs
    for position in range(states):
        slot = first + position
        if slot >= len(node.input) or not node.input[slot]:
            continue
        elem_type = body.input[position].type.tensor_type.elem_type
        if not elem_type:
            continue
        counter[0] += 1
        name = f"\0bnfold_scan_state_{counter[0]}"
        main.input.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        node.input[slot] = name
