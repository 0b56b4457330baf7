"""Reading an add of parallel branches in an FX graph: which operands are convs, BNs or the tensor
itself, all of one source, and what passes a branch's value on unchanged to the add.

:func:`read_branches` finds the :class:`Branches` site that :mod:`bnfold.fx.rules_branches` merges.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfold.core.refuse import Refuse
from bnfold.core.sites import ParallelBranches
from bnfold.fx.nodes import bind, returns_tuple
from bnfold.fx.reading import Layer, NormCall, identify, layer_at, norm_input
from bnfold.fx.state import FoldState

__all__ = ["Branch", "Branches", "add_operands", "read_branches"]

aten = torch.ops.aten
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
_IN_PLACE = (operator.iadd, "add_", aten.add_.Tensor)


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensors an add node sums (``alpha`` 1), or None when it is not such an add.

    An in-place add (``a += b``, ``a.add_(b)``) writes into ``a``: it counts only when nothing but
    the add reads ``a``, since a merge would leave anything else that reads ``a`` (or a caller's
    input tensor) unchanged where the add had changed it.
    """
    if node.op == "call_method" and node.target in _ADD_METHODS:
        operands, options = node.args, dict(node.kwargs)
    elif node.op == "call_function" and (node.target in _ADD_FUNCTIONS or node.target in _ADD_OPS):
        operands, options = node.args, dict(node.kwargs)
        if node.target in _ADD_OPS:
            bound = bind(node)
            operands = (bound.get("self"), bound.get("other"))
            options = {key: value for key, value in bound.items() if key not in ("self", "other")}
    else:
        return None
    if options.get("alpha", 1) != 1 or set(options) - {"alpha"} or len(operands) != 2:
        return None
    first, second = operands
    if not isinstance(first, fx.Node) or not isinstance(second, fx.Node) or first is second:
        return None
    if node.target in _IN_PLACE and (first.op == "placeholder" or set(first.users) != {node}):
        return None
    return first, second


@dataclass(frozen=True)
class Branch:
    """One operand of the add: a conv of ``x`` (``layer``), a BN of ``x`` (``norm``), or ``x`` itself."""

    node: fx.Node
    layer: Layer | None = None
    norm: NormCall | None = None


@dataclass(frozen=True, eq=False)
class Branches(ParallelBranches):
    """The two branches an add sums, both reading ``source``; at least one is a conv.

    ``passed`` maps a branch node to the nodes that pass its value on unchanged to the add, innermost
    first: ``nn.Identity`` (timm's ``drop`` and the activation of ``apply_act=False``), eval-mode
    dropout, ``+ 0`` (MobileOne starts its sum with ``out = 0``). A merge removes them too.
    """

    passed: tuple[tuple[fx.Node, tuple[fx.Node, ...]], ...] = ()

    def reader_of(self, node: fx.Node) -> fx.Node:
        """The node that reads ``node`` on its way to the add: the add, or the first pass-through."""
        chain = dict(self.passed).get(node)
        return chain[0] if chain else self.add

    @property
    def identity_call(self) -> NormCall | None:
        """The identity branch's BN call, if there is one (``identity_norm`` is its node)."""
        return next((branch.norm for branch in self.branches if branch.norm is not None), None)

    @property
    def absorbed(self) -> tuple[fx.Node, ...]:
        """The ``+ 0`` adds the merge removes, reported merged with the add (as the ONNX path does)."""
        return tuple(node for _, chain in self.passed for node in chain if node.op == "call_function")

    def carried_refusal_detail(self, subject_label: str, detail: str) -> str:
        return f"identity branch of `{subject_label}`: {detail}"


def _passed_through(state: FoldState, operand: fx.Node, add: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """(the value ``operand`` passes on unchanged, the pass-through nodes innermost first).

    Each pass-through node must be read only by the next one (the last by ``add``).
    """
    chain: list[fx.Node] = []
    node, reader = operand, add
    while isinstance(node, fx.Node) and set(node.users) == {reader}:
        inner = _pass_through_input(state, node)
        if inner is None:
            break
        chain.append(node)
        node, reader = inner, node
    return node, tuple(reversed(chain))


def _pass_through_input(state: FoldState, node: fx.Node) -> fx.Node | None:
    """The input a node returns unchanged (``nn.Identity``, eval dropout, ``t + 0``), else None."""
    if node.op == "call_module":
        module = state.graph_module.get_submodule(str(node.target))
        identity = isinstance(module, nn.Identity) or (
            isinstance(module, nn.modules.dropout._DropoutNd) and not module.training
        )
        if identity and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None
    if node.op != "call_function":
        return None
    if node.target is operator.add or node.target in (aten.add.Tensor, aten.add.Scalar):
        arguments = node.args
        if len(arguments) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
            return None
        first, second = arguments
        if isinstance(first, fx.Node) and _is_zero(second):
            return first
        if isinstance(second, fx.Node) and _is_zero(first):
            return second
    return None


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _readings(state: FoldState, node: fx.Node) -> list[tuple[fx.Node, Branch]]:
    """(source, branch) ways to read an operand: as a conv or BN of its input, then as itself."""
    readings = []
    try:
        layer = layer_at(state, node)
    except Refuse:
        layer = None
    if layer is not None and layer.kind == "conv":
        source = node.args[0] if node.op == "call_module" else bind(node).get("input")
        if isinstance(source, fx.Node):
            readings.append((source, Branch(node, layer=layer)))
    norm = _batchnorm_of(state, node)
    if norm is not None:
        source = norm_input(norm)
        if isinstance(source, fx.Node):
            readings.append((source, Branch(node, norm=norm)))
    readings.append((node, Branch(node)))
    return readings


def _batchnorm_of(state: FoldState, node: fx.Node) -> NormCall | None:
    """The BN whose normalized output ``node`` is (the call, or ``getitem(call, 0)`` of a tuple one)."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1:] == (0,):
        call_node = node.args[0]
        if not isinstance(call_node, fx.Node) or not returns_tuple(call_node):
            return None
    elif returns_tuple(node):
        return None
    else:
        call_node = node
    call = identify(state, call_node)
    return call if call is not None and call.kind == "batchnorm" else None


def read_branches(state: FoldState, add: fx.Node) -> Branches | None:
    """The add's operands as branches of one tensor, or None when it is not such an add.

    A conv or BN operand is read as a branch of its own input, else as an identity branch (the
    tensor itself): ``add(conv(x), x)`` pairs a conv of ``x`` with ``x``.
    """
    operands = add_operands(add)
    if operands is None:
        return None
    unwrapped = [_passed_through(state, operand, add) for operand in operands]
    first, second = (inner for inner, _ in unwrapped)
    passed = tuple((inner, chain) for inner, chain in unwrapped if chain)
    for source, one in _readings(state, first):
        for other_source, other in _readings(state, second):
            if source is not other_source or (one.layer is None and other.layer is None):
                continue
            # Only a conv or BN output is looked through (a float tensor: adding 0 is exact).
            if any(
                branch.layer is None and branch.norm is None and branch.node in dict(passed)
                for branch in (one, other)
            ):
                continue
            norm = next((branch.norm.node for branch in (one, other) if branch.norm is not None), None)
            return Branches(add, source, (one, other), norm, passed)
    return None
