"""In-place writes in an FX graph, and which tensors may share storage with which.

A fold that moves a read of a tensor from one node to another is exact only when nothing writes
into that tensor's storage in between: after ``n = bn(h); h.mul_(3); conv(n)`` folding the BN into
the conv would make the conv read the tripled ``h``, and after ``a = conv(h); h.relu_(); a + h``
merging the branches would read ``h`` before the ReLU. torch.fx records such writes as ordinary
nodes: methods ending in ``_`` (``mul_``, ``copy_``), augmented assignments (``operator.iadd``),
``x[i] = v`` (``operator.setitem``), ``out=`` arguments, ``inplace=True`` functions and modules
(``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``), and ATen operators whose schema marks an
argument as written.

Storage sharing is over-approximated: the output of any node that is not known to allocate a new
tensor (a conv, a linear, arithmetic, an activation that is not in place, ...) is taken to share
storage with its tensor inputs (views, ``reshape``, ``getitem``, ``nn.Identity``, unknown code), and
the graph's inputs with each other (a caller may pass one tensor twice). Over-approximating can only
refuse a fold next to an in-place write, never allow a wrong one.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as functional
from torch import fx, nn

from bnfold.fx.nodes import is_batchnorm_call, producer_kind_of_function, resolve_attr
from bnfold.fx.shape_ops import POOL_FUNCTIONS

__all__ = ["Effects", "written_inputs"]

_IN_PLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.imatmul,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.setitem,
    }
)
_IN_PLACE_DUNDERS = frozenset(
    f"__i{name}__"
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or")
) | {"__setitem__"}
# Python-level functions whose result is a new tensor (never a view of an input).
_FRESH_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.neg,
        operator.matmul,
        operator.pow,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.cat,
        torch.stack,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.matmul,
        functional.relu,
        functional.relu6,
        functional.gelu,
        functional.silu,
        functional.hardswish,
        functional.hardsigmoid,
        functional.leaky_relu,
        functional.mish,
        functional.elu,
        functional.sigmoid,
        functional.tanh,
        functional.softmax,
        functional.pad,
    }
    | POOL_FUNCTIONS  # pools and interpolate: always a new tensor
)
_FRESH_METHODS = frozenset(
    {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "softmax", "matmul", "mean", "sum", "neg", "pow"}
)
# Modules whose output may be their input itself, or a view of it.
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def written_inputs(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The graph values ``node`` writes into (in place), possibly none."""
    written: list[Any] = []
    out = node.kwargs.get("out")
    if out is not None:
        written.extend(out if isinstance(out, list | tuple) else [out])
    first = _first_argument(node)
    if node.op == "call_method":
        name = str(node.target)
        if _in_place_name(name) or name in _IN_PLACE_DUNDERS:
            written.append(first)
    elif node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            written.extend(_schema_writes(node, target))
        elif target in _IN_PLACE_OPERATORS:
            written.append(first)
        else:
            name = getattr(target, "__name__", "")
            if _in_place_name(name) or _inplace_flag(node):
                written.append(first)
    elif node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if getattr(module, "inplace", False) is True:
            written.append(first)
        elif not type(module).__module__.startswith("torch.nn"):
            written.extend(node.all_input_nodes)  # a leaf of unknown code may write anything it gets
    flat = [item for value in written for item in (value if isinstance(value, list | tuple) else [value])]
    return [value for value in flat if isinstance(value, fx.Node)]


def _in_place_name(name: str) -> bool:
    """PyTorch's naming of in-place operations: a trailing underscore (``mul_``, ``_foreach_mul_``,
    ``_coalesced_``), which dunders (``__add__``) do not count as."""
    return name.endswith("_") and not name.endswith("__")


def _first_argument(node: fx.Node) -> Any:
    """The argument an in-place function or module writes into: its first, given by position or by
    keyword (``nn.init.zeros_(tensor=h)``, ``F.relu(input=h, inplace=True)``, ``self.act(input=h)``);
    every keyword argument where the first parameter is unknown (a module's, or a function without a
    signature: over-approximated, it can only refuse a fold)."""
    if node.args:
        return node.args[0]
    name = _first_parameter(node.target) if node.op == "call_function" else None
    if name is not None:
        return node.kwargs.get(name)
    return list(node.kwargs.values())


@functools.cache
def _first_parameter(target: Any) -> str | None:
    try:
        parameters = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return parameters[0] if parameters else None


def _schema_writes(node: fx.Node, target: torch._ops.OpOverload) -> list[Any]:
    values = []
    for index, argument in enumerate(target._schema.arguments):
        alias = argument.alias_info
        if alias is None or not alias.is_write:
            continue
        if index < len(node.args):
            values.append(node.args[index])
        elif argument.name in node.kwargs:
            values.append(node.kwargs[argument.name])
    return values


def _inplace_flag(node: fx.Node) -> bool:
    """``inplace=True`` given by keyword or by position (``F.relu(x, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    position = _inplace_position(node.target)
    return position is not None and position < len(node.args) and node.args[position] is True


@functools.cache
def _inplace_position(target: Any) -> int | None:
    """The position of a function's ``inplace`` parameter (None: it has none, or no signature)."""
    try:
        parameters = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


