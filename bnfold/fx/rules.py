"""Fold rules for FX graphs: a BatchNorm call absorbed by the Conv / ConvTranspose / Linear that feeds it.

Reading is split from deciding. :func:`identify` says whether a node is a normalization and names it;
:func:`read_batchnorm` turns a BN call (a module or a functional call, any tracer's spelling) into
its constant statistics or a :class:`Refusal`; :func:`find_producer` does the same for the layer
feeding it. A rule then ``accepts`` a (BN, producer) pair and its ``match`` returns either a
:class:`Match` — the folded weight and bias, already computed in float64 and rounded once, so
applying cannot fail half-way — or a :class:`Refusal`. Checks read top to bottom as refusals; the
happy path is last. ``RULES`` is the registry, in the order rules are tried.

Before:  x ─Conv(W, b)─▶ c ─BN(γ, β, μ, σ², ε)─▶ y
After:   x ─Conv(W·s, (b−μ)·s + β)─▶ y          where s = γ / √(σ² + ε)
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from bnfold.affine import (
    Affine,
    WeightLayout,
    batchnorm_affine,
    fold_bias,
    input_channel_count,
    input_shift_bias,
    output_channel_count,
    round_to_dtype,
    scale_input_channels,
    scale_output_channels,
    statistics_problem,
)
from bnfold.fx.effects import Effects
from bnfold.fx.nodes import (
    TensorUses,
    behaves_like_torch,
    bind,
    function_label,
    get_attr_tensor,
    getitem_users,
    is_batchnorm_call,
    is_per_sample_norm_call,
    module_kind,
    output_rank,
    owner_path,
    producer_kind_of_function,
    resolve_attr,
    returns_tuple,
    value_readers,
)
from bnfold.fx.shapes import ShapeFacts, batchnorm_ranks
from bnfold.onnx.graph import EXACT_VALUES_BUDGET
from bnfold.report import Reason

__all__ = [
    "Refusal",
    "FoldContext",
    "NormCall",
    "BatchNorm",
    "Layer",
    "Producer",
    "Match",
    "Rule",
    "ConvThenBN",
    "ConvTransposeThenBN",
    "LinearThenBN",
    "FunctionalBN",
    "BNThenConv",
    "BNThenConvTranspose",
    "BNThenLinear",
    "BranchMerge",
    "LinearReshapeBN",
    "RULES",
    "TORCH_REASONS",
    "identify",
    "read_batchnorm",
    "find_producer",
    "find_consumer",
    "batchnorm_refusal",
    "readers",
    "erase_batchnorm",
    "drop_unused_owner",
    "write_functional_tensors",
    "editable_layer_refusal",
    "statistics_dtype_refusal",
    "sole_reader_refusal",
    "channels_on_axis_one",
    "mutation_refusal",
    "value_readers_of",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYOUTS = {
    "conv": WeightLayout.CONV,
    "conv_transpose": WeightLayout.CONV_TRANSPOSE,
    "linear": WeightLayout.MATRIX_OUT_IN,
}
_KIND_NAMES = {"conv": "Conv", "conv_transpose": "ConvTranspose", "linear": "Linear"}


@dataclass(frozen=True)
class Refusal:
    """A rule's "no", with a stable reason code and the specifics a person needs."""

    reason: Reason
    detail: str = ""


