"""``fold_onnx``: the ONNX backend's entry. It wraps the model in :class:`~bnfold.onnx.view.OnnxView`
and hands it, with :data:`~bnfold.onnx.rules.RULES`, to the core driver
(:func:`bnfold.core.driver.run_rules`), which runs every graph and subgraph to a fixed point; then
the bodies of the model-local functions the same way, then the prune.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from onnx import ModelProto

from bnfold.core.driver import run_rules
from bnfold.core.protocol import Rule
from bnfold.core.table import ONNX, check_skip_rules
from bnfold.core.table import rule_names as table_rule_names
from bnfold.errors import BnfoldError
from bnfold.onnx.graph import ModelContext
from bnfold.onnx.io import WeightStore, is_lazy, load_model, store_of
from bnfold.onnx.rules import RULES
from bnfold.onnx.view import OnnxView
from bnfold.report import Report

__all__ = ["FoldResult", "fold_onnx", "rule_names"]

logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """The folded model, what happened to each normalization node, and whether anything changed.

    ``store`` is the weight store that holds the new weights of a lazily loaded model (the one given
    to :func:`fold_onnx`, or one it made: then this result owns it, and the model's new weights can
    be read and saved while the result is held, or until ``store.close()``); None otherwise.
    """

    model: ModelProto
    report: Report
    store: WeightStore | None = None

    @property
    def changed(self) -> bool:
        return bool(self.report.folded or self.report.rewritten or self.report.merged)


def rule_names(rules: Sequence[Rule] | None = None) -> list[str]:
    """The names of ``rules`` (default: every ONNX rule, in the order they are tried)."""
    return [rule.name for rule in rules] if rules is not None else list(table_rule_names(ONNX))


def fold_onnx(
    model: ModelProto | str | os.PathLike,
    *,
    rules: Sequence[Rule] = RULES,
    skip_rules: Iterable[str] = (),
    inplace: bool = False,
    rewrite_standalone: bool = False,
    store: WeightStore | None = None,
) -> FoldResult:
    """Fold every BatchNormalization that a rule can absorb exactly, in all graphs and subgraphs.

    ``model`` is a ModelProto or a path. A given ModelProto is copied first unless ``inplace=True``;
    a path is loaded (external data included) and never written to. Kept BNs are reported with the
    reason; LayerNormalization, GroupNormalization and InstanceNormalization are reported as never
    foldable (they normalize with per-sample statistics computed at run time).

    A BN is folded into the layer before it when a producer-side rule can, else into the layer after
    it. Per-channel ``Mul``/``Add`` nodes after a layer are folded too (and reported when they are).
    With ``rewrite_standalone=True``, a BN nothing could absorb (its statistics readable, no rule
    disabled) becomes ``Mul`` + ``Add`` (rule ``bn-to-affine``, outcome ``rewritten``). BNs inside
    model-local functions are folded where the fold holds for every call site (their constants are
    ``Constant`` nodes; the function's inputs and call-site attributes are not constants), else kept
    with the reason.

    For a model loaded lazily (``load_model(path, lazy=True)``), large new weights go to a
    :class:`~bnfold.onnx.io.WeightStore`, not into the protobuf: ``store`` if given, else the store of
    the loaded model it came from (``loaded.store``, while ``loaded`` is held), else a new one that
    the result owns (``result.store``: the folded model can be read and saved while the result is
    held). ``result.store`` is the store used, in every case.
    """
    skipped = check_skip_rules(skip_rules, ONNX)
    source = ""
    if isinstance(model, ModelProto):
        if not inplace:
            model = copy.deepcopy(model)
    else:
        source = os.fspath(model)
        model = load_model(source).model
    if store is None and is_lazy(model):
        store = store_of(model) or WeightStore()
    context = ModelContext(model, store)
    if context.opset is None:
        raise BnfoldError("the model imports no default-domain ONNX opset; is it an ONNX model?")
    report = Report(source=source)
    options = {"skipped": skipped, "rewrite_standalone": rewrite_standalone}
    run_rules(OnnxView(model.graph, context), rules, report, **options)
    for function in model.functions:
        path = f"function {function.domain + '.' if function.domain else ''}{function.name}"
        run_rules(OnnxView(function, context, path), rules, report, **options)
    context.finalize()
    context.store = None  # the result (or the caller, or the loaded model) owns it, not the index
    return FoldResult(model=model, report=report, store=store)
