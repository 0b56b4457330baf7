"""The ONNX backend: graph index, fold rules, the fold driver, and model I/O."""

from __future__ import annotations

from bnfold.onnx.fold import FoldResult, fold_onnx, rule_names
from bnfold.onnx.io import LoadedModel, WeightStore, load_model, save_model
from bnfold.onnx.rules import RULES, Rule

__all__ = [
    "FoldResult",
    "fold_onnx",
    "rule_names",
    "load_model",
    "save_model",
    "LoadedModel",
    "WeightStore",
    "RULES",
    "Rule",
]
