"""conv-affine / convtranspose-affine on the PyTorch path: per-channel ``*``/``+``/``-``/``/`` by constants
after a conv (torchvision's FrozenBatchNorm2d written out, scale-and-shift code) fold into the conv;
constants that are not per channel, or whose shape could add axes, are left alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold import Outcome  # noqa: E402


class ScaleShift(nn.Module):
    def __init__(
        self, scale_shape, shift_shape, transposed: bool = False, spelled: str = "operators"
    ) -> None:
        super().__init__()
        self.conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.rand(scale_shape) + 0.5)
        self.register_buffer("shift", torch.randn(shift_shape))
        self.spelled = spelled

    def forward(self, inputs):
        features = self.conv(inputs)
        if self.spelled == "operators":
            return (features * self.scale + self.shift - 0.25) / 2.0
        return torch.add(features.mul(self.scale), self.shift)


def same_at(result, model, *shapes) -> None:
    for shape in shapes:
        inputs = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("spelled", ["operators", "methods"])
@pytest.mark.parametrize("shapes", [((4, 1, 1), (4, 1, 1)), ((1, 4, 1, 1), (4, 1, 1)), ((1,), (4, 1, 1))])
def test_per_channel_chain_folds_into_the_conv(shapes, transposed, spelled) -> None:
    model = ScaleShift(*shapes, transposed=transposed, spelled=spelled).eval()
    result = bnfold.fold_module(model, torch.randn(2, 3, 5, 5))
    rule = "convtranspose-affine" if transposed else "conv-affine"
    assert {(d.rule, d.outcome) for d in result.report.decisions} == {(rule, Outcome.FOLDED)}
    assert len(result.report.decisions) == (4 if spelled == "operators" else 2)
    assert [n.op for n in result.module.graph.nodes] == ["placeholder", "call_module", "output"] or (
        "input_rank_checks" in result.report.extras
    )
    same_at(result, model, (2, 3, 5, 5), (1, 3, 7, 4))


@pytest.mark.parametrize("scale_shape", [(4,), (1, 4, 1, 5), (2, 4, 1, 1)])
def test_constant_that_is_not_per_channel_is_left_alone(scale_shape) -> None:
    model = ScaleShift(scale_shape, (1,)).eval()
    result = bnfold.fold_module(
        model, torch.randn(2, 3, 5, 5) if scale_shape != (4,) else torch.randn(2, 3, 4, 4)
    )
    assert all(d.node != "mul" for d in result.report.folded)
    example = (2, 3, 5, 5) if scale_shape != (4,) else (2, 3, 4, 4)
    same_at(result, model, example)


def test_conv_output_read_elsewhere_is_left_alone() -> None:
    class Reused(ScaleShift):
        def forward(self, inputs):
            features = self.conv(inputs)
            return features * self.scale + features

    model = Reused((4, 1, 1), (1,)).eval()
    result = bnfold.fold_module(model, torch.randn(2, 3, 5, 5))
    assert result.report.folded == []
    same_at(result, model, (2, 3, 5, 5))
