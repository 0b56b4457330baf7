"""Reading an FX graph: which nodes are normalizations and layers, and their constants.

Three tracers spell a layer three ways (see :mod:`bnfold.fx.nodes`); these readers turn any spelling
into :class:`NormCall` / :class:`BatchNorm` (a BN call and its constant statistics) and
:class:`Layer` (a Conv / ConvTranspose / Linear, module or functional, and its constant weight).
Reading raises :class:`~bnfold.core.refuse.Refuse` where a value is not what a fold needs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from bnfold.affine import WeightLayout
from bnfold.core.refuse import Refuse
from bnfold.fx.nodes import (
    behaves_like_torch,
    bind,
    function_label,
    get_attr_tensor,
    getitem_users,
    is_batchnorm_call,
    is_per_sample_norm_call,
    module_kind,
    owner_path,
    producer_kind_of_function,
    returns_tuple,
    value_readers,
)
from bnfold.fx.state import FoldState
from bnfold.report import Reason

__all__ = [
    "LAYOUTS",
    "NormCall",
    "BatchNorm",
    "Layer",
    "identify",
    "norm_input",
    "read_batchnorm",
    "hooks_of",
    "layer_at",
    "layer_kind",
    "consumer_layer",
    "data_input",
    "readers",
    "value_readers_of",
]

LAYOUTS = {
    "conv": WeightLayout.CONV,
    "conv_transpose": WeightLayout.CONV_TRANSPOSE,
    "linear": WeightLayout.MATRIX_OUT_IN,
}


# -- identifying normalizations -----------------------------------------------------------------
@dataclass
class NormCall:
    """A normalization node and how the report names it.

    ``form`` is ``module`` for a torch BN layer (a ``call_module`` node, or torch.export's ATen call
    made by one), ``functional`` for a batch norm called from other code (a BatchNormAct2d's
    ``forward``), and ``custom`` for a leaf module whose class overrides ``forward``.
    """

    node: fx.Node
    name: str
    op_type: str
    kind: str  # "batchnorm" or "per-sample"
    form: str
    module: nn.Module | None = None  # call_module form
    owner: str = ""  # the module path that holds its parameters ("" when they are not attributes)


def identify(state: FoldState, node: fx.Node) -> NormCall | None:
    """The normalization this node computes, or None when it is not one."""
    if node.op == "call_module":
        module = state.graph_module.get_submodule(node.target)
        kind = module_kind(module)
        if kind not in ("batchnorm", "per-sample"):
            return None
        form = "module" if behaves_like_torch(module) else "custom"
        return NormCall(node, node.target, type(module).__name__, kind, form, module, owner=node.target)
    if is_batchnorm_call(node) or is_per_sample_norm_call(node):
        kind = "batchnorm" if is_batchnorm_call(node) else "per-sample"
        arguments = bind(node)
        owner = _owner_of(arguments, ("running_mean", "weight", "bias", "running_var"))
        owner_module = state.module_at(owner) if owner else None
        stack_type = _module_stack_type(node, owner)
        if owner_module is not None:
            op_type = type(owner_module).__name__
            plain = module_kind(owner_module) == "batchnorm" and behaves_like_torch(owner_module)
        elif stack_type:
            op_type = stack_type.rpartition(".")[2]
            plain = stack_type.startswith("torch.nn.modules.batchnorm.")
        else:
            op_type, plain = function_label(node.target), False
        form = "module" if plain else "functional"
        return NormCall(node, owner or node.name, op_type, kind, form, owner=owner)
    return None


def _owner_of(arguments: dict[str, Any], names: tuple[str, ...]) -> str:
    for name in names:
        value = arguments.get(name)
        if isinstance(value, fx.Node) and value.op == "get_attr" and owner_path(value.target):
            return owner_path(value.target)
    return ""


def _module_stack_type(node: fx.Node, path: str) -> str:
    """The class torch.export recorded for the module at ``path`` that made this call ('' if none)."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    for entry_path, entry_type in reversed(entries):
        if entry_path == path or not path:
            return entry_type if isinstance(entry_type, str) else getattr(entry_type, "__qualname__", "")
    return ""


# -- reading a BatchNorm ------------------------------------------------------------------------
@dataclass
class BatchNorm:
    """A BN call's constant statistics and where it sits in the graph."""

    call: NormCall
    input: Any
    outputs: list[fx.Node]  # the nodes whose value is the normalized tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float
    unused: list[fx.Node] = field(default_factory=list)  # getitem nodes of saved statistics nobody reads

    @property
    def node(self) -> fx.Node:
        return self.call.node

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self.call.module is not None:
            return [*self.call.module.parameters(), *self.call.module.buffers()]
        return [t for t in (self.weight, self.bias, self.running_mean, self.running_var) if t is not None]


