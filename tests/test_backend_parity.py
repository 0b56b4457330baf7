"""One table of cases, run against both backends: each small module is folded in torch
(``fold_module``) and, exported to ONNX with every BN kept, by the ONNX rules (``fold_onnx``). Both
must fold the same BNs by the same family of rule and keep the same ones, or the case names the
difference the README documents ("Against the ONNX path"). Both folded models are checked against
the original numerically.

A rule added to one backend only shows up here as a parity case to write, not as a silent gap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import onnx  # noqa: E402

from bnfold import fold_module, fold_onnx  # noqa: E402
from bnfold.report import Outcome  # noqa: E402
from models.export import export_onnx  # noqa: E402
from tests.builders import run  # noqa: E402

# The torch rule names for the ONNX families they implement (the rest have one name in both).
TORCH_TO_ONNX_FAMILY = {
    "linear-bn": "gemm-bn",
    "bn-linear": "bn-gemm",
    "functional-bn": "conv-bn",
    "linear-reshape-bn": "gemm-reshape-bn",
    "linear-affine": "gemm-affine",
}
ONNX_FAMILY = {"matmul-bn": "gemm-bn", "bn-matmul": "bn-gemm", "matmul-reshape-bn": "gemm-reshape-bn"}


def randomize_statistics(module: nn.Module, *, negative_gamma: bool = False) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            count = layer.num_features
            layer.running_mean.copy_(torch.randn(count, generator=generator))
            layer.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            with torch.no_grad():
                gamma = torch.rand(count, generator=generator) + 0.5
                layer.weight.copy_(-gamma if negative_gamma else gamma)
                layer.bias.copy_(torch.randn(count, generator=generator))
    return module.eval()


class Seq(nn.Sequential):
    pass


class ConvScaleShift(nn.Module):
    """FrozenBatchNorm2d written out: a conv, then a per-channel multiply and add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift


class RepVggBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.one = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.identity = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.one(x) + self.identity(x))


class LevitLinearBN(nn.Module):
    """LeViT's Linear + BatchNorm1d over flattened tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        features = self.linear(x)
        return self.bn(features.flatten(0, 1)).reshape_as(features)


class LinearScaleShift(nn.Module):
    """A Linear, then a per-feature multiply and add (buffers of shape [F] and [1, F])."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 7)
        self.register_buffer("scale", torch.rand(7) + 0.5)
        self.register_buffer("shift", torch.randn(1, 7))

    def forward(self, x):
        return self.linear(x) * self.scale + self.shift


class FunctionalBN(nn.Module):
    """timm's BatchNormAct2d: reads the input's rank, then F.batch_norm with its own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        assert y.ndim == 4
        bn = self.bn
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)
        return torch.relu(y)


class PreActivation(nn.Module):
    """A BN between two non-linear ops: no exact fold exists in either backend."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.sigmoid(self.bn(torch.relu(self.conv(x))))


