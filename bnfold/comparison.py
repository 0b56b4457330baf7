"""How one output of a folded model is judged: two judgments, and which one decided.

1. **Tolerance** (Polygraphy's way): element-wise ``|folded - original| <= atol + rtol * |original|``.
2. **Against the exact function**, when (1) fails: the original evaluated in float64 (the function its
   weights define) is the reference; the folded model passes when its error against it is no larger
   than the original's own error against it, within :data:`EXACT_MARGIN` (RMS and max, each at least
   :data:`FLOOR_ULPS` units of the output's last place). A deep float32 network amplifies rounding
   noise past any fixed tolerance; a correct fold in float64 is then as close to the exact function
   as the original, while a wrong one (a weight off by 1%) is orders of magnitude further.

A reference that is itself far from the original (more than :data:`SANE_ULPS` units in the last
place, RMS) cannot judge: the model is chaotic in float32, or the evaluator disagrees with ONNX
Runtime. The tolerance then decides, and the comparison says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.affine import is_supported_float
from bnfold.exactness import EXACT_MARGIN, FLOOR_ULPS, SANE_ULPS, ExactComparison, exact_comparison

if TYPE_CHECKING:
    from bnfold.verify_local import LocalCheck

__all__ = [
    "OutputComparison",
    "VerificationResult",
    "ExactComparison",
    "compare_output",
    "judge_against_reference",
    "judge_runs",
    "failed_outputs",
    "ReferenceUnavailable",
    "EXACT_MODES",
    "default_tolerances",
    "EXACT_MARGIN",
    "FLOOR_ULPS",
    "SANE_ULPS",
]

# (rtol, atol relative to the output's largest reference magnitude, at least 1). Folding reorders a
# multiply and an add per channel, so errors are a few units in the last place of the output scale.
_TOLERANCES = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 2e-3),
    "bfloat16": (5e-2, 1.6e-2),
}
EXACT_MODES = ("auto", "always", "strict")
_SHOWN_LOCAL = 10  # subgraphs checked locally that the text lists one by one


class ReferenceUnavailable(Exception):
    """The float64 evaluation cannot run on this model; the message says why, in one line."""


def default_tolerances(dtype: np.dtype | str, reference_magnitude: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for an output of ``dtype`` whose largest reference value is ``reference_magnitude``.

    The default absolute tolerance scales with the output's magnitude: an error of 1e-5 means
    nothing on logits near 1e3, and elements near zero in such an output carry the same absolute
    rounding error as the large ones.
    """
    rtol, relative_atol = _TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
    return relative_atol * max(1.0, float(reference_magnitude)), rtol


@dataclass(frozen=True)
class OutputComparison:
    """The verdict for one output tensor.

    ``passed`` is the final verdict; ``within_tolerance`` the plain tolerance check; ``exact`` the
    judgment against the float64 evaluation (None when it was not needed or not possible);
    ``decided_by`` which of the two decided (``tolerance`` or ``float64 reference``).
    """

    name: str
    dtype: str
    shape: list[int]
    passed: bool
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    needed_atol: float
    mismatched: int
    note: str = ""
    within_tolerance: bool | None = None
    exact: ExactComparison | None = None
    decided_by: str = "tolerance"

    def describe(self) -> str:
        """One line: what the output differs by, and which judgment decided."""
        over = "within tolerance" if self.within_tolerance is not False else "over tolerance"
        text = f"differs from the original by {self.max_abs_error:.2g} ({over})"
        if self.exact is None:
            return text
        joiner = "and is" if self.within_tolerance is not False or not self.exact.passed else "but is"
        if not self.exact.usable:
            return f"{text}; float64 reference not used: {self.exact.note}"
        return f"{text}, {joiner} {self.exact.describe()}"


