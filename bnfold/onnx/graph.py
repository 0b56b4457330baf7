"""An index over one ONNX graph: who produces and who consumes each tensor, and what is constant.

Rules ask the index questions ("is this a constant?", "who else reads this tensor?", "what is this
tensor's rank in this scope?") and ask it to make changes ("give this node this weight"), so that the
bookkeeping — shared initializers copied not edited, fresh names checked against the whole model,
dead tensors pruned — lives in one place. Shapes are facts of a tensor in its scope
(:mod:`bnfold.onnx.shapes`); constants are read by :mod:`bnfold.onnx.constants`.

Node removal is deferred: removed nodes are only marked, and :meth:`ModelContext.finalize` rewrites
the node lists and prunes what the folds left unused, once, at the end.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import FunctionProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto

from bnfold.core.exact import EXACT_VALUES_BUDGET, ExactValues
from bnfold.onnx.constants import ConstantLookup, constant_node_value, decoded, has_value_tensor, sparse_value
from bnfold.onnx.expressions import EXPRESSION_OPS, evaluate
from bnfold.onnx.io import EXTERNAL_DATA_THRESHOLD, WeightStore, is_lazy, store_tensor
from bnfold.onnx.nodes import DEFAULT_DOMAINS, is_op, subgraphs_of
from bnfold.onnx.shapes import ScopedShapes, TensorFacts
from bnfold.report import Reason

__all__ = [
    "ModelContext",
    "GraphIndex",
    "ConstantLookup",
    "DEFAULT_DOMAINS",
    "EXACT_VALUES_BUDGET",
    "subgraphs_of",
    "default_opset",
    "names_used_by_subgraphs",
]

logger = logging.getLogger(__name__)


def default_opset(model: ModelProto) -> int | None:
    """The opset version of the default ONNX domain, or None when the model does not import it."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return None


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
    into.update(tensor.values.name for tensor in graph.sparse_initializer)
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


# Nodes that may absorb the layer before them in a later fold, or that a fold looks through.
_MAY_FOLD_AGAIN = frozenset({"BatchNormalization", "Mul", "Add", "Reshape", "Flatten"})


class ModelContext:
    """Model-wide state of one fold, shared by the indices of the main graph and all its subgraphs."""

    def __init__(self, model: ModelProto, store: WeightStore | None = None) -> None:
        self.model = model
        self.opset = default_opset(model)
        self._names: set[str] = set()
        _all_names(model.graph, self._names)
        for function in model.functions:
            for node in function.node:
                self._names.update(node.output)
                for _, subgraph in subgraphs_of(node):
                    _all_names(subgraph, self._names)
        self.shapes = ScopedShapes(model)
        self.graphs: list[GraphIndex] = []
        # (graph index, tensor name) pairs that a fold may have left unused; pruned in finalize().
        self.prune_candidates: list[tuple[GraphIndex, str]] = []
        # Weights left on disk by load_model(lazy=True): new large ones go to the weight store (its
        # memory up to its budget, its spill file beyond), not into the protobuf; see
        # GraphIndex._store_for. Its owner is whoever made it (the loaded model, the fold result).
        self.lazy = is_lazy(model)
        self.store = store
        # Folded weights that carry their float64 value, by (id of the GraphIndex, tensor name):
        # sibling subgraphs (an If's two branches) may each hold a weight "W".
        self.exact_values = ExactValues()
        # IR version 3 and older required every main-graph initializer to be listed as a graph input
        # too, and ONNX Runtime treats such a listing as a constant, not an input (from IR 4 on, a
        # listed initializer is an input with a default that a caller may override: kept as
        # param-is-graph-input). The ONNX Model Zoo's older models (ResNet-v1 and co.) are IR 3.
        self.initializers_listed_as_inputs = 0 < model.ir_version < 4
        self.listed_initializers: set[str] = set()
        if self.initializers_listed_as_inputs:
            inputs = {info.name for info in model.graph.input}
            names = [t.name for t in model.graph.initializer]
            names += [t.values.name for t in model.graph.sparse_initializer]
            self.listed_initializers = inputs.intersection(names)

    def fresh_name(self, base: str) -> str:
        """A tensor or node name that no graph of the model uses yet (subgraphs included)."""
        base = base or "bnfold"
        candidate, suffix = base, 0
        while candidate in self._names:
            suffix += 1
            candidate = f"{base}_{suffix}"
        self._names.add(candidate)
        return candidate

    def finalize(self) -> None:
        """Drop removed nodes, then initializers, Constant nodes and value_info the folds orphaned."""
        for index in self.graphs:
            index.drop_removed_nodes()
        while self.prune_candidates:
            self._prune_round()
        if self.initializers_listed_as_inputs:
            list_initializers_as_inputs(self.model.graph, self.listed_initializers)

    def _prune_round(self) -> None:
        used: set[str] = set()
        _used_names(self.model.graph, used)
        for function in self.model.functions:
            used.update(function.output)
            for node in function.node:
                used.update(node.input)
                for _, subgraph in subgraphs_of(node):
                    _used_names(subgraph, used)
        by_graph: dict[int, tuple[GraphIndex, set[str]]] = {}
        for index, name in self.prune_candidates:
            if name and name not in used:
                by_graph.setdefault(id(index), (index, set()))[1].add(name)
        self.prune_candidates = []
        for index, names in by_graph.values():
            index.prune(names)


