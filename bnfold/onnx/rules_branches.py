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

Refuses (an Add is not reported; an identity-branch BN is kept with the reason): a branch output
read elsewhere or a graph output; weights not constant; strides, dilations, groups, channel counts
or dtypes that differ; pads that do not line up, ``auto_pad=SAME_*`` with a stride above 1 (its
pads depend on the input size); an identity branch next to a strided conv or one whose output
channels are not its input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bnfold.affine import ConvWindow, as_float64, merge_branch_kernels, round_to_dtype
from bnfold.onnx.batchnorm import BATCHNORM, BatchNormParams, Refusal, read_batchnorm
from bnfold.onnx.graph import DEFAULT_DOMAINS, GraphIndex
from bnfold.onnx.rules import Rule, _attribute, _constant_input, _set_attribute, _sole_consumer_refusal
from bnfold.report import Reason

__all__ = ["Branch", "Branches", "BranchMatch", "BranchMerge"]

CONV = "Conv"


@dataclass(frozen=True)
class Branch:
    """One input of the Add: a Conv of ``x``, a BN of ``x`` (identity branch), or ``x`` itself (node None)."""

    tensor: str
    node: NodeProto | None

    @property
    def is_conv(self) -> bool:
        return self.node is not None and self.node.op_type == CONV


@dataclass(frozen=True)
class Branches:
    """The two branches an Add sums, both reading ``source``; at least one is a Conv."""

    source: str
    branches: tuple[Branch, Branch]

    @property
    def identity_bn(self) -> NodeProto | None:
        """The identity branch's BN, which the report accounts for, if there is one."""
        return next(
            (b.node for b in self.branches if b.node is not None and b.node.op_type == BATCHNORM), None
        )


@dataclass
class BranchMatch:
    """The merged conv: which Conv node carries it, its new weight, bias and attributes; what goes."""

    conv: NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    attributes: dict[str, list[int]]
    removed: list[NodeProto]


@dataclass(frozen=True)
class _ConvBranch:
    """A Conv branch's constants and geometry, attributes resolved to explicit values."""

    node: NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    groups: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    window: ConvWindow