def read_batchnorm(state: FoldState, call: NormCall) -> BatchNorm:
    """The BN's statistics, or the first reason it cannot be folded whatever feeds it."""
    if call.module is not None:
        return _read_batchnorm_module(call)
    return _read_batchnorm_function(state, call)


def _read_batchnorm_module(call: NormCall) -> BatchNorm:
    module, node = call.module, call.node
    if call.form == "custom":
        raise Refuse(Reason.CUSTOM_FORWARD, f"{type(module).__qualname__} overrides forward()")
    hooks = hooks_of(module)
    if hooks:
        raise Refuse(Reason.HOOKS_REGISTERED, f"`{call.name}` has {hooks}")
    if module.running_mean is None or module.running_var is None:
        raise Refuse(Reason.NO_RUNNING_STATISTICS, f"`{call.name}` has no running_mean/running_var")
    if module.training:
        raise Refuse(Reason.TRAINING_MODE, f"`{call.name}` is in training mode (call .eval())")
    if len(node.args) != 1 or node.kwargs:
        raise Refuse(Reason.NO_FOLDABLE_PRODUCER, f"`{call.name}` is called with unexpected arguments")
    weight = module.weight if module.affine else None
    bias = module.bias if module.affine else None
    return BatchNorm(
        call, node.args[0], [node], weight, bias, module.running_mean, module.running_var, float(module.eps)
    )


def _read_batchnorm_function(state: FoldState, call: NormCall) -> BatchNorm:
    node = call.node
    arguments = bind(node)
    if "input" not in arguments:
        raise Refuse(Reason.PARAM_NOT_CONSTANT, f"cannot read the arguments of {node.name}")
    if arguments.get("running_mean") is None or arguments.get("running_var") is None:
        raise Refuse(Reason.NO_RUNNING_STATISTICS, f"{node.name} is called without running statistics")
    training = arguments.get("training", False)
    if training is not False:
        detail = "training=True" if training is True else f"training is computed at run time ({training})"
        raise Refuse(Reason.TRAINING_MODE, f"{node.name}: {detail}")
    outputs, unused = [node], []
    if returns_tuple(node):
        by_index = getitem_users(node)
        extras = [user for index, users in by_index.items() if index != 0 for user in users]
        if any(user.users or user.target is not operator.getitem for user in extras):
            raise Refuse(Reason.EXTRA_OUTPUTS_USED, f"{node.name}'s saved statistics are read")
        outputs, unused = by_index.get(0, []), extras
    tensors: dict[str, torch.Tensor | None] = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = arguments.get(name)
        if value is None:
            tensors[name] = None
            continue
        found = get_attr_tensor(state.graph_module, value)
        if found is None:
            raise Refuse(Reason.PARAM_NOT_CONSTANT, f"{name} of {node.name} comes from `{value}`")
        tensors[name] = found[1]
    epsilon = arguments.get("eps", 1e-5)
    if not isinstance(epsilon, int | float):
        raise Refuse(Reason.PARAM_NOT_CONSTANT, f"eps of {node.name} is computed at run time")
    return BatchNorm(
        call,
        arguments["input"],
        outputs,
        tensors["weight"],
        tensors["bias"],
        tensors["running_mean"],
        tensors["running_var"],
        float(epsilon),
        unused=unused,
    )


def hooks_of(module: nn.Module) -> str:
    kinds = [
        label
        for label, hooks in (
            ("forward hooks", module._forward_hooks),
            ("pre-hooks", module._forward_pre_hooks),
        )
        if hooks
    ]
    return " and ".join(kinds)


# -- finding the layers on either side ----------------------------------------------------------
@dataclass
class Layer:
    """A Conv / ConvTranspose / Linear next to a BN: its constant weight and bias, and how to rewrite it."""

    node: fx.Node
    kind: str  # "conv", "conv_transpose" or "linear"
    name: str
    op_type: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    groups: int
    spatial_dims: int
    options: dict[str, Any] = field(default_factory=dict)  # padding, stride, output_padding
    module: nn.Module | None = None  # call_module form
    weight_arg: Any = None  # functional form: the argument values as the graph has them
    bias_arg: Any = None
    bias_constant: bool = True

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self.module is not None:
            return [*self.module.parameters(), *self.module.buffers()]
        return [t for t in (self.weight, self.bias) if t is not None]

    @property
    def layout(self) -> WeightLayout:
        return LAYOUTS[self.kind]


