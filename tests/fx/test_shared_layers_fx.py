"""A layer used at more than one call site (a module called twice, a weight tied between two modules,
a parameter read by two functional calls): the fold goes into a copy of the layer for the call site
it folds into; every other site keeps reading the original tensors, and the original model is
untouched. Where a copy cannot be made safely (hooks, a BN called at several sites) the BN is kept."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402
from tests.fx import nets  # noqa: E402


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"the original model's `{name}` changed"


def same_at(result, model, *shapes) -> None:
    for shape in shapes:
        inputs = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-5, atol=1e-5)


def outcomes(result) -> list[tuple[Outcome, str]]:
    return [(d.outcome, d.rule) for d in result.report.decisions]


def call_targets(graph_module) -> list[str]:
    return [node.target for node in graph_module.graph.nodes if node.op == "call_module"]


class TwoSites(nn.Module):
    """``conv`` called at two sites: BN ``first`` after one call, ``second`` (optional) after the other."""

    def __init__(self, both: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.first = nn.BatchNorm2d(4)
        self.second = nn.BatchNorm2d(4) if both else nn.Identity()

    def forward(self, x):
        a = self.first(self.conv(x))
        b = self.second(self.conv(torch.relu(a)))
        return a, b


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_module_called_twice_folds_into_a_copy_for_one_call(tracer) -> None:
    model = nets.randomized(nets.ConvCalledTwice())
    before = snapshot(model)
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5), tracer=tracer)
    assert outcomes(result) == [(Outcome.FOLDED, "conv-bn")], result.report.to_text()
    assert result.verification, result.verification.to_text()
    same_at(result, model, *([(2, 4, 5, 5), (3, 4, 7, 6)] if tracer == "fx" else [(2, 4, 5, 5)]))
    assert_untouched(model, before)
    if tracer == "fx":  # torch.export's graph reads the tensors by get_attr: see the functional test
        (decision,) = result.report.decisions
        assert decision.into == "conv_folded"
        assert sorted(call_targets(result.module)) == ["conv", "conv_folded"]
        # the other call site reads the original values, in a tensor the fold did not touch
        torch.testing.assert_close(result.module.conv.weight, model.conv.weight, rtol=0, atol=0)
        assert not torch.equal(result.module.conv_folded.weight, model.conv.weight)


def test_each_call_site_checked_on_its_own() -> None:
    """Both outputs (one per call site) match the original, with a BN after one call or both."""
    for both in (False, True):
        torch.manual_seed(0)
        model = nets.randomized(TwoSites(both=both))
        before = snapshot(model)
        inputs = torch.randn(2, 4, 6, 6)
        result = bnfold.fold_module(model, inputs)
        expected = [(Outcome.FOLDED, "conv-bn")] * (2 if both else 1)
        assert outcomes(result) == expected, result.report.to_text()
        with torch.no_grad():
            for folded, original in zip(result.module(inputs), model(inputs), strict=True):
                torch.testing.assert_close(folded, original, rtol=1e-5, atol=1e-5)
        assert_untouched(model, before)
        targets = call_targets(result.module)
        assert len(set(targets)) == len(targets) == 2  # each call its own module now


def test_tied_weight_folds_into_a_copy_and_the_other_module_keeps_it() -> None:
    model = nets.randomized(nets.TiedWeights())
    before = snapshot(model)
    result = bnfold.fold_module(model, torch.randn(3, 6))
    assert outcomes(result) == [(Outcome.FOLDED, "linear-bn")], result.report.to_text()
    assert result.verification
    same_at(result, model, (3, 6), (8, 6))
    assert_untouched(model, before)
    assert result.module.second.weight is model.second.weight or torch.equal(
        result.module.second.weight, model.first.weight
    )
    assert model.second.weight is model.first.weight  # the tie in the original model stays


def test_shared_functional_weight_gets_fresh_tensors_for_the_folded_call() -> None:
    class FunctionalTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)
            self.bias = nn.Parameter(torch.randn(4))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            folded = self.bn(F.conv2d(x, self.weight, self.bias, padding=1))
            return folded + F.conv2d(torch.relu(x), self.weight, self.bias, padding=1)

    model = nets.randomized(FunctionalTwice())
    before = snapshot(model)
    for tracer in ("fx", "export"):
        result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5), tracer=tracer)
        assert outcomes(result) == [(Outcome.FOLDED, "conv-bn")], result.report.to_text()
        assert result.verification, result.verification.to_text()
        same_at(result, model, *([(2, 4, 5, 5), (1, 4, 6, 7)] if tracer == "fx" else [(2, 4, 5, 5)]))
        assert_untouched(model, before)
        torch.testing.assert_close(result.module.weight, model.weight, rtol=0, atol=0)


def test_bn_after_a_shared_linear_and_an_affine_chain_go_into_one_copy() -> None:
    class SharedLinearChain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 5)
            self.bn = nn.BatchNorm1d(5)
            self.register_buffer("scale", torch.rand(5) + 0.5)

        def forward(self, x):
            return self.bn(self.linear(x)) * self.scale + self.linear(x)

    model = nets.randomized(SharedLinearChain())
    before = snapshot(model)
    result = bnfold.fold_module(model, torch.randn(4, 5))
    rules = sorted(d.rule for d in result.report.folded)
    assert rules == ["linear-affine", "linear-bn"], result.report.to_text()
    assert {d.into for d in result.report.folded} == {"linear_folded"}
    same_at(result, model, (4, 5), (9, 5))
    assert_untouched(model, before)


def test_bn_before_a_shared_conv_folds_into_a_copy() -> None:
    class BNThenShared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.bn(torch.relu(x))) + self.conv(x)

    model = nets.randomized(BNThenShared())
    before = snapshot(model)
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5))
    assert outcomes(result) == [(Outcome.FOLDED, "bn-conv")], result.report.to_text()
    same_at(result, model, (2, 4, 5, 5), (1, 4, 3, 8))
    assert_untouched(model, before)


def test_inplace_fold_of_a_shared_module_leaves_its_tensors_intact() -> None:
    """``inplace=True`` shares the unfolded tensors with the model: the shared conv's stay as they were."""
    model = nets.randomized(nets.ConvCalledTwice())
    weight, bias = model.conv.weight, model.conv.bias
    before = (weight.detach().clone(), bias.detach().clone())
    reference = nets.randomized(nets.ConvCalledTwice())
    reference.load_state_dict(model.state_dict())
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5), inplace=True)
    assert outcomes(result) == [(Outcome.FOLDED, "conv-bn")]
    assert model.conv.weight is weight and model.conv.bias is bias
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])
    assert result.module.conv.weight is weight  # the other call site reads the very same tensor
    same_at(result, reference.eval(), (2, 4, 5, 5))


def test_hooked_shared_module_is_kept() -> None:
    model = nets.randomized(nets.ConvCalledTwice())
    model.conv.register_forward_hook(lambda module, inputs, output: output * 2)
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5))
    assert [d.reason for d in result.report.decisions] == [Reason.HOOKS_REGISTERED]
    assert result.report.folded == []
    same_at(result, model, (2, 4, 5, 5))


def test_written_in_place_shared_weight_is_kept() -> None:
    class WritesWeight(nets.ConvCalledTwice):
        def forward(self, inputs):
            out = self.bn(self.conv(inputs))
            self.conv.weight.mul_(1.0)
            return out + self.conv(inputs)

    model = nets.randomized(WritesWeight())
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5), verify=False)
    assert result.report.folded == []
    assert [d.reason for d in result.report.decisions] == [Reason.WEIGHT_NOT_CONSTANT]


def test_bn_called_twice_is_still_kept() -> None:
    model = nets.randomized(nets.BNCalledTwice())
    result = bnfold.fold_module(model, torch.randn(2, 3, 5, 5))
    assert {d.reason for d in result.report.decisions} == {Reason.SHARED_MODULE}
    assert result.report.folded == []
