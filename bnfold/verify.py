"""Prove a folded model computes what the original did: run both in ONNX Runtime, compare outputs.

Both models run with graph optimizations disabled — ONNX Runtime's own level-1 transformers fold
Conv->BN, so at the default level the "original" would already be folded and the check would
compare a fold with a fold. Inputs are random (seeded per input: ``seed + position``, so any failure
reproduces) or real data from an ``.npz`` file. Each output gets its own verdict: max/mean absolute
and relative error, the tolerance used, and the absolute tolerance that would have passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import ModelProto

from bnfold.affine import is_supported_float
from bnfold.errors import BnfoldError, InputSpecError, ProviderUnavailableError
from bnfold.onnx.graph import subgraphs_of
from bnfold.onnx.io import has_data_on_disk, load_model, save_model

__all__ = [
    "OutputComparison",
    "VerificationResult",
    "verify",
    "Verifier",
    "default_tolerances",
    "compare_output",
    "parse_input_shapes",
    "ort_session",
    "run_session",
    "PROVIDERS",
]

logger = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")

# (rtol, atol relative to the output's largest reference magnitude, at least 1). Folding reorders a
# multiply and an add per channel, so errors are a few units in the last place of the output scale.
_TOLERANCES = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 2e-3),
    "bfloat16": (5e-2, 1.6e-2),
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


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
    """The verdict for one output tensor."""

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


@dataclass
class VerificationResult:
    """Per-output comparisons; truthy when every output is within tolerance."""

    outputs: list[OutputComparison]
    provider: str
    seed: int
    input_shapes: dict[str, list[int]]
    input_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "provider": self.provider,
            "seed": self.seed,
            "input_shapes": self.input_shapes,
            "input_source": self.input_source,
            "outputs": [asdict(output) for output in self.outputs],
            "notes": self.notes,
        }

    def to_text(self) -> str:
        header = ("output", "dtype", "shape", "max abs err", "max rel err", "atol", "rtol", "result")
        rows = [header]
        for output in self.outputs:
            rows.append(
                (
                    output.name,
                    output.dtype,
                    "x".join(map(str, output.shape)) or "scalar",
                    f"{output.max_abs_error:.3g}",
                    f"{output.max_rel_error:.3g}",
                    f"{output.atol:.3g}",
                    f"{output.rtol:.3g}",
                    "ok"
                    if output.passed
                    else f"MISMATCH ({output.mismatched} elements; "
                    f"atol {output.needed_atol:.3g} would pass){' ' + output.note if output.note else ''}",
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
        return "\n".join(lines)


ModelSource = ModelProto | bytes | str | os.PathLike


def verify(
    original: ModelSource,
    folded: ModelSource,
    *,
    provider: str = "auto",
    input_shapes: Mapping[str, list[int]] | None = None,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerificationResult:
    """Run ``original`` and ``folded`` on the same inputs and compare every output.

    ``inputs`` is a dict or an ``.npz`` path of real data; otherwise inputs are random, with dynamic
    dimensions from ``input_shapes`` (default 1). ``provider`` is ``cpu``, ``cuda`` or ``auto``
    (CUDA when usable, else CPU); asking for CUDA where it cannot run raises
    :class:`ProviderUnavailableError`. ``atol``/``rtol`` override the per-dtype defaults.
    """
    verifier = Verifier(original, provider=provider)
    return verifier.compare(folded, input_shapes=input_shapes, inputs=inputs, seed=seed, atol=atol, rtol=rtol)


class Verifier:
    """The original model's ONNX Runtime session, made up front.

    Creating it before folding lets a caller then fold the very same ModelProto in place: ONNX
    Runtime keeps its own copy of the weights, so no second copy of the model is needed.
    """

    def __init__(self, original: ModelSource, *, provider: str = "auto") -> None:
        if provider not in PROVIDERS:
            raise BnfoldError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
        self.session, self.provider = ort_session(original, provider, "original")

    def compare(
        self,
        folded: ModelSource,
        *,
        input_shapes: Mapping[str, list[int]] | None = None,
        inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
        seed: int = 0,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> VerificationResult:
        """Run both models on the same inputs (see :func:`verify`) and compare every output."""
        if inputs is not None and input_shapes:
            raise InputSpecError(
                "give either --inputs (real data, with its own shapes) or --input-shape, not both"
            )
        folded_session, _ = ort_session(folded, "cuda" if self.provider == "cuda" else "cpu", "folded")
        _check_same_signature(self.session, folded_session)
        if inputs is not None:
            feeds = _load_inputs(self.session, inputs)
            source = "real" if isinstance(inputs, Mapping) else f"file {inputs}"
        else:
            feeds, source = _random_inputs(self.session, input_shapes or {}, seed), "random"
        expected = run_session(self.session, feeds, "original")
        actual = run_session(folded_session, feeds, "folded")
        metas = self.session.get_outputs()
        outputs = [
            compare_output(meta.name, reference, candidate, atol=atol, rtol=rtol)
            for meta, reference, candidate in zip(metas, expected, actual, strict=True)
        ]
        return VerificationResult(
            outputs=outputs,
            provider=self.provider,
            seed=seed,
            input_shapes={name: list(value.shape) for name, value in feeds.items()},
            input_source=source,
        )


def compare_output(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> OutputComparison:
    """Element-wise ``|actual - expected| <= atol + rtol * |expected|``; NaN matches NaN, inf matches inf."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    shape = list(expected.shape)
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
        )
    if not (expected.dtype.kind in "fc" or is_supported_float(expected.dtype)):  # bfloat16 is kind "V"
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
    )


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """``["x=1,3,224,224", ...]`` -> ``{"x": [1, 3, 224, 224]}``, with a clear error for bad text."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, separator, dims = spec.rpartition("=")
        if not separator or not name:
            raise InputSpecError(f"--input-shape {spec!r}: expected NAME=D1,D2,... e.g. input=1,3,224,224")
        try:
            shape = [int(dim) for dim in dims.split(",")] if dims.strip() else []
        except ValueError:
            raise InputSpecError(f"--input-shape {spec!r}: dimensions must be integers") from None
        if any(dim <= 0 for dim in shape):
            raise InputSpecError(
                f"--input-shape {spec!r}: dimensions must be positive (an empty tensor compares nothing)"
            )
        if name in shapes:
            raise InputSpecError(f"--input-shape {name}: given twice")
        shapes[name] = shape
    return shapes


# -- sessions ------------------------------------------------------------------------------------
def ort_session(model: ModelSource, provider: str, role: str):
    """An ONNX Runtime session on ``provider`` (``cpu``, ``cuda``, ``auto``) with graph optimizations
    off (the model runs as written), and the provider it got; ``role`` names the model in errors.

    ``cuda`` where CUDA cannot run is an error, never a silent fallback to the CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda_available = "CUDAExecutionProvider" in available
    if provider == "cuda" and not cuda_available:
        raise ProviderUnavailableError(
            "CUDA was requested but this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu on a machine with an NVIDIA GPU), or use --provider cpu"
        )
    want_cuda = provider == "cuda" or (provider == "auto" and cuda_available)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # FATAL only: errors reach the user in our one-line message
    with _session_source(model) as source:
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises several unrelated exception types here
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BnfoldError(
                f"ONNX Runtime cannot load the {role} model ({message}); use --no-verify to skip"
            ) from None
    used_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
    if provider == "cuda" and not used_cuda:
        raise ProviderUnavailableError(
            "CUDAExecutionProvider is installed but could not start (CUDA/cuDNN libraries or GPU "
            "missing); use --provider cpu"
        )
    return session, "cuda" if used_cuda else "cpu"