def norm_input(call: NormCall | None) -> Any:
    """The tensor a normalization call normalizes (its data input), None when it cannot be read."""
    if call is None:
        return None
    if call.module is not None:
        return call.node.args[0] if call.node.args else None
    return bind(call.node).get("input")


def layer_kind(state: FoldState, node: fx.Node) -> str | None:
    """``conv``, ``conv_transpose`` or ``linear`` when ``node`` calls such a layer (module or
    function), else None. Cheap: whether it can be folded is :func:`layer_at`'s question."""
    if node.op == "call_module":
        kind = module_kind(state.graph_module.get_submodule(str(node.target)))
        return kind if kind in LAYOUTS else None
    return producer_kind_of_function(node)


def consumer_layer(batchnorm_outputs: list[fx.Node], state: FoldState) -> fx.Node | None:
    """The first Conv / ConvTranspose / Linear node that reads a BN output as its data input."""
    for output in batchnorm_outputs:
        for user in output.users:
            if data_input(user) is output and layer_kind(state, user) is not None:
                return user
    return None


def readers(batchnorm: BatchNorm) -> list[fx.Node]:
    """Every node that reads the BN's normalized output."""
    return [user for output in batchnorm.outputs for user in output.users]


def value_readers_of(batchnorm: BatchNorm) -> list[fx.Node]:
    """The nodes that read the BN's normalized values (not only their shape, rank, dtype or device)."""
    return [user for output in batchnorm.outputs for user in value_readers(output)]


def data_input(node: fx.Node) -> Any:
    if node.op == "call_module":
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if producer_kind_of_function(node) is not None:
        return bind(node).get("input")
    return None


def layer_at(state: FoldState, node: fx.Node) -> Layer:
    """``node`` as a layer a rule can fold into, or (NO_FOLDABLE_PRODUCER, what it is)."""
    if node.op == "call_module":
        module = state.graph_module.get_submodule(node.target)
        kind = module_kind(module)
        if kind not in LAYOUTS:
            raise Refuse(Reason.NO_FOLDABLE_PRODUCER, f"{type(module).__name__} `{node.target}`")
        if not behaves_like_torch(module):
            klass = type(module).__qualname__
            raise Refuse(
                Reason.NO_FOLDABLE_PRODUCER, f"`{node.target}`, whose class {klass} overrides forward()"
            )
        if len(node.args) != 1 or node.kwargs:
            raise Refuse(Reason.NO_FOLDABLE_PRODUCER, f"`{node.target}`, called with unexpected arguments")
        if kind == "linear":
            return Layer(
                node,
                kind,
                node.target,
                type(module).__name__,
                module.weight,
                module.bias,
                1,
                0,
                module=module,
            )
        options = {"padding": module.padding, "stride": module.stride}
        if kind == "conv_transpose":
            options["output_padding"] = module.output_padding
        return Layer(
            node,
            kind,
            node.target,
            type(module).__name__,
            module.weight,
            module.bias,
            module.groups,
            len(module.kernel_size),
            options,
            module=module,
        )
    kind = producer_kind_of_function(node)
    if kind is None:
        label = node.target if node.op == "call_module" else function_label(node.target)
        raise Refuse(Reason.NO_FOLDABLE_PRODUCER, f"{label} `{node.name}`")
    arguments = bind(node)
    weight_arg, bias_arg = arguments.get("weight"), arguments.get("bias")
    weight = get_attr_tensor(state.graph_module, weight_arg)
    bias = get_attr_tensor(state.graph_module, bias_arg)
    groups = arguments.get("groups", 1)
    if not isinstance(groups, int):
        raise Refuse(Reason.WEIGHT_NOT_CONSTANT, f"`{node.name}`, whose groups are computed at run time")
    weight_tensor = weight[1] if weight else None
    spatial = weight_tensor.dim() - 2 if weight_tensor is not None and kind != "linear" else 0
    name = owner_path(weight[0]) if weight and owner_path(weight[0]) else node.name
    options = {key: arguments.get(key, 0) for key in ("padding", "output_padding")}
    options["stride"] = arguments.get("stride", 1)
    return Layer(
        node,
        kind,
        name,
        function_label(node.target),
        weight_tensor,
        bias[1] if bias else None,
        groups,
        spatial,
        options,
        weight_arg=weight_arg,
        bias_arg=bias_arg,
        bias_constant=bias_arg is None or bias is not None,
    )
