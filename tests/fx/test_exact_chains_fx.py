"""In torch too, a chain of folds on one weight rounds once (conv-bn then branch-merge, Conv->BN->BN).

The float32 fold must equal, bit for bit, the fold of the same module in float64 rounded to float32.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.fx.state as fx_state  # noqa: E402
from bnfold import fold_module  # noqa: E402
from tests.fx import nets  # noqa: E402


class ConvBNBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn1(self.conv(inputs)))


def models():
    torch.manual_seed(0)
    yield "conv-bn-bn", nets.randomized(ConvBNBN()), torch.randn(2, 4, 6, 6)
    torch.manual_seed(1)
    yield "repvgg", nets.randomized(nets.repvgg_block(channels=6)), torch.randn(2, 6, 6, 6)


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in module.named_parameters()}


@pytest.mark.parametrize("kind, model, example", list(models()), ids=lambda value: str(value)[:12])
def test_a_chain_of_folds_rounds_once_in_torch(kind, model, example):
    folded = fold_module(copy.deepcopy(model), (example,))
    assert not folded.report.kept, folded.report.to_text()
    wide = fold_module(copy.deepcopy(model).double(), (example.double(),))
    expected = {name: value.float() for name, value in parameters(wide.module).items()}
    actual = parameters(folded.module)
    assert expected.keys() == actual.keys()
    for name, value in actual.items():
        assert torch.equal(value, expected[name]), f"{name} was rounded more than once"


def test_without_room_for_exact_values_the_chain_rounds_per_step(monkeypatch):
    monkeypatch.setattr(fx_state, "EXACT_VALUES_BUDGET", 0)
    _, model, example = next(models())
    folded = fold_module(copy.deepcopy(model), (example,))
    wide = fold_module(copy.deepcopy(model).double(), (example.double(),))
    actual, expected = folded.module.conv.weight.detach(), wide.module.conv.weight.detach().float()
    assert not torch.equal(actual, expected)  # this chain shows the second rounding...
    torch.testing.assert_close(actual, expected, rtol=2.5e-7, atol=0)  # ...of at most about an ulp
