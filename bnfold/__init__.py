"""bnfold: fold BatchNorm into neighbouring layers for inference, and prove the result equivalent.

The public API for pipelines::

    result = bnfold.fold_onnx("model.onnx")          # .model (ModelProto), .report
    check = bnfold.verify("model.onnx", result.model)  # truthy when every output matches
    bnfold.save_model(result.model, "folded.onnx")     # atomic write

Folding an ONNX file never imports torch.
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
from bnfold.report import Decision, Outcome, Reason, Report
from bnfold.verify import VerificationResult, verify

__version__ = "0.1.0"

__all__ = [
    "fold_onnx",
    "verify",
    "load_model",
    "save_model",
    "FoldResult",
    "VerificationResult",
    "Report",
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
]
