"""How far a model's output is from the exact function: the float64 evaluation of the original.

:func:`exact_comparison` measures the folded and the original output against that reference (RMS and
max error relative to the output's largest value) and decides whether the folded one is no further
than :data:`EXACT_MARGIN` times the original (or :data:`FLOOR_ULPS` units in the last place);
:mod:`bnfold.comparison` asks it when an output is over tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EXACT_MARGIN", "FLOOR_ULPS", "SANE_ULPS", "EPSILON", "ExactComparison", "exact_comparison"]

# Machine epsilon per dtype (numpy's finfo does not know ml_dtypes' bfloat16).
EPSILON = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}

EXACT_MARGIN = 4.0
"""The folded model's RMS and max error against the float64 evaluation may be at most this many
times the original's. Rounding the scaled weights is a rounding the unfolded model does not have, so
a correct fold is not always at or below 1x: float64 folds rounded once measured up to 3.4x (RMS) on a
small LCNet and 2.6x on LeViT's torch fold, while the corrupted folds in tests/test_verify_exact.py
(a weight off by 1%, a shifted bias, swapped channels) are 100x and more."""
FLOOR_ULPS = 16.0
"""... or at most this many units in the last place of the output scale (max |reference|)."""
SANE_ULPS = 1e4
"""A reference farther than this from the original (RMS, in units in the last place of the output
scale; at most 5% of it) cannot judge a fold."""


@dataclass(frozen=True)
class ExactComparison:
    """Errors of the folded and the original output against the float64 evaluation of the original.

    Errors are relative to ``scale`` (the largest finite |reference| value): RMS and max.
    """

    scale: float
    folded_rms: float
    folded_max: float
    original_rms: float
    original_max: float
    margin: float
    floor: float
    passed: bool
    usable: bool = True
    note: str = ""

    @property
    def closeness(self) -> float:
        """How many times closer (RMS) the folded output is to the reference than the original is."""
        if self.folded_rms == 0.0:
            return float("inf") if self.original_rms > 0.0 else 1.0
        return self.original_rms / self.folded_rms

    def describe(self) -> str:
        if not self.usable:
            return self.note
        ratio = self.closeness
        if ratio >= 1:
            relation = f"{ratio:.2g}x closer to"
        elif ratio > 0:
            relation = f"{1 / ratio:.2g}x further from"
        else:  # the original is exact here
            relation = "further from"
        numbers = (
            f"RMS error {self.folded_rms:.2g} of the output scale against the original's "
            f"{self.original_rms:.2g}, max {self.folded_max:.2g} against {self.original_max:.2g}"
        )
        suffix = f"; {self.note}" if self.note else ""
        if self.passed:
            return f"{relation} the float64 evaluation than the original is ({numbers}{suffix}): pass"
        return (
            f"{relation} the float64 evaluation than the original is ({numbers}; allowed "
            f"{self.margin:g}x the original's, at least {self.floor:.2g}{suffix}): FAILED"
        )


def exact_comparison(reference: np.ndarray, original: np.ndarray, folded: np.ndarray) -> ExactComparison:
    epsilon = EPSILON.get(original.dtype.name, 2.0**-23)
    with np.errstate(invalid="ignore", over="ignore"):
        reference = reference.astype(np.float64).reshape(original.shape)
        original64 = original.astype(np.float64)
        folded64 = folded.astype(np.float64)
    finite = np.isfinite(reference)
    # Where the exact value is finite but the original's is not, the original overflowed its dtype
    # (values near its largest number, e.g. an If branch run on inputs it never gets): its error
    # there is unbounded, so any folded value is no further; the other elements are judged, on
    # their own scale.
    overflowed = finite & ~np.isfinite(original64)
    judged = finite & ~overflowed
    scale = float(np.abs(reference[judged]).max()) if judged.any() else 0.0
    scale = max(scale, np.finfo(np.float64).tiny)
    floor = FLOOR_ULPS * epsilon
    if overflowed.any() and not judged.any():
        note = (
            "the original overflows its dtype wherever the float64 evaluation is finite: nothing to judge by"
        )
        return ExactComparison(
            scale, 0.0, 0.0, float("inf"), float("inf"), EXACT_MARGIN, floor, False, False, note
        )
    original_rms, original_max = _errors(reference, original64, judged, scale)
    folded_rms, folded_max = _errors(reference, folded64, judged, scale)
    # Where the exact value is not finite, the folded model must do what the original did.
    with np.errstate(invalid="ignore"):
        unlike = ~finite & ~((original64 == folded64) | (np.isnan(original64) & np.isnan(folded64)))
    if unlike.any():
        folded_rms = folded_max = float("inf")
    sane_limit = min(SANE_ULPS * epsilon, 0.05)
    if not np.isfinite(original_rms) or original_rms > sane_limit:
        note = (
            f"the original itself is {original_rms:.2g} of the output scale (RMS) from the float64 "
            f"evaluation (over {sane_limit:.2g}), too far for it to judge the fold"
        )
        return ExactComparison(
            scale, folded_rms, folded_max, original_rms, original_max, EXACT_MARGIN, floor, False, False, note
        )
    passed = folded_rms <= max(EXACT_MARGIN * original_rms, floor) and folded_max <= max(
        EXACT_MARGIN * original_max, floor
    )
    notes = []
    if overflowed.any():
        notes.append(f"the original overflows at {int(overflowed.sum())} element(s), judged on the others")
    folded_overflows = int((judged & ~np.isfinite(folded64)).sum())
    if folded_overflows:
        notes.append(
            f"the folded model overflows at {folded_overflows} element(s) where the original does not"
        )
    note = "; ".join(notes)
    return ExactComparison(
        scale, folded_rms, folded_max, original_rms, original_max, EXACT_MARGIN, floor, passed, note=note
    )


def _errors(
    reference: np.ndarray, value: np.ndarray, finite: np.ndarray, scale: float
) -> tuple[float, float]:
    """RMS and max of |value - reference| over the finite reference elements, relative to ``scale``."""
    if not finite.any():
        return 0.0, 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(value[finite] - reference[finite]) / scale
    if not np.isfinite(error).all():
        return float("inf"), float("inf")
    return float(np.sqrt(np.mean(error * error))), float(error.max())
