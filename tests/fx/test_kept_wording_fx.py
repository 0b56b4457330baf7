"""The PyTorch path's kept-BN detail (issue 13): the same wording as ONNX (bnfold.core.kept), naming
the module or function on either side and the remedy that exists for torch users."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402
from bnfold.core.kept import REMEDY_TORCH  # noqa: E402
from tests.fx import nets  # noqa: E402


class ConvMixerBlock(torch.nn.Module):
    """ConvMixer's residual: ``x + bn(gelu(conv(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.act = torch.nn.GELU()
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.act(self.conv(x))) + x


class PreActivation(torch.nn.Module):
    """ResNetV2 / DenseNet: ``conv(relu(bn(a + b)))`` after a join."""

    def __init__(self) -> None:
        super().__init__()
        self.left = torch.nn.Conv2d(4, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(torch.relu(self.left(x)) + x)))


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (ConvMixerBlock, "between GELU `act` and add `add`: no exact fold exists (GELU is not linear; add "),
        (PreActivation, "between add `add` and relu `relu_1`: no exact fold exists (add combines"),
    ],
)
def test_a_kept_bn_says_why_no_exact_fold_exists_and_what_to_do(module, expected) -> None:
    result = bnfold.fold_module(nets.randomized(module()), torch.randn(2, 4, 5, 5))
    (decision,) = [d for d in result.report.decisions if d.outcome is Outcome.KEPT]
    assert decision.reason is Reason.NO_FOLDABLE_PRODUCER
    assert decision.detail.startswith(expected), decision.detail
    assert decision.detail.endswith("; " + REMEDY_TORCH)
    assert result.verification, result.verification.to_text()


class BatchStatisticsAfterRelu(torch.nn.Module):
    """``F.batch_norm(relu(x), None, None, training=True)``: batch statistics, in eval mode too."""

    def forward(self, x):
        return torch.nn.functional.batch_norm(torch.relu(x), None, None, training=True)


def test_a_bn_no_rule_can_use_gives_its_own_reason_not_a_remedy() -> None:
    result = bnfold.fold_module(BatchStatisticsAfterRelu().eval(), torch.randn(2, 4, 5, 5))
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.NO_RUNNING_STATISTICS)
    assert "rewrite" not in decision.detail, decision.detail
