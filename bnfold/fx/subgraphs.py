"""Control-flow subgraphs of a torch.export graph, made foldable: ``torch.cond`` branches,
``while_loop`` condition and body, ``map`` and ``scan`` bodies, ``torch.no_grad()`` / autocast regions.

torch.export writes each as a GraphModule that a higher-order operator calls, and passes the
parameters and buffers the subgraph reads in as *operands*: inside it a conv weight is a
placeholder, not a constant, so no rule could fold there. :func:`localize_constants` turns an
operand that the caller reads from a module attribute (a ``get_attr`` node: a constant of the
whole model) back into a constant of the subgraph: the subgraph module registers the same tensor
object under the same dotted path (``conv.weight``) and reads it with a ``get_attr`` node; the
operand and its placeholder go, in every subgraph of the call at once (a ``cond``'s two branches
take the same operands).

Why that is safe, and what it gives:

- a subgraph then holds its *own reference* to each tensor: a fold writes a new tensor at its path
  in that subgraph's module (folds never edit a tensor in place), so a parameter shared with the
  outer graph or the other branch is in effect copied on write: the outer graph and the other
  branch keep reading the original;
- for the same reason the outer graph's folds are no longer blocked by the subgraph reading a
  layer's weight (the subgraph keeps the original tensor);
- operands whose value changes between runs of the subgraph stay operands: a ``while_loop``'s
  carried values, a ``map``'s mapped tensors, a ``scan``'s carry and slices, and anything the
  caller computes;
- a subgraph module that more than one call uses keeps its operands (each call could pass other
  tensors).

Unknown higher-order operators are left alone: their subgraphs are still folded where they read
attributes directly, and a normalization whose statistics arrive as operands is kept with
``param-not-constant``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from bnfold.fx.nodes import get_attr_tensor, get_attr_value, resolve_attr
from bnfold.fx.writing import drop_unused_owner

__all__ = [
    "HigherOrderCall",
    "higher_order_calls",
    "lift_constants",
    "localize_constants",
    "own_calls",
    "subgraph_modules",
]

_higher_order = torch.ops.higher_order


@dataclass(frozen=True)
class _Layout:
    """Where a higher-order operator keeps its subgraphs and operands (positions in ``node.args``).

    A subgraph's placeholders are the ``varying`` operands (list arguments; values that change
    between runs) followed by the ``constant`` ones (a list argument, or every argument from
    ``constant`` on when ``varargs``).
    """

    subgraphs: tuple[int, ...]
    constant: int
    varying: tuple[int, ...] = ()
    varargs: bool = False
    sliced: tuple[int, ...] = ()  # varying lists whose subgraph input is one slice along axis 0


def _layouts() -> dict[object, _Layout]:
    known = {
        # cond(pred, true_graph, false_graph, operands)
        "cond": _Layout(subgraphs=(1, 2), constant=3),
        # while_loop(cond_graph, body_graph, carried_inputs, additional_inputs)
        "while_loop": _Layout(subgraphs=(0, 1), constant=3, varying=(2,)),
        # map_impl(body_graph, mapped_xs, pos_args)
        "map_impl": _Layout(subgraphs=(0,), constant=2, varying=(1,), sliced=(1,)),
        # scan(combine_graph, init, xs, additional_inputs)
        "scan": _Layout(subgraphs=(0,), constant=3, varying=(1, 2), sliced=(2,)),
        # wrap_with_set_grad_enabled(enabled, graph, *operands): `with torch.no_grad():` regions
        "wrap_with_set_grad_enabled": _Layout(subgraphs=(1,), constant=2, varargs=True),
        # wrap_with_autocast(device_type, dtype, enabled, cache_enabled, graph, *operands)
        "wrap_with_autocast": _Layout(subgraphs=(4,), constant=5, varargs=True),
    }
    return {
        getattr(_higher_order, name): layout for name, layout in known.items() if hasattr(_higher_order, name)
    }


_LAYOUTS = _layouts()


@dataclass(frozen=True)
class HigherOrderCall:
    """A node calling subgraphs: the subgraphs' attribute names, and the layout when it is known."""

    node: fx.Node
    subgraph_targets: tuple[str, ...]
    layout: _Layout | None

    def constant_operands(self) -> list[object]:
        """The operands that may be constants of the subgraphs, in placeholder order."""
        if self.layout is None:
            return []
        args = self.node.args
        if self.layout.varargs:
            return list(args[self.layout.constant :])
        value = args[self.layout.constant] if len(args) > self.layout.constant else None
        return list(value) if isinstance(value, list | tuple) else []

    def varying_count(self) -> int | None:
        """How many placeholders come before the constant operands (None: unreadable)."""
        if self.layout is None:
            return None
        count = 0
        for position in self.layout.varying:
            value = self.node.args[position] if len(self.node.args) > position else None
            if not isinstance(value, list | tuple):
                return None
            count += len(value)
        return count

    def subgraph_inputs(self, args: tuple) -> list:
        """What one run of a subgraph takes, from the call's evaluated ``args``: the varying values
        (a mapped tensor's first slice; a loop's initial carried values), then the constants."""
        assert self.layout is not None
        inputs: list = []
        for position in self.layout.varying:
            values = list(args[position])
            inputs += [value[0] for value in values] if position in self.layout.sliced else values
        if self.layout.varargs:
            return inputs + list(args[self.layout.constant :])
        return inputs + list(args[self.layout.constant])

    def append_constant_operand(self, operand: fx.Node) -> None:
        """Add ``operand`` after the constant operands (the subgraphs get a last placeholder for it)."""
        assert self.layout is not None
        args = list(self.node.args)
        if self.layout.varargs:
            self.node.args = (*args, operand)
            return
        container = type(args[self.layout.constant])
        args[self.layout.constant] = container([*args[self.layout.constant], operand])
        self.node.args = tuple(args)

    def drop_constant_operands(self, positions: set[int]) -> None:
        """Remove the constant operands at ``positions`` from the call."""
        assert self.layout is not None
        kept = [value for index, value in enumerate(self.constant_operands()) if index not in positions]
        args = list(self.node.args)
        if self.layout.varargs:
            self.node.args = (*args[: self.layout.constant], *kept)
            return
        container = type(args[self.layout.constant])
        args[self.layout.constant] = container(kept)
        self.node.args = tuple(args)


