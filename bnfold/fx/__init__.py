"""The PyTorch backend: fold BatchNorm in torch models (torch.fx / torch.export), export to ONNX, verify.

Importing this package imports torch; ``import bnfold`` alone does not (``bnfold.fold_module`` and
``bnfold.export`` load this package on first use).
"""

from __future__ import annotations

from bnfold.fx.fold import ModuleFoldResult, fold_module, rule_names
from bnfold.fx.onnx_export import ExportResult, export
from bnfold.fx.rules import RULES, Rule
from bnfold.fx.source import load_torch_source

__all__ = [
    "ModuleFoldResult",
    "fold_module",
    "rule_names",
    "RULES",
    "Rule",
    "ExportResult",
    "export",
    "load_torch_source",
]