@contextlib.contextmanager
def _session_source(model: ModelSource) -> Iterator[bytes | str]:
    """Bytes or a path ONNX Runtime can load, with trailing empty node outputs dropped.

    Empty trailing outputs mean nothing, but ONNX Runtime 1.32 crashes (SIGSEGV) on a
    BatchNormalization-9 that lists them when graph optimizations are disabled.
    """
    if isinstance(model, bytes):
        parsed = ModelProto()
        parsed.ParseFromString(model)
        model = parsed
    elif not isinstance(model, ModelProto):
        model = load_model(model, lazy=True).model
    with _without_trailing_empty_outputs(model):
        # A model whose weights are on disk (a lazy load, a fold's spill file), or one over 2 GB, is
        # written with external data to a temporary directory (file ranges are copied by the kernel,
        # not read into memory) and ONNX Runtime loads it from there; others go as bytes.
        serialized = None
        if not has_data_on_disk(model):
            with contextlib.suppress(EncodeError, ValueError):
                serialized = model.SerializeToString()
        if serialized is not None:
            yield serialized
            return
        with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as directory:
            path = Path(directory) / "model.onnx"
            save_model(model, path, external_data=True)
            yield str(path)


@contextlib.contextmanager
def _without_trailing_empty_outputs(model: ModelProto) -> Iterator[None]:
    trimmed: list[tuple[onnx.NodeProto, int]] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            count = 0
            while len(node.output) > 1 and node.output[-1] == "":
                del node.output[-1]
                count += 1
            if count:
                trimmed.append((node, count))
            for _, subgraph in subgraphs_of(node):
                visit(subgraph)

    visit(model.graph)
    try:
        yield
    finally:
        for node, count in trimmed:
            node.output.extend([""] * count)


