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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.affine import ConvWindow
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.folds import merge_branches, require_scale_fits
from bnfold.fx.branch_reading import Branch, Branches, read_branches
from bnfold.fx.checks import (
    batchnorm_map,
    channels_on_axis_one,
    require_channel_count,
    require_editable,
    require_float_statistics,
    require_no_write_between,
    require_not_shared,
    require_sole_reader,
)
from bnfold.fx.nodes import argument_names, bind
from bnfold.fx.reading import BatchNorm, Layer, read_batchnorm, value_readers_of
from bnfold.fx.state import numpy_dtype
from bnfold.fx.view import FxView
from bnfold.fx.writing import (
    drop_unused_owner,
    erase_batchnorm,
    replace_module,
    set_argument,
    write_functional_tensors,
)
from bnfold.report import Reason

__all__ = ["BranchMerge", "BranchPlan"]

aten = torch.ops.aten
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass
class BranchPlan:
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


class BranchMerge:
    """``add`` of Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet, MobileOne)."""

    name = "branch-merge"
    site = Branches

    def find(self, view: FxView, node: fx.Node) -> Branches | None:
        return read_branches(view, node)

    def plan(self, view: FxView, branches: Branches) -> BranchPlan:
        convs: list[Layer] = []
        geometries: list[_Geometry] = []
        for branch in branches.branches:
            if branch.layer is None:
                continue
            _require_mergeable(view, branches.reader_of(branch.layer.node), branch.layer)
            convs.append(branch.layer)
            geometries.append(_geometry(branch.layer))
        _require_compatible(convs, geometries)
        _require_no_write(view, branches)
        reference, geometry = convs[0], geometries[0]
        identity_map, batchnorm, assumes = None, None, frozenset()
        identity = next((branch for branch in branches.branches if branch.layer is None), None)
        if identity is not None:
            scale, shift, batchnorm, assumes = _identity(view, branches, identity, reference, geometry)
            identity_map = (scale, shift)
        window, weight, bias = merge_branches(
            [view.exact.array(conv.weight) for conv in convs],
            [view.exact.array(conv.bias) if conv.bias is not None else None for conv in convs],
            [g.window for g in geometries],
            geometry.dilations,
            groups=reference.groups,
            identity=identity_map,
            keep_exact=True,
        )
        padding = _torch_padding(window, geometry)
        position = {node: index for index, node in enumerate(view.graph_module.graph.nodes)}
        carrier = min(convs, key=lambda conv: position[conv.node])
        removed = [conv for conv in convs if conv is not carrier]
        new_weight = view.exact.tensor(weight, reference.weight)
        new_bias = view.exact.tensor(bias, reference.weight) if bias is not None else None
        return BranchPlan(
            branches, carrier, removed, batchnorm, new_weight, new_bias, window.kernel, padding, assumes
        )

    def apply(self, view: FxView, plan: BranchPlan) -> Applied:
        """The first conv becomes the merged one and takes the add's place; the rest go."""
        graph_module, graph = view.graph_module, view.graph_module.graph
        carrier, add = plan.carrier, plan.branches.add
        view.assume(plan.assumes)
        if carrier.module is not None:
            replace_module(graph_module, carrier.node.target, _merged_module(carrier, plan))
        else:
            write_functional_tensors(view, carrier, plan.weight, plan.bias)
            _set_padding(carrier.node, plan.padding)
        add.replace_all_uses_with(carrier.node)
        graph.erase_node(add)
        for _, chain in plan.branches.passed:
            for node in reversed(chain):
                graph.erase_node(node)
        for layer in plan.removed:
            layer.node.replace_all_uses_with(carrier.node)  # readers of its shape (the same shape)
            _remove_layer(graph_module, layer)
        if plan.batchnorm is not None:
            for output in plan.batchnorm.outputs:  # readers of its shape: the source has that shape
                output.replace_all_uses_with(plan.branches.source)
            erase_batchnorm(view, plan.batchnorm)
        view.refresh()
        return Applied(carrier.name)


@dataclass(frozen=True)
class _Geometry:
    """A conv branch's stride, dilation and the window it reads, resolved to explicit values."""

    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    window: ConvWindow


def _require_mergeable(view: FxView, add: fx.Node, layer: Layer) -> None:
    """Why this conv branch cannot be edited: other readers, sharing, hooks, run-time or odd weights."""
    require_sole_reader(layer, add)
    require_editable(view, layer)
    padding_mode = getattr(layer.module, "padding_mode", "zeros")
    if padding_mode != "zeros":
        detail = f"`{layer.name}` has padding_mode={padding_mode!r}; only zero padding merges"
        raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
    return None


def _geometry(layer: Layer) -> _Geometry:
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
        raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
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
            raise Refuse(Reason.BRANCHES_INCOMPATIBLE, f"`{layer.name}` has padding {padding!r}")
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


def _require_compatible(convs: list[Layer], geometries: list[_Geometry]) -> None:
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
            raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
    return None


def _require_no_write(view: FxView, branches: Branches) -> None:
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
    require_no_write_between(view, branches.source, reads, f"the branches of `{branches.add.name}`")


def _identity(
    view: FxView, branches: Branches, identity: Branch, conv: Layer, geometry: _Geometry
) -> tuple[np.ndarray, np.ndarray | None, BatchNorm | None, frozenset[str]]:
    """The identity branch's per-channel (scale, shift) and its BN: a BN's map, or (1, none) for ``x``;
    and the graph inputs whose example rank that relies on."""
    channels = conv.weight.shape[0]
    if any(stride != 1 for stride in geometry.strides):
        detail = f"`{conv.name}` has stride {_shown(geometry.strides)}; an identity branch has stride 1"
        raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
    if conv.weight.shape[1] * conv.groups != channels:
        detail = (
            f"`{conv.name}` maps {conv.weight.shape[1] * conv.groups} channels to {channels}; "
            "an identity keeps them"
        )
        raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
    if identity.norm is None:
        return np.ones(channels), None, None, frozenset()
    batchnorm = read_batchnorm(view, identity.norm)
    require_not_shared(view, batchnorm)
    reader = branches.reader_of(identity.node)
    readers = [user for user in value_readers_of(batchnorm) if user is not reader]
    if readers or identity.node not in batchnorm.outputs:
        where = "is returned" if any(user.op == "output" for user in readers) else "is also read elsewhere"
        raise Refuse(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"the output of `{identity.norm.name}` {where}")
    require_float_statistics(batchnorm)
    require_channel_count(batchnorm, conv, channels, "output")
    # The BN normalizes the source's axis 1; the conv reads channels there only when it is batched.
    assumes = channels_on_axis_one(view, batchnorm, branches.source, conv, "input")
    affine = batchnorm_map(batchnorm, channels)
    # As in conv-bn: a scale the weight dtype cannot hold is degenerate even where sums would fit.
    require_scale_fits(affine, numpy_dtype(conv.weight.dtype), f"the scale of `{identity.norm.name}`")
    return affine.scale, affine.shift, batchnorm, assumes


def _torch_padding(window: ConvWindow, geometry: _Geometry) -> tuple[int, ...] | str:
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
    raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)


def _merged_module(carrier: Layer, match: BranchPlan) -> nn.Module:
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
    set_argument(node, names.index("padding"), "padding", padding)


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
