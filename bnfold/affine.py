"""The arithmetic of folding, in float64, with no knowledge of ONNX, torch or graphs.

At inference a BatchNorm is a per-channel affine map ``y = scale * x + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``. A linear layer followed by
that map is the same linear layer with its output channels scaled and its bias ``b`` replaced by
``b * scale + shift``. Every value here is computed in float64 from the stored values and rounded
once, at the end, into the weight's dtype — so the folded model is at least as close to the exact
function as the original.

Both backends (``bnfold.onnx`` and the PyTorch path) call these functions, so a fix here fixes both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

__all__ = [
    "Affine",
    "WeightLayout",
    "batchnorm_affine",
    "statistics_problem",
    "output_channel_count",
    "scale_output_channels",
    "round_scaled_output_channels",
    "input_channel_count",
    "scale_input_channels",
    "round_scaled_input_channels",
    "input_shift_bias",
    "fold_bias",
    "round_to_dtype",
    "Rounded",
    "as_float64",
    "is_supported_float",
    "ConvWindow",
    "merge_windows",
    "place_kernel",
    "dirac_kernel",
    "merge_branch_kernels",
]

BLOCK_BYTES = 1 << 20
"""How many float64 bytes of a weight are scaled at a time (:func:`round_scaled_output_channels`).

A block's products are rounded while they are still in the cache (L2 is 512 KiB to 2 MiB per core
on current CPUs), so a weight is read once and written once, with no full-size float64 temporary.
"""

# ml_dtypes' bfloat16 has numpy kind "V", so dtypes are recognised by name, not by kind.
SUPPORTED_FLOATS = ("float16", "bfloat16", "float32", "float64")


def is_supported_float(dtype: np.dtype) -> bool:
    """Whether a fold can read and write weights or statistics of this dtype."""
    return np.dtype(dtype).name in SUPPORTED_FLOATS


@dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``y = scale * x + shift`` (both 1-D float64)."""

    scale: np.ndarray
    shift: np.ndarray


class WeightLayout(Enum):
    """Where the output channels sit in a layer's weight.

    - ``CONV``: ``[C_out, C_in/groups, k...]`` — output channels on axis 0.
    - ``CONV_TRANSPOSE``: ``[C_in, C_out/groups, k...]`` — input channels first; output channel
      ``o`` of group ``g`` lives at ``[g*C_in/groups : (g+1)*C_in/groups, o - g*C_out/groups]``.
      Scaling axis 1 alone is only right for ``groups == 1``.
    - ``MATRIX_IN_OUT``: ``[K, N]`` (MatMul right-hand side, Gemm with ``transB=0``) — axis 1.
    - ``MATRIX_OUT_IN``: ``[N, K]`` (Gemm with ``transB=1``, torch Linear) — axis 0.
    """

    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    MATRIX_IN_OUT = "matrix_in_out"
    MATRIX_OUT_IN = "matrix_out_in"


def batchnorm_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> Affine:
    """The inference-time affine map of a BatchNorm, computed in float64."""
    # Quiet numpy: inf or NaN results become a refusal where they are rounded (round_to_dtype).
    with np.errstate(over="ignore", invalid="ignore"):
        gamma64, beta64, mean64, var64 = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
        scale = gamma64 / np.sqrt(var64 + np.float64(epsilon))
        shift = beta64 - mean64 * scale
    return Affine(scale=scale, shift=shift)


def statistics_problem(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[str, list[int]] | None:
    """Why these statistics cannot be folded, or None.

    Returns ``("nonfinite", channels)`` when any value is NaN/inf, ``("nonpositive", channels)``
    when ``var + eps <= 0`` (the BN itself would produce NaN/inf there, and a fold would bake that
    into the weights of every channel it touches).
    """
    with np.errstate(invalid="ignore"):  # casting a signalling NaN (bit patterns files can hold) warns
        arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in (gamma, beta, mean, var)]
    nonfinite = ~np.isfinite(np.stack(arrays)).all(axis=0) | (not np.isfinite(epsilon))
    if nonfinite.any():
        return "nonfinite", np.flatnonzero(nonfinite).tolist()
    nonpositive = arrays[3] + np.float64(epsilon) <= 0
    if nonpositive.any():
        return "nonpositive", np.flatnonzero(nonpositive).tolist()
    return None