def compare_output(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    shape: list[int] | None = None,
) -> OutputComparison:
    """Element-wise ``|actual - expected| <= atol + rtol * |expected|``; NaN matches NaN, inf matches inf.

    ``shape`` is what to report as the output's shape (default: ``expected``'s).
    """
    expected, actual = np.asarray(expected), np.asarray(actual)
    shape = list(expected.shape) if shape is None else list(shape)
    dtype = expected.dtype.name
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return OutputComparison(
            name,
            dtype,
            shape,
            False,
            float("inf"),
            float("inf"),
            float("inf"),
            atol or 0.0,
            rtol or 0.0,
            float("inf"),
            int(expected.size),
            f"folded output is {actual.dtype.name}{list(actual.shape)}",
            within_tolerance=False,
        )
    if not is_float(expected.dtype):
        mismatched = int(np.count_nonzero(expected != actual))
        return OutputComparison(
            name,
            dtype,
            shape,
            mismatched == 0,
            float(mismatched > 0),
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            mismatched,
            "compared exactly",
            within_tolerance=mismatched == 0,
        )
    with np.errstate(invalid="ignore"):  # a signalling NaN warns when cast
        reference = expected.astype(np.float64)
        candidate = actual.astype(np.float64)
    finite = np.isfinite(reference)
    finite_reference = reference[finite]
    magnitude = float(np.abs(finite_reference).max()) if finite_reference.size else 1.0
    default_atol, default_rtol = default_tolerances(expected.dtype, magnitude)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        same = (reference == candidate) | (np.isnan(reference) & np.isnan(candidate))
        error = np.where(same, 0.0, np.abs(candidate - reference))
        error = np.where(np.isnan(error), np.inf, error)
        # Only a finite reference has a tolerance: NaN matches only NaN, inf only the same inf
        # (a bound of atol + rtol * inf would let any finite value pass, and a NaN bound fails even
        # equal NaNs).
        magnitudes = np.where(finite, np.abs(reference), 0.0)
        bound = atol + rtol * magnitudes
        relative = np.where(
            same, 0.0, np.where(finite, error / np.maximum(magnitudes, np.finfo(np.float64).tiny), np.inf)
        )
        needed = np.where(same, 0.0, np.where(finite, np.maximum(error - rtol * magnitudes, 0.0), np.inf))
    failing = ~(same | (finite & (error <= bound)))
    mismatched = int(np.count_nonzero(failing))
    size = max(error.size, 1)
    return OutputComparison(
        name=name,
        dtype=dtype,
        shape=shape,
        passed=mismatched == 0,
        max_abs_error=float(error.max(initial=0.0)),
        mean_abs_error=float(error.sum() / size) if np.isfinite(error).all() else float("inf"),
        max_rel_error=float(relative.max(initial=0.0)),
        atol=float(atol),
        rtol=float(rtol),
        needed_atol=float(needed.max(initial=0.0)),
        mismatched=mismatched,
        within_tolerance=mismatched == 0,
    )


def failed_outputs(names: Sequence[str], expected: Sequence[Any], note: str) -> list[OutputComparison]:
    """Every output failed for ``note`` (a model that could not run inputs the original ran: there is
    nothing to compare, and that is a mismatch, not a pass); shapes and dtypes from ``expected``."""
    inf = float("inf")
    return [
        OutputComparison(
            name,
            np.asarray(value).dtype.name,
            list(np.asarray(value).shape),
            False,
            inf,
            inf,
            inf,
            0.0,
            0.0,
            inf,
            int(np.asarray(value).size),
            note,
            within_tolerance=False,
        )
        for name, value in zip(names, expected, strict=True)
    ]


def is_float(dtype: np.dtype) -> bool:
    """Whether outputs of ``dtype`` are compared with a tolerance (bfloat16 is numpy kind "V")."""
    return dtype.kind in "fc" or is_supported_float(dtype)


def judge_against_reference(
    comparison: OutputComparison,
    reference: np.ndarray,
    original: np.ndarray,
    folded: np.ndarray,
) -> OutputComparison:
    """``comparison`` with the float64 judgment added, and decided by it when over tolerance.

    ``reference`` is the original model's output evaluated in float64, ``original`` and ``folded``
    the two models' outputs (same shape). A comparison within tolerance stays a pass (the judgment
    is shown next to it); one over tolerance passes only when the folded output is no further from
    the reference than :data:`EXACT_MARGIN` times the original's error (or :data:`FLOOR_ULPS`).
    """
    original, folded = np.asarray(original), np.asarray(folded)
    if not is_float(original.dtype) or original.shape != folded.shape or original.dtype != folded.dtype:
        return comparison  # exact or structural mismatches are not a matter of precision
    reference = np.asarray(reference)
    if reference.size != original.size or not (reference.dtype.kind in "fciub" or is_float(reference.dtype)):
        given = f"{reference.dtype.name}{list(reference.shape)}"
        note = f"the float64 evaluation gives {given}, not {original.size} values"
        unusable = ExactComparison(0.0, 0.0, 0.0, 0.0, 0.0, EXACT_MARGIN, 0.0, False, False, note)
        return OutputComparison(**{**_fields(comparison), "exact": unusable})
    exact = exact_comparison(reference, original, folded)
    decided_by = comparison.decided_by
    passed = comparison.passed
    if not comparison.passed and exact.usable:
        passed, decided_by = exact.passed, "float64 reference"
    return OutputComparison(
        **{
            **_fields(comparison),
            "passed": passed,
            "exact": exact,
            "decided_by": decided_by,
        }
    )