class Effects:
    """Graph positions, in-place writes and storage classes of one graph (index it again after edits)."""

    def __init__(self, graph_module: fx.GraphModule, known: dict[fx.Node, tuple] | None = None) -> None:
        """``known``: what earlier indexes of this graph found per node (kept across a fold's edits:
        a node's target and arguments decide it, and folds do not change those of the nodes they keep)."""
        known = {} if known is None else known
        self._position: dict[fx.Node, int] = {}
        self._parent: dict[fx.Node, fx.Node] = {}
        self._writes: list[tuple[int, fx.Node, fx.Node]] = []
        placeholders: list[fx.Node] = []
        for index, node in enumerate(graph_module.graph.nodes):
            self._position[node] = index
            self._parent[node] = node
            if node.op == "placeholder":
                placeholders.append(node)
            key = (node.target, len(node.args), tuple(node.kwargs))
            if known.get(node, (None,))[0] != key:
                aliases = node.op in ("call_function", "call_method", "call_module") and _may_alias(
                    node, graph_module
                )
                known[node] = (key, _slots(node, written_inputs(node, graph_module)), aliases)
            _, slots, aliases = known[node]
            for value in _values_at(node, slots):
                self._writes.append((index, node, value))
                self._union(node, value)  # an in-place op returns its target
            if aliases:
                for value in node.all_input_nodes:
                    self._union(node, value)
        for placeholder in placeholders[1:]:
            self._union(placeholders[0], placeholder)
        # Parameters and buffers written in place by the graph itself (``self.bn.running_mean.add_(1)``
        # in forward): not constants, whatever a fold reads from them now.
        self.written_tensors: set[int] = set()
        attributes: dict[fx.Node, list[fx.Node]] = {}
        for node in self._parent:
            if node.op == "get_attr":
                attributes.setdefault(self._find(node), []).append(node)
        for _, _, value in self._writes:
            for node in attributes.get(self._find(value), ()):
                tensor = resolve_attr(graph_module, str(node.target))
                if isinstance(tensor, torch.Tensor):
                    self.written_tensors.add(id(tensor))

    def _find(self, node: fx.Node) -> fx.Node:
        root = node
        while self._parent.get(root, root) is not root:
            root = self._parent[root]
        while node is not root:  # path compression: chains of views stay short across queries
            self._parent[node], node = root, self._parent[node]
        return root

    def _union(self, first: fx.Node, second: fx.Node) -> None:
        if first in self._parent and second in self._parent:
            self._parent[self._find(first)] = self._find(second)

    def position(self, node: fx.Node) -> int:
        return self._position.get(node, -1)

    def write_between(self, tensor: fx.Node, reads: Iterable[fx.Node]) -> fx.Node | None:
        """A node that writes into ``tensor``'s storage after the first of ``reads`` and before the
        last (where moving or merging those reads into one would see a different value), or None."""
        positions = [self.position(read) for read in reads]
        if not positions or tensor not in self._parent:
            return None
        first, last, storage = min(positions), max(positions), self._find(tensor)
        for index, writer, value in self._writes:
            if first < index < last and self._find(value) is storage:
                return writer
        return None


def _slots(node: fx.Node, values: list[fx.Node]) -> tuple:
    """Where ``values`` sit in ``node``'s arguments: positions, keyword names, or ``*`` for all inputs."""
    if values and set(values) == set(node.all_input_nodes) and len(values) > 1:
        return ("*",)
    slots: list[Any] = []
    for value in values:
        position = next((index for index, arg in enumerate(node.args) if arg is value), None)
        if position is not None:
            slots.append(position)
            continue
        name = next((key for key, arg in node.kwargs.items() if arg is value), None)
        if name is not None:
            slots.append(name)
            continue
        name = next(
            (key for key, arg in node.kwargs.items() if isinstance(arg, list | tuple) and value in arg), None
        )
        slots.append(("list", name) if name is not None else "*")
    return tuple(slots)


def _values_at(node: fx.Node, slots: tuple) -> list[fx.Node]:
    values: list[Any] = []
    for slot in slots:
        if slot == "*":
            values.extend(node.all_input_nodes)
        elif isinstance(slot, int):
            values.append(node.args[slot] if slot < len(node.args) else None)
        elif isinstance(slot, tuple):
            values.extend(node.kwargs.get(slot[1], ()))
        else:
            values.append(node.kwargs.get(slot))
    return [value for value in values if isinstance(value, fx.Node)]


def _may_alias(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node``'s output may share storage with one of its inputs."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        if isinstance(module, _ALIASING_MODULES) or getattr(module, "inplace", False) is True:
            return True
        return not type(module).__module__.startswith("torch.nn")
    if node.op == "call_method":
        return node.target not in _FRESH_METHODS
    if isinstance(node.target, torch._ops.OpOverload):
        return any(ret.alias_info is not None for ret in node.target._schema.returns)
    if producer_kind_of_function(node) is not None or is_batchnorm_call(node):
        return False
    if node.target is getattr:  # ``x.T``, ``x.data`` are views; ``x.shape`` is not a tensor
        return not (len(node.args) == 2 and node.args[1] in ("shape", "ndim", "dtype", "device"))
    return node.target not in _FRESH_FUNCTIONS or _inplace_flag(node)
