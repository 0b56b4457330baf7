"""bnfold: fold BatchNorm into neighbouring layers for inference, and prove the result equivalent.

The public API for pipelines::

    result = bnfold.fold_file("model.onnx", "folded.onnx")  # what `bnfold model.onnx -o folded.onnx` does
    result = bnfold.fold_onnx("model.onnx")          # .model (ModelProto), .report
    check = bnfold.verify("model.onnx", result.model)  # truthy when every output matches
    bnfold.save_model(result.model, "folded.onnx")     # atomic write

Every name is imported on first use (PEP 562), so ``import bnfold`` is light: the ``bnfold`` command
(:mod:`bnfold.console`) answers Ctrl-C while it is still starting. The PyTorch path
(``bnfold.fold_module``, ``bnfold.export``, ``bnfold.load_torch_source``) lives in ``bnfold.fx``, so
``import bnfold`` and folding an ONNX file never import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from bnfold.errors import (
    BnfoldError,
    InputSpecError,
    MissingDependencyError,
    ModelLoadError,
    OutputError,
    ProviderUnavailableError,
)
from bnfold.version import __version__

if TYPE_CHECKING:  # what type checkers (and readers) see; at run time __getattr__ imports these
    from bnfold.onnx import RULES, FoldResult, LoadedModel, WeightStore, fold_onnx, load_model, save_model
    from bnfold.pipeline import FileFoldResult, PipelineResult, fold_file
    from bnfold.report import Decision, Outcome, Reason, Report, Summary
    from bnfold.verify import VerificationResult, verify

__all__ = [
    "fold_onnx",
    "fold_file",
    "verify",
    "load_model",
    "save_model",
    "LoadedModel",
    "WeightStore",
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

# Each lazily served name and the module that defines it.
_LAZY = {
    **dict.fromkeys(
        ("RULES", "FoldResult", "LoadedModel", "WeightStore", "fold_onnx", "load_model", "save_model"),
        "bnfold.onnx",
    ),
    **dict.fromkeys(("FileFoldResult", "PipelineResult", "fold_file"), "bnfold.pipeline"),
    **dict.fromkeys(("Decision", "Outcome", "Reason", "Report", "Summary"), "bnfold.report"),
    **dict.fromkeys(("VerificationResult", "verify"), "bnfold.verify"),
}
# Served from bnfold.fx (importing them imports torch).
_TORCH_EXPORTS = ("fold_module", "export", "load_torch_source", "ModuleFoldResult", "ExportResult")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _TORCH_EXPORTS:
        try:
            torch_backend = importlib.import_module("bnfold.fx")
        except ImportError as error:
            if error.name is None or not error.name.startswith("torch"):
                raise
            raise MissingDependencyError(
                f"bnfold.{name} needs PyTorch: pip install 'bnfold[torch]'"
            ) from None
        value = getattr(torch_backend, name)
    else:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_TORCH_EXPORTS})


class _Package(types.ModuleType):
    """``bnfold.verify`` is the function, as it always was, even once the submodule of the same name
    is imported (which sets the package's attribute to the module)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "verify" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