def list_initializers_as_inputs(graph: GraphProto, listed_before: set[str]) -> None:
    """Keep an IR < 4 model valid after a fold: its main-graph inputs list exactly its initializers
    (besides the real inputs), each with the type and shape the initializer now has — a folded
    weight may be new, renamed or reshaped; one the fold pruned (``listed_before``, gone now) is no
    longer listed, so it cannot turn into an input the caller must feed."""
    tensors = {tensor.name: (tensor.data_type, list(tensor.dims)) for tensor in graph.initializer}
    for sparse in graph.sparse_initializer:
        tensors[sparse.values.name] = (sparse.values.data_type, list(sparse.dims))
    listed: set[str] = set()
    for position in range(len(graph.input) - 1, -1, -1):
        entry = graph.input[position]
        if entry.name in listed_before and entry.name not in tensors:
            del graph.input[position]
        elif entry.name in tensors:
            listed.add(entry.name)
            elem_type, dims = tensors[entry.name]
            entry.CopyFrom(onnx.helper.make_tensor_value_info(entry.name, elem_type, dims, entry.doc_string))
    for name, (elem_type, dims) in tensors.items():
        if name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(name, elem_type, dims))


def _used_names(graph: GraphProto, into: set[str]) -> None:
    into.update(info.name for info in graph.output)
    for node in graph.node:
        into.update(node.input)
        for _, subgraph in subgraphs_of(node):
            _used_names(subgraph, into)


