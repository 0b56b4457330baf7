"""Parallel branches of one input summed by an add, merged into one Conv (structural re-parameterization).

The PyTorch side of ``bnfold.onnx.rules_branches``, over FX nodes. RepVGG, ACNet and MobileOne train
blocks of parallel branches that read the same input ``x`` and are summed:
``bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)`` (ACNet: ``1x3`` and ``3x1``; MobileOne: several ``k x k``).
The driver visits nodes in graph order, so by the time it reaches the add, conv-bn has folded each
branch's BN and the block is ``add(conv_a(x), conv_b(x))`` (chained for more branches, each inner add
merged first). Convolutions of one input with the same strides, dilations and groups sum to one
convolution whose kernel is their kernels zero-padded into a common window
(``bnfold.affine.merge_windows``); an identity branch is a 1-tap Dirac kernel (``dirac_kernel``,
scaled by the BN's ``scale``, the BN's ``shift`` added to the bias). All in float64, rounded once.

    Before:  x -+- conv_a(Wa, ba) -+- add -> y      After:  x - Conv(Wa' + Wb' + s*I, ba + bb + t) -> y
                +- conv_b(Wb, bb) -+
                +- bn(x) (s, t) ---+  (an identity branch; or x itself: s = 1, t = 0)

The adds read are ``operator.add``/``operator.iadd`` (``a + b``, ``a += b``), ``torch.add``,
``Tensor.add``/``add_`` and ``aten.add(_).Tensor``, all with ``alpha`` 1. The merged layer is a new
``nn.Conv1d/2d/3d`` at the first conv's path (for a functional call, its weight, bias and padding
are rewritten); the other conv's module goes when nothing else uses it.

Refuses (an add is not reported; an identity-branch BN is kept with the reason): a branch output read
elsewhere or returned; a conv module called at another site, hooks, weights computed at run time;
``padding_mode`` other than ``zeros``; strides, dilations, groups, channel counts, dtypes or devices
that differ; pads that do not line up, or merged pads that a torch conv cannot express (unequal at
the two ends, except ``padding="same"`` at stride 1); an identity branch next to a strided conv or one
whose output channels are not its input channels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.affine import ConvWindow, merge_branch_kernels
from bnfold.fx.nodes import argument_names, bind, returns_tuple
from bnfold.fx.rules import (
    BatchNorm,
    FoldContext,
    Layer,
    NormCall,
    Refusal,
    Rule,
    _affine,
    _channel_refusal,
    _layer,
    _replace_module,
    _rounded,
    _set_argument,
    batchnorm_refusal,
    channels_on_axis_one,
    drop_unused_owner,
    editable_layer_refusal,
    erase_batchnorm,
    identify,
    mutation_refusal,
    read_batchnorm,
    sole_reader_refusal,
    statistics_dtype_refusal,
    value_readers_of,
    write_functional_tensors,
)
from bnfold.report import Reason

__all__ = ["Branch", "Branches", "BranchMatch", "BranchMerge", "add_operands"]

aten = torch.ops.aten
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


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


@dataclass(frozen=True)
class Branches:
    """The two branches an add sums, both reading ``source``; at least one is a conv.

    ``passed`` maps a branch node to the nodes that pass its value on unchanged to the add, innermost
    first: ``nn.Identity`` (timm's ``drop`` and the activation of ``apply_act=False``), eval-mode
    dropout, ``+ 0`` (MobileOne starts its sum with ``out = 0``). A merge removes them too.
    """

    add: fx.Node
    source: fx.Node
    branches: tuple[Branch, Branch]
    passed: tuple[tuple[fx.Node, tuple[fx.Node, ...]], ...] = ()

    def reader_of(self, node: fx.Node) -> fx.Node:
        """The node that reads ``node`` on its way to the add: the add, or the first pass-through."""
        chain = dict(self.passed).get(node)
        return chain[0] if chain else self.add

    @property
    def identity_norm(self) -> NormCall | None:
        """The identity branch's BN, which the report accounts for, if there is one."""
        return next((branch.norm for branch in self.branches if branch.norm is not None), None)


@dataclass
class BranchMatch:
    """The merged conv: which layer carries it, its new weight, bias, kernel and padding; what goes."""

    branches: Branches
    carrier: Layer
    removed: list[Layer]
    batchnorm: BatchNorm | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    kernel: tuple[int, ...]
    padding: tuple[int, ...] | str
    assumes: frozenset[str] = frozenset()  # graph inputs whose example rank the merge relies on


@dataclass(frozen=True)
class _Geometry:
    """A conv branch's stride, dilation and the window it reads, resolved to explicit values."""

    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    window: ConvWindow


class BranchMerge(Rule):
    """``add`` of Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet, MobileOne)."""

    name = "branch-merge"
    side = "branches"

    def accepts(self, batchnorm: BatchNorm, layer: Layer) -> bool:
        return False  # not a (BN, layer) rule: the driver offers it adds (read_branches)

    def read_branches(self, context: FoldContext, add: fx.Node) -> Branches | None:
        """The add's operands as branches of one tensor, or None when it is not such an add.

        A conv or BN operand is read as a branch of its own input, else as an identity branch (the
        tensor itself): ``add(conv(x), x)`` pairs a conv of ``x`` with ``x``.
        """
        operands = add_operands(add)
        if operands is None:
            return None
        unwrapped = [_passed_through(context, operand, add) for operand in operands]
        first, second = (inner for inner, _ in unwrapped)
        passed = tuple((inner, chain) for inner, chain in unwrapped if chain)
        for source, one in _readings(context, first):
            for other_source, other in _readings(context, second):
                if source is not other_source or (one.layer is None and other.layer is None):
                    continue
                # Only a conv or BN output is looked through (a float tensor: adding 0 is exact).
                if any(
                    branch.layer is None and branch.norm is None and branch.node in dict(passed)
                    for branch in (one, other)
                ):
                    continue
                return Branches(add, source, (one, other), passed)
        return None

    def match(self, context: FoldContext, branches: Branches) -> BranchMatch | Refusal:  # type: ignore[override]
        convs: list[Layer] = []
        geometries: list[_Geometry] = []
        for branch in branches.branches:
            if branch.layer is None:
                continue
            reader = branches.reader_of(branch.layer.node)
            geometry = _conv_refusal(context, reader, branch.layer) or _geometry(branch.layer)
            if isinstance(geometry, Refusal):
                return geometry
            convs.append(branch.layer)
            geometries.append(geometry)
        refusal = _compatibility_refusal(convs, geometries) or _mutation_refusal(context, branches)
        if refusal:
            return refusal
        reference, geometry = convs[0], geometries[0]
        channels = reference.weight.shape[0]
        windows = [g.window for g in geometries]
        weights = [context.exact.float64(conv.weight) for conv in convs]
        biases = [context.exact.float64(conv.bias) for conv in convs if conv.bias is not None]
        bias64 = sum(biases, np.zeros(channels))
        has_bias = any(conv.bias is not None for conv in convs)
        batchnorm, scale, assumes = None, None, frozenset()
        identity = next((branch for branch in branches.branches if branch.layer is None), None)
        if identity is not None:
            mapped = _identity(context, branches, identity, reference, geometry)
            if isinstance(mapped, Refusal):
                return mapped
            scale, shift, batchnorm, assumes = mapped
            if shift is not None:
                bias64, has_bias = bias64 + shift, True
        merged = merge_branch_kernels(
            weights, windows, geometry.dilations, identity_scale=scale, groups=reference.groups
        )
        if isinstance(merged, str):
            return Refusal(Reason.BRANCHES_INCOMPATIBLE, merged)
        window, weight64 = merged
        padding = _torch_padding(window, geometry)
        if isinstance(padding, Refusal):
            return padding
        weight = _rounded(weight64, reference.weight, context.exact)
        bias = _rounded(bias64, reference.weight, context.exact) if has_bias else None
        if weight is None or (has_bias and bias is None):
            detail = f"the merged weight or bias overflows {reference.weight.dtype}"
            return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, detail)
        position = {node: index for index, node in enumerate(context.graph_module.graph.nodes)}
        carrier = min(convs, key=lambda conv: position[conv.node])
        removed = [conv for conv in convs if conv is not carrier]
        return BranchMatch(
            branches, carrier, removed, batchnorm, weight, bias, window.kernel, padding, assumes
        )

    def apply(self, context: FoldContext, match: BranchMatch) -> str:  # type: ignore[override]
        """The first conv becomes the merged one and takes the add's place; the rest go."""
        graph_module, graph = context.graph_module, context.graph_module.graph
        carrier, add = match.carrier, match.branches.add
        context.assume(match.assumes)
        if carrier.module is not None:
            _replace_module(graph_module, carrier.node.target, _merged_module(carrier, match))
        else:
            write_functional_tensors(context, carrier, match.weight, match.bias)
            _set_padding(carrier.node, match.padding)
        add.replace_all_uses_with(carrier.node)
        graph.erase_node(add)
        for _, chain in match.branches.passed:
            for node in reversed(chain):
                graph.erase_node(node)
        for layer in match.removed:
            layer.node.replace_all_uses_with(carrier.node)  # readers of its shape (the same shape)
            _remove_layer(graph_module, layer)
        if match.batchnorm is not None:
            for output in match.batchnorm.outputs:  # readers of its shape: the source has that shape
                output.replace_all_uses_with(match.branches.source)
            erase_batchnorm(context, match.batchnorm)
        return carrier.name


