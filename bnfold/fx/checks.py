"""The checks every torch fold makes, as functions that raise :class:`~bnfold.core.refuse.Refuse`.

What may be edited (not shared, no hooks, constant float weights), what reads a layer's output
besides the BN, whether the BN's axis 1 is the layer's channel axis for every input (ranks proven,
see :mod:`bnfold.fx.shapes`), whether an in-place write lies between reads a fold would move (see
:mod:`bnfold.fx.effects`), and the BN's affine map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from bnfold.affine import Affine, batchnorm_affine, statistics_problem
from bnfold.core.refuse import Refuse
from bnfold.fx.nodes import output_rank, value_readers
from bnfold.fx.reading import BatchNorm, Layer, hooks_of
from bnfold.fx.shapes import batchnorm_ranks
from bnfold.fx.state import FoldState, numpy64
from bnfold.report import Reason

__all__ = [
    "FLOAT_DTYPES",
    "require_no_write_between",
    "require_not_shared",
    "require_foldable_pair",
    "require_editable",
    "require_sole_reader",
    "require_float_statistics",
    "require_channel_count",
    "require_even_taps",
    "batchnorm_map",
    "channels_on_axis_one",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_no_write_between(state: FoldState, tensor: Any, reads: list[fx.Node], where: str) -> None:
    """Refuse when a fold would move or merge reads of ``tensor`` across an in-place write into it.

    ``reads`` are the nodes that read ``tensor`` before the fold (the fold makes one node read it).
    """
    if not isinstance(tensor, fx.Node):
        return None
    writer = state.effects.write_between(tensor, reads)
    if writer is None:
        return None
    detail = (
        f"`{writer.name}` writes in place into `{tensor.name}` (or a tensor sharing its storage) "
        f"between {where}"
    )
    raise Refuse(Reason.MUTATED_IN_PLACE, detail)


def require_not_shared(state: FoldState, batchnorm: BatchNorm) -> None:
    """Refuse a BN used at more than one call site (a shared module or parameter), or whose
    statistics the graph writes in place."""
    if any(id(tensor) in state.effects.written_tensors for tensor in batchnorm.tensors):
        detail = f"a statistic or parameter of `{batchnorm.call.name}` is written in place by the model"
        raise Refuse(Reason.PARAM_NOT_CONSTANT, detail)
    _require_unshared(state, batchnorm.call.name, batchnorm.node, batchnorm.tensors, batchnorm.call.module)


def require_foldable_pair(state: FoldState, batchnorm: BatchNorm, layer: Layer) -> None:
    """The checks on the layer that both sides share: hooks, constants, dtypes. A layer shared with
    other call sites gets its own copy when the fold is written (``writing.write_layer_tensors``)."""
    require_editable(state, layer, copy_if_shared=True)
    require_float_statistics(batchnorm)


def require_sole_reader(layer: Layer, reader: fx.Node) -> None:
    """Refuse when anything besides ``reader`` sees the layer's output values: it would see the folded
    values. Readers of its shape, rank, dtype or device see the same before and after."""
    others = [user for user in value_readers(layer.node) if user is not reader]
    if any(user.op == "output" for user in others):
        raise Refuse(Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"the output of `{layer.name}` is returned")
    if others:
        names = ", ".join(user.name for user in others[:3])
        raise Refuse(Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"the output of `{layer.name}` also feeds {names}")
    return None


def require_editable(state: FoldState, layer: Layer, *, copy_if_shared: bool = False) -> None:
    """Why the layer's weights cannot be replaced: shared, hooked, computed at run time, not float.

    ``copy_if_shared``: the fold writes a copy of the layer for this call site alone (a module called
    at other sites, a weight tied to another module), so sharing is no reason to refuse; the copy
    must still be safe to make: no hooks (a copy would run them, or not, differently), no tensor the
    model writes in place, no parametrization besides the weight's and bias'.
    """
    if not copy_if_shared:
        _require_unshared(state, layer.name, layer.node, layer.tensors, layer.module)
    if any(id(tensor) in state.effects.written_tensors for tensor in layer.tensors):
        raise Refuse(Reason.WEIGHT_NOT_CONSTANT, f"the model writes into `{layer.name}`'s tensors in place")
    if layer.module is not None and hooks_of(layer.module):
        raise Refuse(Reason.HOOKS_REGISTERED, f"`{layer.name}` has {hooks_of(layer.module)}")
    if layer.module is not None and parametrize.is_parametrized(layer.module):
        others = sorted(set(layer.module.parametrizations) - {"weight", "bias"})
        if others:
            detail = f"`{layer.name}` has parametrized tensors {others} besides its weight and bias"
            raise Refuse(Reason.WEIGHT_NOT_CONSTANT, detail)
    if layer.weight is None or not layer.bias_constant:
        which = "weight" if layer.weight is None else "bias"
        raise Refuse(Reason.WEIGHT_NOT_CONSTANT, f"the {which} of `{layer.name}` is computed at run time")
    for role, tensor in (("weight", layer.weight), ("bias", layer.bias)):
        if tensor is not None and tensor.dtype not in FLOAT_DTYPES:
            raise Refuse(Reason.UNSUPPORTED_DTYPE, f"the {role} of `{layer.name}` is {tensor.dtype}")
    return None


def require_float_statistics(batchnorm: BatchNorm) -> None:
    for tensor in (batchnorm.weight, batchnorm.bias, batchnorm.running_mean, batchnorm.running_var):
        if tensor is not None and tensor.dtype not in FLOAT_DTYPES:
            raise Refuse(
                Reason.UNSUPPORTED_DTYPE, f"a statistic of `{batchnorm.call.name}` is {tensor.dtype}"
            )
    return None


def require_channel_count(batchnorm: BatchNorm, layer: Layer, channels: int, which: str) -> None:
    for tensor in (batchnorm.weight, batchnorm.bias, batchnorm.running_mean, batchnorm.running_var):
        if tensor is not None and tensor.numel() != channels:
            detail = (
                f"`{layer.name}` has {channels} {which} channels, `{batchnorm.call.name}` {tensor.numel()}"
            )
            raise Refuse(Reason.PARAM_SHAPE_MISMATCH, detail)
    return None


def batchnorm_map(batchnorm: BatchNorm, channels: int) -> Affine:
    statistics = _float64(batchnorm, channels)
    problem = statistics_problem(*statistics, batchnorm.eps)
    if problem:
        kind, bad_channels = problem
        reason = Reason.NONFINITE_STATISTICS if kind == "nonfinite" else Reason.NONPOSITIVE_VARIANCE
        raise Refuse(reason, f"channels {bad_channels[:8]}")
    return batchnorm_affine(*statistics, batchnorm.eps)


def require_even_taps(consumer: Layer) -> None:
    """Folding a shift into a bias is exact only when every output reads every kernel tap from the input."""
    if consumer.kind == "linear":
        return None
    padding = consumer.options.get("padding", 0)
    if isinstance(padding, str):
        if padding != "valid":
            raise Refuse(Reason.PADDING_AFTER_BN, f"`{consumer.name}` has padding={padding!r}")
    elif any(_as_tuple(padding)):
        raise Refuse(Reason.PADDING_AFTER_BN, f"`{consumer.name}` has padding={padding}")
    if consumer.kind == "conv_transpose":
        kernel = list(consumer.weight.shape[2:])
        stride = _as_tuple(consumer.options.get("stride", 1))
        output_padding = _as_tuple(consumer.options.get("output_padding", 0))
        if any(size != 1 for size in kernel) or any(step != 1 for step in stride) or any(output_padding):
            shape = f"kernel {kernel}, stride {list(stride)}, output_padding {list(output_padding)}"
            detail = f"`{consumer.name}`: {shape}"
            raise Refuse(Reason.UNEVEN_TAPS_AFTER_BN, detail)
    return None


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _require_unshared(
    state: FoldState, name: str, node: fx.Node, tensors: list[torch.Tensor], module: nn.Module | None
) -> None:
    if module is not None:
        calls = state.uses.module_sites(module)
        if len(calls) > 1:
            sites = ", ".join(call.name for call in calls)
            raise Refuse(Reason.SHARED_MODULE, f"module `{name}` is called at {len(calls)} sites ({sites})")
    others = state.uses.other_sites(tensors, node)
    if others:
        sites = ", ".join(other.name for other in others[:3])
        raise Refuse(Reason.SHARED_MODULE, f"parameters of `{name}` are also used by {sites}")
    return None


def channels_on_axis_one(
    state: FoldState, batchnorm: BatchNorm, tensor: Any, layer: Layer, which: str
) -> frozenset[str]:
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
    known = state.facts.rank(tensor)
    if known is None:
        if output_rank(tensor) is not None:
            detail = (
                f"the rank of `{label}` ({which} of `{layer.name}`) is {output_rank(tensor)} in the example "
                "but is not fixed by the graph for every input"
            )
            raise Refuse(Reason.SHAPE_DEPENDENT, detail)
        raise Refuse(Reason.UNKNOWN_SHAPE, f"the rank of `{layer.name}`'s {which} is unknown")
    rank, assumes = known
    if rank == wanted:
        return assumes
    if layer.kind == "linear":
        detail = f"`{layer.name}` {which} has rank {rank}: its features are on the last axis, not axis 1"
    else:
        detail = f"`{layer.name}` {which} has rank {rank} (unbatched): its channels are on axis 0"
    raise Refuse(Reason.CHANNEL_AXIS_MISMATCH, detail)


def _float64(batchnorm: BatchNorm, channels: int) -> tuple[np.ndarray, ...]:
    gamma = numpy64(batchnorm.weight) if batchnorm.weight is not None else np.ones(channels)
    beta = numpy64(batchnorm.bias) if batchnorm.bias is not None else np.zeros(channels)
    return gamma, beta, numpy64(batchnorm.running_mean), numpy64(batchnorm.running_var)