class BranchMerge(Rule):
    """``Add`` of Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet, MobileOne)."""

    name = "branch-merge"
    op_types = (CONV,)
    side = "branches"
    absorbs = ("Add",)
    description = "Add of parallel Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet)"

    def read_branches(self, graph: GraphIndex, add: NodeProto) -> Branches | None:
        """The Add's two inputs as branches of one tensor, or None when it is not such an Add.

        A Conv or BN input is read as a branch of its own input, else as an identity branch (the
        tensor itself): ``Add(Conv(x), x)`` pairs a Conv of ``x`` with ``x``.
        """
        if add.domain not in DEFAULT_DOMAINS or add.op_type not in self.absorbs or len(add.input) != 2:
            return None
        first, second = add.input
        if not first or first == second or any(graph.constant(name).is_constant for name in add.input):
            return None
        for one in self._readings(graph, first):
            for other in self._readings(graph, second):
                if one[0] == other[0] and (one[1].is_conv or other[1].is_conv):
                    return Branches(one[0], (one[1], other[1]))
        return None

    @staticmethod
    def _readings(graph: GraphIndex, tensor: str) -> list[tuple[str, Branch]]:
        """(source, branch) ways to read ``tensor``: as a Conv or BN of its input, then as itself."""
        node = graph.producer.get(tensor)
        readings = []
        if node is not None and node.domain in DEFAULT_DOMAINS and node.op_type in (CONV, BATCHNORM):
            if node.input and node.input[0] and node.output[0] == tensor:
                readings.append((node.input[0], Branch(tensor, node)))
        readings.append((tensor, Branch(tensor, None)))
        return readings

    def match(self, graph: GraphIndex, add: NodeProto, branches: Branches) -> BranchMatch | Refusal:
        convs: list[_ConvBranch] = []
        for branch in branches.branches:
            if branch.is_conv:
                conv = self._conv_branch(graph, add, branch.node)
                if isinstance(conv, Refusal):
                    return conv
                convs.append(conv)
        refusal = self._compatibility_refusal(convs)
        if refusal:
            return refusal
        reference = convs[0]
        windows, weights = [conv.window for conv in convs], [conv.weight for conv in convs]
        bias64 = sum(
            (as_float64(conv.bias) for conv in convs if conv.bias is not None),
            np.zeros(reference.weight.shape[0]),
        )
        has_bias = any(conv.bias is not None for conv in convs)
        identity = next((b for b in branches.branches if not b.is_conv), None)
        scale = None
        if identity is not None:
            scaled = self._identity(graph, add, identity, reference)
            if isinstance(scaled, Refusal):
                return scaled
            scale, shift = scaled
            if shift is not None:
                bias64, has_bias = bias64 + shift, True
        merged = merge_branch_kernels(
            weights, windows, reference.dilations, identity_scale=scale, groups=reference.groups
        )
        if isinstance(merged, str):
            return Refusal(Reason.BRANCHES_INCOMPATIBLE, merged)
        window, weight64 = merged
        dtype = reference.weight.dtype
        again = graph.may_fold_again(add.output[0])
        new_weight = round_to_dtype(weight64, dtype, keep_exact=again)
        new_bias = round_to_dtype(bias64, dtype, keep_exact=again) if has_bias else None
        if new_weight is None or (has_bias and new_bias is None):
            return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, f"merged weight or bias overflows {dtype.name}")
        first = min((conv.node for conv in convs), key=lambda node: graph.position[id(node)])
        # Only what changes is written: the pads (explicit once auto_pad goes) and a declared kernel_shape.
        attributes: dict[str, list[int]] = {}
        pads = [*window.pads_begin, *window.pads_end]
        if (
            _attribute(first, "auto_pad", None) is not None
            or list(_attribute(first, "pads", [0] * len(pads))) != pads
        ):
            attributes["pads"] = pads
        declared = _attribute(first, "kernel_shape", None)
        if declared is not None and list(declared) != list(window.kernel):
            attributes["kernel_shape"] = list(window.kernel)
        removed = [b.node for b in branches.branches if b.node is not None and b.node is not first]
        return BranchMatch(first, new_weight, new_bias, attributes, removed)

    def apply(self, graph: GraphIndex, add: NodeProto, match: BranchMatch) -> NodeProto:
        """The first Conv becomes the merged one and takes over the Add's output; the rest go."""
        conv = match.conv
        label = conv.name or CONV
        graph.set_constant_input(conv, 1, match.weight, f"{label}_merged_weight")
        if match.bias is not None:
            graph.set_constant_input(conv, 2, match.bias, f"{label}_merged_bias")
        _remove_attribute(conv, "auto_pad")  # the merged pads are explicit
        for name, value in match.attributes.items():
            _set_attribute(conv, name, value)
        for node in match.removed:
            graph.remove_node(node)
        graph.remove_node(add)
        graph.take_over_output(conv, 0, add.output[0])
        return conv

    def _conv_branch(self, graph: GraphIndex, add: NodeProto, conv: NodeProto) -> _ConvBranch | Refusal:
        refusal = _sole_consumer_refusal(graph, conv.output[0], add)
        if refusal:
            return refusal
        weight = _constant_input(graph, conv, 1, "weight")
        if weight is None or isinstance(weight, Refusal):
            return weight or Refusal(Reason.WEIGHT_NOT_CONSTANT, f"{graph.node_label(conv)} has no weight")
        bias = _constant_input(graph, conv, 2, "bias")
        if isinstance(bias, Refusal):
            return bias
        groups = int(_attribute(conv, "group", 1))
        if weight.ndim < 3 or groups < 1 or weight.shape[0] % groups:
            detail = f"weight shape {list(weight.shape)} with group={groups}"
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, detail)
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
            detail = f"bias shape {list(bias.shape)} ({bias.dtype.name}), weight {list(weight.shape)}"
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, detail)
        rank = weight.ndim - 2
        strides = tuple(int(v) for v in _attribute(conv, "strides", [1] * rank))
        dilations = tuple(int(v) for v in _attribute(conv, "dilations", [1] * rank))
        if len(strides) != rank or len(dilations) != rank or min(strides + dilations) < 1:
            detail = f"strides {list(strides)}, dilations {list(dilations)} for a rank-{rank} kernel"
            return Refusal(Reason.PARAM_SHAPE_MISMATCH, detail)
        pads = _explicit_pads(conv, weight.shape[2:], strides, dilations)
        if isinstance(pads, Refusal):
            return pads
        window = ConvWindow(tuple(weight.shape[2:]), pads[:rank], pads[rank:])
        return _ConvBranch(conv, weight, bias, groups, strides, dilations, window)

    @staticmethod
    def _compatibility_refusal(convs: list[_ConvBranch]) -> Refusal | None:
        """Why Conv branches cannot be one Conv: each of these must agree."""
        if len(convs) < 2:
            return None
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
                return Refusal(
                    Reason.BRANCHES_INCOMPATIBLE, f"{what} differ: {_shown(one)} and {_shown(other)}"
                )
        return None

    def _identity(
        self, graph: GraphIndex, add: NodeProto, identity: Branch, conv: _ConvBranch
    ) -> tuple[np.ndarray, np.ndarray | None] | Refusal:
        """The identity branch's per-channel (scale, shift): a BN's map, or (1, none) for ``x`` itself."""
        channels = conv.weight.shape[0]
        if any(stride != 1 for stride in conv.strides):
            detail = f"strides differ: {_shown(conv.strides)} and 1 (identity)"
            return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
        if conv.weight.shape[1] * conv.groups != channels:
            detail = (
                f"{graph.node_label(conv.node)} maps {conv.weight.shape[1] * conv.groups} channels "
                f"to {channels}; an identity keeps them"
            )
            return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
        bn = identity.node
        if bn is None:
            return np.ones(channels), None
        output = bn.output[0]
        if graph.is_graph_output(output) or graph.other_consumers(output, add):
            return Refusal(Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS, f"`{output}` is also read elsewhere")
        params = read_batchnorm(graph, bn)
        if isinstance(params, Refusal):
            return params
        return _bn_map(params, channels, conv.weight.dtype)


