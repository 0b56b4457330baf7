"""``--benchmark``: what folding buys in ONNX Runtime, measured on the model before and after.

Both models run at ONNX Runtime's *default* optimization level (what a deployment gets, unlike the
verifier, which turns optimizations off): ONNX Runtime folds Conv->BN itself, so a plain CNN often
runs at the same speed, while BNs after Gemm/MatMul, in RepVGG branches or in float16 stay. Each
model gets warm-up runs, then ``runs`` timed runs; the median is reported. The models run one after
the other (never both sessions in memory at once), on inputs of the verification's shapes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.errors import InputSpecError
from bnfold.verify import VerificationResult, read_input_file, session_source

__all__ = ["Latency", "measure_latency", "WARMUP_RUNS"]

WARMUP_RUNS = 3

_INPUT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class Latency:
    """Median run time in milliseconds of the model before and after folding."""

    before_ms: float
    after_ms: float
    runs: int
    warmup: int
    provider: str

    @property
    def ratio(self) -> float:
        return self.after_ms / self.before_ms if self.before_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "before_ms": self.before_ms,
            "after_ms": self.after_ms,
            "ratio": self.ratio,
            "runs": self.runs,
            "warmup": self.warmup,
            "provider": self.provider,
            "optimization_level": "default",
        }

    def to_text(self) -> str:
        return (
            f"latency in ONNX Runtime ({self.provider}, default optimizations, median of {self.runs} runs "
            f"after {self.warmup} warm-up): before {self.before_ms:.3f} ms, after {self.after_ms:.3f} ms "
            f"({self.ratio:.2f}x)"
        )


def measure_latency(
    before: str | os.PathLike,
    after: str | os.PathLike,
    verification: VerificationResult | None,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    runs: int = 20,
) -> Latency:
    """Time ``before`` and ``after`` (ONNX files) on the verification's inputs (or its shapes)."""
    import onnxruntime

    provider = verification.provider if verification is not None else "cpu"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else None
    medians = []
    feeds: dict[str, np.ndarray] | None = None
    for path in (before, after):
        options = onnxruntime.SessionOptions()  # default level: ORT_ENABLE_ALL
        options.log_severity_level = 3
        with session_source(path) as source:  # (a path ONNX Runtime can open, e.g. not UTF-8)
            session = onnxruntime.InferenceSession(
                source, options, providers=providers or ["CPUExecutionProvider"]
            )
        if feeds is None:
            feeds = _feeds(session, verification, inputs)
        for _ in range(WARMUP_RUNS):
            session.run(None, feeds)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times) * 1000)
        del session
    return Latency(medians[0], medians[1], runs, WARMUP_RUNS, provider)


def _feeds(
    session: Any,
    verification: VerificationResult | None,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None,
) -> dict[str, np.ndarray]:
    """The real inputs when given, else seeded random ones of the shapes the verification ran."""
    if inputs is not None:
        if isinstance(inputs, Mapping):
            return {name: np.asarray(value) for name, value in inputs.items()}
        return read_input_file(inputs, [meta.name for meta in session.get_inputs()])
    shapes = verification.input_shapes if verification is not None else {}
    seed = verification.seed if verification is not None else 0
    feeds = {}
    for position, meta in enumerate(session.get_inputs()):
        if meta.type not in _INPUT_TYPES:
            raise InputSpecError(
                f"{{benchmark_runs}}: cannot make inputs of type {meta.type} for {meta.name}",
                parameters=("benchmark_runs",),
            )
        dtype = np.dtype(_INPUT_TYPES[meta.type])
        shape = shapes.get(meta.name) or [
            dim if isinstance(dim, int) and dim > 0 else 1 for dim in meta.shape
        ]
        generator = np.random.default_rng(seed + position)
        if dtype.kind == "f":
            feeds[meta.name] = generator.standard_normal(shape).astype(dtype)
        else:
            feeds[meta.name] = generator.integers(0, 2, size=shape).astype(dtype)
    return feeds
