"""Parallel branches of one input summed by ``Add``, merged into one Conv (structural re-parameterization).

RepVGG, ACNet and MobileOne train blocks of parallel branches that read the same input ``x`` and are
summed: ``Conv_3x3(x) -> BN``, ``Conv_1x1(x) -> BN`` (ACNet: ``1x3`` and ``3x1``; MobileOne: several
``k x k``), and an identity branch ``BN(x)``. Once conv-bn has folded each branch's BN, the block is
``Add(Conv_a(x), Conv_b(x))`` (chained for more branches). A convolution is linear in its weight, so
convolutions of one input with the same strides, dilations and groups sum to one convolution whose
kernel is the sum of theirs, each zero-padded into a common window (``bnfold.affine.merge_windows``
says when the windows line up). An identity branch is a 1-tap Dirac kernel (scaled by the BN's
``scale``, the BN's ``shift`` added to the bias); in a grouped conv channel ``c`` is in-group index
``c mod (C / groups)``. Everything is summed in float64 and rounded once into the weight's dtype.

    Before:  x -+- Conv(Wa, ba) -+- Add -> y        After:  x - Conv(Wa' + Wb' + s*I, ba + bb + t) -> y
                +- Conv(Wb, bb) -+
                +- BN(s, t) -----+  (an identity branch; or x itself: s = 1, t = 0)

Refuses (an Add is not reported; an identity-branch BN is kept with the reason; the arithmetic is
:func:`bnfold.folds.merge_branches`): a branch output
read elsewhere or a graph output; weights not constant; strides, dilations, groups, channel counts
or dtypes that differ; pads that do not line up, ``auto_pad=SAME_*`` with a stride above 1 (its
pads depend on the input size); an identity branch next to a strided conv or one whose output
channels are not its input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bnfold.affine import ConvWindow, is_supported_float
from bnfold.core.protocol import Applied
from bnfold.core.refuse import Refuse
from bnfold.core.sites import Branch, ParallelBranches
from bnfold.folds import merge_branches, require_channels, require_scale_fits
from bnfold.onnx.batchnorm import BATCHNORM
from bnfold.onnx.checks import constant_input, require_sole_reader, required_constant_input
from bnfold.onnx.nodes import attribute, auto_pad, is_op, remove_attribute, set_attribute
from bnfold.onnx.view import OnnxView
from bnfold.report import Reason

__all__ = ["BranchMerge", "BranchPlan"]

CONV = "Conv"


@dataclass
class BranchPlan:
    """The merged conv: which Conv node carries it, its new weight, bias and attributes; what goes."""

    add: NodeProto
    conv: NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    attributes: dict[str, list[int]]
    removed: list[NodeProto]


@dataclass(frozen=True)
class ConvBranch:
    """A Conv branch's constants and geometry, attributes resolved to explicit values."""

    node: NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    groups: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    window: ConvWindow


class BranchMerge:
    """``Add`` of Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet, MobileOne)."""

    name = "branch-merge"
    site = ParallelBranches

    def find(self, view: OnnxView, add: NodeProto) -> ParallelBranches | None:
        """The Add's two inputs as branches of one tensor, or None when it is not such an Add.

        A Conv or BN input is read as a branch of its own input, else as an identity branch (the
        tensor itself): ``Add(Conv(x), x)`` pairs a Conv of ``x`` with ``x``.
        """
        if not is_op(add, "Add") or len(add.input) != 2:
            return None
        first, second = add.input
        if not first or first == second or any(view.constant(name).is_constant for name in add.input):
            return None
        for one in _readings(view, first):
            for other in _readings(view, second):
                if one[0] == other[0] and (one[1].is_layer or other[1].is_layer):
                    branches = (one[1], other[1])
                    identity_bn = next(
                        (b.node for b in branches if b.node is not None and is_op(b.node, BATCHNORM)), None
                    )
                    return ParallelBranches(
                        add=add, source=one[0], branches=branches, identity_norm=identity_bn
                    )
        return None

    def plan(self, view: OnnxView, site: ParallelBranches) -> BranchPlan:
        add = site.add
        convs = []
        for branch in site.branches:
            _require_sole_readers(view, branch, add)
            if branch.is_layer:
                convs.append(_conv_branch(view, branch.node))
        _require_compatible(convs)
        reference = convs[0]
        identity = next((b for b in site.branches if not b.is_layer), None)
        identity_map = _identity(view, add, identity, reference) if identity is not None else None
        offset = _offset(view, site.branches, reference.weight.ndim, reference.weight.shape[0])
        window, new_weight, new_bias = merge_branches(
            [conv.weight for conv in convs],
            [conv.bias for conv in convs],
            [conv.window for conv in convs],
            reference.dilations,
            groups=reference.groups,
            identity=identity_map,
            offset=offset,
            keep_exact=view.may_fold_again(add.output[0]),
        )
        first = min((conv.node for conv in convs), key=lambda node: view.position[id(node)])
        # Only what changes is written: the pads (explicit once auto_pad goes) and a declared kernel_shape.
        attributes: dict[str, list[int]] = {}
        pads = [*window.pads_begin, *window.pads_end]
        if (
            attribute(first, "auto_pad", None) is not None
            or list(attribute(first, "pads", [0] * len(pads))) != pads
        ):
            attributes["pads"] = pads
        declared = attribute(first, "kernel_shape", None)
        if declared is not None and list(declared) != list(window.kernel):
            attributes["kernel_shape"] = list(window.kernel)
        removed = [b.node for b in site.branches if b.node is not None and b.node is not first]
        removed += [offset for branch in site.branches for offset in branch.offsets]
        return BranchPlan(add, first, new_weight, new_bias, attributes, removed)

    def apply(self, view: OnnxView, plan: BranchPlan) -> Applied:
        """The first Conv becomes the merged one and takes over the Add's output; the rest go."""
        conv = plan.conv
        label = conv.name or CONV
        view.set_constant_input(conv, 1, plan.weight, f"{label}_merged_weight")
        if plan.bias is not None:
            view.set_constant_input(conv, 2, plan.bias, f"{label}_merged_bias")
        remove_attribute(conv, "auto_pad")  # the merged pads are explicit
        for name, value in plan.attributes.items():
            set_attribute(conv, name, value)
        for node in plan.removed:
            view.remove_node(node)
        view.remove_node(plan.add)
        view.take_over_output(conv, 0, plan.add.output[0])
        return Applied(conv)


