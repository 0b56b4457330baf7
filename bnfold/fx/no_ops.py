"""Eval-mode no-ops next to normalizations and layers, removed before the rules run.

``nn.Identity``, dropout modules in eval mode, and ``F.dropout(..., training=False)`` (and its
ATen / ``torch.dropout`` forms) return their input tensor itself. Between a layer and a BN (timm's
``head_drop`` in LeViT's ``NormLinear``: BatchNorm1d -> Dropout -> Linear) they would make every
rule see "a dropout", not "a BN", as the neighbour. Rather than teach each rule to look through
them, the fold replaces such a node by its input wherever it touches a normalization or a layer: the
tensor that flows is the same object, so values, aliasing and in-place writes are unchanged. Timm's
``DropPath`` needs nothing here: its ``forward`` returns ``x`` when not training (or at rate 0), so
tracing leaves no node for it. A dropout module in training mode, a module with hooks (removing it
would skip them) and a dropout whose ``training`` is not the constant False stay.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx, nn

from bnfold.fx.reading import hooks_of, layer_kind

__all__ = ["identity_input", "remove_no_ops"]

_aten = torch.ops.aten

# function -> (names of its positional parameters, the name of its "training" flag, its default)
_DROPOUT_FUNCTIONS: dict[Callable, tuple[tuple[str, ...], str, bool]] = {}
for _function in (
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d,
    torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout,
):
    _DROPOUT_FUNCTIONS[_function] = (("input", "p", "training", "inplace"), "training", True)
for _function in (
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
    _aten.dropout.default,
    _aten.alpha_dropout.default,
    _aten.feature_dropout.default,
    _aten.feature_alpha_dropout.default,
):
    _DROPOUT_FUNCTIONS[_function] = (("input", "p", "train"), "train", True)


def identity_input(graph_module: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input ``node`` returns itself (unchanged, the same tensor), when it is an eval no-op."""
    if node.op == "call_module":
        module = graph_module.get_submodule(str(node.target))
        no_op = isinstance(module, nn.Identity) or (
            isinstance(module, nn.modules.dropout._DropoutNd) and not module.training
        )
        if not no_op or hooks_of(module) or type(module).forward is not _torch_forward(module):
            return None
        if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            return node.args[0]
        return None
    if node.op != "call_function":
        return None
    try:
        signature = _DROPOUT_FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    except TypeError:  # an unhashable callable
        return None
    if signature is None:
        return None
    names, flag, default = signature
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return None
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    source = bound.get("input")
    if bound.get(flag, default) is not False or not isinstance(source, fx.Node):
        return None
    return source


def _torch_forward(module: nn.Module) -> Callable:
    """The ``forward`` of the torch class ``module`` derives from (a subclass may override it)."""
    for klass in type(module).__mro__:
        if klass.__module__.startswith("torch.nn.modules.") and "forward" in vars(klass):
            return vars(klass)["forward"]
    return type(module).forward


def remove_no_ops(view) -> list[str]:
    """Replace each eval no-op that reads or feeds a normalization or a layer by its input; the names
    of the removed nodes. Repeated until none is left, so chains of no-ops go too."""
    graph_module: fx.GraphModule = view.graph_module
    removed: list[str] = []
    changed = True
    while changed:
        changed = False
        for node in list(graph_module.graph.nodes):
            source = identity_input(graph_module, node)
            if source is None or not _touches_fold_site(view, node, source):
                continue
            node.replace_all_uses_with(source)
            graph_module.graph.erase_node(node)
            removed.append(node.name)
            changed = True
    return removed


def _touches_fold_site(view, node: fx.Node, source: fx.Node) -> bool:
    """Whether a no-op reads a normalization's or a layer's output, or feeds a normalization or layer."""
    if _is_norm_output(view, source) or _is_layer(view, source):
        return True
    return any(view.is_norm(user) or _is_layer(view, user) for user in node.users)


def _is_norm_output(view, node: fx.Node) -> bool:
    if view.is_norm(node):
        return True
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and isinstance(node.args[0], fx.Node)
        and view.is_norm(node.args[0])
    )


def _is_layer(view, node: fx.Node) -> bool:
    return node.op in ("call_module", "call_function") and layer_kind(view, node) is not None