class Rounded(np.ndarray):
    """A fold's result in the model's dtype that remembers the float64 value it was rounded from.

    When a folded weight is folded again — ``Conv -> BN -> BN``, a per-channel ``Mul`` after a
    folded BN, a RepVGG merge of branches whose BNs were just folded — the next fold starts from
    ``exact`` (see :func:`as_float64`), so the chain is rounded once, not once per step. Views and
    results of arithmetic are plain (``exact`` None): only :func:`round_to_dtype` sets it.
    """

    exact: np.ndarray | None

    def __array_finalize__(self, obj) -> None:
        self.exact = None


def as_float64(values: np.ndarray) -> np.ndarray:
    """``values`` in float64: the exact value a :class:`Rounded` carries, else ``values`` widened."""
    exact = getattr(values, "exact", None)
    if exact is not None and exact.shape == np.shape(values):
        return exact
    return np.asarray(values, dtype=np.float64)


def output_channel_count(weight_shape: tuple[int, ...], layout: WeightLayout, groups: int = 1) -> int:
    """How many output channels a weight of this shape and layout produces."""
    if layout is WeightLayout.CONV:
        return weight_shape[0]
    if layout is WeightLayout.CONV_TRANSPOSE:
        return weight_shape[1] * groups
    if layout is WeightLayout.MATRIX_IN_OUT:
        return weight_shape[1]
    return weight_shape[0]


def scale_output_channels(
    weight: np.ndarray, scale: np.ndarray, layout: WeightLayout, groups: int = 1
) -> np.ndarray:
    """``weight`` with output channel ``c`` multiplied by ``scale[c]``, as float64."""
    return _scaled(weight, scale, layout, groups, _OUTPUT_AXIS, None)


def round_scaled_output_channels(
    weight: np.ndarray, scale: np.ndarray, layout: WeightLayout, groups: int = 1, *, keep_exact: bool = False
) -> np.ndarray | None:
    """``round_to_dtype(scale_output_channels(weight, scale, layout, groups), weight.dtype)``.

    The same float64 products and the same single rounding, computed a block of rows at a time
    (:data:`BLOCK_BYTES`) instead of through full-size float64 temporaries; None when a rounded
    value is not finite. ``keep_exact``: a :class:`Rounded` holding the float64 products too (for a
    weight that may be folded again), computed whole.
    """
    dtype = np.asarray(weight).dtype
    if keep_exact:
        return round_to_dtype(scale_output_channels(weight, scale, layout, groups), dtype, keep_exact=True)
    return _scaled(weight, scale, layout, groups, _OUTPUT_AXIS, dtype)


# The axis of a weight along which each layout's output (or input) channels lie. On axis 1 the
# channels are those of the row's group: ConvTranspose's outputs, Conv's inputs (see WeightLayout).
_OUTPUT_AXIS = {
    WeightLayout.CONV: 0,
    WeightLayout.MATRIX_OUT_IN: 0,
    WeightLayout.MATRIX_IN_OUT: 1,
    WeightLayout.CONV_TRANSPOSE: 1,
}
_INPUT_AXIS = {layout: 1 - axis for layout, axis in _OUTPUT_AXIS.items()}