def _fields(comparison: OutputComparison) -> dict:
    return {name: getattr(comparison, name) for name in comparison.__dataclass_fields__}


@dataclass
class VerificationResult:
    """Per-output comparisons over every run; truthy when every output passes.

    ``runs`` lists what was run (seed and input shapes per run; the first is also ``seed`` and
    ``input_shapes``), ``uncovered`` what those runs could not reach, ``reference`` the float64
    evaluation (``computed``, ``seconds``, or why it was ``skipped``), ``mode`` the judgment
    (``auto``: tolerance, then the float64 reference when over it; ``always``: the reference is
    always computed and shown; ``strict``: tolerance only). ``local`` holds the checks of subgraphs
    the fold changed, run on values captured from the original (:mod:`bnfold.verify_local`); a
    local mismatch fails the verification as an end-to-end one does.
    """

    outputs: list[OutputComparison]
    provider: str
    seed: int
    input_shapes: dict[str, list[int]]
    input_source: str
    notes: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    mode: str = "auto"
    local: list[LocalCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs) and all(check.passed for check in self.local)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "provider": self.provider,
            "seed": self.seed,
            "input_shapes": self.input_shapes,
            "input_source": self.input_source,
            "mode": self.mode,
            "outputs": [asdict(output) for output in self.outputs],
            "runs": self.runs,
            "uncovered": self.uncovered,
            "reference": self.reference,
            "notes": self.notes,
            "local": [check.to_dict() for check in self.local],
        }

    def coverage_text(self) -> list[str]:
        """What the runs covered and could not, one statement per line."""
        runs = self.runs or [{"seed": self.seed, "input_shapes": self.input_shapes}]
        described = "; ".join(_describe_run(run) for run in runs)
        lines = [f"covered: {len(runs)} run(s): {described}"]
        checked = [check for check in self.local if check.status == "checked"]
        shown = [check for check in checked if not check.passed]  # every mismatch, then the first passes
        shown += [check for check in checked if check.passed][: max(0, _SHOWN_LOCAL - len(shown))]
        lines += [f"covered locally: {check.describe()}" for check in shown]
        if len(checked) > len(shown):
            lines.append(
                f"covered locally: {len(checked) - len(shown)} more subgraph(s), listed in the JSON result"
            )
        unchanged = sum(check.status == "unchanged" for check in self.local)
        if unchanged:
            lines.append(f"covered: {unchanged} subgraph(s) unchanged by the fold")
        lines += [f"not covered: {item}" for item in self.uncovered]
        return lines

    def to_text(self) -> str:
        header = ("output", "dtype", "shape", "max abs err", "max rel err", "atol", "rtol", "result")
        rows = [header]
        local = [
            dataclasses.replace(output, name=f"{check.subgraph}: {output.name}")
            for check in self.local
            for output in check.outputs
            if not output.passed or output.exact is not None
        ]
        for output in [*self.outputs, *local]:
            if output.passed:
                verdict = "ok" if output.decided_by == "tolerance" else "ok (float64 reference)"
            else:
                verdict = (
                    f"MISMATCH ({output.mismatched} elements; atol {output.needed_atol:.3g} would pass)"
                    f"{' ' + output.note if output.note else ''}"
                )
            rows.append(
                (
                    output.name,
                    output.dtype,
                    "x".join(map(str, output.shape)) or "scalar",
                    f"{output.max_abs_error:.3g}",
                    f"{output.max_rel_error:.3g}",
                    f"{output.atol:.3g}",
                    f"{output.rtol:.3g}",
                    verdict,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
            + "  "
            + row[-1]
            for row in rows
        ]
        verdict = "passed" if self.passed else "FAILED"
        shapes = ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in self.input_shapes.items())
        lines.append(
            f"verification {verdict} on {self.provider} ({self.input_source} inputs, seed {self.seed}; "
            f"{shapes})"
        )
        for output in [*self.outputs, *local]:
            if output.exact is not None:
                lines.append(f"{output.name}: {output.describe()}")
        reference = self.reference or {}
        if reference.get("skipped"):
            lines.append(f"float64 reference skipped: {reference['skipped']}")
        elif reference.get("computed"):
            lines.append(f"float64 reference of the original: {reference['seconds']:.2f} s")
        lines += self.coverage_text()
        lines += self.notes
        return "\n".join(lines)