def higher_order_calls(graph_module: fx.GraphModule) -> Iterator[HigherOrderCall]:
    """The nodes of ``graph_module`` that call subgraph modules (positional ``get_attr`` arguments)."""
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        targets = tuple(
            argument.target
            for argument in node.args
            if isinstance(get_attr_value(graph_module, argument), fx.GraphModule)
        )
        if targets:
            yield HigherOrderCall(node, targets, _LAYOUTS.get(node.target))


def subgraph_modules(graph_module: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """``(attribute name, subgraph)`` for every subgraph a live node calls, each once, in graph order."""
    found: dict[str, fx.GraphModule] = {}
    for call in higher_order_calls(graph_module):
        for target in call.subgraph_targets:
            subgraph = resolve_attr(graph_module, target)
            if isinstance(subgraph, fx.GraphModule) and target not in found:
                found[target] = subgraph
    return list(found.items())


def localize_constants(graph_module: fx.GraphModule) -> int:
    """Make the subgraphs of ``graph_module`` (and theirs, recursively) read the model's parameters
    and buffers as their own constants instead of operands; returns how many operands went.

    Every subgraph module is replaced by a copy first: the fold edits subgraphs, which may be the
    caller's own (``ExportedProgram.module()`` shares them with the program). In torch.export's
    form they hold no tensors, so the copies are cheap.
    """
    for target, _ in subgraph_modules(graph_module):
        _own_copy(graph_module, target)
    moved = sum(_localize_call(graph_module, call) for call in own_calls(graph_module))
    if moved:
        graph_module.graph.lint()
        graph_module.recompile()
    for _, subgraph in subgraph_modules(graph_module):
        moved += localize_constants(subgraph)
    return moved


def own_calls(graph_module: fx.GraphModule) -> list[HigherOrderCall]:
    """The calls of a known layout whose subgraph modules no other call (nor the same call twice) uses:
    only those may have their operands changed."""
    calls = list(higher_order_calls(graph_module))
    callers: dict[str, int] = {}
    for call in calls:
        for target in call.subgraph_targets:
            callers[target] = callers.get(target, 0) + 1
    return [
        call
        for call in calls
        if call.layout is not None and all(callers[target] == 1 for target in call.subgraph_targets)
    ]


def _localize_call(graph_module: fx.GraphModule, call: HigherOrderCall) -> int:
    operands = call.constant_operands()
    offset = call.varying_count()
    if not operands or offset is None:
        return 0
    subgraphs = [resolve_attr(graph_module, target) for target in call.subgraph_targets]
    placeholders = [
        [node for node in subgraph.graph.nodes if node.op == "placeholder"] for subgraph in subgraphs
    ]
    if any(len(inputs) != offset + len(operands) for inputs in placeholders):
        return 0  # not the layout we know: leave the call as it is
    moved: set[int] = set()
    for index, operand in enumerate(operands):
        found = get_attr_tensor(graph_module, operand)
        if found is None:
            continue
        target, tensor = found
        if not all(_free(subgraph, target) for subgraph in subgraphs):
            continue
        for subgraph, inputs in zip(subgraphs, placeholders, strict=True):
            _make_constant(subgraph, inputs[offset + index], target, tensor)
        moved.add(index)
    if not moved:
        return 0
    call.drop_constant_operands(moved)
    for subgraph in subgraphs:
        subgraph.graph.lint()
        subgraph.recompile()
    unread = {operands[index] for index in moved if not operands[index].users}
    for operand in unread:
        graph_module.graph.erase_node(operand)
    for target in {operand.target for operand in unread}:
        _drop_if_unread(graph_module, target)
    return len(moved)


def _own_copy(graph_module: fx.GraphModule, target: str) -> fx.GraphModule:
    """Replace the subgraph at ``target`` by a copy of it, and return the copy."""
    copied = copy.deepcopy(resolve_attr(graph_module, target))
    path, _, name = target.rpartition(".")
    setattr(resolve_attr(graph_module, path) if path else graph_module, name, copied)
    return copied


def _free(subgraph: fx.GraphModule, target: str) -> bool:
    """Whether ``target`` can be registered in ``subgraph``: nothing there, and every module on its
    path either absent or a plain container (never one of the subgraph's own attributes)."""
    if resolve_attr(subgraph, target) is not None:
        return False
    value: object = subgraph
    for part in target.split(".")[:-1]:
        value = getattr(value, part, None)
        if value is None:
            return True
        if type(value) is not nn.Module:
            return False
    return True


def _make_constant(subgraph: fx.GraphModule, placeholder: fx.Node, target: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` at ``target`` in ``subgraph`` and read it there instead of ``placeholder``
    (a placeholder nothing reads just goes: a ``cond`` branch gets the other branch's operands too)."""
    graph = subgraph.graph
    if not placeholder.users:
        graph.erase_node(placeholder)
        return
    _register(subgraph, target, tensor)
    first = next(node for node in graph.nodes if node.op != "placeholder")
    with graph.inserting_before(first):
        constant = graph.get_attr(target)
    constant.meta.update(placeholder.meta)
    placeholder.replace_all_uses_with(constant)
    graph.erase_node(placeholder)


def _register(module: nn.Module, target: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` (the object itself) at dotted ``target``, making plain containers on the way."""
    parent = module
    path, _, name = target.rpartition(".")
    for part in path.split(".") if path else ():
        child = getattr(parent, part, None)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if isinstance(tensor, nn.Parameter):
        parent.register_parameter(name, tensor)
    else:
        parent.register_buffer(name, tensor)


def _drop_if_unread(graph_module: fx.GraphModule, target: str) -> None:
    """Forget a tensor the outer graph no longer reads (the subgraphs hold their own reference)."""
    if any(node.op == "get_attr" and node.target == target for node in graph_module.graph.nodes):
        return
    owner, _, name = target.rpartition(".")
    if owner:
        drop_unused_owner(graph_module, owner, (name,))


def lift_constants(graph_module: fx.GraphModule) -> int:
    """Undo :func:`localize_constants` after the fold: every tensor a subgraph reads as its own
    constant (the original ones and those folds wrote) becomes an operand again, held by the outer
    module; returns how many operands were added.

    torch.export passes a subgraph's parameters as operands, and exporting a module whose branches
    read their own attributes fails (``torch.onnx.export`` cannot decompose it), so the folded
    module keeps torch.export's form. A tensor goes back to its original path in the outer module
    when that path is free or holds the same tensor; a tensor a fold wrote where the outer module
    holds another one gets a fresh name (``true_graph_0_conv_weight``). Inner subgraphs first, so
    their constants climb to the top.
    """
    lifted = 0
    for _, subgraph in subgraph_modules(graph_module):
        lifted += lift_constants(subgraph)
    for call in own_calls(graph_module):
        lifted += _lift_call(graph_module, call)
    if lifted:
        graph_module.graph.lint()
        graph_module.recompile()
    return lifted


@dataclass
class _ConstantReads:
    """The ``get_attr`` nodes of one tensor in a call's subgraphs, and where it was first seen."""

    tensor: torch.Tensor
    subgraph_target: str
    target: str
    nodes: list[fx.Node]


def _lift_call(graph_module: fx.GraphModule, call: HigherOrderCall) -> int:
    subgraphs = [resolve_attr(graph_module, target) for target in call.subgraph_targets]
    reads: dict[int, _ConstantReads] = {}
    for subgraph_target, subgraph in zip(call.subgraph_targets, subgraphs, strict=True):
        for node in subgraph.graph.nodes:
            found = get_attr_tensor(subgraph, node)
            if found is not None:
                target, tensor = found
                entry = reads.setdefault(id(tensor), _ConstantReads(tensor, subgraph_target, target, []))
                entry.nodes.append(node)
    for entry in reads.values():
        fallback = f"{entry.subgraph_target}_{entry.target}"
        outer_target = _outer_target(graph_module, entry.tensor, entry.target, fallback)
        call.append_constant_operand(_outer_read(graph_module, outer_target, call.node))
        for subgraph in subgraphs:
            placeholder = _append_placeholder(subgraph.graph, entry.target)
            placeholder.meta.update(entry.nodes[0].meta)
            for node in entry.nodes:
                if node.graph is subgraph.graph:
                    node.replace_all_uses_with(placeholder)
                    subgraph.graph.erase_node(node)
                    _forget(subgraph, node.target)
    for subgraph in subgraphs:
        subgraph.graph.lint()
        subgraph.recompile()
    return len(reads)


def _outer_read(graph_module: fx.GraphModule, target: str, before: fx.Node) -> fx.Node:
    """A ``get_attr`` node of ``target`` in the outer graph (an existing one, else a new one)."""
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.target == target:
            return node
    with graph_module.graph.inserting_before(before):
        return graph_module.graph.get_attr(target)


def _append_placeholder(graph: fx.Graph, target: str) -> fx.Node:
    """A new last input of ``graph``, named after ``target``."""
    taken = {node.name for node in graph.nodes}
    name = candidate = target.replace(".", "_")
    index = 0
    while candidate in taken:
        index += 1
        candidate = f"{name}_{index}"
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    anchor = graph.inserting_after(inputs[-1]) if inputs else graph.inserting_before(next(iter(graph.nodes)))
    with anchor:
        return graph.placeholder(candidate)


def _outer_target(graph_module: fx.GraphModule, tensor: torch.Tensor, target: str, fallback: str) -> str:
    """Where the outer module holds ``tensor``: ``target`` when that is free or holds it already,
    else a fresh top-level name from ``fallback``."""
    held = resolve_attr(graph_module, target)
    if held is tensor:
        return target
    if held is None and _free(graph_module, target):
        _register(graph_module, target, tensor)
        return target
    name, index = fallback.replace(".", "_"), 0
    candidate = name
    while hasattr(graph_module, candidate):
        index += 1
        candidate = f"{name}_{index}"
    _register(graph_module, candidate, tensor)
    return candidate


def _forget(subgraph: fx.GraphModule, target: str) -> None:
    """Remove the tensor at ``target`` from ``subgraph`` and the containers left empty."""
    path, _, name = target.rpartition(".")
    owner = resolve_attr(subgraph, path) if path else subgraph
    if not isinstance(owner, nn.Module):
        return
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)
    while path:
        container = resolve_attr(subgraph, path)
        if type(container) is not nn.Module or any(True for _ in container.children()):
            return
        if container._parameters or container._buffers:
            return
        parent_path, _, child = path.rpartition(".")
        parent = resolve_attr(subgraph, parent_path) if parent_path else subgraph
        delattr(parent, child)
        path = parent_path
