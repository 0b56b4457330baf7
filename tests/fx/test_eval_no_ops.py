"""Eval-mode no-ops (Identity, dropout in eval, ``F.dropout(training=False)``, timm-style DropPath)
between a layer and a BN, or a BN and a layer, do not block a fold in any rule family (issue 13:
timm LeViT's ``NormLinear`` is BatchNorm1d -> Dropout -> Linear). A dropout in training mode does.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold import Outcome  # noqa: E402
from tests.fx import nets  # noqa: E402


class Functional(nn.Module):
    """``F.dropout(x, p, training=self.training)``, as model code writes it."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.dropout(inputs, 0.4, training=self.training)


class TorchDropout(nn.Module):
    """``torch.dropout(x, p, train)`` with the flag positional."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.dropout(inputs, 0.2, self.training)


class DropPath(nn.Module):
    """Stochastic depth as timm's ``DropPath`` computes it: the input itself when not training."""

    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return inputs
        keep = 1 - self.drop_prob
        mask = inputs.new_empty((inputs.shape[0],) + (1,) * (inputs.ndim - 1)).bernoulli_(keep)
        return inputs * mask / keep


NO_OPS = {
    "identity": lambda rank: nn.Identity(),
    "dropout": lambda rank: nn.Dropout(0.3),
    "dropout-inplace": lambda rank: nn.Dropout(0.3, inplace=True),
    "feature-dropout": lambda rank: nn.Dropout1d(0.3) if rank in (2, 3) else nn.Dropout2d(0.3),
    "alpha-dropout": lambda rank: nn.AlphaDropout(0.3),
    "feature-alpha-dropout": lambda rank: nn.FeatureAlphaDropout(0.3),
    "functional": lambda rank: Functional(),
    "torch-dropout": lambda rank: TorchDropout(),
    "drop-path": lambda rank: DropPath(),
    "two-in-a-row": lambda rank: nn.Sequential(nn.Dropout(0.1), nn.Identity()),
}


class Chain(nn.Module):
    """``second(no_op(first(x)))``, optionally with more after (``rest``)."""

    def __init__(self, first: nn.Module, no_op: nn.Module, second: nn.Module, *rest: nn.Module) -> None:
        super().__init__()
        self.first, self.no_op, self.second = first, no_op, second
        self.rest = nn.Sequential(*rest)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.rest(self.second(self.no_op(self.first(inputs))))