def _readings(view: OnnxView, tensor: str) -> list[tuple[str, Branch]]:
    """(source, branch) ways to read ``tensor``: as a Conv or BN of its input, or that input itself,
    behind any ``Add`` nodes of a constant (``offsets``); then as ``tensor`` itself."""
    offsets: list[NodeProto] = []
    current = tensor
    node = view.producer.get(current)
    while node is not None and is_op(node, "Add") and node.output[0] == current:
        data = _constant_add_data(view, node)
        if data is None:
            break
        offsets.append(node)
        current, node = data, view.producer.get(data)
    offsets.reverse()  # nearest the branch first
    readings = []
    if node is not None and is_op(node, CONV, BATCHNORM):
        if node.input and node.input[0] and node.output[0] == current:
            branch = Branch(current, node, is_layer=node.op_type == CONV, offsets=tuple(offsets))
            readings.append((node.input[0], branch))
    if offsets:
        readings.append((current, Branch(current, None, is_layer=False, offsets=tuple(offsets))))
    readings.append((tensor, Branch(tensor, None, is_layer=False)))
    return readings


def _constant_add_data(view: OnnxView, add: NodeProto) -> str | None:
    """The data input of an ``Add`` whose other input is a constant, or None."""
    if len(add.input) != 2 or not all(add.input):
        return None
    constant = [view.constant(name).is_constant for name in add.input]
    if constant == [False, True]:
        return add.input[0]
    if constant == [True, False]:
        return add.input[1]
    return None


def _require_sole_readers(view: OnnxView, branch: Branch, add: NodeProto) -> None:
    """A conv branch's output, and each constant Add after a branch, must be read only by the next
    node (an identity BN's output is checked with its statistics)."""
    chain = [*branch.offsets, add]
    if branch.is_layer:
        require_sole_reader(view, branch.node.output[0], chain[0])
    for offset, reader in zip(branch.offsets, chain[1:], strict=True):
        require_sole_reader(view, offset.output[0], reader)


def _offset(view: OnnxView, branches: tuple[Branch, ...], rank: int, channels: int) -> np.ndarray | None:
    """The constants the Adds between the branches and the sum add, per output channel (float64), or
    Refuse when one is not one value per channel (or one for all)."""
    total = None
    for branch in branches:
        for add in branch.offsets:
            name = next(name for name in add.input if view.constant(name).is_constant)
            value = view.constant(name).value
            if not is_supported_float(value.dtype):
                raise Refuse(
                    Reason.BRANCHES_INCOMPATIBLE, f"Add {view.node_label(add)} adds a {value.dtype.name}"
                )
            padded = (1,) * (rank - value.ndim) + tuple(value.shape)
            if (
                value.ndim > rank
                or any(size != 1 for axis, size in enumerate(padded) if axis != 1)
                or (padded[1] not in (1, channels))
            ):
                shape = list(value.shape)
                detail = f"Add {view.node_label(add)} adds a constant of shape {shape}, not one per channel"
                raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
            values = np.broadcast_to(np.asarray(value, dtype=np.float64).reshape(-1), (channels,))
            if not np.isfinite(values).all():
                raise Refuse(
                    Reason.NONFINITE_STATISTICS, f"Add {view.node_label(add)} adds a value that is not finite"
                )
            total = values if total is None else total + values
    return total


