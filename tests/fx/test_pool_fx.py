"""conv-pool-bn / convtranspose-pool-bn on the PyTorch path: a BN after a pooling folds into the layer
before the pool where the pool commutes with the BN's map (any average of real elements; a max only
with a non-negative scale), and is kept with pool-does-not-commute where it does not."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional  # noqa: E402

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402

BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def statistics(model: nn.Module, negative: bool = False, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with non-trivial BN statistics; scales >= 0 unless ``negative``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                channels = layer.num_features
                layer.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
                layer.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
                scale = 0.5 + torch.rand(channels, generator=generator)
                if negative:
                    scale[0] = -scale[0]
                layer.weight.copy_(scale)
                layer.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    return model.eval()


class LayerPoolNorm(nn.Module):
    """conv (or transposed conv) -> pool (a module, or a function of the input) -> BN."""

    def __init__(self, rank: int, pool, transposed: bool = False, conv_padding: int = 1) -> None:
        super().__init__()
        self.conv = (TRANSPOSED if transposed else CONVS)[rank](3, 4, 3, padding=conv_padding)
        self.pool = pool if isinstance(pool, nn.Module) else None
        self.pool_function = None if isinstance(pool, nn.Module) else pool
        self.bn = BATCHNORMS[rank](4)

    def forward(self, inputs):
        features = self.conv(inputs)
        pooled = self.pool(features) if self.pool is not None else self.pool_function(features)
        return self.bn(pooled)


def sizes(rank: int) -> list[tuple[int, ...]]:
    return [(2, 3, *([7] * rank)), (1, 3, *([10] * rank))]


def same_at(result, model, shapes) -> None:
    for shape in shapes:
        inputs = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-4, atol=1e-5)


def batchnorms_left(result) -> list[str]:
    return [
        name
        for name, module in result.module.named_modules()
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
    ] + [node.name for node in result.module.graph.nodes if "batch_norm" in str(node.target)]


POOLS = [
    ("MaxPool", lambda rank: getattr(nn, f"MaxPool{rank}d")(3, 2, padding=1)),
    ("MaxPool-ceil-dilated", lambda rank: getattr(nn, f"MaxPool{rank}d")(2, 2, dilation=2, ceil_mode=True)),
    (
        "F.max_pool",
        lambda rank: lambda x: getattr(functional, f"max_pool{rank}d")(x, 2, padding=1, ceil_mode=True),
    ),
    ("torch.max_pool", lambda rank: lambda x: getattr(torch, f"max_pool{rank}d")(x, 2)),
    ("AvgPool-no-pad", lambda rank: getattr(nn, f"AvgPool{rank}d")(2, ceil_mode=True)),
    (
        "AvgPool-pad-excluded",
        lambda rank: getattr(nn, f"AvgPool{rank}d")(3, 2, 1, ceil_mode=True, count_include_pad=False),
    ),
    (
        "F.avg_pool",
        lambda rank: lambda x: getattr(functional, f"avg_pool{rank}d")(x, 3, 1, 1, count_include_pad=False),
    ),
    ("AdaptiveAvgPool", lambda rank: getattr(nn, f"AdaptiveAvgPool{rank}d")(1)),
    ("AdaptiveAvgPool-3", lambda rank: getattr(nn, f"AdaptiveAvgPool{rank}d")(3)),
    ("F.adaptive_avg_pool", lambda rank: lambda x: getattr(functional, f"adaptive_avg_pool{rank}d")(x, 2)),
    ("AdaptiveMaxPool", lambda rank: getattr(nn, f"AdaptiveMaxPool{rank}d")(2)),
    ("F.adaptive_max_pool", lambda rank: lambda x: getattr(functional, f"adaptive_max_pool{rank}d")(x, 1)),
]


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(("label", "make_pool"), POOLS, ids=[label for label, _ in POOLS])
def test_each_pool_kind_folds(label, make_pool, rank) -> None:
    model = statistics(LayerPoolNorm(rank, make_pool(rank)))
    result = bnfold.fold_module(model, torch.randn(sizes(rank)[0]))
    assert [(d.rule, d.outcome) for d in result.report.decisions] == [("conv-pool-bn", Outcome.FOLDED)], (
        result.report.to_text()
    )
    assert batchnorms_left(result) == []
    assert result.verification, result.verification.to_text()
    same_at(result, model, sizes(rank))


@pytest.mark.parametrize(
    "make_pool", [lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False)]
)
def test_transposed_conv_then_pool_folds(make_pool) -> None:
    model = statistics(LayerPoolNorm(2, make_pool(), transposed=True))
    result = bnfold.fold_module(model, torch.randn(2, 3, 6, 6))
    assert [(d.rule, d.outcome) for d in result.report.decisions] == [
        ("convtranspose-pool-bn", Outcome.FOLDED)
    ]
    same_at(result, model, [(2, 3, 6, 6), (1, 3, 9, 5)])


@pytest.mark.parametrize(
    "make_pool",
    [lambda: nn.MaxPool2d(2), lambda: nn.AdaptiveMaxPool2d(1), lambda: lambda x: functional.max_pool2d(x, 3)],
)
def test_negative_scale_after_a_max_is_kept(make_pool) -> None:
    model = statistics(LayerPoolNorm(2, make_pool()), negative=True)
    result = bnfold.fold_module(model, torch.randn(2, 3, 7, 7))
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.POOL_DOES_NOT_COMMUTE)
    assert "channels 0" in decision.detail
    same_at(result, model, [(2, 3, 7, 7)])


def test_negative_scale_after_an_average_folds() -> None:
    model = statistics(LayerPoolNorm(2, nn.AvgPool2d(2)), negative=True)
    result = bnfold.fold_module(model, torch.randn(2, 3, 7, 7))
    assert [d.outcome for d in result.report.decisions] == [Outcome.FOLDED]
    same_at(result, model, [(2, 3, 7, 7), (1, 3, 9, 12)])


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(3, 2, 1),
        nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True),
        nn.AvgPool2d(2, divisor_override=3),
        lambda x: functional.avg_pool2d(x, 3, 1, (0, 1)),
    ],
)
def test_average_that_counts_padding_or_overrides_the_divisor_is_kept(pool) -> None:
    model = statistics(LayerPoolNorm(2, pool))
    result = bnfold.fold_module(model, torch.randn(2, 3, 7, 7))
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.POOL_DOES_NOT_COMMUTE)
    same_at(result, model, [(2, 3, 7, 7)])


class PoolReadTwice(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.conv, self.pool, self.bn, self.where = (
            nn.Conv2d(3, 4, 3),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(4),
            where,
        )

    def forward(self, inputs):
        features = self.conv(inputs)
        pooled = self.pool(features)
        if self.where == "pool":
            return self.bn(pooled) + pooled
        if self.where == "pool-inplace":
            normalized = self.bn(pooled)
            return normalized + pooled.relu_()
        return self.bn(pooled), features.sum()


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("pool", Reason.PRODUCER_HAS_OTHER_CONSUMERS),
        ("pool-inplace", Reason.PRODUCER_HAS_OTHER_CONSUMERS),
        ("conv", Reason.PRODUCER_HAS_OTHER_CONSUMERS),
    ],
)
def test_other_readers_of_the_pool_or_conv_output_keep_the_bn(where, reason) -> None:
    model = statistics(PoolReadTwice(where))
    result = bnfold.fold_module(model, torch.randn(2, 3, 8, 8))
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, reason), result.report.to_text()
    same_at(result, model, [(2, 3, 8, 8)])


def test_hook_on_the_pool_keeps_the_bn() -> None:
    model = statistics(LayerPoolNorm(2, nn.MaxPool2d(2)))
    model.pool.register_forward_hook(lambda module, inputs, output: None)
    (decision,) = bnfold.fold_module(model, torch.randn(2, 3, 7, 7)).report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.HOOKS_REGISTERED)


class FunctionalNorm(nn.Module):
    """timm's BatchNormAct2d spelling: F.batch_norm of the pool's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs):
        pooled = functional.max_pool2d(self.conv(inputs), 2)
        bn = self.bn
        return functional.batch_norm(
            pooled, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
        )