class ConvAffine(nn.Module):
    """``no_op(conv(x)) * scale + shift`` with per-channel buffers (the conv-affine family)."""

    def __init__(self, no_op: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.no_op = no_op
        self.register_buffer("scale", torch.randn(6, 1, 1))
        self.register_buffer("shift", torch.randn(6, 1, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.no_op(self.conv(inputs)) * self.scale + self.shift


class LinearReshapeBN(nn.Module):
    """LeViT's ``bn(no_op(linear(x)).flatten(0, 1)).reshape_as(...)`` (the linear-reshape-bn family)."""

    def __init__(self, no_op: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 6, bias=False)
        self.no_op = no_op
        self.bn = nn.BatchNorm1d(6)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.no_op(self.linear(inputs))
        return self.bn(features.flatten(0, 1)).reshape_as(features)


IMAGES = [(2, 3, 9, 9), (1, 3, 6, 11)]
FAMILIES = {
    # name: (builder taking the no-op, rank of the tensor through the no-op, example shapes)
    "conv-bn": (lambda op: Chain(nn.Conv2d(3, 6, 3), op, nn.BatchNorm2d(6)), 4, IMAGES),
    "linear-bn": (lambda op: Chain(nn.Linear(5, 6), op, nn.BatchNorm1d(6)), 2, [(4, 5), (7, 5)]),
    "bn-conv": (lambda op: Chain(nn.BatchNorm2d(3), op, nn.Conv2d(3, 6, 3)), 4, IMAGES),
    "bn-linear": (lambda op: Chain(nn.BatchNorm1d(5), op, nn.Linear(5, 6)), 2, [(4, 5), (7, 5)]),
    "bn-bn-chain": (
        lambda op: Chain(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), op, nn.BatchNorm2d(6)),
        4,
        IMAGES,
    ),
    "conv-affine": (lambda op: ConvAffine(op), 4, IMAGES),
    "linear-reshape-bn": (lambda op: LinearReshapeBN(op), 3, [(2, 3, 5), (4, 6, 5)]),
}


def batchnorm_count(model: nn.Module) -> int:
    return sum(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in model.modules())


def check_folds(model: nn.Module, shapes: list[tuple[int, ...]], tracer: str = "fx") -> Any:
    """Fold ``model``; every BN folds and the folded module matches it at each shape."""
    torch.manual_seed(1)
    examples = [torch.randn(*shape) for shape in shapes]
    result = bnfold.fold_module(model, examples[0], tracer=tracer)
    assert result.report.kept == [], result.report.to_text()
    assert result.report.count(Outcome.FOLDED) == batchnorm_count(model)
    assert result.verification
    assert not any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in result.module.modules())
    with torch.no_grad():
        for example in examples if tracer == "fx" else examples[:1]:
            expected = model(example.clone())
            torch.testing.assert_close(result.module(example.clone()), expected, rtol=1e-4, atol=1e-5)
    return result


@pytest.mark.parametrize("no_op", NO_OPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_no_op_does_not_block_a_fold(family: str, no_op: str) -> None:
    build, rank, shapes = FAMILIES[family]
    model = nets.randomized(build(NO_OPS[no_op](rank)))
    if family == "conv-affine":  # no BN: the per-channel affine map is folded into the conv
        torch.manual_seed(1)
        example = torch.randn(*shapes[0])
        result = bnfold.fold_module(model, example)
        assert result.report.folded, result.report.to_text()
        targets = [str(node.target) for node in result.module.graph.nodes if node.op == "call_function"]
        assert not any("mul" in target or "add" in target for target in targets), targets
        with torch.no_grad():
            for shape in shapes:
                other = torch.randn(*shape)
                torch.testing.assert_close(result.module(other), model(other), rtol=1e-4, atol=1e-5)
        return
    check_folds(model, shapes)


@pytest.mark.parametrize("family", ["conv-bn", "bn-linear", "bn-conv"])
def test_eval_dropout_does_not_block_a_fold_in_exported_graphs(family: str) -> None:
    build, _, shapes = FAMILIES[family]
    check_folds(nets.randomized(build(nn.Dropout(0.3))), shapes, tracer="export")


class NormLinear(nn.Module):
    """timm's ``NormLinear`` (LeViT's head): BatchNorm1d, Dropout, Linear."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(inputs)))


class LeViTHead(nn.Module):
    """LeViT's distilled head: tokens averaged, then ``(head(x) + head_dist(x)) / 2``."""

    def __init__(self, features: int = 8, classes: int = 5, drop: float = 0.2) -> None:
        super().__init__()
        self.head = NormLinear(features, classes, drop)
        self.head_dist = NormLinear(features, classes, drop)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens.mean(1)
        return (self.head(pooled) + self.head_dist(pooled)) / 2


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_levit_head_folds_completely(tracer: str) -> None:
    model = nets.randomized(LeViTHead())
    result = check_folds(model, [(2, 6, 8), (5, 3, 8)], tracer=tracer)
    assert result.report.count(Outcome.FOLDED) == 2


def test_training_mode_dropout_is_not_an_identity() -> None:
    """A dropout left in training mode (the root in eval) changes values: its BN is kept."""
    model = nets.randomized(Chain(nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 6)))
    model.no_op.train()
    result = bnfold.fold_module(model, torch.randn(4, 5), verify=False)
    assert [decision.node for decision in result.report.kept] == ["first"], result.report.to_text()
    assert any(isinstance(layer, nn.Dropout) for layer in result.module.modules())


def test_functional_dropout_in_training_is_not_an_identity() -> None:
    """``F.dropout(x, p)`` defaults to training=True: it is not an eval no-op."""

    class AlwaysDrops(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return F.dropout(inputs, 0.5)

    model = nets.randomized(Chain(nn.BatchNorm1d(5), AlwaysDrops(), nn.Linear(5, 6)))
    result = bnfold.fold_module(model, torch.randn(4, 5), verify=False)
    assert [decision.node for decision in result.report.kept] == ["first"], result.report.to_text()


def test_no_op_with_a_hook_stays() -> None:
    """Removing a hooked Identity would skip its hook: it stays, and so does the BN behind it."""
    model = nets.randomized(Chain(nn.BatchNorm1d(5), nn.Identity(), nn.Linear(5, 6)))
    calls = []
    model.no_op.register_forward_hook(lambda module, inputs, output: calls.append(1))
    result = bnfold.fold_module(model, torch.randn(4, 5))
    assert [decision.node for decision in result.report.kept] == ["first"], result.report.to_text()
    calls.clear()
    result.module(torch.randn(3, 5))
    assert calls == [1]


def test_in_place_write_after_a_no_op_is_kept_exact() -> None:
    """``y = drop(conv(x)); y.relu_()`` writes the conv output itself (eval dropout returns it)."""

    class WritesThroughDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.drop = nn.Dropout(0.2)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.conv(inputs)
            dropped = self.drop(features)
            normalized = self.bn(dropped)
            dropped.relu_()
            return normalized, features

    model = nets.randomized(WritesThroughDropout())
    example = torch.randn(2, 3, 5, 5)
    result = bnfold.fold_module(model, example)
    assert result.verification
    with torch.no_grad():
        for actual, expected in zip(result.module(example), model(example), strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_only_no_ops_next_to_a_fold_site_go() -> None:
    """A dropout between two activations stays; the one before the BN goes, and the report lists it."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 6)
            self.act = nn.ReLU()
            self.middle = nn.Dropout(0.2)
            self.act2 = nn.Tanh()
            self.before_bn = nn.Dropout(0.2)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.bn(self.before_bn(self.act2(self.middle(self.act(self.linear(inputs))))))

    model = nets.randomized(Mixed())
    result = bnfold.fold_module(model, torch.randn(4, 5))
    assert result.report.extras["eval_no_ops_removed"] == ["before_bn"]
    modules = [node.target for node in result.module.graph.nodes if node.op == "call_module"]
    assert "middle" in modules and "before_bn" not in modules


def test_dropout_subclass_with_its_own_forward_is_not_an_identity() -> None:
    """A leaf dropout module whose class overrides ``forward`` may compute anything: it stays."""

    class Scaled(nn.Dropout):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs * 2

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, Scaled) or super().is_leaf_module(module, name)

    model = nets.randomized(Chain(nn.BatchNorm1d(5), Scaled(0.1), nn.Linear(5, 6)))
    graph_module = torch.fx.GraphModule(model, Leaves().trace(model))
    result = bnfold.fold_module(graph_module, torch.randn(4, 5))
    assert result.verification
    assert "eval_no_ops_removed" not in result.report.extras
