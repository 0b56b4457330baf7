"""The rule table: every fold rule's name, pattern, notes and backends, in the order rules are tried.

Torch-free, so that the CLI can list and check ``--skip-rule`` names without importing torch. The
README's "Fold rules" table is checked against it (``tests/test_docs.py``), and each backend's
registry against its rows (``bnfold.onnx.rules.RULES``, ``bnfold.fx.RULES``). Adding a rule: add
its row here, then its implementation in each backend it lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bnfold.errors import BnfoldError

__all__ = ["ONNX", "TORCH", "RuleInfo", "RULE_TABLE", "rule_info", "rule_names", "check_skip_rules"]

ONNX = "onnx"
TORCH = "torch"
BOTH = frozenset({ONNX, TORCH})


@dataclass(frozen=True)
class RuleInfo:
    """One rule: its stable name (``--skip-rule``, the report), the pattern as the README shows it, a
    one-line note, and the backends that implement it."""

    name: str
    pattern: str
    notes: str
    backends: frozenset[str]


def _row(name: str, pattern: str, notes: str, *backends: str) -> RuleInfo:
    return RuleInfo(name, pattern, notes, frozenset(backends))


_RESHAPE = "`layer -> Reshape/Flatten -> BN`"
_AFFINE = "`layer -> Mul/Add(const)`"
_POOL = "`layer -> MaxPool/AveragePool/GlobalAveragePool/GlobalMaxPool -> BN`"
_BRANCHES = "`Add(Conv(x), Conv(x))`, `Add(Conv(x), BN(x))`, `Add(Conv(x), x)`"

RULE_TABLE: tuple[RuleInfo, ...] = (
    # A BN into the layer before it (its output channels).
    _row("conv-bn", "`Conv -> BN`", "scale output channels, fold into the bias", ONNX, TORCH),
    _row("convtranspose-bn", "`ConvTranspose -> BN`", "output channels scaled per group", ONNX, TORCH),
    _row("gemm-bn", "`Gemm -> BN`", "scale B's output columns, fold beta*C into the bias", ONNX),
    _row("matmul-bn", "`MatMul [-> Add] -> BN`", "2-D outputs; without a bias the BN becomes an Add", ONNX),
    _row("linear-bn", "PyTorch only", "Linear -> BatchNorm1d on 2-D input", TORCH),
    _row("functional-bn", "PyTorch only", "F.batch_norm after a layer (timm's BatchNormAct2d)", TORCH),
    # ... through a channel-preserving Reshape/Flatten between the layer and the BN.
    _row("conv-reshape-bn", _RESHAPE, "Conv -> channel-preserving Reshape/Flatten -> BN", ONNX),
    _row("gemm-reshape-bn", _RESHAPE, "Gemm -> channel-preserving Reshape/Flatten -> BN", ONNX),
    _row("matmul-reshape-bn", _RESHAPE, "MatMul [-> Add] -> channel-preserving Reshape/Flatten -> BN", ONNX),
    _row(
        "linear-reshape-bn",
        "`Linear -> flatten/reshape/view -> BN` (PyTorch)",
        "LeViT's bn(linear(x).flatten(0, 1))",
        TORCH,
    ),
    # ... through a pooling that commutes with the BN's per-channel map.
    _row("conv-pool-bn", _POOL, "Conv -> MaxPool/AveragePool/GlobalAveragePool -> BN", ONNX, TORCH),
    _row("convtranspose-pool-bn", _POOL, "ConvTranspose -> pool -> BN", ONNX, TORCH),
    # A BN into the layer after it (its input channels), tried when no rule above folds it.
    _row("bn-conv", "`BN -> Conv`", "only without padding", ONNX, TORCH),
    _row("bn-convtranspose", "`BN -> ConvTranspose`", "only 1x1 kernels, stride 1", ONNX, TORCH),
    _row("bn-gemm", "`BN -> Gemm`", "A side, transA=0", ONNX),
    _row("bn-matmul", "`BN -> MatMul`", "2-D input; the shift becomes an Add", ONNX),
    _row("bn-linear", "PyTorch only", "BatchNorm1d -> Linear", TORCH),
    # Per-channel Mul/Add after a layer (affine chains from other exporters).
    _row("conv-affine", _AFFINE, "Conv -> per-channel Mul/Add", ONNX, TORCH),
    _row("convtranspose-affine", _AFFINE, "ConvTranspose -> per-channel Mul/Add", ONNX, TORCH),
    _row("gemm-affine", _AFFINE, "Gemm -> per-column Mul/Add", ONNX),
    _row("matmul-affine", _AFFINE, "MatMul [-> Add] -> per-column Mul/Add on 2-D outputs", ONNX),
    _row("linear-affine", _AFFINE, "Linear -> per-feature mul/add/sub/div (last axis, any rank)", TORCH),
    # Parallel branches of one input summed by an Add, merged into one conv (RepVGG, ACNet, MobileOne).
    _row("branch-merge", _BRANCHES, "RepVGG / ACNet / MobileOne re-parameterization", ONNX, TORCH),
    # A BN nothing absorbed, rewritten as Mul + Add on request.
    _row("bn-to-affine", "`BN` nothing absorbs", "only with --rewrite-standalone-bn", ONNX),
)


def rule_info(name: str) -> RuleInfo:
    """The table row of rule ``name`` (KeyError for a name the table does not have)."""
    for info in RULE_TABLE:
        if info.name == name:
            return info
    raise KeyError(name)


def rule_names(backend: str | None = None) -> tuple[str, ...]:
    """The rule names of one backend (``"onnx"``, ``"torch"``) or of all, in table order."""
    return tuple(info.name for info in RULE_TABLE if backend is None or backend in info.backends)


def check_skip_rules(skip_rules: Iterable[str], backend: str) -> set[str]:
    """The names in ``skip_rules`` as a set; :class:`BnfoldError` for a name ``backend`` does not have."""
    skipped = set(skip_rules)
    known = rule_names(backend)
    unknown = skipped - set(known)
    if unknown:
        raise BnfoldError(f"unknown rule(s) {sorted(unknown)}; choose from {list(known)}")
    return skipped
