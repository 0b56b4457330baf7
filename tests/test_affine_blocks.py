"""The blocked weight scaling of bnfold.affine gives, bit for bit, what the straightforward float64
arithmetic gives: the same products, the same single rounding, the same refusal on overflow."""

from __future__ import annotations

import numpy as np
import pytest

import bnfold.affine as affine
from bnfold.affine import (
    WeightLayout,
    round_scaled_input_channels,
    round_scaled_output_channels,
    round_to_dtype,
    scale_input_channels,
    scale_output_channels,
)

try:
    import ml_dtypes

    DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
except ImportError:  # pragma: no cover - onnx depends on ml_dtypes
    DTYPES = [np.float16, np.float32, np.float64]


def reference_output(weight, scale, layout, groups):
    """The whole weight at once: the implementation the blocked one replaced."""
    weight64 = np.asarray(weight, dtype=np.float64)
    scale64 = np.asarray(scale, dtype=np.float64)
    if layout in (WeightLayout.CONV, WeightLayout.MATRIX_OUT_IN):
        return weight64 * scale64.reshape((-1,) + (1,) * (weight64.ndim - 1))
    if layout is WeightLayout.MATRIX_IN_OUT:
        return weight64 * scale64.reshape(1, -1)
    in_channels, out_per_group, *kernel = weight64.shape
    grouped = weight64.reshape(groups, in_channels // groups, out_per_group, *kernel)
    return (grouped * scale64.reshape(groups, 1, out_per_group, *([1] * len(kernel)))).reshape(weight64.shape)


def reference_input(weight, scale, layout, groups):
    weight64 = np.asarray(weight, dtype=np.float64)
    scale64 = np.asarray(scale, dtype=np.float64)
    if layout in (WeightLayout.MATRIX_IN_OUT, WeightLayout.CONV_TRANSPOSE):
        return weight64 * scale64.reshape((-1,) + (1,) * (weight64.ndim - 1))
    if layout is WeightLayout.MATRIX_OUT_IN:
        return weight64 * scale64.reshape(1, -1)
    out_channels, in_per_group, *kernel = weight64.shape
    grouped = weight64.reshape(groups, out_channels // groups, in_per_group, *kernel)
    return (grouped * scale64.reshape(groups, 1, in_per_group, *([1] * len(kernel)))).reshape(weight64.shape)


def reference_round(values, dtype):
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = np.asarray(values, dtype=np.float64).astype(dtype)
    finite = np.isfinite(rounded if rounded.dtype.kind == "f" else rounded.astype(np.float64))
    return rounded if finite.all() else None


# (layout, weight shape, groups, channels scaled on the output side, on the input side)
CASES = [
    (WeightLayout.CONV, (12, 3, 3, 3), 1, 12, 3),
    (WeightLayout.CONV, (12, 2, 3, 1), 3, 12, 6),
    (WeightLayout.CONV, (8, 1, 5), 8, 8, 8),  # depthwise, 1-D
    (WeightLayout.CONV_TRANSPOSE, (6, 4, 2, 2), 1, 4, 6),
    (WeightLayout.CONV_TRANSPOSE, (6, 2, 3, 3), 3, 6, 6),
    (WeightLayout.MATRIX_IN_OUT, (10, 7), 1, 7, 10),
    (WeightLayout.MATRIX_OUT_IN, (7, 10), 1, 7, 10),
]


def case_id(case) -> str:
    layout, shape, groups, *_ = case
    return f"{layout.value}-{'x'.join(map(str, shape))}-g{groups}"


@pytest.fixture(params=[None, 8 * 7, 8 * 40], ids=["one-block", "row-blocks", "uneven-blocks"])
def block_bytes(request, monkeypatch):
    """The default block size, and blocks of one row (or a few) so that every weight here spans many."""
    if request.param is not None:
        monkeypatch.setattr(affine, "BLOCK_BYTES", request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: np.dtype(dtype).name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_blocked_scaling_is_bit_identical_to_the_whole_weight_arithmetic(case, dtype, block_bytes):
    layout, shape, groups, out_channels, in_channels = case
    rng = np.random.default_rng(hash((shape, groups)) % 2**32)
    weight = rng.standard_normal(shape).astype(dtype)
    for side, channels, blocked, rounded, reference in (
        ("output", out_channels, scale_output_channels, round_scaled_output_channels, reference_output),
        ("input", in_channels, scale_input_channels, round_scaled_input_channels, reference_input),
    ):
        # Scales with long mantissas, so that products really round.
        scale = rng.uniform(0.1, 3.0, channels) * (1 + rng.standard_normal(channels) * 1e-3)
        expected = reference(weight, scale, layout, groups)
        assert blocked(weight, scale, layout, groups).dtype == np.float64
        np.testing.assert_array_equal(blocked(weight, scale, layout, groups), expected, err_msg=side)
        result = rounded(weight, scale, layout, groups)
        assert result.dtype == np.dtype(dtype) and result.shape == weight.shape, side
        want = reference_round(expected, dtype)
        assert np.array_equal(result.view(np.uint8), want.view(np.uint8)), side  # bits, NaN-safe
        assert np.array_equal(round_to_dtype(expected, dtype).view(np.uint8), want.view(np.uint8)), side


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: np.dtype(dtype).name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_value_that_overflows_anywhere_gives_none(case, dtype, block_bytes):
    layout, shape, groups, out_channels, in_channels = case
    weight = np.full(shape, 0.5, dtype=dtype)
    big = float(np.finfo(np.float64).max if np.dtype(dtype) == np.float64 else 1e300) / 2
    for channels, rounded in (
        (out_channels, round_scaled_output_channels),
        (in_channels, round_scaled_input_channels),
    ):
        scale = np.ones(channels)
        assert rounded(weight, scale, layout, groups) is not None
        scale[-1] = big * 8 if np.dtype(dtype) == np.float64 else big  # the last block overflows
        assert rounded(weight, scale, layout, groups) is None
        scale[-1] = np.nan
        assert rounded(weight, scale, layout, groups) is None


def test_non_finite_weights_are_refused_quietly():
    weight = np.array([[np.inf, 1.0], [2.0, 3.0]], dtype=np.float32)
    with np.errstate(all="raise"):
        assert round_scaled_output_channels(weight, np.array([0.0, 1.0]), WeightLayout.MATRIX_OUT_IN) is None


def test_read_only_and_empty_weights():
    weight = np.arange(24, dtype=np.float32).reshape(4, 6)
    weight.flags.writeable = False
    result = round_scaled_output_channels(weight, np.full(4, 2.0), WeightLayout.MATRIX_OUT_IN)
    np.testing.assert_array_equal(result, weight * 2)
    empty = np.zeros((0, 3, 1, 1), np.float32)
    assert round_scaled_output_channels(empty, np.zeros(0), WeightLayout.CONV).shape == (0, 3, 1, 1)


def test_one_factor_scales_every_channel_and_a_wrong_count_is_an_error(monkeypatch):
    monkeypatch.setattr(affine, "BLOCK_BYTES", 8)
    weight = np.arange(24, dtype=np.float32).reshape(4, 6)
    for layout in WeightLayout:
        np.testing.assert_array_equal(scale_output_channels(weight, np.array([3.0]), layout), weight * 3.0)
    with pytest.raises(ValueError, match="3 factors for 4 channels"):
        round_scaled_output_channels(weight, np.ones(3), WeightLayout.MATRIX_OUT_IN)
