"""An index over one ONNX graph: who produces and who consumes each tensor, and what is constant.

Rules ask the index questions ("is this a constant?", "who else reads this tensor?") and ask it to
make changes ("give this node this weight"), so that the bookkeeping — shared initializers copied not
edited, fresh names checked against the whole model, dead tensors pruned — lives in one place.

Node removal is deferred: removed nodes are only marked, and :meth:`ModelContext.finalize` rewrites
the node lists and prunes what the folds left unused, once, at the end.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from bnfold.affine import Rounded
from bnfold.errors import ModelLoadError
from bnfold.onnx.io import (
    EXTERNAL_DATA_THRESHOLD,
    IN_MEMORY,
    RAW_DATA,
    SPILL,
    is_lazy,
    memory_store_bytes,
    read_tensor,
    store_tensor,
)
from bnfold.report import Reason

__all__ = ["ModelContext", "GraphIndex", "ConstantLookup", "subgraphs_of", "default_opset"]

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")

NEW_WEIGHTS_MEMORY_BUDGET = 512 * 2**20
"""How many bytes of new weights of lazily loaded models this process keeps in memory (as the arrays
the folds computed, in :mod:`bnfold.onnx.io`'s in-memory store, not copied into the protobuf); the
weights after those go to the spill file (:func:`bnfold.onnx.io.store_tensor`). The store lives as
long as the process, so the budget is the process's, not one fold's.

Big enough that a model under the 2 GB protobuf limit mostly stays in memory (the weights of the
530 MB all-conv benchmark model nearly all fit, and writing them to a file only to copy them into
the output again costs as much as the fold's arithmetic), small enough that a fold of a larger model
(external data) stays under 1 GB of peak RSS: about 200 MB for the rest of the process, this budget,
and the float64 block buffer of the one weight being computed.
"""


def default_opset(model: ModelProto) -> int | None:
    """The opset version of the default ONNX domain, or None when the model does not import it."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return None


def subgraphs_of(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    """The (attribute name, graph) pairs of a control-flow node (If, Loop, Scan, ...)."""
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            for position, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{position}]", graph


def names_used_by_subgraphs(node: NodeProto) -> set[str]:
    """Every tensor name read anywhere inside the node's subgraphs (a superset of outer-scope reads)."""
    used: set[str] = set()
    for _, graph in subgraphs_of(node):
        for inner in graph.node:
            used.update(name for name in inner.input if name)
            used.update(names_used_by_subgraphs(inner))
        used.update(output.name for output in graph.output)
    return used


def _all_names(graph: GraphProto, into: set[str]) -> None:
    into.update(tensor.name for tensor in graph.initializer)
    into.update(info.name for info in graph.input)
    into.update(info.name for info in graph.output)
    into.update(info.name for info in graph.value_info)
    for node in graph.node:
        into.update(node.input)
        into.update(node.output)
        if node.name:
            into.add(node.name)
        for _, subgraph in subgraphs_of(node):
            _all_names(subgraph, into)


@dataclass(frozen=True)
class ConstantLookup:
    """The answer to "is tensor X a constant?": its value, or the reason it is not."""

    value: np.ndarray | None
    reason: Reason | None = None
    detail: str = ""

    @property
    def is_constant(self) -> bool:
        return self.value is not None


EXACT_VALUES_BUDGET = 256 * 2**20
"""How many bytes of float64 values of folded weights are kept for folds that may follow.

A weight that a fold wrote may be folded again (``Conv -> BN -> BN``, conv-bn then a branch merge);
starting from its float64 value keeps the chain rounded once. Only weights whose layer feeds
another foldable node keep it (:meth:`GraphIndex.may_fold_again`), and the oldest go first beyond
this budget (a later fold then starts from the rounded weight: one more rounding, never a wrong
value). Such chains are local in the graph, so the budget is rarely reached.
"""

# Nodes that may absorb the layer before them in a later fold, or that a fold looks through.
_MAY_FOLD_AGAIN = frozenset({"BatchNormalization", "Mul", "Add", "Reshape", "Flatten"})


class ModelContext:
    """Model-wide state shared by the indices of the main graph and all its subgraphs."""

    def __init__(self, model: ModelProto) -> None:
        self.model = model
        self.opset = default_opset(model)
        self._names: set[str] = set()
        _all_names(model.graph, self._names)
        self._ranks: dict[str, int] | None = None
        self._elem_types: dict[str, int] = {}
        self._dims: dict[str, list[int | str | None]] = {}
        self.graphs: list[GraphIndex] = []
        # (graph index, tensor name) pairs that a fold may have left unused; pruned in finalize().
        self.prune_candidates: list[tuple[GraphIndex, str]] = []
        # Weights left on disk by load_model(lazy=True): new ones stay in memory up to a budget and
        # go to the spill file beyond it (see GraphIndex._keep_new_weight).
        self.lazy = is_lazy(model)
        # Folded weights that carry their float64 value (affine.Rounded), oldest first, by (graph
        # index, tensor name): sibling subgraphs (an If's two branches) may each hold a weight "W".
        self.exact_values: OrderedDict[tuple[int, str], Rounded] = OrderedDict()
        self.exact_bytes = 0

    def remember_exact(self, key: tuple[int, str], value: Rounded) -> None:
        """Keep a folded weight's float64 value under (``id`` of its GraphIndex, tensor name), within
        EXACT_VALUES_BUDGET."""
        self.forget_exact(key)
        value.flags.writeable = False
        self.exact_values[key] = value
        self.exact_bytes += value.exact.nbytes
        while self.exact_bytes > EXACT_VALUES_BUDGET and self.exact_values:
            _, oldest = self.exact_values.popitem(last=False)
            self.exact_bytes -= oldest.exact.nbytes

    def forget_exact(self, key: tuple[int, str]) -> None:
        previous = self.exact_values.pop(key, None)
        if previous is not None:
            self.exact_bytes -= previous.exact.nbytes

    def fresh_name(self, base: str) -> str:
        """A tensor or node name that no graph of the model uses yet (subgraphs included)."""
        base = base or "bnfold"
        candidate, suffix = base, 0
        while candidate in self._names:
            suffix += 1
            candidate = f"{base}_{suffix}"
        self._names.add(candidate)
        return candidate

    def inferred_rank(self, name: str) -> int | None:
        """The rank ONNX shape inference gives ``name``, or None when it cannot tell.

        Inference runs once, lazily, on a skeleton of the model whose large initializers are
        replaced by typed graph inputs, so it never copies the weights.
        """
        self._infer()
        return self._ranks.get(name)

    def inferred_elem_type(self, name: str) -> int | None:
        """The element type (a ``TensorProto`` data type) shape inference gives ``name``, or None."""
        self._infer()
        return self._elem_types.get(name)

    def inferred_dims(self, name: str) -> list[int | str | None] | None:
        """The sizes shape inference gives ``name`` (see :meth:`GraphIndex.dims`), or None."""
        self._infer()
        return self._dims.get(name)

    def _infer(self) -> None:
        if self._ranks is None:
            self._ranks, self._elem_types, self._dims = _infer_ranks(self.model)

    def finalize(self) -> None:
        """Drop removed nodes, then initializers, Constant nodes and value_info the folds orphaned."""
        for index in self.graphs:
            index.drop_removed_nodes()
        used: set[str] = set()
        _used_names(self.model.graph, used)
        by_graph: dict[int, tuple[GraphIndex, set[str]]] = {}
        for index, name in self.prune_candidates:
            if name and name not in used:
                by_graph.setdefault(id(index), (index, set()))[1].add(name)
        for index, names in by_graph.values():
            index.prune(names)
        self.prune_candidates.clear()


def _used_names(graph: GraphProto, into: set[str]) -> None:
    into.update(info.name for info in graph.output)
    for node in graph.node:
        into.update(node.input)
        for _, subgraph in subgraphs_of(node):
            _used_names(subgraph, into)


def _infer_ranks(
    model: ModelProto,
) -> tuple[dict[str, int], dict[str, int], dict[str, list[int | str | None]]]:
    skeleton = ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    # Shapes are inferred from the inputs alone: declared value_info and output shapes may not be
    # what runs (GraphIndex.rank), and inference would keep and spread them.
    _forget_declared_shapes(graph)
    declared_inputs = {info.name for info in model.graph.input}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= 64:
            graph.initializer.append(tensor)
        elif tensor.name not in declared_inputs:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception as error:  # shape inference is best effort; rules refuse on unknown ranks
        logger.debug("shape inference failed: %s", error)
        return {}, {}, {}
    ranks: dict[str, int] = {}
    elem_types: dict[str, int] = {}
    dims: dict[str, list[int | str | None]] = {}
    _collect_ranks(inferred.graph, ranks, elem_types, dims)
    return ranks, elem_types, dims


def _forget_declared_shapes(graph: GraphProto) -> None:
    """Drop ``value_info`` and the shapes of the outputs (keeping their types), in subgraphs too."""
    del graph.value_info[:]
    for info in graph.output:
        if info.type.HasField("tensor_type"):
            info.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for _, subgraph in subgraphs_of(node):
            _forget_declared_shapes(subgraph)


def _collect_ranks(
    graph: GraphProto, ranks: dict[str, int], elem_types: dict[str, int], dims: dict[str, list]
) -> None:
    for info in (*graph.input, *graph.output, *graph.value_info):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
            dims[info.name] = _dim_values(tensor_type.shape)
        if tensor_type.elem_type:
            elem_types[info.name] = tensor_type.elem_type
    for node in graph.node:
        for _, subgraph in subgraphs_of(node):
            _collect_ranks(subgraph, ranks, elem_types, dims)


def _dim_values(shape: onnx.TensorShapeProto) -> list[int | str | None]:
    """Per axis: its size, its symbolic name (``dim_param``), or None."""
    return [
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param if dim.HasField("dim_param") else None)
        for dim in shape.dim
    ]


class GraphIndex:
    """Producers, consumers and constants of one graph; parent index for outer-scope lookups."""

    def __init__(
        self,
        graph: GraphProto,
        context: ModelContext,
        path: str = "main",
        parent: GraphIndex | None = None,
    ) -> None:
        self.graph = graph
        self.context = context
        self.path = path
        self.parent = parent
        self.nodes: list[NodeProto] = list(graph.node)
        self.position = {id(node): position for position, node in enumerate(self.nodes)}
        self.removed: set[int] = set()
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in self.nodes:
            self._register(node)
        self.initializers: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs = {info.name for info in graph.input}
        self.graph_outputs = {info.name for info in graph.output}
        context.graphs.append(self)

    # -- structure -------------------------------------------------------------------------------
    def _register(self, node: NodeProto) -> None:
        for name in node.output:
            if name:
                self.producer[name] = node
        for name in node.input:
            if name:
                self.consumers[name].append(node)
        for name in names_used_by_subgraphs(node) - set(node.input):
            self.consumers[name].append(node)

    def live_nodes(self) -> list[NodeProto]:
        return [node for node in self.nodes if id(node) not in self.removed]

    def other_consumers(self, name: str, expected: NodeProto) -> list[NodeProto]:
        """Consumers of ``name`` besides one use by ``expected`` (a node reading it twice counts)."""
        others = [node for node in self.consumers.get(name, []) if id(node) not in self.removed]
        for position, node in enumerate(others):
            if node is expected:
                del others[position]
                break
        return others

    def is_graph_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def node_label(self, node: NodeProto) -> str:
        return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"

    def rank(self, name: str) -> int | None:
        """The rank of a tensor from graph inputs, initializers, or (lazily) shape inference.

        Declared ``value_info`` and graph-output shapes are not trusted: ONNX Runtime only warns
        when they differ from what runs (a batch size edited on the inputs alone, a stale export),
        and a fold decided on them would compute a different function.
        """
        for info in self.graph.input:
            if info.name == name and info.type.tensor_type.HasField("shape"):
                return len(info.type.tensor_type.shape.dim)
        constant = self.constant(name)
        if constant.is_constant:
            return constant.value.ndim
        return self.context.inferred_rank(name)

    def dims(self, name: str) -> list[int | str | None] | None:
        """Per axis of a tensor: its size (int), its symbolic name (``dim_param``), or None when unknown.

        Sizes come from graph inputs, else from (lazy) shape inference, never from declared
        ``value_info`` or output shapes (see :meth:`rank`); when only the rank is known, every axis
        is None. None overall when the rank is unknown.
        """
        for info in self.graph.input:
            if info.name == name and info.type.tensor_type.HasField("shape"):
                return _dim_values(info.type.tensor_type.shape)
        inferred = self.context.inferred_dims(name)
        if inferred is not None:
            return inferred
        rank = self.rank(name)
        return None if rank is None else [None] * rank

    def elem_type(self, name: str) -> int | None:
        """The element type of a tensor (``TensorProto`` data type) from declarations or inference."""
        for info in (*self.graph.value_info, *self.graph.input, *self.graph.output):
            if info.name == name and info.type.tensor_type.elem_type:
                return info.type.tensor_type.elem_type
        constant = self.constant(name)
        if constant.is_constant:
            return onnx.helper.np_dtype_to_tensor_dtype(constant.value.dtype)
        return self.context.inferred_elem_type(name)

    # -- constants -------------------------------------------------------------------------------
    def constant(self, name: str) -> ConstantLookup:
        """The value of ``name`` if it is fixed at export time, else why it is not.

        Looks at this graph's initializers and ``Constant`` nodes, then outer scopes. An initializer
        that is also a graph input is not constant: a caller may feed a different value.
        """
        if name in self.producer:
            node = self.producer[name]
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                value = _constant_node_value(node)
                if value is not None:
                    return ConstantLookup(value)
            return ConstantLookup(None, Reason.PARAM_NOT_CONSTANT, f"`{name}` is computed by {node.op_type}")
        if name in self.initializers:
            if name in self.graph_inputs:
                return ConstantLookup(
                    None, Reason.PARAM_IS_GRAPH_INPUT, f"`{name}` is an initializer and a graph input"
                )
            exact = self.context.exact_values.get((id(self), name))
            return ConstantLookup(exact if exact is not None else _decoded(self.initializers[name]))
        if name in self.graph_inputs:
            return ConstantLookup(None, Reason.PARAM_NOT_CONSTANT, f"`{name}` is a graph input")
        if self.parent is not None:
            return self.parent.constant(name)
        return ConstantLookup(None, Reason.PARAM_NOT_CONSTANT, f"`{name}` is not defined")

    def set_constant_input(self, node: NodeProto, slot: int, value: np.ndarray, base_name: str) -> None:
        """Make ``node.input[slot]`` read ``value``.

        The tensor is replaced in place only when it lives in this graph and ``node`` is its only
        reader; otherwise the node gets its own fresh initializer and every other reader keeps the
        original (a shared weight is copied, never edited).
        """
        old_name = node.input[slot] if slot < len(node.input) else ""
        if old_name and not self.other_consumers(old_name, node) and not self.is_graph_output(old_name):
            if old_name in self.initializers and old_name not in self.graph_inputs:
                store_tensor(self.initializers[old_name], value, keep=self._keep_new_weight(value))
                self._remember_exact(old_name, value)
                return
            producer = self.producer.get(old_name)
            if producer is not None and producer.op_type == "Constant" and _has_value_tensor(producer):
                for attribute in producer.attribute:
                    if attribute.name == "value":
                        store_tensor(attribute.t, value)
                return
        new_name = self.context.fresh_name(base_name)
        tensor = self.graph.initializer.add()
        tensor.name = new_name
        store_tensor(tensor, value, keep=self._keep_new_weight(value))
        self.initializers[new_name] = tensor
        self._remember_exact(new_name, value)
        while len(node.input) <= slot:
            node.input.append("")
        self.replace_input(node, slot, new_name)

    def _remember_exact(self, name: str, value: np.ndarray) -> None:
        if isinstance(value, Rounded) and value.exact is not None:
            self.context.remember_exact((id(self), name), value)
        else:
            self.context.forget_exact((id(self), name))

    def may_fold_again(self, name: str) -> bool:
        """Whether a node reading ``name`` (what a folded layer will output) may fold it again, so
        that the layer's new weights should keep their float64 values (see EXACT_VALUES_BUDGET)."""
        return any(
            id(reader) not in self.removed and reader.op_type in _MAY_FOLD_AGAIN
            for reader in self.consumers.get(name, [])
        )

    def _keep_new_weight(self, value: np.ndarray) -> str:
        """How :func:`~bnfold.onnx.io.store_tensor` keeps a new weight. In raw_data, unless the model
        was loaded lazily (its weights on disk) and it is a large main-graph weight: then the array
        itself, in memory, while the new weights kept there fit the budget
        (:data:`NEW_WEIGHTS_MEMORY_BUDGET`), and in the spill file beyond it, so that they cannot pile
        up in memory."""
        if not (self.context.lazy and self.parent is None and value.nbytes >= EXTERNAL_DATA_THRESHOLD):
            return RAW_DATA
        if memory_store_bytes() + value.nbytes <= NEW_WEIGHTS_MEMORY_BUDGET:
            return IN_MEMORY
        return SPILL

    def replace_input(self, node: NodeProto, slot: int, new_name: str) -> None:
        old_name = node.input[slot]
        if old_name:
            readers = self.consumers[old_name]
            for position, reader in enumerate(readers):
                if reader is node:
                    del readers[position]
                    break
            self.context.prune_candidates.append((self, old_name))
        node.input[slot] = new_name
        self.consumers[new_name].append(node)

    # -- rewiring --------------------------------------------------------------------------------
    def remove_node(self, node: NodeProto) -> None:
        """Mark ``node`` removed; its inputs become prune candidates (they may now be unused)."""
        self.removed.add(id(node))
        for name in node.input:
            if not name:
                continue
            readers = self.consumers[name]
            for position, reader in enumerate(readers):
                if reader is node:
                    del readers[position]
                    break
            self.context.prune_candidates.append((self, name))
        for name in node.output:
            if name and self.producer.get(name) is node:
                del self.producer[name]

    def take_over_output(self, node: NodeProto, slot: int, new_name: str) -> None:
        """Rename ``node.output[slot]`` to ``new_name`` (the removed BN's output), keeping names
        downstream unchanged. The old tensor's value_info is pruned."""
        old_name = node.output[slot]
        if self.producer.get(old_name) is node:
            del self.producer[old_name]
        self.context.prune_candidates.append((self, old_name))
        node.output[slot] = new_name
        self.producer[new_name] = node

    def insert_node_at(self, node: NodeProto, replacing: NodeProto) -> NodeProto:
        """Put a new node where ``replacing`` sits (which is then removed), keeping topological order."""
        position = self.position[id(replacing)]
        self.remove_node(replacing)
        self.graph.node.insert(position, node)
        # The repeated field holds a copy: index the live message, not the argument.
        inserted = self.graph.node[position]
        self.nodes.insert(position, inserted)
        self.position = {id(n): index for index, n in enumerate(self.nodes)}
        self._register(inserted)
        return inserted

    def insert_node_after(self, node: NodeProto, anchor: NodeProto) -> NodeProto:
        """Put a new node right after ``anchor`` (which stays), keeping topological order."""
        position = self.position[id(anchor)] + 1
        self.graph.node.insert(position, node)
        inserted = self.graph.node[position]
        self.nodes.insert(position, inserted)
        self.position = {id(n): index for index, n in enumerate(self.nodes)}
        self._register(inserted)
        return inserted

    # -- finalize --------------------------------------------------------------------------------
    def drop_removed_nodes(self) -> None:
        if not self.removed:
            return
        for position in range(len(self.nodes) - 1, -1, -1):
            if id(self.nodes[position]) in self.removed:
                del self.graph.node[position]
        self.nodes = [node for node in self.nodes if id(node) not in self.removed]
        self.position = {id(node): index for index, node in enumerate(self.nodes)}
        self.removed.clear()

    def prune(self, unused: set[str]) -> None:
        """Delete initializers, Constant nodes and value_info for names no graph reads any more."""
        for position in range(len(self.graph.initializer) - 1, -1, -1):
            name = self.graph.initializer[position].name
            if name in unused and name not in self.graph_inputs:
                del self.graph.initializer[position]
                self.initializers.pop(name, None)
        for position in range(len(self.graph.node) - 1, -1, -1):
            node = self.graph.node[position]
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output[0] in unused:
                del self.graph.node[position]
        self.nodes = list(self.graph.node)
        self.position = {id(node): index for index, node in enumerate(self.nodes)}
        for position in range(len(self.graph.value_info) - 1, -1, -1):
            if self.graph.value_info[position].name in unused:
                del self.graph.value_info[position]


def _decoded(tensor: TensorProto) -> np.ndarray:
    """A tensor's value, read-only; a clear error for data the checker lets through but numpy cannot
    read (raw_data longer than its shape, an unknown data_type, too many float_data values).

    A tensor left on disk by a lazy load is a read-only view of its mapped file range, a new weight
    of a lazily loaded model the (read-only) array in the in-memory store; every other
    value is made read-only too, so that a rule writing into a constant fails in every test, not
    only on lazily loaded models.
    """
    try:
        if tensor.data_location == TensorProto.EXTERNAL:
            value = read_tensor(tensor)  # left on disk by a lazy load: map this one tensor
        else:
            value = numpy_helper.to_array(tensor)
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise ModelLoadError(
            f"tensor `{tensor.name}` has data that does not match its type and shape ({error})"
        ) from None
    value.flags.writeable = False
    return value


def _has_value_tensor(node: NodeProto) -> bool:
    return any(attribute.name == "value" for attribute in node.attribute)


def _constant_node_value(node: NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node in any of its attribute forms (sparse: not supported)."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return _decoded(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.array(list(attribute.floats), dtype=np.float32)
        if attribute.name == "value_int":
            return np.array(attribute.i, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.array(list(attribute.ints), dtype=np.int64)
    return None
