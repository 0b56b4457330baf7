"""Compare a PyTorch module's outputs with another module's, or with an ONNX model's in ONNX Runtime.

Both checks produce the same :class:`~bnfold.verify.VerificationResult` the ONNX verifier does
(per output: max/mean abs and relative error, tolerance used, tolerance that would have passed), so
reports, JSON and the CLI render them alike. The reference is always the *original* torch module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from onnx import ModelProto
from torch import nn

from bnfold.errors import InputSpecError
from bnfold.fx.trace import preserved_buffers
from bnfold.verify import (
    OutputComparison,
    VerificationResult,
    compare_output,
    ort_session,
    run_session,
)

__all__ = ["module_outputs", "flatten_outputs", "compare_outputs", "compare_with_onnx", "output_names"]


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in the order the ONNX exporters flatten them."""
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def module_outputs(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> list:
    """The module's output tensors (on CPU, detached). Buffers are restored afterwards: a BN left in
    training mode would otherwise update its running statistics in the caller's model."""
    with preserved_buffers(module), torch.no_grad():
        outputs = module(*args, **(kwargs or {}))
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
) -> VerificationResult:
    """Run ``onnx_model`` in ONNX Runtime (graph optimizations off) and compare with ``expected``.

    ``feeds`` are the inputs: positional (matched to the model's inputs in order) or by name.
    """
    # bnfold.verify owns ONNX Runtime sessions: providers, CUDA checks, optimizations off.
    session, used_provider = ort_session(onnx_model, provider, "exported")
    metas = session.get_inputs()
    if isinstance(feeds, Mapping):
        named = {name: _numpy(value) for name, value in feeds.items()}
    else:
        values = [_numpy(value) for value in feeds]
        if len(values) < len(metas):
            raise InputSpecError(f"the ONNX model has {len(metas)} inputs, {len(values)} were given")
        named = {meta.name: value for meta, value in zip(metas, values, strict=False)}
    declared = {meta.name for meta in metas}
    unknown = sorted(set(named) - declared)
    if isinstance(feeds, Mapping) and unknown:
        raise InputSpecError(f"inputs {unknown} are not inputs of the ONNX model ({sorted(declared)})")
    run_feeds = {name: value for name, value in named.items() if name in declared}
    actual = run_session(session, run_feeds, "exported")
    names = [meta.name for meta in session.get_outputs()]
    if len(actual) != len(expected):
        raise InputSpecError(
            f"the ONNX model has {len(actual)} outputs, the PyTorch module returns {len(expected)} tensors"
        )
    return VerificationResult(
        outputs=compare_outputs(names, expected, actual, atol=atol, rtol=rtol),
        provider=used_provider,
        seed=0,
        input_shapes={name: list(value.shape) for name, value in run_feeds.items()},
        input_source=input_source,
    )