class ExactValues:
    """The float64 values that folded tensors were rounded from, so a chain of folds rounds once.

    A tensor a fold wrote may be folded again (``Conv -> BN -> BN``, conv-bn then branch-merge):
    :meth:`float64` then gives the float64 value it came from, not the rounded one. Keyed by the
    tensor's storage (the Parameter made from a rounded tensor shares it), holding the tensor so
    that its storage cannot be freed and reused; the oldest entries go beyond
    ``EXACT_VALUES_BUDGET`` bytes (a later fold then starts from the rounded tensor: one more
    rounding, never a wrong value).
    """

    def __init__(self) -> None:
        self._values: OrderedDict[tuple, tuple[torch.Tensor, np.ndarray]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple:
        return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)

    def remember(self, tensor: torch.Tensor, values64: np.ndarray) -> None:
        key = self._key(tensor)
        previous = self._values.pop(key, None)
        if previous is not None:
            self._bytes -= previous[1].nbytes
        self._values[key] = (tensor, values64)
        self._bytes += values64.nbytes
        while self._bytes > EXACT_VALUES_BUDGET and self._values:
            _, (_, dropped) = self._values.popitem(last=False)
            self._bytes -= dropped.nbytes

    def float64(self, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` in float64: the value a fold rounded it from, when one did."""
        entry = self._values.get(self._key(tensor))
        return entry[1] if entry is not None else _numpy64(tensor)


@dataclass
class FoldContext:
    """The graph being folded, the model it came from (for class names), who uses which tensor, the
    float64 values of the tensors folds wrote, the shape facts and the in-place writes of the graph.

    ``trusted_shapes``: the graph's shape metadata is enforced by the module (torch.export).
    ``assumed_ranks``: graph inputs whose example rank a fold relied on (the driver makes the folded
    module check them).
    """

    graph_module: fx.GraphModule
    root: nn.Module | None = None
    trusted_shapes: bool = False
    uses: TensorUses = field(init=False)
    exact: ExactValues = field(init=False, default_factory=ExactValues)
    facts: ShapeFacts = field(init=False)
    effects: Effects = field(init=False)
    assumed_ranks: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        # Shapes are computed once: a fold gives the folded layer's output the BN output's shape.
        self.facts = ShapeFacts(self.graph_module, trusted=self.trusted_shapes)
        self.refresh()

    def refresh(self) -> None:
        """Re-index tensor uses and in-place writes; call after the graph or its modules changed."""
        self.uses = TensorUses(self.graph_module)
        self.effects = Effects(self.graph_module)

    def assume(self, inputs: frozenset[str]) -> None:
        """Record that an applied fold relies on these graph inputs having their example rank."""
        for name in inputs:
            rank = self.facts.example_rank(name)
            if rank is not None:
                self.assumed_ranks[name] = rank

    def module_at(self, path: str) -> nn.Module | None:
        """The module at ``path`` in the original model (real classes), else in the graph module."""
        for root in (self.root, self.graph_module):
            if root is None:
                continue
            found = resolve_attr(root, path) if path else root
            if isinstance(found, nn.Module) and type(found) is not nn.Module:
                return found
        return None


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


def identify(context: FoldContext, node: fx.Node) -> NormCall | None:
    """The normalization this node computes, or None when it is not one."""
    if node.op == "call_module":
        module = context.graph_module.get_submodule(node.target)
        kind = module_kind(module)
        if kind not in ("batchnorm", "per-sample"):
            return None
        form = "module" if behaves_like_torch(module) else "custom"
        return NormCall(node, node.target, type(module).__name__, kind, form, module, owner=node.target)
    if is_batchnorm_call(node) or is_per_sample_norm_call(node):
        kind = "batchnorm" if is_batchnorm_call(node) else "per-sample"
        arguments = bind(node)
        owner = _owner_of(arguments, ("running_mean", "weight", "bias", "running_var"))
        owner_module = context.module_at(owner) if owner else None
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


def read_batchnorm(context: FoldContext, call: NormCall) -> BatchNorm | Refusal:
    """The BN's statistics, or the first reason it cannot be folded whatever feeds it."""
    if call.module is not None:
        return _read_batchnorm_module(call)
    return _read_batchnorm_function(context, call)


def _read_batchnorm_module(call: NormCall) -> BatchNorm | Refusal:
    module, node = call.module, call.node
    if call.form == "custom":
        return Refusal(Reason.CUSTOM_FORWARD, f"{type(module).__qualname__} overrides forward()")
    hooks = _hooks(module)
    if hooks:
        return Refusal(Reason.HOOKS_REGISTERED, f"`{call.name}` has {hooks}")
    if module.running_mean is None or module.running_var is None:
        return Refusal(Reason.NO_RUNNING_STATISTICS, f"`{call.name}` has no running_mean/running_var")
    if module.training:
        return Refusal(Reason.TRAINING_MODE, f"`{call.name}` is in training mode (call .eval())")
    if len(node.args) != 1 or node.kwargs:
        return Refusal(Reason.NO_FOLDABLE_PRODUCER, f"`{call.name}` is called with unexpected arguments")
    weight = module.weight if module.affine else None
    bias = module.bias if module.affine else None
    return BatchNorm(
        call, node.args[0], [node], weight, bias, module.running_mean, module.running_var, float(module.eps)
    )


def _read_batchnorm_function(context: FoldContext, call: NormCall) -> BatchNorm | Refusal:
    node = call.node
    arguments = bind(node)
    if "input" not in arguments:
        return Refusal(Reason.PARAM_NOT_CONSTANT, f"cannot read the arguments of {node.name}")
    if arguments.get("running_mean") is None or arguments.get("running_var") is None:
        return Refusal(Reason.NO_RUNNING_STATISTICS, f"{node.name} is called without running statistics")
    training = arguments.get("training", False)
    if training is not False:
        detail = "training=True" if training is True else f"training is computed at run time ({training})"
        return Refusal(Reason.TRAINING_MODE, f"{node.name}: {detail}")
    outputs, unused = [node], []
    if returns_tuple(node):
        by_index = getitem_users(node)
        extras = [user for index, users in by_index.items() if index != 0 for user in users]
        if any(user.users or user.target is not operator.getitem for user in extras):
            return Refusal(Reason.EXTRA_OUTPUTS_USED, f"{node.name}'s saved statistics are read")
        outputs, unused = by_index.get(0, []), extras
    tensors: dict[str, torch.Tensor | None] = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = arguments.get(name)
        if value is None:
            tensors[name] = None
            continue
        found = get_attr_tensor(context.graph_module, value)
        if found is None:
            return Refusal(Reason.PARAM_NOT_CONSTANT, f"{name} of {node.name} comes from `{value}`")
        tensors[name] = found[1]
    epsilon = arguments.get("eps", 1e-5)
    if not isinstance(epsilon, int | float):
        return Refusal(Reason.PARAM_NOT_CONSTANT, f"eps of {node.name} is computed at run time")
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


def _hooks(module: nn.Module) -> str:
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
        return _LAYOUTS[self.kind]


#: Kept for readers of the producer-side API.
Producer = Layer


def find_producer(context: FoldContext, batchnorm: BatchNorm) -> Layer | Refusal:
    """The Conv / ConvTranspose / Linear whose output the BN normalizes, or why there is none."""
    source = batchnorm.input
    if not isinstance(source, fx.Node):
        return Refusal(Reason.NO_FOLDABLE_PRODUCER, "its input is not a tensor computed in the graph")
    if source.op == "placeholder":
        return Refusal(Reason.NO_FOLDABLE_PRODUCER, f"input `{source.name}` is a graph input")
    layer = _layer(context, source)
    if isinstance(layer, Refusal):
        return Refusal(layer.reason, f"input comes from {layer.detail}")
    return layer


def find_consumer(context: FoldContext, batchnorm: BatchNorm) -> Layer | None:
    """The first Conv / ConvTranspose / Linear that reads the BN's output as its data input."""
    for output in batchnorm.outputs:
        for user in output.users:
            if _data_input(user) is output:
                layer = _layer(context, user)
                if isinstance(layer, Layer):
                    return layer
    return None


def readers(batchnorm: BatchNorm) -> list[fx.Node]:
    """Every node that reads the BN's normalized output."""
    return [user for output in batchnorm.outputs for user in output.users]


def value_readers_of(batchnorm: BatchNorm) -> list[fx.Node]:
    """The nodes that read the BN's normalized values (not only their shape, rank, dtype or device)."""
    return [user for output in batchnorm.outputs for user in value_readers(output)]


def mutation_refusal(context: FoldContext, tensor: Any, reads: list[fx.Node], where: str) -> Refusal | None:
    """Refuse when a fold would move or merge reads of ``tensor`` across an in-place write into it.

    ``reads`` are the nodes that read ``tensor`` before the fold (the fold makes one node read it).
    """
    if not isinstance(tensor, fx.Node):
        return None
    writer = context.effects.write_between(tensor, reads)
    if writer is None:
        return None
    detail = (
        f"`{writer.name}` writes in place into `{tensor.name}` (or a tensor sharing its storage) "
        f"between {where}"
    )
    return Refusal(Reason.MUTATED_IN_PLACE, detail)


def _data_input(node: fx.Node) -> Any:
    if node.op == "call_module":
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if producer_kind_of_function(node) is not None:
        return bind(node).get("input")
    return None


def _layer(context: FoldContext, node: fx.Node) -> Layer | Refusal:
    """``node`` as a layer a rule can fold into, or (NO_FOLDABLE_PRODUCER, what it is)."""
    if node.op == "call_module":
        module = context.graph_module.get_submodule(node.target)
        kind = module_kind(module)
        if kind not in _LAYOUTS:
            return Refusal(Reason.NO_FOLDABLE_PRODUCER, f"{type(module).__name__} `{node.target}`")
        if not behaves_like_torch(module):
            klass = type(module).__qualname__
            return Refusal(
                Reason.NO_FOLDABLE_PRODUCER, f"`{node.target}`, whose class {klass} overrides forward()"
            )
        if len(node.args) != 1 or node.kwargs:
            return Refusal(Reason.NO_FOLDABLE_PRODUCER, f"`{node.target}`, called with unexpected arguments")
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
        return Refusal(Reason.NO_FOLDABLE_PRODUCER, f"{label} `{node.name}`")
    arguments = bind(node)
    weight_arg, bias_arg = arguments.get("weight"), arguments.get("bias")
    weight = get_attr_tensor(context.graph_module, weight_arg)
    bias = get_attr_tensor(context.graph_module, bias_arg)
    groups = arguments.get("groups", 1)
    if not isinstance(groups, int):
        return Refusal(Reason.WEIGHT_NOT_CONSTANT, f"`{node.name}`, whose groups are computed at run time")
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


# -- rules --------------------------------------------------------------------------------------
@dataclass
class Match:
    """Everything a fold writes: the new weight and bias, in the layer's dtype and on its device."""

    batchnorm: BatchNorm
    layer: Layer
    weight: torch.Tensor
    bias: torch.Tensor
    side: str = "producer"
    assumes: frozenset[str] = frozenset()  # graph inputs whose example rank the fold relies on

    @property
    def producer(self) -> Layer:
        return self.layer


class Rule:
    """A (BN, layer) pattern: the layer before the BN (``side = "producer"``) or after it ("consumer").

    ``match`` and ``apply`` are shared by the rules of one side: only what is accepted differs.
    """

    name: str = ""
    side: str = "producer"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        raise NotImplementedError

    def match(self, context: FoldContext, batchnorm: BatchNorm, layer: Layer) -> Match | Refusal:
        if self.side == "consumer":
            return _match_consumer(context, batchnorm, layer)
        return _match(context, batchnorm, layer)

    def apply(self, context: FoldContext, match: Match) -> str:
        """Rewrite the graph; returns the name of the layer the BN went into."""
        return _apply(context, match)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ConvThenBN(Rule):
    """Conv1d/2d/3d (any groups, dilation, padding mode) -> a BatchNorm layer: scale W's axis 0."""

    name = "conv-bn"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return batchnorm.call.form == "module" and layer.kind == "conv"


class ConvTransposeThenBN(Rule):
    """ConvTranspose1d/2d/3d -> a BatchNorm layer: W is [C_in, C_out/groups, k...], scaled per group."""

    name = "convtranspose-bn"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return batchnorm.call.form == "module" and layer.kind == "conv_transpose"


class LinearThenBN(Rule):
    """Linear -> BatchNorm1d on 2-D input [N, C]: scale W's rows. 3-D input normalizes another axis."""

    name = "linear-bn"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return batchnorm.call.form == "module" and layer.kind == "linear"


class FunctionalBN(Rule):
    """``F.batch_norm`` called by other code (timm's BatchNormAct2d) on a Conv/ConvTranspose/Linear output."""

    name = "functional-bn"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return batchnorm.call.form == "functional"


class BNThenConv(Rule):
    """BN -> Conv without padding: scale the conv's input channels, fold the shift into its bias.

    Before:  x -BN(s, t)-> n -Conv(W, b)-> y      After:  x -Conv(W*s, b + sum W*t)-> y
    Refuses any padding (the border would read 0 where the BN gives ``t``), ``padding="same"`` too.
    """

    name = "bn-conv"
    side = "consumer"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return layer.kind == "conv"


class BNThenConvTranspose(Rule):
    """BN -> ConvTranspose that is a per-pixel map (every kernel size 1, stride 1, no output padding)."""

    name = "bn-convtranspose"
    side = "consumer"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return layer.kind == "conv_transpose"


class BNThenLinear(Rule):
    """BatchNorm1d on 2-D input [N, C] -> Linear: scale the Linear's input features (W's columns)."""

    name = "bn-linear"
    side = "consumer"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return layer.kind == "linear"


def batchnorm_refusal(context: FoldContext, batchnorm: BatchNorm) -> Refusal | None:
    """Why this BN cannot fold into anything (a shared module), or None."""
    return _sharing_refusal(
        context, batchnorm.call.name, batchnorm.node, batchnorm.tensors, batchnorm.call.module
    )


def _layer_refusal(context: FoldContext, batchnorm: BatchNorm, layer: Layer) -> Refusal | None:
    """The checks on the layer that both sides share: sharing, hooks, constants, dtypes."""
    return editable_layer_refusal(context, layer) or statistics_dtype_refusal(batchnorm)


def sole_reader_refusal(layer: Layer, reader: fx.Node) -> Refusal | None:
    """Refuse when anything besides ``reader`` sees the layer's output values: it would see the folded
    values. Readers of its shape, rank, dtype or device see the same before and after."""
    others = [user for user in value_readers(layer.node) if user is not reader]
    if any(user.op == "output" for user in others):
        return Refusal(Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"the output of `{layer.name}` is returned")
    if others:
        names = ", ".join(user.name for user in others[:3])
        return Refusal(
            Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"the output of `{layer.name}` also feeds {names}"
        )
    return None


def editable_layer_refusal(context: FoldContext, layer: Layer) -> Refusal | None:
    """Why the layer's weights cannot be replaced: shared, hooked, computed at run time, not float."""
    shared = _sharing_refusal(context, layer.name, layer.node, layer.tensors, layer.module)
    if shared:
        return shared
    if layer.module is not None and _hooks(layer.module):
        return Refusal(Reason.HOOKS_REGISTERED, f"`{layer.name}` has {_hooks(layer.module)}")
    if layer.module is not None and parametrize.is_parametrized(layer.module):
        others = sorted(set(layer.module.parametrizations) - {"weight", "bias"})
        if others:
            detail = f"`{layer.name}` has parametrized tensors {others} besides its weight and bias"
            return Refusal(Reason.WEIGHT_NOT_CONSTANT, detail)
    if layer.weight is None or not layer.bias_constant:
        which = "weight" if layer.weight is None else "bias"
        return Refusal(Reason.WEIGHT_NOT_CONSTANT, f"the {which} of `{layer.name}` is computed at run time")
    for role, tensor in (("weight", layer.weight), ("bias", layer.bias)):
        if tensor is not None and tensor.dtype not in _FLOAT_DTYPES:
            return Refusal(Reason.UNSUPPORTED_DTYPE, f"the {role} of `{layer.name}` is {tensor.dtype}")
    return None


def statistics_dtype_refusal(batchnorm: BatchNorm) -> Refusal | None:
    for tensor in (batchnorm.weight, batchnorm.bias, batchnorm.running_mean, batchnorm.running_var):
        if tensor is not None and tensor.dtype not in _FLOAT_DTYPES:
            return Refusal(
                Reason.UNSUPPORTED_DTYPE, f"a statistic of `{batchnorm.call.name}` is {tensor.dtype}"
            )
    return None


def _channel_refusal(batchnorm: BatchNorm, layer: Layer, channels: int, which: str) -> Refusal | None:
    for tensor in (batchnorm.weight, batchnorm.bias, batchnorm.running_mean, batchnorm.running_var):
        if tensor is not None and tensor.numel() != channels:
            detail = (
                f"`{layer.name}` has {channels} {which} channels, `{batchnorm.call.name}` {tensor.numel()}"
            )
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, detail)
    return None


def _affine(batchnorm: BatchNorm, channels: int) -> Affine | Refusal:
    statistics = _float64(batchnorm, channels)
    problem = statistics_problem(*statistics, batchnorm.eps)
    if problem:
        kind, bad_channels = problem
        reason = Reason.NONFINITE_STATISTICS if kind == "nonfinite" else Reason.NONPOSITIVE_VARIANCE
        return Refusal(reason, f"channels {bad_channels[:8]}")
    return batchnorm_affine(*statistics, batchnorm.eps)


def _match(context: FoldContext, batchnorm: BatchNorm, producer: Layer) -> Match | Refusal:
    refusal = _layer_refusal(context, batchnorm, producer)
    if refusal:
        return refusal
    refusal = sole_reader_refusal(producer, batchnorm.node)
    if refusal:
        return refusal
    channels = output_channel_count(tuple(producer.weight.shape), producer.layout, producer.groups)
    refusal = _channel_refusal(batchnorm, producer, channels, "output")
    if refusal:
        return refusal
    assumes = channels_on_axis_one(context, batchnorm, batchnorm.input, producer, "output")
    if isinstance(assumes, Refusal):
        return assumes
    affine = _affine(batchnorm, channels)
    if isinstance(affine, Refusal):
        return affine
    weight64 = scale_output_channels(
        context.exact.float64(producer.weight), affine.scale, producer.layout, producer.groups
    )
    bias = context.exact.float64(producer.bias) if producer.bias is not None else None
    bias64 = fold_bias(bias, affine)
    return _rounded_match(context, batchnorm, producer, weight64, bias64, "producer", assumes)


def _match_consumer(context: FoldContext, batchnorm: BatchNorm, consumer: Layer) -> Match | Refusal:
    others = [user for user in value_readers_of(batchnorm) if user is not consumer.node]
    if others:
        names = ", ".join(user.name for user in others[:3])
        where = "is returned" if any(user.op == "output" for user in others) else f"also feeds {names}"
        return Refusal(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"the output of `{batchnorm.call.name}` {where}")
    refusal = _layer_refusal(context, batchnorm, consumer) or _taps_refusal(consumer)
    if refusal:
        return refusal
    channels = input_channel_count(tuple(consumer.weight.shape), consumer.layout, consumer.groups)
    between = f"`{batchnorm.call.name}` and `{consumer.name}`"
    refusal = _channel_refusal(batchnorm, consumer, channels, "input") or mutation_refusal(
        context, batchnorm.input, [batchnorm.node, consumer.node], between
    )
    if refusal:
        return refusal
    assumes = channels_on_axis_one(context, batchnorm, batchnorm.input, consumer, "input")
    if isinstance(assumes, Refusal):
        return assumes
    affine = _affine(batchnorm, channels)
    if isinstance(affine, Refusal):
        return affine
    weight = context.exact.float64(consumer.weight)
    weight64 = scale_input_channels(weight, affine.scale, consumer.layout, consumer.groups)
    correction = input_shift_bias(weight, affine.shift, consumer.layout, consumer.groups)
    bias64 = correction if consumer.bias is None else context.exact.float64(consumer.bias) + correction
    return _rounded_match(context, batchnorm, consumer, weight64, bias64, "consumer", assumes)


def _taps_refusal(consumer: Layer) -> Refusal | None:
    """Folding a shift into a bias is exact only when every output reads every kernel tap from the input."""
    if consumer.kind == "linear":
        return None
    padding = consumer.options.get("padding", 0)
    if isinstance(padding, str):
        if padding != "valid":
            return Refusal(Reason.PADDING_AFTER_BN, f"`{consumer.name}` has padding={padding!r}")
    elif any(_as_tuple(padding)):
        return Refusal(Reason.PADDING_AFTER_BN, f"`{consumer.name}` has padding={padding}")
    if consumer.kind == "conv_transpose":
        kernel = list(consumer.weight.shape[2:])
        stride = _as_tuple(consumer.options.get("stride", 1))
        output_padding = _as_tuple(consumer.options.get("output_padding", 0))
        if any(size != 1 for size in kernel) or any(step != 1 for step in stride) or any(output_padding):
            shape = f"kernel {kernel}, stride {list(stride)}, output_padding {list(output_padding)}"
            detail = f"`{consumer.name}`: {shape}"
            return Refusal(Reason.UNEVEN_TAPS_AFTER_BN, detail)
    return None


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _rounded_match(
    context: FoldContext,
    batchnorm: BatchNorm,
    layer: Layer,
    weight64: np.ndarray,
    bias64: np.ndarray,
    side: str,
    assumes: frozenset[str] = frozenset(),
) -> Match | Refusal:
    weight = _rounded(weight64, layer.weight, context.exact)
    bias = _rounded(bias64, layer.weight, context.exact)
    if weight is None or bias is None:
        return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, f"{layer.weight.dtype} cannot hold the folded values")
    return Match(batchnorm, layer, weight, bias, side, assumes)


def _sharing_refusal(
    context: FoldContext, name: str, node: fx.Node, tensors: list[torch.Tensor], module: nn.Module | None
) -> Refusal | None:
    if module is not None:
        calls = context.uses.module_sites(module)
        if len(calls) > 1:
            sites = ", ".join(call.name for call in calls)
            return Refusal(Reason.SHARED_MODULE, f"module `{name}` is called at {len(calls)} sites ({sites})")
    others = context.uses.other_sites(tensors, node)
    if others:
        sites = ", ".join(other.name for other in others[:3])
        return Refusal(Reason.SHARED_MODULE, f"parameters of `{name}` are also used by {sites}")
    return None


def channels_on_axis_one(
    context: FoldContext, batchnorm: BatchNorm, tensor: Any, layer: Layer, which: str
) -> frozenset[str] | Refusal:
    """Prove that the BN's axis 1 is ``layer``'s channel axis for every input, or refuse.

    ``tensor`` is what the BN normalizes and the layer produces (``which = "output"``) or reads
    (``"input"``). A Linear's features are on axis 1 only for 2-D tensors; a conv's channels only
    for batched ones (an unbatched Conv1d output ``[C, L]`` would put ``L`` on the BN's axis 1). The
    rank comes from the BN's own input check (BatchNorm2d/3d accept one rank), an assertion in the
    graph, or the graph's shape facts; returns the graph inputs whose example rank that assumes.
    """
    wanted = 2 if layer.kind == "linear" else layer.spatial_dims + 2
    label = getattr(tensor, "name", str(tensor))
    ranks = batchnorm_ranks(batchnorm.call.module) if batchnorm.call.module is not None else None
    if ranks is not None and ranks == {wanted}:
        return frozenset()
    known = context.facts.rank(tensor)
    if known is None:
        if output_rank(tensor) is not None:
            detail = (
                f"the rank of `{label}` ({which} of `{layer.name}`) is {output_rank(tensor)} in the example "
                "but is not fixed by the graph for every input"
            )
            return Refusal(Reason.SHAPE_DEPENDENT, detail)
        return Refusal(Reason.UNKNOWN_SHAPE, f"the rank of `{layer.name}`'s {which} is unknown")
    rank, assumes = known
    if rank == wanted:
        return assumes
    if layer.kind == "linear":
        detail = f"`{layer.name}` {which} has rank {rank}: its features are on the last axis, not axis 1"
    else:
        detail = f"`{layer.name}` {which} has rank {rank} (unbatched): its channels are on axis 0"
    return Refusal(Reason.CHANNEL_AXIS_MISMATCH, detail)


def _numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _float64(batchnorm: BatchNorm, channels: int) -> tuple[np.ndarray, ...]:
    gamma = _numpy64(batchnorm.weight) if batchnorm.weight is not None else np.ones(channels)
    beta = _numpy64(batchnorm.bias) if batchnorm.bias is not None else np.zeros(channels)
    return gamma, beta, _numpy64(batchnorm.running_mean), _numpy64(batchnorm.running_var)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        import ml_dtypes  # an onnx dependency; numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype])


def _rounded(values: np.ndarray, like: torch.Tensor, exact: ExactValues | None = None) -> torch.Tensor | None:
    """Round float64 ``values`` once into ``like``'s dtype, on its device; None on overflow.

    With ``exact``, the new tensor's float64 values are remembered there for a later fold.
    """
    rounded = round_to_dtype(values, _numpy_dtype(like.dtype))
    if rounded is None:
        return None
    rounded = np.ascontiguousarray(rounded)
    if like.dtype == torch.bfloat16:
        tensor = torch.from_numpy(rounded.view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(rounded)
    tensor = tensor.to(like.device)
    if exact is not None:
        exact.remember(tensor, np.asarray(values, dtype=np.float64))
    return tensor


# -- applying -----------------------------------------------------------------------------------
def _apply(context: FoldContext, match: Match) -> str:
    layer, batchnorm = match.layer, match.batchnorm
    _write_weights(context, layer, match)
    context.assume(match.assumes)
    for output in batchnorm.outputs:
        # Producer side: what the BN read (the layer's output, or a reshape of it) takes the BN's
        # place. Consumer side: the layer reads what the BN read, and so do the readers of the BN
        # output's shape (the only other readers a consumer-side fold allows: same shape).
        output.replace_all_uses_with(batchnorm.input)
    erase_batchnorm(context, batchnorm)
    return layer.name


def erase_batchnorm(context: FoldContext, batchnorm: BatchNorm) -> None:
    """Remove a BN whose readers were all redirected: its nodes, its unused tensors and module."""
    graph = context.graph_module.graph
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
    drop_unused_owner(context.graph_module, batchnorm.call.owner, _BATCHNORM_STATE)


def _write_weights(context: FoldContext, layer: Layer, match: Match) -> None:
    if layer.module is not None:
        _replace_module(context.graph_module, layer.node.target, _folded_module(layer.module, match))
        return
    write_functional_tensors(context, layer, match.weight, match.bias)


def write_functional_tensors(
    context: FoldContext, layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """New weight and bias tensors for a functional layer call (a bias attribute is added if it had none)."""
    graph_module, graph = context.graph_module, context.graph_module.graph
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
    _set_argument(layer.node, 2, "bias", bias_node)


def _folded_module(module: nn.Module, match: Match) -> nn.Module:
    """A copy of the layer with the folded weight and bias; the original layer is not touched.

    A shallow copy with its own parameter dict: configuration (stride, groups, padding mode, ...)
    is shared, tensors are new.
    """
    folded = _plain_copy(module)
    requires_grad = module.weight.requires_grad
    folded._parameters["weight"] = nn.Parameter(match.weight, requires_grad=requires_grad)
    folded._parameters["bias"] = nn.Parameter(match.bias, requires_grad=requires_grad)
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


def _replace_module(graph_module: fx.GraphModule, target: str, module: nn.Module) -> None:
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


def _set_argument(node: fx.Node, position: int, name: str, value: Any) -> None:
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


# -- the registry ---------------------------------------------------------------------------
# One family of patterns per module; they build on the reading and checking above.
from bnfold.fx.rules_branches import BranchMerge  # noqa: E402
from bnfold.fx.rules_reshape import LinearReshapeBN  # noqa: E402

RULES: tuple[Rule, ...] = (
    # BN -> the layer before it (output channels)
    ConvThenBN(),
    ConvTransposeThenBN(),
    LinearThenBN(),
    FunctionalBN(),
    # ... through flatten/reshape/view calls between a Linear and the BN (LeViT's Linear_BN)
    LinearReshapeBN(),
    # BN -> the layer after it (input channels), tried when no producer-side rule folds it
    BNThenConv(),
    BNThenConvTranspose(),
    BNThenLinear(),
    # add of parallel Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet)
    BranchMerge(),
)

#: Every reason code the PyTorch path can give (the tests hold one negative case for each).
TORCH_REASONS = frozenset(
    {
        Reason.NO_FOLDABLE_PRODUCER,
        Reason.PRODUCER_HAS_OTHER_CONSUMERS,
        Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT,
        Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS,
        Reason.PADDING_AFTER_BN,
        Reason.UNEVEN_TAPS_AFTER_BN,
        Reason.PARAM_NOT_CONSTANT,
        Reason.PARAM_SHAPE_MISMATCH,
        Reason.TRAINING_MODE,
        Reason.EXTRA_OUTPUTS_USED,
        Reason.NONPOSITIVE_VARIANCE,
        Reason.NONFINITE_STATISTICS,
        Reason.WEIGHT_NOT_CONSTANT,
        Reason.UNSUPPORTED_DTYPE,
        Reason.CHANNEL_AXIS_MISMATCH,
        Reason.FOLD_OVERFLOWS_DTYPE,
        Reason.RULE_DISABLED,
        Reason.PER_SAMPLE_STATISTICS,
        Reason.SHARED_MODULE,
        Reason.NO_RUNNING_STATISTICS,
        Reason.UNKNOWN_SHAPE,
        Reason.HOOKS_REGISTERED,
        Reason.CUSTOM_FORWARD,
        Reason.BRANCHES_INCOMPATIBLE,
        Reason.RESHAPE_NOT_CHANNEL_PRESERVING,
        Reason.SHAPE_DEPENDENT,
        Reason.MUTATED_IN_PLACE,
    }
)
