"""Compare a PyTorch module's outputs with another module's, or with an ONNX model's in ONNX Runtime.

Both checks produce the same :class:`~bnfold.verify.VerificationResult` the ONNX verifier does
(per output: max/mean abs and relative error, tolerance used, tolerance that would have passed), so
reports, JSON and the CLI render them alike. The reference is always the *original* torch module.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from onnx import ModelProto
from torch import nn

from bnfold.comparison import ReferenceUnavailable, failed_outputs, judge_runs
from bnfold.errors import InputSpecError
from bnfold.fx.trace import describe_inputs, first_line, input_copies, preserved_buffers
from bnfold.progress import Progress, step
from bnfold.verify import (
    OutputComparison,
    VerificationResult,
    compare_output,
    ort_session,
    run_session,
)
from bnfold.verify_inputs import shapes_text

DEFAULT_LIMIT_BYTES = 1 << 30  # as bnfold.reference's (not imported: it loads onnx.reference)

__all__ = [
    "module_outputs",
    "flatten_outputs",
    "compare_outputs",
    "compare_with_onnx",
    "compare_runs_with_onnx",
    "output_names",
    "TorchRun",
    "covered_runs",
    "float64_outputs",
    "module_copier",
    "judged_result",
]


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in the order the ONNX exporters flatten them."""
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def module_outputs(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> list:
    """The module's output tensors (on CPU, detached). Buffers are restored afterwards: a BN left in
    training mode would otherwise update its running statistics in the caller's model. The module
    runs on copies of its tensor inputs: one that writes into them (``x.mul_(3)``) must not change
    what the next run, the folded module or the caller see."""
    args, kwargs = input_copies((tuple(args), dict(kwargs or {})))
    with preserved_buffers(module), torch.no_grad():
        outputs = module(*args, **kwargs)
    return [tensor.detach().cpu() for tensor in flatten_outputs(outputs)]


def output_names(count: int) -> list[str]:
    """``output`` for one output, else ``output_0``, ``output_1``, ... (bnfold.export's names)."""
    return ["output"] if count == 1 else [f"output_{index}" for index in range(count)]


def compare_outputs(
    names: Sequence[str],
    expected: Sequence[torch.Tensor | np.ndarray],
    actual: Sequence[torch.Tensor | np.ndarray],
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> list[OutputComparison]:
    """Element-wise comparison per output with bnfold's per-dtype default tolerances."""
    return [
        _compare_one(name, reference, candidate, atol, rtol)
        for name, reference, candidate in zip(names, expected, actual, strict=True)
    ]


def _compare_one(name: str, expected, actual, atol: float | None, rtol: float | None) -> OutputComparison:
    if _dtype_name(expected) == "bfloat16":  # numpy has no bfloat16; ml_dtypes' has the same bits
        import ml_dtypes

        expected, actual = (_numpy(value).astype(ml_dtypes.bfloat16) for value in (expected, actual))
    else:
        expected, actual = _numpy(expected), _numpy(actual)
    return compare_output(name, expected, actual, atol=atol, rtol=rtol)


def _dtype_name(value) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    return np.asarray(value).dtype.name


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def compare_with_onnx(
    expected: Sequence[torch.Tensor],
    onnx_model: ModelProto | str | os.PathLike,
    feeds: Sequence[Any] | Mapping[str, Any],
    *,
    provider: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    input_source: str = "example",
    exact: str = "auto",
    reference: Callable[[], tuple[list[list[np.ndarray]], float]] | None = None,
) -> VerificationResult:
    """Run ``onnx_model`` in ONNX Runtime (graph optimizations off) and compare with ``expected``.

    ``feeds`` are the inputs: positional (matched to the model's inputs in order) or by name.
    ``reference`` gives the module's float64 outputs for the ``exact`` judgment (see
    :func:`bnfold.comparison.judge_runs`); without it that judgment is reported as unavailable.
    """
    if isinstance(feeds, Mapping):
        run = TorchRun((), None, list(expected), dict(feeds))
    else:
        run = TorchRun(tuple(feeds), None, list(expected))
    return compare_runs_with_onnx(
        [run],
        onnx_model,
        provider=provider,
        atol=atol,
        rtol=rtol,
        input_source=input_source,
        exact=exact,
        reference=reference,
    )


def compare_runs_with_onnx(
    runs: Sequence[TorchRun],
    onnx_model: ModelProto | str | os.PathLike,
    *,
    provider: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    input_source: str = "example",
    exact: str = "auto",
    reference: Callable[[], tuple[list[list[np.ndarray]], float]] | None = None,
    uncovered: Sequence[str] = (),
    progress: Progress | None = None,
) -> VerificationResult:
    """Run ``onnx_model`` on every run's inputs and judge it against the module's outputs
    (``progress`` is told about the session and each run).

    The first run's inputs are the caller's: a failure there is an :class:`InputSpecError`. A later
    run (a second size of the dynamic axes, which the module ran) that the ONNX model cannot run is
    a mismatch: every output fails, saying so.
    """
    # bnfold.verify owns ONNX Runtime sessions: providers, CUDA checks, optimizations off.
    with step(progress, "verifying: loading the exported model into ONNX Runtime"):
        session, used_provider = ort_session(onnx_model, provider, "exported")
    actual, failure = [], ""
    for number, run in enumerate(runs, 1):
        shapes = shapes_text(run.describe()["input_shapes"])
        feeds = _onnx_feeds(session, run)
        with step(progress, f"verifying: run {number} of the exported model ({shapes})"):
            if number == 1:
                actual.append(run_session(session, feeds, "exported"))
                continue
            try:
                actual.append(session.run(None, feeds))
            except Exception as error:  # onnxruntime raises several unrelated types
                failure = f"the ONNX model fails on {shapes}, which the module runs ({first_line(error)})"
                break
    names = [meta.name for meta in session.get_outputs()]
    del session
    if failure:
        return VerificationResult(
            outputs=failed_outputs(names, [_comparable(value) for value in runs[0].expected], failure),
            provider=used_provider,
            seed=0,
            input_shapes=runs[0].describe()["input_shapes"],
            input_source=input_source,
            runs=[run.describe() for run in runs],
            uncovered=list(uncovered),
            mode=exact,
        )
    for run, outputs in zip(runs, actual, strict=True):
        if len(outputs) != len(run.expected):
            raise InputSpecError(
                f"the ONNX model has {len(outputs)} outputs, "
                f"the PyTorch module returns {len(run.expected)} tensors"
            )
    return judged_result(
        names,
        runs,
        actual,
        atol=atol,
        rtol=rtol,
        exact=exact,
        reference=reference or _no_reference,
        provider=used_provider,
        input_source=input_source,
        uncovered=uncovered,
    )


def _no_reference() -> tuple[list[list[np.ndarray]], float]:
    raise ReferenceUnavailable("no float64 evaluation of the module was given")


def _onnx_feeds(session, run: TorchRun) -> dict[str, np.ndarray]:
    metas = session.get_inputs()
    declared = {meta.name for meta in metas}
    if run.kwargs:
        named = {name: _numpy(value) for name, value in run.kwargs.items()}
        unknown = sorted(set(named) - declared)
        if unknown:
            raise InputSpecError(f"inputs {unknown} are not inputs of the ONNX model ({sorted(declared)})")
    else:
        values = [_numpy(value) for value in run.args]
        if len(values) < len(metas):
            raise InputSpecError(f"the ONNX model has {len(metas)} inputs, {len(values)} were given")
        named = {meta.name: value for meta, value in zip(metas, values, strict=False)}
    return {name: value for name, value in named.items() if name in declared}


# -- runs that cover what a fold decided, and the float64 reference -------------------------------
@dataclass(eq=False)
class TorchRun:
    """One run of the original module: positional inputs, the seed of random ones (None: given)."""

    args: tuple[Any, ...]
    seed: int | None
    expected: list[torch.Tensor] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        shapes = describe_inputs(self.args)
        shapes.update(
            {
                name: list(value.shape)
                for name, value in self.kwargs.items()
                if isinstance(value, torch.Tensor)
            }
        )
        return {"seed": self.seed, "input_shapes": shapes}


def covered_runs(
    module: nn.Module,
    args: tuple[Any, ...],
    *,
    axes: Mapping[int, set[int]] | None = None,
    seed: int = 1,
) -> tuple[list[TorchRun], list[str]]:
    """The example run and a second one: every dynamic axis at a second size (3 for 1, else 1).

    ``axes`` maps a positional input to its dynamic axes; None means unknown, and then the batch
    axis and every axis of size 1 are tried (the sizes a fold may silently rely on), then the batch
    axis alone. A size the module rejects is reported; the second run then uses random inputs of the
    example's shapes. Returns the runs (with the original's outputs) and what was not covered.
    """
    runs = [TorchRun(args, None, module_outputs(module, args))]
    tensors = {
        index: value for index, value in enumerate(args) if isinstance(value, torch.Tensor) and value.ndim
    }
    if axes is None:
        guesses = [
            {
                index: {0} | {axis for axis, size in enumerate(value.shape) if size == 1}
                for index, value in tensors.items()
            },
            {index: {0} for index in tensors},
        ]
    else:
        guesses = [{index: set(chosen) for index, chosen in axes.items() if chosen and index in tensors}]
    rejected: list[str] = []
    for guess in [
        guess for position, guess in enumerate(guesses) if guess and guess not in guesses[:position]
    ]:
        second = _resized(args, guess, seed)
        try:
            runs.append(TorchRun(second, seed, module_outputs(module, second)))
            break
        except Exception as error:  # the module refuses that size: say so
            rejected.append(f"{_shapes_text(second)} ({first_line(error)})")
    uncovered = []
    if len(runs) == 1:
        if rejected:
            uncovered.append(
                f"a second size of the dynamic axes: the module rejects {'; '.join(rejected)}; "
                "only the example's shapes were checked"
            )
        elif axes is not None:
            uncovered.append("a second size: no axis is dynamic, so only the example's shapes were checked")
        again = _resized(args, {}, seed)
        runs.append(TorchRun(again, seed, module_outputs(module, again)))
    return runs, uncovered


def _shapes_text(args: tuple[Any, ...]) -> str:
    return ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in describe_inputs(args).items())


def _resized(args: tuple[Any, ...], axes: Mapping[int, set[int]], seed: int) -> tuple[Any, ...]:
    """Random inputs like ``args``, with each axis in ``axes`` at a second size."""
    generator = torch.Generator().manual_seed(seed)
    resized = []
    for index, value in enumerate(args):
        if not isinstance(value, torch.Tensor):
            resized.append(value)
            continue
        shape = [
            (3 if size == 1 else 1) if axis in axes.get(index, ()) else size
            for axis, size in enumerate(value.shape)
        ]
        resized.append(_random_like(value, shape, generator))
    return tuple(resized)


def _random_like(value: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if value.dtype.is_floating_point or value.dtype.is_complex:
        sample = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif value.dtype == torch.bool:
        sample = torch.randint(0, 2, shape, generator=generator).bool()
    elif value.numel():
        low, high = int(value.min()), int(value.max())
        sample = torch.randint(low, high + 1, shape, generator=generator)
    else:
        sample = torch.zeros(shape, dtype=torch.int64)
    return sample.to(dtype=value.dtype, device=value.device)


def float64_outputs(
    module_factory: Callable[[], nn.Module],
    runs: Sequence[TorchRun],
    *,
    limit_bytes: int = DEFAULT_LIMIT_BYTES,
) -> tuple[list[list[np.ndarray]], float]:
    """The module evaluated in float64 on each run's inputs (float inputs cast), and the seconds taken.

    ``module_factory`` returns a module bnfold may convert in place (a deep copy of the original,
    or a fresh ``ExportedProgram.module()``). Raises :class:`ReferenceUnavailable` when it is too
    large, cannot be copied, or does not run in float64.
    """
    start = time.perf_counter()
    try:
        module = module_factory()
    except Exception as error:
        raise ReferenceUnavailable(f"the module cannot be copied ({first_line(error)})") from None
    size = 8 * sum(
        tensor.numel() for tensor in [*module.parameters(), *module.buffers()] if tensor.is_floating_point()
    )
    if size > limit_bytes:
        raise ReferenceUnavailable(
            f"its float64 weights would take {size / 2**20:.0f} MiB (limit {limit_bytes / 2**20:.0f} MiB)"
        )
    outputs = []
    try:
        module = module.double()
        for run in runs:
            args = tuple(_double(value) for value in run.args)
            kwargs = {name: _double(value) for name, value in run.kwargs.items()}
            outputs.append([tensor.numpy() for tensor in module_outputs(module, args, kwargs)])
    except Exception as error:
        raise ReferenceUnavailable(f"the module does not run in float64 ({first_line(error)})") from None
    return outputs, time.perf_counter() - start


def _double(value: Any) -> Any:
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def module_copier(module: nn.Module) -> Callable[[], nn.Module]:
    """A factory of deep copies of ``module`` (its float64 evaluation must not touch it)."""

    def copy_module() -> nn.Module:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return copy.deepcopy(module)

    return copy_module


def judged_result(
    names: Sequence[str],
    runs: Sequence[TorchRun],
    actual_runs: Sequence[Sequence[Any]],
    *,
    atol: float | None,
    rtol: float | None,
    exact: str,
    reference: Callable[[], tuple[list[list[np.ndarray]], float]],
    provider: str,
    input_source: str,
    uncovered: Sequence[str] = (),
) -> VerificationResult:
    """Both judgments (tolerance, then float64 when over it) over every run, as a result value."""
    expected = [[_comparable(value) for value in run.expected] for run in runs]
    actual = [[_comparable(value) for value in run] for run in actual_runs]
    outputs, reference_info = judge_runs(
        names, expected, actual, atol=atol, rtol=rtol, exact=exact, reference=reference
    )
    return VerificationResult(
        outputs=outputs,
        provider=provider,
        seed=0,
        input_shapes=runs[0].describe()["input_shapes"],
        input_source=input_source,
        runs=[run.describe() for run in runs],
        uncovered=list(uncovered),
        reference=reference_info,
        mode=exact,
    )


def _comparable(value) -> np.ndarray:
    if _dtype_name(value) == "bfloat16":  # numpy has no bfloat16; ml_dtypes' has the same bits
        import ml_dtypes

        return _numpy(value).astype(ml_dtypes.bfloat16)
    return _numpy(value)