def _check_same_signature(original, folded) -> None:
    original_inputs = [meta.name for meta in original.get_inputs()]
    folded_inputs = [meta.name for meta in folded.get_inputs()]
    if original_inputs != folded_inputs:
        raise BnfoldError(f"the models have different inputs: {original_inputs} vs {folded_inputs}")
    original_outputs = [meta.name for meta in original.get_outputs()]
    folded_outputs = [meta.name for meta in folded.get_outputs()]
    if original_outputs != folded_outputs:
        raise BnfoldError(f"the models have different outputs: {original_outputs} vs {folded_outputs}")


def run_session(session, feeds: dict[str, np.ndarray], role: str) -> list[np.ndarray]:
    """Every output of ``session`` on ``feeds``; a failure is an InputSpecError naming ``role``."""
    try:
        return session.run(None, feeds)
    except Exception as error:  # invalid shapes reach us as ORT runtime errors
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputSpecError(
            f"ONNX Runtime failed to run the {role} model on the inputs ({message}); "
            "check --input-shape / --inputs"
        ) from None


# -- inputs --------------------------------------------------------------------------------------
def _input_dtype(meta) -> np.dtype:
    if meta.type not in _ORT_TYPES:
        raise InputSpecError(
            f"input {meta.name!r} has type {meta.type}, which bnfold cannot generate; pass --inputs data.npz"
        )
    return np.dtype(_ORT_TYPES[meta.type])


def _random_inputs(session, shapes: Mapping[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    metas = session.get_inputs()
    unknown = set(shapes) - {meta.name for meta in metas}
    if unknown:
        names = ", ".join(meta.name for meta in metas)
        raise InputSpecError(
            f"--input-shape names unknown input(s) {sorted(unknown)}; the model has: {names}"
        )
    feeds = {}
    for position, meta in enumerate(metas):
        declared = list(meta.shape)
        if meta.name in shapes:
            shape = list(shapes[meta.name])
            if len(shape) != len(declared):
                raise InputSpecError(
                    f"--input-shape {meta.name}: rank {len(shape)} given, the model declares {declared}"
                )
            for given, fixed in zip(shape, declared, strict=True):
                if isinstance(fixed, int) and fixed != given:
                    given_text = ",".join(map(str, shape))
                    raise InputSpecError(
                        f"--input-shape {meta.name}={given_text}: the model fixes it to {declared}"
                    )
        else:
            shape = [dim if isinstance(dim, int) and dim >= 0 else 1 for dim in declared]
        dtype = _input_dtype(meta)
        generator = np.random.default_rng(seed + position)
        if dtype.kind == "f":
            value = generator.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            value = generator.integers(0, 2, size=shape).astype(np.bool_)
        else:
            value = generator.integers(0, 4, size=shape).astype(dtype)
        feeds[meta.name] = value
    return feeds


def _load_inputs(session, inputs: Mapping[str, np.ndarray] | str | os.PathLike) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        path = Path(inputs)
        try:
            with np.load(path, allow_pickle=False) as archive:
                inputs = {name: archive[name] for name in archive.files}
        except FileNotFoundError:
            raise InputSpecError(f"{path}: no such file") from None
        except (OSError, ValueError) as error:
            raise InputSpecError(f"{path}: not a readable .npz file ({error})") from None
    metas = {meta.name: meta for meta in session.get_inputs()}
    missing = sorted(set(metas) - set(inputs))
    extra = sorted(set(inputs) - set(metas))
    if missing or extra:
        raise InputSpecError(
            f"--inputs do not match the model's inputs: missing {missing}, unexpected {extra}"
        )
    feeds = {}
    for name, meta in metas.items():
        value = np.asarray(inputs[name])
        dtype = _input_dtype(meta)
        if value.dtype != dtype:
            raise InputSpecError(f"--inputs {name}: dtype {value.dtype.name}, the model expects {dtype.name}")
        declared = list(meta.shape)
        if len(declared) != value.ndim or any(
            isinstance(fixed, int) and fixed != given
            for fixed, given in zip(declared, value.shape, strict=True)
        ):
            raise InputSpecError(f"--inputs {name}: shape {list(value.shape)}, the model declares {declared}")
        feeds[name] = value
    return feeds