def _conv_branch(view: OnnxView, conv: NodeProto) -> ConvBranch:
    weight = required_constant_input(view, conv, 1, "weight")
    bias = constant_input(view, conv, 2, "bias")
    groups = int(attribute(conv, "group", 1))
    if weight.ndim < 3 or groups < 1 or weight.shape[0] % groups:
        raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"weight shape {list(weight.shape)} with group={groups}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        detail = f"bias shape {list(bias.shape)} ({bias.dtype.name}), weight {list(weight.shape)}"
        raise Refuse(Reason.PARAM_SHAPE_MISMATCH, detail)
    rank = weight.ndim - 2
    strides = tuple(int(v) for v in attribute(conv, "strides", [1] * rank))
    dilations = tuple(int(v) for v in attribute(conv, "dilations", [1] * rank))
    if len(strides) != rank or len(dilations) != rank or min(strides + dilations) < 1:
        detail = f"strides {list(strides)}, dilations {list(dilations)} for a rank-{rank} kernel"
        raise Refuse(Reason.PARAM_SHAPE_MISMATCH, detail)
    pads = _explicit_pads(conv, weight.shape[2:], strides, dilations)
    window = ConvWindow(tuple(weight.shape[2:]), pads[:rank], pads[rank:])
    return ConvBranch(conv, weight, bias, groups, strides, dilations, window)


def _require_compatible(convs: list[ConvBranch]) -> None:
    """Why Conv branches cannot be one Conv: each of these must agree."""
    if len(convs) < 2:
        return
    first, second = convs
    checks = (
        ("dtypes", first.weight.dtype.name, second.weight.dtype.name),
        ("weight ranks", first.weight.ndim, second.weight.ndim),
        ("strides", first.strides, second.strides),
        ("dilations", first.dilations, second.dilations),
        ("groups", first.groups, second.groups),
        ("output channels", first.weight.shape[0], second.weight.shape[0]),
        ("input channels per group", first.weight.shape[1], second.weight.shape[1]),
    )
    for what, one, other in checks:
        if one != other:
            raise Refuse(Reason.BRANCHES_INCOMPATIBLE, f"{what} differ: {_shown(one)} and {_shown(other)}")


def _identity(
    view: OnnxView, add: NodeProto, identity: Branch, conv: ConvBranch
) -> tuple[np.ndarray, np.ndarray | None]:
    """The identity branch's per-channel (scale, shift): a BN's map, or (1, none) for ``x`` itself."""
    channels = conv.weight.shape[0]
    if any(stride != 1 for stride in conv.strides):
        raise Refuse(Reason.BRANCHES_INCOMPATIBLE, f"strides differ: {_shown(conv.strides)} and 1 (identity)")
    if conv.weight.shape[1] * conv.groups != channels:
        detail = (
            f"{view.node_label(conv.node)} maps {conv.weight.shape[1] * conv.groups} channels "
            f"to {channels}; an identity keeps them"
        )
        raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
    bn = identity.node
    if bn is None:
        return np.ones(channels), None
    output = bn.output[0]
    reader = identity.offsets[0] if identity.offsets else add
    if view.is_graph_output(output) or view.other_consumers(output, reader):
        raise Refuse(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"`{output}` is also read elsewhere")
    params = view.norm_params(bn)
    require_channels(channels, params.channels, "conv has {} output channels")
    # As in conv-bn: a scale the weight dtype cannot hold is degenerate even where sums would fit.
    require_scale_fits(params.affine, conv.weight.dtype)
    return params.affine.scale, params.affine.shift


def _explicit_pads(
    conv: NodeProto, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]
) -> tuple[int, ...]:
    """``[begin..., end...]`` pads for any ``auto_pad``; SAME_* with a stride above 1 is refused."""
    rank = len(kernel)
    padding = auto_pad(conv)
    if padding == "VALID":
        return (0,) * (2 * rank)
    if padding in ("SAME_UPPER", "SAME_LOWER"):
        if any(stride != 1 for stride in strides):
            detail = f"auto_pad={padding} with strides {list(strides)}: its pads depend on the input size"
            raise Refuse(Reason.BRANCHES_INCOMPATIBLE, detail)
        # Stride 1: the output keeps the input size, d * (k - 1) pads in all, the odd one at the end
        # (SAME_UPPER) or at the beginning (SAME_LOWER).
        totals = [dilation * (size - 1) for size, dilation in zip(kernel, dilations, strict=True)]
        small, large = [total // 2 for total in totals], [total - total // 2 for total in totals]
        return tuple(small + large) if padding == "SAME_UPPER" else tuple(large + small)
    pads = tuple(int(v) for v in attribute(conv, "pads", [0] * (2 * rank)))
    if len(pads) != 2 * rank or min(pads) < 0:
        raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"pads {list(pads)} for a rank-{rank} kernel")
    return pads


def _shown(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