def _bn_map(
    params: BatchNormParams, channels: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray] | Refusal:
    if params.channels != channels:
        detail = f"conv has {channels} output channels, BatchNormalization has {params.channels}"
        return Refusal(Reason.PARAM_SHAPE_MISMATCH, detail)
    # As in conv-bn: a scale the weight dtype cannot hold is degenerate even where sums would fit.
    if round_to_dtype(params.affine.scale, dtype) is None:
        return Refusal(Reason.FOLD_OVERFLOWS_DTYPE, f"BatchNormalization scale overflows {dtype.name}")
    return params.affine.scale, params.affine.shift


def _explicit_pads(
    conv: NodeProto, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]
) -> tuple[int, ...] | Refusal:
    """``[begin..., end...]`` pads for any ``auto_pad``; SAME_* with a stride above 1 is refused."""
    rank = len(kernel)
    auto_pad = _attribute(conv, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(stride != 1 for stride in strides):
            detail = f"auto_pad={auto_pad} with strides {list(strides)}: its pads depend on the input size"
            return Refusal(Reason.BRANCHES_INCOMPATIBLE, detail)
        # Stride 1: the output keeps the input size, d * (k - 1) pads in all, the odd one at the end
        # (SAME_UPPER) or at the beginning (SAME_LOWER).
        totals = [dilation * (size - 1) for size, dilation in zip(kernel, dilations, strict=True)]
        small, large = [total // 2 for total in totals], [total - total // 2 for total in totals]
        return tuple(small + large) if auto_pad == "SAME_UPPER" else tuple(large + small)
    pads = tuple(int(v) for v in _attribute(conv, "pads", [0] * (2 * rank)))
    if len(pads) != 2 * rank or min(pads) < 0:
        return Refusal(Reason.PARAM_SHAPE_MISMATCH, f"pads {list(pads)} for a rank-{rank} kernel")
    return pads


def _remove_attribute(node: NodeProto, name: str) -> None:
    for position, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[position]
            return


def _shown(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