def _passed_through(
    context: FoldContext, operand: fx.Node, add: fx.Node
) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """(the value ``operand`` passes on unchanged, the pass-through nodes innermost first).

    Each pass-through node must be read only by the next one (the last by ``add``).
    """
    chain: list[fx.Node] = []
    node, reader = operand, add
    while isinstance(node, fx.Node) and set(node.users) == {reader}:
        inner = _pass_through_input(context, node)
        if inner is None:
            break
        chain.append(node)
        node, reader = inner, node
    return node, tuple(reversed(chain))


def _pass_through_input(context: FoldContext, node: fx.Node) -> fx.Node | None:
    """The input a node returns unchanged (``nn.Identity``, eval dropout, ``t + 0``), else None."""
    if node.op == "call_module":
        module = context.graph_module.get_submodule(str(node.target))
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


def _readings(context: FoldContext, node: fx.Node) -> list[tuple[fx.Node, Branch]]:
    """(source, branch) ways to read an operand: as a conv or BN of its input, then as itself."""
    readings = []
    layer = _layer(context, node)
    if isinstance(layer, Layer) and layer.kind == "conv":
        source = node.args[0] if node.op == "call_module" else bind(node).get("input")
        if isinstance(source, fx.Node):
            readings.append((source, Branch(node, layer=layer)))
    norm = _batchnorm_of(context, node)
    if norm is not None:
        source = _norm_input(norm)
        if isinstance(source, fx.Node):
            readings.append((source, Branch(node, norm=norm)))
    readings.append((node, Branch(node)))
    return readings