def _describe_run(run: dict[str, Any]) -> str:
    shapes = ", ".join(
        f"{name}={'x'.join(map(str, shape)) or 'scalar'}" for name, shape in run["input_shapes"].items()
    )
    seed = run.get("seed")
    return f"{shapes} (seed {seed})" if seed is not None else f"{shapes} (given data)"


def judge_runs(
    names: Sequence[str],
    expected_runs: Sequence[Sequence[np.ndarray]],
    actual_runs: Sequence[Sequence[np.ndarray]],
    *,
    atol: float | None,
    rtol: float | None,
    exact: str,
    reference: Callable[[], tuple[list[list[np.ndarray]], float]],
) -> tuple[list[OutputComparison], dict[str, Any] | None]:
    """Judge every output over every run; the float64 ``reference`` is asked for when the mode needs it.

    ``expected_runs[run][output]`` are the original's outputs, ``actual_runs`` the folded model's,
    ``reference()`` returns the original's float64 outputs the same way and the seconds they took
    (or raises :class:`ReferenceUnavailable`). ``exact`` is ``auto`` (the reference judges outputs
    over the default tolerance), ``always`` (computed for every output; it may also pass an output
    over a given ``atol``/``rtol``) or ``strict`` (tolerance only). Returns the comparisons and what
    happened to the reference (None in strict mode).
    """
    if exact not in EXACT_MODES:
        raise ValueError(f"unknown exact mode {exact!r}; choose from {', '.join(EXACT_MODES)}")
    outputs = [
        _compare_runs(
            name, [run[index] for run in expected_runs], [run[index] for run in actual_runs], atol, rtol
        )
        for index, name in enumerate(names)
    ]
    if exact == "strict":
        return outputs, None
    info: dict[str, Any] = {"computed": False, "seconds": 0.0, "skipped": None}
    over = any(output.within_tolerance is False for output in outputs)
    # Tolerances the caller chose are the judge, unless they asked for the reference too.
    chosen = atol is not None or rtol is not None
    if not (exact == "always" or (over and not chosen)):
        return outputs, info
    try:
        reference_runs, seconds = reference()
    except ReferenceUnavailable as error:
        info["skipped"] = (
            f"{error}; the plain tolerance decides (if the difference is rounding noise, pass --atol "
            "with the atol that would pass, or real data with --inputs)"
        )
        return outputs, info
    info.update(computed=True, seconds=round(seconds, 3))
    judged = [
        judge_against_reference(
            output,
            _joined([run[index] for run in reference_runs]),
            _joined([run[index] for run in expected_runs]),
            _joined([run[index] for run in actual_runs]),
        )
        for index, output in enumerate(outputs)
    ]
    return judged, info


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """Outputs of several runs as one flat array (runs may have different shapes)."""
    if len(arrays) == 1:
        return np.asarray(arrays[0])
    return np.concatenate([np.asarray(array).reshape(-1) for array in arrays])


def _compare_runs(
    name: str, expected: list[np.ndarray], actual: list[np.ndarray], atol, rtol
) -> OutputComparison:
    """One comparison over every run's values of an output; the first run's shape is reported."""
    shape = list(np.asarray(expected[0]).shape)
    for reference, candidate in zip(expected, actual, strict=True):
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape or reference.dtype != candidate.dtype:
            return compare_output(name, reference, candidate, atol=atol, rtol=rtol)
    return compare_output(name, _joined(expected), _joined(actual), atol=atol, rtol=rtol, shape=shape)