def _scaled(
    weight: np.ndarray,
    scale: np.ndarray,
    layout: WeightLayout,
    groups: int,
    axes: dict[WeightLayout, int],
    dtype: np.dtype | None,
) -> np.ndarray | None:
    """``weight`` times ``scale`` along ``axes[layout]`` in float64, rounded into ``dtype``.

    Works through blocks of axis 0: each block's products go to a float64 buffer the size of one
    block and are rounded from there into the result (for float64, straight into it). None when a
    rounded value is not finite; ``dtype=None``: the float64 products, unchecked (the caller rounds).
    A :class:`Rounded` weight is read through its exact float64 value.
    """
    exact = getattr(weight, "exact", None)
    weight = np.asarray(weight if exact is None or exact.shape != np.shape(weight) else exact)
    scale64 = np.asarray(scale, dtype=np.float64).reshape(-1)
    axis = axes[layout]
    if layout is WeightLayout.MATRIX_IN_OUT or layout is WeightLayout.MATRIX_OUT_IN:
        groups = 1
    rows = weight.shape[0]
    if axis == 1 and rows % groups:
        raise ValueError(f"{rows} rows do not split into {groups} groups")
    channels = rows if axis == 0 else groups * weight.shape[1]
    if scale64.size == 1:  # one factor for every channel, as numpy would broadcast it
        scale64 = np.full(channels, scale64[0])
    elif scale64.size != channels:
        raise ValueError(f"{scale64.size} factors for {channels} channels of a {list(weight.shape)} weight")
    result = np.empty(weight.shape, np.float64 if dtype is None else dtype)
    row_items = math.prod(weight.shape[1:])
    step = max(1, BLOCK_BYTES // (8 * row_items)) if row_items else max(rows, 1)
    direct = result.dtype == np.float64  # products go straight into the result
    buffer = None if direct else np.empty((min(step, rows), *weight.shape[1:]), np.float64)
    # Non-finite values (inf * 0, a signalling NaN, overflow in the rounding) must not warn: they
    # are refused (None) here, or by round_to_dtype for float64 results.
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            products = result[start:stop] if buffer is None else buffer[: stop - start]
            factors = _factors(scale64, weight.shape, start, stop, axis, groups)
            if weight.dtype.kind == "f":  # numpy's floats are widened inside the multiply
                np.multiply(weight[start:stop], factors, out=products, dtype=np.float64)
            else:  # bfloat16 (numpy kind "V"), integers: widened first, the same float64 values
                np.copyto(products, weight[start:stop], casting="unsafe")
                np.multiply(products, factors, out=products)
            if dtype is None:
                continue
            rounded = result[start:stop]
            if not direct:
                rounded[...] = products  # the one rounding (the cast astype does)
                if dtype.kind != "f":  # bfloat16: checked through float64, as round_to_dtype does
                    np.copyto(products, rounded, casting="unsafe")
            if not np.isfinite(rounded if dtype.kind == "f" else products).all():
                return None
    return result


def _factors(
    scale64: np.ndarray, shape: tuple[int, ...], start: int, stop: int, axis: int, groups: int
) -> np.ndarray:
    """The factors of ``weight[start:stop]``, broadcastable against it.

    Axis 0: row ``r`` is channel ``r``. Axis 1: the rows split evenly into ``groups`` and row ``r``
    holds, along axis 1, the ``shape[1]`` channels of its group.
    """
    if axis == 0:
        return scale64[start:stop].reshape((-1,) + (1,) * (len(shape) - 1))
    kernel = (1,) * (len(shape) - 2)
    per_group = scale64.reshape(groups, shape[1])
    if groups == 1:
        return per_group.reshape(1, shape[1], *kernel)
    row_groups = np.arange(start, stop) // (shape[0] // groups)
    return per_group[row_groups].reshape(-1, shape[1], *kernel)


def input_channel_count(weight_shape: tuple[int, ...], layout: WeightLayout, groups: int = 1) -> int:
    """How many input channels a weight of this shape and layout reads."""
    if layout is WeightLayout.CONV:
        return weight_shape[1] * groups
    if layout is WeightLayout.CONV_TRANSPOSE or layout is WeightLayout.MATRIX_IN_OUT:
        return weight_shape[0]
    return weight_shape[1]


def _grouped_by_input(weight64: np.ndarray, layout: WeightLayout, groups: int) -> np.ndarray:
    """The weight viewed as ``[groups, C_out/groups, C_in/groups, K]`` (K = flattened kernel, or 1).

    Conv ``[C_out, C_in/g, k...]``: output channel ``o`` of group ``o // (C_out/g)`` reads input
    channels ``g*C_in/g + j``. ConvTranspose ``[C_in, C_out/g, k...]``: input channel ``i`` of group
    ``i // (C_in/g)`` feeds that group's output channels. Matrices are one group with K = 1.
    """
    if layout is WeightLayout.MATRIX_IN_OUT:
        return weight64.T.reshape(1, weight64.shape[1], weight64.shape[0], 1)
    if layout is WeightLayout.MATRIX_OUT_IN:
        return weight64.reshape(1, weight64.shape[0], weight64.shape[1], 1)
    if layout is WeightLayout.CONV:
        out_channels, in_per_group = weight64.shape[:2]
        return weight64.reshape(groups, out_channels // groups, in_per_group, -1)
    in_channels, out_per_group = weight64.shape[:2]
    grouped = weight64.reshape(groups, in_channels // groups, out_per_group, -1)
    return grouped.transpose(0, 2, 1, 3)


def scale_input_channels(
    weight: np.ndarray, scale: np.ndarray, layout: WeightLayout, groups: int = 1
) -> np.ndarray:
    """``weight`` with every tap that reads input channel ``i`` multiplied by ``scale[i]``, as float64.

    This folds an affine map that runs *before* the layer: ``layer(scale * x) = layer'(x)``.
    """
    return _scaled(weight, scale, layout, groups, _INPUT_AXIS, None)


def round_scaled_input_channels(
    weight: np.ndarray, scale: np.ndarray, layout: WeightLayout, groups: int = 1, *, keep_exact: bool = False
) -> np.ndarray | None:
    """``round_to_dtype(scale_input_channels(weight, scale, layout, groups), weight.dtype)``, block
    by block like :func:`round_scaled_output_channels` (``keep_exact`` as there); None when a
    rounded value is not finite."""
    dtype = np.asarray(weight).dtype
    if keep_exact:
        return round_to_dtype(scale_input_channels(weight, scale, layout, groups), dtype, keep_exact=True)
    return _scaled(weight, scale, layout, groups, _INPUT_AXIS, dtype)


def input_shift_bias(
    weight: np.ndarray, shift: np.ndarray, layout: WeightLayout, groups: int = 1
) -> np.ndarray:
    """Per output channel, what a constant ``shift[i]`` on every input channel adds to the output.

    ``sum_{i, k} W[o, i, k] * shift[i]`` over the input channels of ``o``'s group and every kernel
    tap, in float64. It is the bias correction for folding ``x -> x + shift`` into the layer, exact
    only when every output position reads every kernel tap from inside the input (no padding).
    """
    grouped = _grouped_by_input(as_float64(weight), layout, groups)
    group_count, _, in_per_group, _ = grouped.shape
    per_group_shift = np.asarray(shift, dtype=np.float64).reshape(group_count, in_per_group)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.einsum("goik,gi->go", grouped, per_group_shift).reshape(-1)


def fold_bias(bias: np.ndarray | None, affine: Affine, bias_multiplier: float = 1.0) -> np.ndarray:
    """The bias after the affine map: ``bias_multiplier * bias * scale + shift`` in float64.

    ``bias`` may be absent (zero) or any shape that broadcasts against ``[..., C]`` (Gemm's ``C``);
    ``bias_multiplier`` carries Gemm's ``beta``, which the folded node then sets to 1.
    """
    if bias is None:
        return affine.shift.copy()
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results: see round_to_dtype
        bias64 = as_float64(bias) * np.float64(bias_multiplier)
        return bias64 * affine.scale + affine.shift


def round_to_dtype(values: np.ndarray, dtype: np.dtype, *, keep_exact: bool = False) -> np.ndarray | None:
    """Round float64 ``values`` once into ``dtype``; None when the result is not all finite.

    Returning None (instead of inf/NaN weights) lets the caller keep the BN and say why.
    ``keep_exact``: return a :class:`Rounded` that carries ``values`` for a later fold.
    """
    values64 = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = values64.astype(dtype)
    # numpy's floats are checked as they are; others (bfloat16) through float64.
    if not np.isfinite(rounded if rounded.dtype.kind == "f" else rounded.astype(np.float64)).all():
        return None
    if keep_exact:
        rounded = rounded.view(Rounded)
        rounded.exact = values64
    return rounded


# -- parallel branches summed into one convolution (RepVGG, ACNet, MobileOne) --------------------


@dataclass(frozen=True)
class ConvWindow:
    """Which input positions a convolution reads, per spatial axis.

    With dilation ``d`` and stride ``s``, output position ``o`` reads input positions
    ``o * s - pads_begin + d * j`` for the taps ``j = 0 .. kernel - 1``. An identity branch is the
    window of a 1-tap kernel without padding.
    """

    kernel: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]


def merge_windows(
    windows: Sequence[ConvWindow], dilations: Sequence[int]
) -> tuple[ConvWindow, list[tuple[int, ...]]] | str:
    """One window covering every branch's taps, and where each branch's kernel starts inside it.

    Convolutions of one input with the same strides, dilations and groups sum to one convolution
    whose kernel is their kernels zero-padded into a common window, when along every axis:

    - they give the same number of outputs for every input length: ``pads_begin + pads_end -
      d * (kernel - 1)`` agrees (this also rules out an Add that would broadcast);
    - their first taps are a whole number of dilation steps apart (``pads_begin`` differ by a
      multiple of ``d``), so every tap of every branch lands on a tap of the merged kernel.

    The merged window pads as much as the most padded branch at each end; padding only ever meets
    the zero taps a branch was padded with. Returns a sentence saying why not otherwise.
    """
    rank = len(dilations)
    kernel, pads_begin, pads_end = [], [], []
    for axis, dilation in enumerate(dilations):
        slack = {w.pads_begin[axis] + w.pads_end[axis] - dilation * (w.kernel[axis] - 1) for w in windows}
        if len(slack) > 1:
            sizes = ", ".join(
                f"{w.kernel[axis]} (pads {w.pads_begin[axis]}, {w.pads_end[axis]})" for w in windows
            )
            return f"spatial axis {axis}: kernels {sizes} give outputs of different sizes"
        begin = max(w.pads_begin[axis] for w in windows)
        if any((begin - w.pads_begin[axis]) % dilation for w in windows):
            starts = ", ".join(str(w.pads_begin[axis]) for w in windows)
            return (
                f"spatial axis {axis}: pads before {starts} are not a whole number of "
                f"dilation steps ({dilation}) apart"
            )
        end = max(w.pads_end[axis] for w in windows)
        pads_begin.append(begin)
        pads_end.append(end)
        kernel.append((begin + end - slack.pop()) // dilation + 1)
    offsets = [
        tuple((pads_begin[axis] - w.pads_begin[axis]) // dilations[axis] for axis in range(rank))
        for w in windows
    ]
    return ConvWindow(tuple(kernel), tuple(pads_begin), tuple(pads_end)), offsets


def place_kernel(weight: np.ndarray, offsets: Sequence[int], kernel: Sequence[int]) -> np.ndarray:
    """A conv ``weight`` ``[C_out, C_in/groups, k...]`` zero-padded to ``kernel``, starting at ``offsets``.

    Float64, so that summed branches are rounded once.
    """
    weight64 = as_float64(weight)
    placed = np.zeros(weight64.shape[:2] + tuple(kernel), dtype=np.float64)
    taps = tuple(
        slice(offset, offset + size) for offset, size in zip(offsets, weight64.shape[2:], strict=True)
    )
    placed[(slice(None), slice(None), *taps)] = weight64
    return placed


def dirac_kernel(scale: np.ndarray, groups: int, spatial_rank: int) -> np.ndarray:
    """The conv weight of ``x -> scale * x`` per channel, ``[C, C/groups, 1, ...]``, as float64.

    A grouped conv's output channel ``c`` reads only its own group's input channels, numbered from
    0 inside the group: channel ``c`` itself is in-group index ``c mod (C / groups)``.
    """
    scale64 = np.asarray(scale, dtype=np.float64).reshape(-1)
    channels = scale64.size
    per_group = channels // groups
    weight = np.zeros((channels, per_group) + (1,) * spatial_rank, dtype=np.float64)
    rows = np.arange(channels)
    weight[(rows, rows % per_group) + (0,) * spatial_rank] = scale64
    return weight


def merge_branch_kernels(
    weights: Sequence[np.ndarray],
    windows: Sequence[ConvWindow],
    dilations: Sequence[int],
    *,
    identity_scale: np.ndarray | None = None,
    groups: int = 1,
) -> tuple[ConvWindow, np.ndarray] | str:
    """Parallel conv branches of one input summed into one kernel: the common window and the float64
    kernel, or why the windows do not line up (see :func:`merge_windows`).

    ``identity_scale``: an identity branch too, scaled per channel (a BN of the input, or ones).
    """
    weights, windows = list(weights), list(windows)
    if identity_scale is not None:
        rank = len(windows[0].kernel)
        windows.append(ConvWindow((1,) * rank, (0,) * rank, (0,) * rank))
        weights.append(dirac_kernel(identity_scale, groups, rank))
    merged = merge_windows(windows, dilations)
    if isinstance(merged, str):
        return merged
    window, offsets = merged
    kernel = sum(place_kernel(w, offset, window.kernel) for w, offset in zip(weights, offsets, strict=True))
    return window, kernel
