"""The fold of each family, backend-free: new weights in float64, rounded once, or :class:`Refuse`.

:mod:`bnfold.affine` holds the arithmetic; this module holds what both backends decide the same way
around it — a scale the weight's dtype cannot hold, a folded value that overflows, channel counts
that must agree, the shape of a bias — so that a rule in either backend only finds its layer and
reads its constants. Families:

- output side (:func:`fold_output_side`): ``layer -> BN`` and everything that reduces to it
  (through a reshape, a Mul/Add chain, through a pool);
- input side (:func:`fold_input_side`): ``BN -> layer``;
- parallel branches (:func:`merge_branches`): ``Add`` of convs of one input (+ identity);
- through a pool (:func:`require_pool_commutes`): which per-channel maps commute with a pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bnfold.affine import (
    Affine,
    ConvWindow,
    WeightLayout,
    as_float64,
    fold_bias,
    input_shift_bias,
    merge_branch_kernels,
    round_scaled_input_channels,
    round_scaled_output_channels,
    round_to_dtype,
)
from bnfold.core.refuse import Refuse
from bnfold.report import Reason

__all__ = [
    "require_channels",
    "require_scale_fits",
    "fold_output_side",
    "fold_input_side",
    "merge_branches",
    "require_pool_commutes",
]


def require_channels(channels: int, norm_channels: int, what: str, norm: str = "BatchNormalization") -> None:
    """Refuse unless the layer's channel count is the norm's; ``what`` describes the layer's count
    with ``{}`` where the number goes ("layer has {} output channels")."""
    if channels != norm_channels:
        raise Refuse(Reason.PARAM_SHAPE_MISMATCH, f"{what.format(channels)}, {norm} has {norm_channels}")


def require_scale_fits(affine: Affine, dtype: np.dtype, what: str = "BatchNormalization scale") -> None:
    """Refuse a scale the weights' dtype cannot hold (e.g. over 65504 for float16 weights with float32
    statistics): degenerate even where the folded weights happen to fit."""
    if round_to_dtype(affine.scale, dtype) is None:
        raise Refuse(Reason.FOLD_OVERFLOWS_DTYPE, f"{what} overflows {np.dtype(dtype).name}")


def _rounded(values: np.ndarray | None, role: str, dtype: np.dtype) -> np.ndarray:
    if values is None:
        raise Refuse(Reason.FOLD_OVERFLOWS_DTYPE, f"folded {role} overflows {np.dtype(dtype).name}")
    return values


def fold_output_side(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: Affine,
    layout: WeightLayout,
    *,
    groups: int = 1,
    bias_multiplier: float = 1.0,
    keep_exact: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``layer -> affine`` as one layer: the weight's output channels scaled, the bias
    ``bias_multiplier * b * scale + shift``; both in float64, rounded once into the weight's dtype.

    ``keep_exact``: the results carry their float64 values for a fold that may follow.
    """
    require_scale_fits(affine, weight.dtype)
    new_weight = round_scaled_output_channels(weight, affine.scale, layout, groups, keep_exact=keep_exact)
    new_bias = round_to_dtype(fold_bias(bias, affine, bias_multiplier), weight.dtype, keep_exact=keep_exact)
    return _rounded(new_weight, "weight", weight.dtype), _rounded(new_bias, "bias", weight.dtype)


def fold_input_side(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: Affine,
    layout: WeightLayout,
    *,
    groups: int = 1,
    bias_multiplier: float = 1.0,
    correction_multiplier: float = 1.0,
    bias_broadcasts: bool = False,
    keep_exact: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``affine -> layer`` as one layer: ``W * scale`` along input channels and the bias
    ``bias_multiplier * b + correction_multiplier * sum W * shift``.

    Exact only where every output position reads every kernel tap from the real input (the caller
    checks padding and taps). The bias must have one value per output channel, or
    (``bias_broadcasts``, Gemm's C) broadcast against them.
    """
    correction = input_shift_bias(weight, affine.shift, layout, groups) * correction_multiplier
    if bias is not None and not _bias_fits(bias.shape, correction.shape, bias_broadcasts):
        raise Refuse(
            Reason.PARAM_SHAPE_MISMATCH,
            f"bias has shape {list(bias.shape)}, the layer has {correction.shape[0]} output channels",
        )
    new_bias64 = correction if bias is None else as_float64(bias) * bias_multiplier + correction
    new_weight = round_scaled_input_channels(weight, affine.scale, layout, groups, keep_exact=keep_exact)
    new_bias = round_to_dtype(new_bias64, weight.dtype, keep_exact=keep_exact)
    return _rounded(new_weight, "weight", weight.dtype), _rounded(new_bias, "bias", weight.dtype)


def _bias_fits(bias: tuple[int, ...], channels: tuple[int, ...], broadcasts: bool) -> bool:
    if not broadcasts:
        return bias == channels
    return len(bias) <= 2 and (not bias or bias[-1] in (1, channels[0]))


def merge_branches(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray | None],
    windows: Sequence[ConvWindow],
    dilations: Sequence[int],
    *,
    groups: int = 1,
    identity: tuple[np.ndarray, np.ndarray | None] | None = None,
    offset: np.ndarray | None = None,
    keep_exact: bool = False,
) -> tuple[ConvWindow, np.ndarray, np.ndarray | None]:
    """Convs of one input (and an identity branch ``(scale, shift)``) summed into one conv: the common
    window, the weight and the bias (None when no branch has one and ``offset``, constants added to
    the branches, is zero), in float64 rounded once."""
    dtype = weights[0].dtype
    bias64 = sum((as_float64(b) for b in biases if b is not None), np.zeros(weights[0].shape[0]))
    has_bias = any(b is not None for b in biases)
    if offset is not None and np.any(offset):
        bias64, has_bias = bias64 + offset, True
    scale = None
    if identity is not None:
        scale, shift = identity
        if shift is not None:
            bias64, has_bias = bias64 + shift, True
    merged = merge_branch_kernels(weights, windows, dilations, identity_scale=scale, groups=groups)
    if isinstance(merged, str):
        raise Refuse(Reason.BRANCHES_INCOMPATIBLE, merged)
    window, weight64 = merged
    new_weight = round_to_dtype(weight64, dtype, keep_exact=keep_exact)
    new_bias = round_to_dtype(bias64, dtype, keep_exact=keep_exact) if has_bias else None
    if new_weight is None or (has_bias and new_bias is None):
        raise Refuse(Reason.FOLD_OVERFLOWS_DTYPE, f"merged weight or bias overflows {dtype.name}")
    return window, new_weight, new_bias


def require_pool_commutes(affine: Affine, pool: str, what: str) -> None:
    """Refuse unless ``pool(affine(x)) == affine(pool(x))`` for every input.

    An average (``pool == "average"``: global, or windows that count only real elements) commutes with
    any per-channel affine map: each output is a mean of inputs of one channel. A max (``"max"``,
    padding that never wins: ONNX MaxPool's) commutes with ``x -> s * x + t`` where ``s >= 0`` (a
    negative scale turns the max into a min; a zero scale makes every value ``t``).
    """
    if pool == "average":
        return
    negative = np.flatnonzero(affine.scale < 0)
    if negative.size:
        shown = ", ".join(map(str, negative[:8].tolist())) + (", ..." if negative.size > 8 else "")
        raise Refuse(Reason.POOL_DOES_NOT_COMMUTE, f"{what} takes a max; BN scale < 0 in channels {shown}")
