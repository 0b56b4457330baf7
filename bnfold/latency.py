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

from bnfold.verify import VerificationResult, session_source
from bnfold.verify_inputs import random_inputs, read_input_file

__all__ = ["Latency", "measure_latency", "WARMUP_RUNS"]

WARMUP_RUNS = 3


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
    return random_inputs(session, shapes, seed)