def _batchnorm_of(context: FoldContext, node: fx.Node) -> NormCall | None:
    """The BN whose normalized output ``node`` is (the call, or ``getitem(call, 0)`` of a tuple one)."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1:] == (0,):
        call_node = node.args[0]
        if not isinstance(call_node, fx.Node) or not returns_tuple(call_node):
            return None
    elif returns_tuple(node):
        return None
    else:
        call_node = node
    call = identify(context, call_node)
    return call if call is not None and call.kind == "batchnorm" else None


def _norm_input(norm: NormCall) -> Any:
    if norm.module is not None:
        return norm.node.args[0] if norm.node.args else None
    return bind(norm.node).get("input")


def _conv_refusal(context: FoldContext, add: fx.Node, layer: Layer) -> Refusal | None:
    """Why this conv branch cannot be edited: other readers, sharing, hooks, run-time or odd weights."""
    refusal = sole_reader_refusal(layer, add) or editable_layer_refusal(context, layer)
    if refusal:
        return refusal
    padding_mode = getattr(layer.module, "padding_mode", "zeros")
    if padding_mode != "zeros":
        detail = f"`{layer.name}` has padding_mode={padding_mode!r}; only zero padding merges"
        return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
    return None


def _geometry(layer: Layer) -> _Geometry | Refusal:
    """Strides, dilations and the window of a conv, module or functional, any spelling of its options."""
    rank, kernel = layer.spatial_dims, tuple(layer.weight.shape[2:])
    if layer.module is not None:
        stride, padding, dilation = layer.module.stride, layer.module.padding, layer.module.dilation
    else:
        arguments = bind(layer.node)
        stride, padding = arguments.get("stride", 1), arguments.get("padding", 0)
        dilation = arguments.get("dilation", 1)
    strides, dilations = _expand(stride, rank), _expand(dilation, rank)
    if strides is None or dilations is None or min(strides + dilations) < 1:
        detail = f"`{layer.name}` has stride {stride}, dilation {dilation}"
        return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
    if padding == "valid":
        pads = (0,) * rank
        window = ConvWindow(kernel, pads, pads)
    elif padding == "same":
        # torch pads d * (k - 1) in all, the odd one at the end (as ONNX's SAME_UPPER).
        totals = [d * (k - 1) for k, d in zip(kernel, dilations, strict=True)]
        window = ConvWindow(kernel, tuple(t // 2 for t in totals), tuple(t - t // 2 for t in totals))
    else:
        pads = _expand(padding, rank)
        if pads is None or min(pads, default=0) < 0:
            return Refusal(Reason.BRANCHES_INCOMPATIBLE, f"`{layer.name}` has padding {padding!r}")
        window = ConvWindow(kernel, pads, pads)
    return _Geometry(strides, dilations, window)


def _expand(value: Any, rank: int) -> tuple[int, ...] | None:
    """An int or a list of ints as one int per spatial axis; None for anything else (run-time values)."""
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not all(isinstance(item, int) and not isinstance(item, bool) for item in values):
        return None
    if len(values) == 1:
        return values * rank
    return values if len(values) == rank else None


def _compatibility_refusal(convs: list[Layer], geometries: list[_Geometry]) -> Refusal | None:
    """Why conv branches cannot be one conv: each of these must agree."""
    if len(convs) < 2:
        return None
    (first, second), (one, other) = convs, geometries
    checks = (
        ("dtypes", first.weight.dtype, second.weight.dtype),
        ("devices", first.weight.device, second.weight.device),
        ("weight ranks", first.weight.dim(), second.weight.dim()),
        ("strides", one.strides, other.strides),
        ("dilations", one.dilations, other.dilations),
        ("groups", first.groups, second.groups),
        ("output channels", first.weight.shape[0], second.weight.shape[0]),
        ("input channels per group", first.weight.shape[1], second.weight.shape[1]),
    )
    for what, left, right in checks:
        if left != right:
            detail = f"{what} differ: {_shown(left)} (`{first.name}`) and {_shown(right)} (`{second.name}`)"
            return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
    return None


def _mutation_refusal(context: FoldContext, branches: Branches) -> Refusal | None:
    """The merged conv reads the source once, where the first branch did: refuse an in-place write
    into the source between the first and the last branch that reads it (the add, for ``x`` itself)."""
    reads = []
    for branch in branches.branches:
        if branch.layer is not None:
            reads.append(branch.layer.node)
        elif branch.norm is not None:
            reads.append(branch.norm.node)
        else:
            reads.append(branches.add)  # ``x`` itself is read by the add
    return mutation_refusal(context, branches.source, reads, f"the branches of `{branches.add.name}`")


def _identity(
    context: FoldContext, branches: Branches, identity: Branch, conv: Layer, geometry: _Geometry
) -> tuple[np.ndarray, np.ndarray | None, BatchNorm | None, frozenset[str]] | Refusal:
    """The identity branch's per-channel (scale, shift) and its BN: a BN's map, or (1, none) for ``x``;
    and the graph inputs whose example rank that relies on."""
    channels = conv.weight.shape[0]
    if any(stride != 1 for stride in geometry.strides):
        detail = f"`{conv.name}` has stride {_shown(geometry.strides)}; an identity branch has stride 1"
        return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
    if conv.weight.shape[1] * conv.groups != channels:
        detail = (
            f"`{conv.name}` maps {conv.weight.shape[1] * conv.groups} channels to {channels}; "
            "an identity keeps them"
        )
        return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
    if identity.norm is None:
        return np.ones(channels), None, None, frozenset()
    batchnorm = read_batchnorm(context, identity.norm)
    if isinstance(batchnorm, Refusal):
        return batchnorm
    refusal = batchnorm_refusal(context, batchnorm)
    if refusal:
        return refusal
    reader = branches.reader_of(identity.node)
    readers = [user for user in value_readers_of(batchnorm) if user is not reader]
    if readers or identity.node not in batchnorm.outputs:
        where = "is returned" if any(user.op == "output" for user in readers) else "is also read elsewhere"
        return Refusal(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"the output of `{identity.norm.name}` {where}")
    refusal = statistics_dtype_refusal(batchnorm) or _channel_refusal(batchnorm, conv, channels, "output")
    if refusal:
        return refusal
    # The BN normalizes the source's axis 1; the conv reads channels there only when it is batched.
    assumes = channels_on_axis_one(context, batchnorm, branches.source, conv, "input")
    if isinstance(assumes, Refusal):
        return assumes
    affine = _affine(batchnorm, channels)
    if isinstance(affine, Refusal):
        return affine
    # As in conv-bn: a scale the weight dtype cannot hold is degenerate even where sums would fit.
    if _rounded(affine.scale, conv.weight) is None:
        detail = f"the scale of `{identity.norm.name}` overflows {conv.weight.dtype}"
        return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, detail)
    return affine.scale, affine.shift, batchnorm, assumes


def _torch_padding(window: ConvWindow, geometry: _Geometry) -> tuple[int, ...] | str | Refusal:
    """The merged window's pads as a torch conv's ``padding``: equal at both ends, or ``"same"``."""
    if window.pads_begin == window.pads_end:
        return window.pads_begin
    totals = [d * (k - 1) for k, d in zip(window.kernel, geometry.dilations, strict=True)]
    same = tuple(t // 2 for t in totals), tuple(t - t // 2 for t in totals)
    if all(stride == 1 for stride in geometry.strides) and (window.pads_begin, window.pads_end) == same:
        return "same"
    detail = (
        f"the merged kernel {list(window.kernel)} needs pads {list(window.pads_begin)} before and "
        f"{list(window.pads_end)} after, which a torch conv cannot express"
    )
    return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)


def _merged_module(carrier: Layer, match: BranchMatch) -> nn.Module:
    """A new plain ``nn.Conv1d/2d/3d`` holding the merged kernel (built on ``meta``: no initialization)."""
    module, weight = carrier.module, match.weight
    merged = _CONV_CLASSES[carrier.spatial_dims](
        module.in_channels,
        module.out_channels,
        match.kernel,
        stride=module.stride,
        padding=match.padding,
        dilation=module.dilation,
        groups=module.groups,
        bias=match.bias is not None,
        device="meta",
        dtype=weight.dtype,
    )
    requires_grad = module.weight.requires_grad
    merged.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if match.bias is not None:
        merged.bias = nn.Parameter(match.bias, requires_grad=requires_grad)
    merged.train(module.training)
    return merged


def _set_padding(node: fx.Node, padding: tuple[int, ...] | str) -> None:
    """Write the merged padding into a functional conv call (an ATen call gets the overload that takes it)."""
    if isinstance(node.target, torch._ops.OpOverload):
        packet = node.target.overloadpacket
        node.target = packet.padding if isinstance(padding, str) else packet.default
        padding = padding if isinstance(padding, str) else list(padding)
    names = argument_names(node.target)
    _set_argument(node, names.index("padding"), "padding", padding)


def _remove_layer(graph_module: fx.GraphModule, layer: Layer) -> None:
    """Erase a merged-away conv call; its module (or tensors) go when nothing else uses them."""
    graph = graph_module.graph
    graph.erase_node(layer.node)
    if layer.module is not None:
        drop_unused_owner(graph_module, layer.node.target, ("weight", "bias"))
        return
    attributes = [
        argument
        for argument in (layer.weight_arg, layer.bias_arg)
        if isinstance(argument, fx.Node) and argument.op == "get_attr"
    ]
    for argument in attributes:
        if not argument.users and not getattr(argument, "_erased", False):
            graph.erase_node(argument)
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    for argument in attributes:
        owner, _, name = argument.target.rpartition(".")
        if owner:
            drop_unused_owner(graph_module, owner, (name,))
        elif name not in read:
            graph_module._parameters.pop(name, None)
            graph_module._buffers.pop(name, None)


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