def test_functional_batchnorm_after_a_pool_folds() -> None:
    model = statistics(FunctionalNorm())
    result = bnfold.fold_module(model, torch.randn(2, 3, 8, 8))
    assert [(d.rule, d.outcome) for d in result.report.decisions] == [("conv-pool-bn", Outcome.FOLDED)]
    same_at(result, model, [(2, 3, 8, 8), (1, 3, 11, 9)])


def test_pool_folds_through_torch_export() -> None:
    model = statistics(LayerPoolNorm(2, nn.AvgPool2d(3, 2, 1, count_include_pad=False)))
    result = bnfold.fold_module(model, torch.randn(2, 3, 8, 8), tracer="export")
    assert [(d.rule, d.outcome) for d in result.report.decisions] == [("conv-pool-bn", Outcome.FOLDED)], (
        result.report.to_text()
    )
    same_at(result, model, [(2, 3, 8, 8)])


class PreActStem(nn.Module):
    """timm ResNetV2 (preact): stem conv -> max pool, then the first block's norm1 -> relu of the pool's
    output, which feeds both the downsample shortcut and conv1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.stem_pool = nn.MaxPool2d(3, 2, 1)
        self.norm1 = nn.BatchNorm2d(8)
        self.downsample = nn.Conv2d(8, 16, 1, bias=False)
        self.conv1 = nn.Conv2d(8, 4, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 16, 3, padding=1, bias=False)

    def forward(self, inputs):
        pooled = self.stem_pool(self.stem_conv(inputs))
        preact = torch.relu(self.norm1(pooled))
        shortcut = self.downsample(preact)
        out = self.conv2(torch.relu(self.norm2(self.conv1(preact))))
        return out + shortcut


def test_resnetv2_preact_stem_folds_completely() -> None:
    model = statistics(PreActStem())
    result = bnfold.fold_module(model, torch.randn(2, 3, 32, 32))
    rules = {d.rule for d in result.report.decisions if d.outcome is Outcome.FOLDED}
    assert "conv-pool-bn" in rules
    assert all(d.outcome is Outcome.FOLDED for d in result.report.decisions), result.report.to_text()
    assert batchnorms_left(result) == []
    same_at(result, model, [(2, 3, 32, 32), (1, 3, 45, 29)])


@settings(max_examples=25, deadline=None)
@given(
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    ceil_mode=st.booleans(),
    count_include_pad=st.booleans(),
    maximum=st.booleans(),
    negative=st.booleans(),
    size=st.integers(5, 9),
)
def test_fold_only_where_the_pool_commutes(
    kernel, stride, padding, ceil_mode, count_include_pad, maximum, negative, size
) -> None:
    """Whatever the pool's options: folded means the same function at two input sizes; kept means the
    BN stays with pool-does-not-commute, and only for a max after a negative scale or padding counted."""
    padding = min(padding, kernel // 2)
    if maximum:
        pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    else:
        pool = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    model = statistics(LayerPoolNorm(2, pool), negative=negative)
    result = bnfold.fold_module(model, torch.randn(2, 3, size, size + 1))
    (decision,) = result.report.decisions
    if decision.outcome is Outcome.FOLDED:
        same_at(result, model, [(2, 3, size, size + 1), (1, 3, size + 3, size)])
        assert not (maximum and negative)
    else:
        assert decision.reason is Reason.POOL_DOES_NOT_COMMUTE
        assert (maximum and negative) or (not maximum and count_include_pad and padding > 0)
