"""bnfold: fold BatchNorm into neighbouring layers for inference, and prove the result equivalent.

The public API for pipelines::

    result = bnfold.fold_file("model.onnx", "folded.onnx")  # what `bnfold model.onnx -o folded.onnx` does
    result = bnfold.fold_onnx("model.onnx")          # .model (ModelProto), .report
    check = bnfold.verify("model.onnx", result.model)  # truthy when every output matches
    bnfold.save_model(result.model, "folded.onnx")     # atomic write

The PyTorch path (``bnfold.fold_module``, ``bnfold.export``, ``bnfold.load_torch_source``) lives in
``bnfold.fx`` and is imported on first use, so ``import bnfold`` and folding an ONNX file never
import torch.
"""

from __future__ import annotations

from bnfold.errors import (
    BnfoldError,
    InputSpecError,
    MissingDependencyError,
    ModelLoadError,
    OutputError,
    ProviderUnavailableError,
)
from bnfold.onnx import RULES, FoldResult, fold_onnx, load_model, save_model
from bnfold.pipeline import FileFoldResult, PipelineResult, fold_file
from bnfold.report import Decision, Outcome, Reason, Report, Summary
from bnfold.verify import VerificationResult, verify
from bnfold.version import __version__

__all__ = [
    "fold_onnx",
    "fold_file",
    "verify",
    "load_model",
    "save_model",
    "FoldResult",
    "FileFoldResult",
    "PipelineResult",
    "VerificationResult",
    "Report",
    "Summary",
    "Decision",
    "Outcome",
    "Reason",
    "RULES",
    "BnfoldError",
    "ModelLoadError",
    "InputSpecError",
    "ProviderUnavailableError",
    "MissingDependencyError",
    "OutputError",
    "__version__",
]  # the torch names stay out of __all__: `from bnfold import *` must work without torch

# Names served from bnfold.fx on first access (PEP 562): importing them eagerly would import torch.
_TORCH_EXPORTS = ("fold_module", "export", "load_torch_source", "ModuleFoldResult", "ExportResult")


def __getattr__(name: str):
    if name in _TORCH_EXPORTS:
        try:
            import bnfold.fx as torch_backend
        except ImportError as error:
            if error.name is None or not error.name.startswith("torch"):
                raise
            raise MissingDependencyError(
                f"bnfold.{name} needs PyTorch: pip install 'bnfold[torch]'"
            ) from None
        value = getattr(torch_backend, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_TORCH_EXPORTS])
