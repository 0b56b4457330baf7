"""A pytest helper for your own CI: assert that an ONNX file computes what your PyTorch module does.

::

    import torch
    from bnfold.testing import assert_equivalent

    def test_export_matches_model(tmp_path):
        model = build_model().eval()
        inputs = torch.randn(4, 3, 224, 224)
        bnfold.export(model, inputs, tmp_path / "model.onnx")
        assert_equivalent(model, tmp_path / "model.onnx", inputs)

On a mismatch it raises ``AssertionError`` with one row per output: name, dtype, shape, max absolute
and relative error, the tolerances used, and the absolute tolerance that would have passed. The
ONNX model runs in ONNX Runtime with graph optimizations off (so ONNX Runtime's own fusions cannot
hide a difference). Importing this module does not import torch; calling the helper does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnfold.errors import InputSpecError

__all__ = ["assert_equivalent"]


def assert_equivalent(
    model: Any,
    onnx_model: str | os.PathLike | Any,
    inputs: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
    exact: str = "auto",
):
    """Run ``model`` (a torch module, in the mode you give it) and ``onnx_model`` on ``inputs``; compare.

    ``inputs``: a tensor or numpy array (one input), a tuple or list of them (positional inputs, fed
    to the ONNX inputs in order), or a dict (keyword arguments for the module, ONNX inputs by the
    same names); numpy arrays become tensors of their dtype. Anything else is an
    :class:`~bnfold.errors.InputSpecError` that says what to pass. ``atol``/``rtol`` default to
    bnfold's per-dtype tolerances (float32: rtol 1e-4, atol 1e-5 scaled by the output's magnitude).
    An output over the default tolerance is then judged against ``model`` evaluated in float64 (a
    deep copy in double precision): it passes when the ONNX model is no further from that exact
    function than the module's own float32 output is (``exact="strict"``: tolerance only;
    ``"always"``: the float64 judgment is computed and shown for every output).
    Returns the :class:`~bnfold.verify.VerificationResult` when every output matches.
    """

    from bnfold.fx.compare import (
        TorchRun,
        compare_runs_with_onnx,
        float64_outputs,
        module_copier,
        module_outputs,
    )

    if isinstance(inputs, Mapping):
        kwargs = {str(name): _as_tensor(value, f"inputs[{name!r}]") for name, value in inputs.items()}
        run = TorchRun((), None, module_outputs(model, (), kwargs), kwargs)
    else:
        args = _positional(inputs)
        run = TorchRun(args, None, module_outputs(model, args))
    result = compare_runs_with_onnx(
        [run],
        onnx_model,
        provider=provider,
        atol=atol,
        rtol=rtol,
        input_source="given",
        exact=exact,
        reference=lambda: float64_outputs(module_copier(model), [run]),
    )
    if not result:
        label = os.fspath(onnx_model) if isinstance(onnx_model, str | os.PathLike) else "the ONNX model"
        failing = ", ".join(output.name for output in result.outputs if not output.passed)
        raise AssertionError(
            f"{label} does not match the PyTorch module (outputs {failing}):\n{result.to_text()}"
        )
    return result


_WHAT_TO_PASS = (
    "pass a torch.Tensor or numpy array (one input), a tuple/list of them (positional inputs), "
    "or a dict name -> tensor (keyword inputs)"
)


def _positional(inputs: Any) -> tuple[Any, ...]:
    """The module's positional inputs from what a test passes."""
    import torch

    if isinstance(inputs, torch.Tensor | np.ndarray):
        return (_as_tensor(inputs, "inputs"),)
    if isinstance(inputs, tuple | list):
        if not inputs:
            raise InputSpecError(f"inputs is empty; {_WHAT_TO_PASS}")
        return tuple(_as_tensor(value, f"inputs[{index}]") for index, value in enumerate(inputs))
    raise InputSpecError(f"inputs is a {type(inputs).__name__}; {_WHAT_TO_PASS}")


def _as_tensor(value: Any, where: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return torch.from_numpy(np.array(value))  # a copy: the test's array is never shared or edited
    raise InputSpecError(f"{where} is a {type(value).__name__}, not a tensor or numpy array; {_WHAT_TO_PASS}")