class SharedConv(nn.Module):
    """One conv module called twice, a BN after one call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(torch.relu(x))


class SharedBN(nn.Module):
    """One BN module after two different convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class CondBranches(nn.Module):
    """torch.cond with a conv -> BN in each branch: torch folds inside the branches (the parameters
    torch.export passes as operands made constants), ONNX inside the If's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(3, 4, 1)
        self.other_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.cond(
            x.sum() > 0,
            lambda v: self.bn(self.conv(v)),
            lambda v: torch.relu(self.other_bn(self.other(v))),
            (x,),
        )


@dataclass
class Case:
    name: str
    build: object  # () -> nn.Module
    input_shape: tuple[int, ...]
    negative_gamma: bool = False
    # BN outcomes by family, the same in both backends unless the case says otherwise.
    folded: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    # Per-channel Mul/Add folded into a layer (reported as their own rows), by this rule family.
    affine_folded: int = 0
    affine_family: str = "conv-affine"
    # Where the backends differ on purpose (the README's "Against the ONNX path"): the torch result.
    torch_differs: dict[str, object] | None = None
    # "dynamo" for torch.cond, which only the dynamo exporter writes (as If); checked on x and -x.
    exporter: str = "torchscript"


CASES = [
    Case(
        "conv-bn",
        lambda: Seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
        (2, 3, 6, 6),
        folded={"conv-bn": 1},
    ),
    Case(
        "conv-bn-depthwise-1d",
        lambda: Seq(nn.Conv1d(4, 4, 3, groups=4), nn.BatchNorm1d(4)),
        (2, 4, 9),
        folded={"conv-bn": 1},
    ),
    Case(
        "convtranspose-bn",
        lambda: Seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
        (2, 4, 5, 5),
        folded={"convtranspose-bn": 1},
    ),
    Case("linear-bn", lambda: Seq(nn.Linear(5, 7), nn.BatchNorm1d(7)), (3, 5), folded={"gemm-bn": 1}),
    Case("bn-conv", lambda: Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (2, 3, 6, 6), folded={"bn-conv": 1}),
    Case(
        "bn-conv-padded",  # the border would read 0, not the BN's shift: kept in both
        lambda: Seq(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)),
        (2, 3, 6, 6),
        kept=1,
    ),
    Case(
        "bn-convtranspose",
        lambda: Seq(nn.ReLU(), nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 1)),
        (2, 3, 5, 5),
        folded={"bn-convtranspose": 1},
    ),
    Case(
        "bn-linear", lambda: Seq(nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5), folded={"bn-gemm": 1}
    ),
    Case(
        "conv-pool-bn",
        lambda: Seq(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4)),
        (2, 3, 8, 8),
        folded={"conv-pool-bn": 1},
    ),
    Case(
        "conv-avgpool-bn",
        lambda: Seq(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4)),
        (2, 3, 8, 8),
        negative_gamma=True,  # an average commutes with any per-channel affine map
        folded={"conv-pool-bn": 1},
    ),
    Case(
        "conv-maxpool-bn-negative-scale",  # a max does not commute with a negative scale
        lambda: Seq(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(4)),
        (2, 3, 8, 8),
        negative_gamma=True,
        kept=1,
    ),
    Case("conv-affine", ConvScaleShift, (2, 3, 6, 6), affine_folded=2),
    Case("linear-affine", LinearScaleShift, (3, 5), affine_folded=2, affine_family="gemm-affine"),
    Case(
        "branch-merge",
        RepVggBlock,
        (2, 4, 6, 6),
        folded={"conv-bn": 2, "branch-merge": 1},  # the identity BN goes into the merged conv
    ),
    Case("linear-reshape-bn", LevitLinearBN, (2, 5, 6), folded={"gemm-reshape-bn": 1}),
    Case("functional-bn", FunctionalBN, (2, 3, 6, 6), folded={"conv-bn": 1}),
    Case("between-non-linear-ops", PreActivation, (2, 3, 6, 6), kept=1),
    Case(
        "shared-conv",
        SharedConv,
        (2, 4, 6, 6),
        folded={"conv-bn": 1},  # both copy the shared layer for the call site they fold into
    ),
    Case(
        "shared-bn",
        SharedBN,
        (2, 3, 6, 6),
        folded={"conv-bn": 2},  # ONNX: two BatchNormalization nodes reading the same statistics
        torch_differs={"folded": {}, "kept": 2, "reason": "shared-module"},  # torch keeps it (README)
    ),
    Case("cond-branches", CondBranches, (2, 3, 6, 6), folded={"conv-bn": 2}, exporter="dynamo"),
]


def family(rule: str) -> str:
    return ONNX_FAMILY.get(rule, TORCH_TO_ONNX_FAMILY.get(rule, rule))


def outcomes(report) -> tuple[Counter, int, Counter, list[str]]:
    """(folded BNs by rule family, kept BNs, folded Mul/Add rows by rule family, kept reasons)."""
    folded: Counter = Counter()
    kept, affine = 0, Counter()
    reasons = []
    for decision in report.decisions:
        if decision.op_type in ("Mul", "Add"):
            if decision.outcome is Outcome.FOLDED:
                affine[family(decision.rule)] += 1
            continue
        if decision.outcome in (Outcome.FOLDED, Outcome.MERGED) and decision.op_type != "Add":
            folded[family(decision.rule)] += 1
        elif decision.outcome is Outcome.KEPT:
            kept += 1
            reasons.append(decision.reason.value)
    return folded, kept, affine, reasons


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_both_backends_fold_the_same_bns(case: Case, tmp_path: Path):
    torch.manual_seed(0)
    module = randomize_statistics(case.build(), negative_gamma=case.negative_gamma)
    x = torch.randn(*case.input_shape)
    checked = (x, -x) if case.exporter == "dynamo" else (x,)  # -x: the other branch of a cond
    with torch.no_grad():
        expected_outputs = [module(values).numpy() for values in checked]

    torch_result = fold_module(module, (x,))
    path = tmp_path / f"{case.name}.onnx"
    if case.exporter == "dynamo":  # optimize=False keeps every BN (in the If branches too)
        program = torch.onnx.export(
            module, (x,), dynamo=True, optimize=False, opset_version=18, verbose=False
        )
        program.save(str(path))
    else:
        export_onnx(module, x, path)
    onnx_result = fold_onnx(onnx.load(path))

    onnx_folded, onnx_kept, onnx_affine, _ = outcomes(onnx_result.report)
    assert dict(onnx_folded) == case.folded, onnx_result.report.to_text()
    assert onnx_kept == case.kept
    expected_affine = {case.affine_family: case.affine_folded} if case.affine_folded else {}
    assert dict(onnx_affine) == expected_affine, onnx_result.report.to_text()
    torch_folded, torch_kept, torch_affine, torch_reasons = outcomes(torch_result.report)
    if case.torch_differs is None:
        assert dict(torch_folded) == case.folded, torch_result.report.to_text()
        assert torch_kept == case.kept
        assert dict(torch_affine) == expected_affine, torch_result.report.to_text()
    else:
        assert dict(torch_folded) == case.torch_differs["folded"], torch_result.report.to_text()
        assert torch_kept == case.torch_differs["kept"]
        assert case.torch_differs["reason"] in torch_reasons

    for values, expected in zip(checked, expected_outputs, strict=True):
        with torch.no_grad():
            np.testing.assert_allclose(torch_result.module(values).numpy(), expected, rtol=1e-4, atol=1e-5)
        (folded_output,) = run(onnx_result.model, {onnx_result.model.graph.input[0].name: values.numpy()})
        np.testing.assert_allclose(folded_output, expected, rtol=1e-4, atol=1e-5)


def test_the_table_covers_every_rule_both_backends_implement():
    from bnfold.core.table import ONNX, RULE_TABLE, TORCH

    both = {row.name for row in RULE_TABLE if ONNX in row.backends and TORCH in row.backends}
    torch_only = {row.name for row in RULE_TABLE if row.backends == frozenset({TORCH})}
    covered = {name for case in CASES for name in case.folded} | {
        case.affine_family for case in CASES if case.affine_folded
    }
    missing = (
        {family(name) for name in both | torch_only}
        - covered
        - {"convtranspose-pool-bn", "convtranspose-affine"}
    )
    assert not missing, f"rules both backends have but no parity case folds: {sorted(missing)}"
