"""Writing a fold into the graph module: new tensors and modules (never the old ones edited), the
BN's nodes and unused tensors removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from bnfold.fx.nodes import owner_path, resolve_attr
from bnfold.fx.reading import BatchNorm, Layer
from bnfold.fx.state import FoldState

__all__ = [
    "LayerFold",
    "apply_layer_fold",
    "write_layer_tensors",
    "is_shared",
    "erase_batchnorm",
    "write_functional_tensors",
    "replace_module",
    "set_argument",
    "drop_unused_owner",
]


# -- applying -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFold:
    """Everything a BN-into-layer fold writes: the layer's new weight and bias (in its dtype, on its
    device), the side (``output``: the layer before the BN; ``input``: the layer after it), and the
    graph inputs whose example rank the fold relies on."""

    batchnorm: BatchNorm
    layer: Layer
    weight: torch.Tensor
    bias: torch.Tensor
    side: str
    assumes: frozenset[str] = frozenset()


def apply_layer_fold(state: FoldState, fold: LayerFold) -> str:
    """Write the layer's new tensors and remove the BN; returns the name of the layer it went into.

    Output side: what the BN read (the layer's output, or a reshape of it) takes the BN's place.
    Input side: the layer reads what the BN read, and so do the readers of the BN output's shape
    (the only other readers an input-side fold allows: the same shape).
    """
    layer, batchnorm = fold.layer, fold.batchnorm
    into = write_layer_tensors(state, layer, fold.weight, fold.bias)
    state.assume(fold.assumes)
    for output in batchnorm.outputs:
        output.replace_all_uses_with(batchnorm.input)
    erase_batchnorm(state, batchnorm)
    state.refresh()
    return into


def erase_batchnorm(state: FoldState, batchnorm: BatchNorm) -> None:
    """Remove a BN whose readers were all redirected: its nodes, its unused tensors and module."""
    graph = state.graph_module.graph
    inputs = [value for value in batchnorm.node.all_input_nodes if value.op == "get_attr"]
    for output in batchnorm.outputs:
        if output is not batchnorm.node:
            graph.erase_node(output)
    for unused in batchnorm.unused:
        graph.erase_node(unused)
    graph.erase_node(batchnorm.node)
    for value in inputs:
        if not value.users:
            graph.erase_node(value)
    drop_unused_owner(state.graph_module, batchnorm.call.owner, _BATCHNORM_STATE)


def write_layer_tensors(state: FoldState, layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> str:
    """Give ``layer``'s call a new weight and bias; returns where they are (the module's path, or
    the layer's name for a functional call).

    A layer used only by this call gets a copy of its module at its path (or new tensors at the
    functional call's attributes). A layer shared with other call sites (a module called twice, a
    weight tied to another module, a weight read by another node) is never edited in place: this
    call gets a copy of the module at a fresh path next to it (``conv`` -> ``conv_folded``), or new
    tensors at fresh attributes, and every other site keeps reading the original.
    """
    if layer.module is not None:
        folded = _folded_module(layer.module, weight, bias)
        target = str(layer.node.target)
        if is_shared(state, layer):
            owner, _, name = target.rpartition(".")
            target = _fresh_attribute(state.graph_module, owner, f"{name}_folded")
            replace_module(state.graph_module, target, folded)
            layer.node.target = target
        else:
            replace_module(state.graph_module, target, folded)
        return target
    if is_shared(state, layer):
        _write_own_functional_tensors(state, layer, weight, bias)
    else:
        write_functional_tensors(state, layer, weight, bias)
    return layer.name


def is_shared(state: FoldState, layer: Layer) -> bool:
    """Whether another call site uses ``layer``'s module or any of its tensors."""
    if layer.module is not None and len(state.uses.module_sites(layer.module)) > 1:
        return True
    return bool(state.uses.other_sites(layer.tensors, layer.node))


def _write_own_functional_tensors(
    state: FoldState, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """New weight and bias tensors at fresh attributes, read by this call alone (the old ones, which
    other sites read, stay where they are)."""
    graph_module, graph = state.graph_module, state.graph_module.graph
    owner = owner_path(layer.weight_arg.target)
    old_arguments = [layer.weight_arg, layer.bias_arg]
    for position, role, tensor in ((1, "weight", weight), (2, "bias", bias)):
        if tensor is None:
            continue
        target = _fresh_attribute(graph_module, owner, f"{role}_folded")
        _set_tensor(graph_module, target, tensor, like=layer.weight)
        with graph.inserting_before(layer.node):
            read = graph.get_attr(target)
        set_argument(layer.node, position, role, read)
    for old in old_arguments:
        if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
            graph.erase_node(old)


def write_functional_tensors(
    state: FoldState, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """New weight and bias tensors for a functional layer call (a bias attribute is added if it had none)."""
    graph_module, graph = state.graph_module, state.graph_module.graph
    _set_tensor(graph_module, layer.weight_arg.target, weight, like=layer.weight)
    if bias is None:
        return
    if isinstance(layer.bias_arg, fx.Node):
        _set_tensor(graph_module, layer.bias_arg.target, bias, like=layer.weight)
        return
    owner = owner_path(layer.weight_arg.target)
    target = _fresh_attribute(graph_module, owner, "bias")
    _set_tensor(graph_module, target, bias, like=layer.weight)
    with graph.inserting_before(layer.node):
        bias_node = graph.get_attr(target)
    set_argument(layer.node, 2, "bias", bias_node)


def _folded_module(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of the layer with the folded weight and bias; the original layer is not touched.

    A shallow copy with its own parameter dict: configuration (stride, groups, padding mode, ...)
    is shared, tensors are new.
    """
    folded = _plain_copy(module)
    requires_grad = module.weight.requires_grad
    folded._parameters["weight"] = nn.Parameter(weight, requires_grad=requires_grad)
    folded._parameters["bias"] = nn.Parameter(bias, requires_grad=requires_grad)
    return folded


def _plain_copy(module: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter, buffer and child dicts.

    A layer with ``torch.nn.utils.parametrize`` parametrizations (weight norm, spectral norm) is of a
    class torch made for it (``ParametrizedConv2d``) whose ``weight`` is computed from the
    parametrization on every call, and which cannot be copied (``copy.copy`` raises). The copy is of
    the layer's own class, without the parametrizations: the fold's weight is the parametrized value,
    folded, stored as a plain parameter.
    """
    klass = type(module)
    if parametrize.is_parametrized(module):
        klass = klass.__bases__[0]
    folded = klass.__new__(klass)
    folded.__dict__.update(module.__dict__)
    folded._parameters = dict(module._parameters)
    folded._buffers = dict(module._buffers)
    folded._modules = {name: child for name, child in module._modules.items() if name != "parametrizations"}
    return folded


def replace_module(graph_module: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_path, _, name = target.rpartition(".")
    parent = graph_module.get_submodule(parent_path) if parent_path else graph_module
    setattr(parent, name, module)


def _set_tensor(graph_module: fx.GraphModule, target: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    """Put a new tensor at ``target`` (a parameter if ``like`` is one); never writes into the old one."""
    parent_path, _, name = target.rpartition(".")
    parent = graph_module.get_submodule(parent_path) if parent_path else graph_module
    parent._parameters.pop(name, None)
    parent._buffers.pop(name, None)
    if name in parent.__dict__:
        delattr(parent, name)
    if isinstance(like, nn.Parameter):
        parent.register_parameter(name, nn.Parameter(tensor, requires_grad=like.requires_grad))
    else:
        parent.register_buffer(name, tensor)


def _fresh_attribute(graph_module: fx.GraphModule, owner: str, name: str) -> str:
    parent = graph_module.get_submodule(owner) if owner else graph_module
    candidate, index = name, 0
    while getattr(parent, candidate, None) is not None:
        index += 1
        candidate = f"{name}_{index}"
    return f"{owner}.{candidate}" if owner else candidate


def set_argument(node: fx.Node, position: int, name: str, value: Any) -> None:
    if len(node.args) > position:
        node.update_arg(position, value)
    elif name in node.kwargs or len(node.args) < position:
        node.update_kwarg(name, value)
    else:
        node.args = (*node.args, value)


_BATCHNORM_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def drop_unused_owner(graph_module: fx.GraphModule, owner: str, names: tuple[str, ...]) -> None:
    """Remove the tensors ``names`` of the module at ``owner`` that nothing reads any more, and the
    module itself when nothing in it is used.

    A BatchNormAct2d traced through keeps its activation (``b2.act``) as a module of the graph, so
    its owner stays; only the statistics and affine parameters go.
    """
    module = resolve_attr(graph_module, owner) if owner else None
    if not isinstance(module, nn.Module):
        return
    graph, prefix = graph_module.graph, owner + "."
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target.startswith(prefix) and not node.users:
            graph.erase_node(node)
    if any(node.op == "call_module" and node.target == owner for node in graph.nodes):
        return
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    for name in names:
        if prefix + name not in read:
            module._parameters.pop(name, None)
            module._buffers.pop(name, None)
    referenced = any(
        node.op in ("get_attr", "call_module") and node.target.startswith(prefix) for node in graph.nodes
    )
    if not referenced:
        graph_module.delete_submodule(owner)