class GraphIndex:
    """Producers, consumers, constants and scoped shape facts of one graph (or one model-local
    function's body); the parent index answers for outer scopes.

    A function body (``FunctionProto``) has no initializers: its inputs differ per call site, its
    constants are ``Constant`` nodes, and a new constant is written as one.
    """

    def __init__(
        self,
        graph: GraphProto | FunctionProto,
        context: ModelContext,
        path: str = "main",
        parent: GraphIndex | None = None,
    ) -> None:
        self.graph = graph
        self.context = context
        self.path = path
        self.parent = parent
        # Values of constant sub-expressions by node; cleared whenever the graph changes.
        self._expression_values: dict[int, np.ndarray | None] = {}
        self.is_function = isinstance(graph, FunctionProto)
        if self.is_function:
            self.opset = _function_opset(graph, context)
        else:
            self.opset = parent.opset if parent is not None else context.opset
        self.nodes: list[NodeProto] = list(graph.node)
        self.position = {id(node): position for position, node in enumerate(self.nodes)}
        self.removed: set[int] = set()
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in self.nodes:
            self._register(node)
        if self.is_function:
            self.initializers: dict[str, TensorProto] = {}
            self.sparse_initializers: dict[str, SparseTensorProto] = {}
            self.graph_inputs = set(graph.input)
            self.graph_outputs = set(graph.output)
        else:
            self.initializers = {t.name: t for t in graph.initializer}
            self.sparse_initializers = {t.values.name: t for t in graph.sparse_initializer}
            self.graph_inputs = {info.name for info in graph.input}
            self.graph_outputs = {info.name for info in graph.output}
            if parent is None and context.initializers_listed_as_inputs:
                # IR < 4: every initializer had to be listed as a main-graph input, and ONNX Runtime
                # does not let a caller feed them (they are constants); the listing is kept in sync
                # in ModelContext.finalize.
                self.graph_inputs -= set(self.initializers) | set(self.sparse_initializers)
        context.graphs.append(self)

    # -- structure -------------------------------------------------------------------------------
    def _register(self, node: NodeProto) -> None:
        self._expression_values.clear()
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

    def live_consumers(self, name: str) -> list[NodeProto]:
        return [node for node in self.consumers.get(name, []) if id(node) not in self.removed]

    def is_graph_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def node_label(self, node: NodeProto) -> str:
        return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"

    def defines(self, name: str) -> bool:
        """Whether ``name`` is a tensor of this scope (not one of an outer scope read here)."""
        return (
            name in self.producer
            or name in self.graph_inputs
            or name in self.initializers
            or name in self.sparse_initializers
        )

    # -- scoped facts ----------------------------------------------------------------------------
    def facts(self, name: str) -> TensorFacts:
        """What the graph fixes about ``name``'s shape and type in this scope (see
        :mod:`bnfold.onnx.shapes`): this scope's own facts for its own tensors, the enclosing
        scope's for a name read from outside, never another scope's tensor of the same name."""
        if self.defines(name):
            if self.is_function:
                return TensorFacts()  # a function body's shapes differ per call site
            return self.context.shapes.scope(self.graph).get(name, TensorFacts())
        if self.parent is not None:
            return self.parent.facts(name)
        return TensorFacts()

    def rank(self, name: str) -> int | None:
        """The rank of a tensor: a constant's, else what shape inference shows in its scope.

        Declared ``value_info``, graph-output and subgraph-input shapes are not trusted: ONNX
        Runtime does not enforce them (it only warns on stale ones), and a fold decided on them
        would compute a different function.
        """
        constant = self.constant(name)
        if constant.is_constant:
            return constant.value.ndim
        return self.facts(name).rank

    def dims(self, name: str) -> list[int | str | None] | None:
        """Per axis of a tensor: its size (int), its symbolic name (``dim_param``), or None when unknown.

        From constants and scoped shape facts only (see :meth:`rank`); None when the rank is unknown.
        """
        constant = self.constant(name)
        if constant.is_constant:
            return [int(size) for size in constant.value.shape]
        dims = self.facts(name).dims
        return None if dims is None else list(dims)

    def elem_type(self, name: str) -> int | None:
        """The element type of a tensor (a ``TensorProto`` data type): a constant's, else inferred."""
        constant = self.constant(name)
        if constant.is_constant:
            return onnx.helper.np_dtype_to_tensor_dtype(constant.value.dtype)
        return self.facts(name).elem_type

    # -- constants -------------------------------------------------------------------------------
    def constant(self, name: str) -> ConstantLookup:
        """The value of ``name`` if it is fixed at export time, else why it is not.

        Looks at this graph's initializers (sparse ones too) and ``Constant`` nodes, then outer
        scopes. An initializer that is also a graph input is not constant: a caller may feed a
        different value; nor is a function input, or a ``Constant`` whose value each call site sets.
        """
        if name in self.producer:
            node = self.producer[name]
            if is_op(node, "Constant"):
                value = constant_node_value(node)
                if value is not None:
                    return ConstantLookup(value)
                return ConstantLookup(None, Reason.PARAM_NOT_CONSTANT, f"`{name}` is set by each call site")
            if is_op(node, *EXPRESSION_OPS) and node.output and node.output[0] == name:
                value = self._expression_value(node)
                if value is not None:
                    return ConstantLookup(value)
            return ConstantLookup(None, Reason.PARAM_NOT_CONSTANT, f"`{name}` is computed by {node.op_type}")
        if name in self.initializers or name in self.sparse_initializers:
            if name in self.graph_inputs:
                return ConstantLookup(
                    None, Reason.PARAM_IS_GRAPH_INPUT, f"`{name}` is an initializer and a graph input"
                )
            exact = self.context.exact_values.get((id(self), name))
            if exact is not None:
                return ConstantLookup(exact)
            if name in self.initializers:
                return ConstantLookup(decoded(self.initializers[name]))
            return ConstantLookup(sparse_value(self.sparse_initializers[name]))
        if name in self.graph_inputs:
            where = "an input of the function" if self.is_function else "a graph input"
            return ConstantLookup(None, Reason.PARAM_NOT_CONSTANT, f"`{name}` is {where}")
        if self.parent is not None:
            return self.parent.constant(name)
        return ConstantLookup(None, Reason.PARAM_NOT_CONSTANT, f"`{name}` is not defined")

    def _expression_value(self, node: NodeProto) -> np.ndarray | None:
        """The value of a constant sub-expression (:mod:`bnfold.onnx.expressions`), evaluated when a
        fold first asks and remembered until the graph changes."""
        key = id(node)
        if key in self._expression_values:
            return self._expression_values[key]
        self._expression_values[key] = None  # a cycle (an invalid graph) reads as not constant
        inputs: list[np.ndarray | None] = []
        value = None
        for slot, name in enumerate(node.input):
            lookup = self.constant(name) if name else None
            if lookup is not None and not lookup.is_constant:
                if node.op_type == "CastLike" and slot == 1:  # only the element type is read
                    inputs.append(self._typed_stand_in(name))
                    continue
                break
            inputs.append(lookup.value if lookup is not None else None)
        else:
            value = evaluate(node, inputs, self.opset or 0)
        self._expression_values[key] = value
        return value

    def _typed_stand_in(self, name: str) -> np.ndarray | None:
        """An empty array of ``name``'s element type (from this scope's facts), else None."""
        elem_type = self.facts(name).elem_type
        if not elem_type:
            return None
        try:
            return np.empty(0, dtype=onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        except (KeyError, TypeError, ValueError):
            return None

    def set_constant_input(self, node: NodeProto, slot: int, value: np.ndarray, base_name: str) -> None:
        """Make ``node.input[slot]`` read ``value``.

        The tensor is replaced in place only when it lives in this graph and ``node`` is its only
        reader; otherwise the node gets its own fresh constant and every other reader keeps the
        original (a shared weight is copied, never edited).
        """
        self._expression_values.clear()
        old_name = node.input[slot] if slot < len(node.input) else ""
        if old_name and not self.other_consumers(old_name, node) and not self.is_graph_output(old_name):
            if old_name in self.initializers and old_name not in self.graph_inputs:
                store_tensor(self.initializers[old_name], value, store=self._store_for(value))
                self.context.exact_values.remember((id(self), old_name), value)
                return
            producer = self.producer.get(old_name)
            if producer is not None and is_op(producer, "Constant") and has_value_tensor(producer):
                for entry in producer.attribute:
                    if entry.name == "value":
                        store_tensor(entry.t, value)
                return
        new_name = self.add_constant(value, base_name)
        while len(node.input) <= slot:
            node.input.append("")
        self.replace_input(node, slot, new_name)

    def add_constant(self, value: np.ndarray, base_name: str) -> str:
        """A new constant tensor of this graph (an initializer; a ``Constant`` node in a function
        body, which has no initializers); its fresh name."""
        name = self.context.fresh_name(base_name)
        if self.is_function:
            constant = onnx.helper.make_node(
                "Constant", [], [name], value=onnx.numpy_helper.from_array(value)
            )
            self.graph.node.insert(0, constant)
            self.nodes.insert(0, self.graph.node[0])
            self.position = {id(n): index for index, n in enumerate(self.nodes)}
            self._register(self.nodes[0])
            return name
        tensor = self.graph.initializer.add()
        tensor.name = name
        store_tensor(tensor, value, store=self._store_for(value))
        self.initializers[name] = tensor
        self.context.exact_values.remember((id(self), name), value)
        return name

    def may_fold_again(self, name: str) -> bool:
        """Whether a node reading ``name`` (what a folded layer will output) may fold it again, so
        that the layer's new weights should keep their float64 values (see EXACT_VALUES_BUDGET)."""
        return any(
            id(reader) not in self.removed and reader.op_type in _MAY_FOLD_AGAIN
            for reader in self.consumers.get(name, [])
        )

    def _store_for(self, value: np.ndarray) -> WeightStore | None:
        """Where :func:`~bnfold.onnx.io.store_tensor` keeps a new weight: in raw_data (None), unless
        the model was loaded lazily (its weights on disk) and it is a large main-graph weight — then
        in the fold's weight store, so that new weights cannot pile up in the protobuf (in memory up
        to the store's budget, in its spill file beyond)."""
        if self.context.lazy and self.parent is None and value.nbytes >= EXTERNAL_DATA_THRESHOLD:
            return self.context.store  # None: raw_data after all
        return None

    def replace_input(self, node: NodeProto, slot: int, new_name: str) -> None:
        self._expression_values.clear()
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
        self._expression_values.clear()
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
        self._expression_values.clear()
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
        if not self.is_function:
            for position in range(len(self.graph.initializer) - 1, -1, -1):
                name = self.graph.initializer[position].name
                if name in unused and name not in self.graph_inputs:
                    del self.graph.initializer[position]
                    self.initializers.pop(name, None)
            for position in range(len(self.graph.sparse_initializer) - 1, -1, -1):
                name = self.graph.sparse_initializer[position].values.name
                if name in unused and name not in self.graph_inputs:
                    del self.graph.sparse_initializer[position]
                    self.sparse_initializers.pop(name, None)
        for position in range(len(self.graph.node) - 1, -1, -1):
            node = self.graph.node[position]
            if (
                is_op(node, "Constant", *EXPRESSION_OPS)
                and node.output
                and all(name in unused and name not in self.graph_outputs for name in node.output)
            ):
                del self.graph.node[position]
                # Its inputs may now be unused too (a Transpose's weight): pruned in the next round.
                self.context.prune_candidates.extend((self, name) for name in node.input if name)
        self.nodes = list(self.graph.node)
        self.position = {id(node): index for index, node in enumerate(self.nodes)}
        value_info = self.graph.value_info
        for position in range(len(value_info) - 1, -1, -1):
            if value_info[position].name in unused:
                del value_info[position]


def _function_opset(function: FunctionProto, context: ModelContext) -> int | None:
    """The default-domain opset a function body's nodes follow: its own import, else the model's."""
    for entry in function.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return context.opset
