"""In-place writes (issue 12, item 4) and parametrized layers (item 8) on the PyTorch path.

A fold that moves a read of a tensor to another node, or merges reads made at different nodes, must
not cross an in-place write into that tensor or into one sharing its storage.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
functional = torch.nn.functional

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402
from tests.fx import nets  # noqa: E402


def same_at(result, model, *shapes) -> None:
    generator = torch.Generator().manual_seed(3)
    for shape in shapes:
        inputs = torch.randn(shape, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-5, atol=1e-5)


def _setitem(tensor):
    tensor[:, 0] = 0.0


WRITES = {
    "mul_": lambda tensor: tensor.mul_(3),
    "relu_ via F.relu(inplace=True)": lambda tensor: functional.relu(tensor, inplace=True),
    "F.relu(x, True) positional": lambda tensor: functional.relu(tensor, True),
    "setitem": _setitem,
    "copy_": lambda tensor: tensor.copy_(tensor * 2),
    "a view written": lambda tensor: tensor.view(-1).add_(1.0),
    "__setitem__": lambda tensor: tensor.__setitem__((slice(None), 0), 0.0),
    "out=": lambda tensor: torch.mul(tensor, 2.0, out=tensor),
    "torch.relu_": lambda tensor: torch.relu_(tensor),
    # The written tensor given by keyword or inside a list argument.
    "nn.init.constant_(tensor=)": lambda tensor: torch.nn.init.constant_(tensor=tensor, val=0.5),
    "F.relu(input=, inplace=True)": lambda tensor: functional.relu(input=tensor, inplace=True),
    "torch.relu_(input=)": lambda tensor: torch.relu_(input=tensor),
    "torch._foreach_mul_([x])": lambda tensor: torch._foreach_mul_([tensor], 3.0),
}


@pytest.mark.parametrize("write", WRITES, ids=str)
def test_write_between_bn_and_the_conv_after_it_is_refused(write: str) -> None:
    model = nets.randomized(nets.MutatedBetweenBNAndConv(write=WRITES[write]))
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5))
    (decision,) = result.report.decisions
    assert (decision.outcome, decision.rule, decision.reason) == (
        Outcome.KEPT,
        "bn-conv",
        Reason.MUTATED_IN_PLACE,
    )
    assert "writes in place into `relu`" in decision.detail
    # ``x[i] = v`` cannot be traced symbolically: torch.export traces it (and keeps the in-place
    # write), specialised to the example's shape.
    assert result.tracer == ("torch.export" if write == "setitem" else "torch.fx.symbolic_trace")
    same_at(result, model, (2, 4, 5, 5), *([(1, 4, 3, 7)] if write != "setitem" else []))


@pytest.mark.parametrize("given", ["module", "GraphModule, called by keyword"])
def test_inplace_activation_module_between_bn_and_conv_is_refused(given: str) -> None:
    class ModuleWrite(nets.MutatedBetweenBNAndConv):
        def __init__(self) -> None:
            super().__init__()
            self.act = torch.nn.ReLU(inplace=True)
            self.write = self.act if given == "module" else (lambda tensor: self.act(input=tensor))

    model = nets.randomized(ModuleWrite())
    # Shift the statistics so the in-place ReLU changes values the conv would read.
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
    # A GraphModule is folded as given: plain symbolic_trace keeps nn.ReLU a leaf call, `act(input=h)`.
    given_model = model if given == "module" else torch.fx.symbolic_trace(model)
    result = bnfold.fold_module(given_model, torch.randn(2, 4, 5, 5))
    assert [d.reason for d in result.report.decisions] == [Reason.MUTATED_IN_PLACE]
    same_at(result, model, (2, 4, 5, 5))


def test_write_before_the_bn_or_after_the_conv_does_not_block() -> None:
    class WriteOutside(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(4)
            self.conv = torch.nn.Conv2d(4, 6, 1)

        def forward(self, inputs):
            hidden = inputs * 2
            hidden.relu_()  # before the BN reads it: the BN and the folded conv both see it
            output = self.conv(self.bn(hidden))
            hidden.mul_(3)  # after the conv: neither reads it again
            return output + hidden.sum()

    model = nets.randomized(WriteOutside())
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5))
    assert [(d.rule, d.outcome) for d in result.report.decisions] == [("bn-conv", Outcome.FOLDED)]
    same_at(result, model, (2, 4, 5, 5), (3, 4, 2, 6))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_write_between_branch_reads_blocks_the_merge(tracer: str) -> None:
    model = nets.MutatedBeforeIdentityAdd().eval()
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5), tracer=tracer)
    assert result.report.merged == []
    same_at(result, model, (2, 4, 5, 5))


def test_unmutated_identity_branch_still_merges() -> None:
    class Plain(nets.MutatedBeforeIdentityAdd):
        def forward(self, inputs):
            hidden = inputs * 2
            return self.conv(hidden) + hidden

    model = Plain().eval()
    result = bnfold.fold_module(model, torch.randn(2, 4, 5, 5))
    assert len(result.report.merged) == 1
    same_at(result, model, (2, 4, 5, 5), (1, 4, 8, 3))


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm", "orthogonal-free"])
def test_parametrized_conv_folds_into_a_plain_conv(parametrization: str) -> None:
    from torch.nn.utils import parametrizations, parametrize

    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    if parametrization == "weight_norm":
        conv = parametrizations.weight_norm(conv)
    elif parametrization == "spectral_norm":
        conv = parametrizations.spectral_norm(conv)
    else:

        class Doubled(torch.nn.Module):
            def forward(self, weight):
                return weight * 2

        parametrize.register_parametrization(conv, "weight", Doubled())
    model = nets.randomized(torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4), torch.nn.ReLU()))
    result = bnfold.fold_module(model, torch.randn(2, 3, 6, 6))

    assert [(d.node, d.rule, d.into) for d in result.report.folded] == [("1", "conv-bn", "0")]
    folded = result.module.get_submodule("0")
    assert type(folded) is torch.nn.Conv2d and not parametrize.is_parametrized(folded)
    assert parametrize.is_parametrized(model[0]), "the original model is not changed"
    same_at(result, model, (2, 3, 6, 6), (1, 3, 4, 9))


def test_parametrized_conv_through_the_cli_folds(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from bnfold.cli import cli

    (tmp_path / "parametrized_model.py").write_text(
        "import torch\n"
        "from torch.nn.utils import parametrizations\n"
        "def build():\n"
        "    conv = parametrizations.weight_norm(torch.nn.Conv2d(3, 4, 3))\n"
        "    return torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4)).eval(), torch.randn(1, 3, 6, 6)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ran = CliRunner().invoke(cli, ["parametrized_model:build", "-o", str(tmp_path / "out.onnx")])
    assert ran.exit_code == 0, ran.output
    assert "1 folded, 0 kept" in ran.output


def test_parameters_written_in_place_by_forward_are_not_constants() -> None:
    class Drifting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.head = torch.nn.Conv2d(4, 4, 1)

        def forward(self, inputs):
            self.bn.weight.mul_(1.5)  # every call rescales: no fold can bake the value in
            self.head.weight.add_(0.25)
            return self.head(self.bn(self.conv(inputs)))

    model = nets.randomized(Drifting()).requires_grad_(False)
    result = bnfold.fold_module(model, torch.randn(2, 3, 4, 4), verify=False)
    (decision,) = result.report.decisions
    assert decision.reason is Reason.PARAM_NOT_CONSTANT, result.report.to_text()
    assert "written in place" in decision.detail


def test_reshape_to_a_size_read_from_the_input_that_a_linear_fixes_folds() -> None:
    # x.shape[-1] is a symbol, but the Linear accepts only inputs whose last size is in_features.
    class ReadFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(6, 6)
            self.bn = torch.nn.BatchNorm1d(6)

        def forward(self, inputs):
            return self.bn(self.linear(inputs).reshape(-1, inputs.shape[-1]))

    model = nets.randomized(ReadFeatures())
    result = bnfold.fold_module(model, torch.randn(2, 3, 6))
    assert [(d.rule, d.outcome) for d in result.report.decisions] == [("linear-reshape-bn", Outcome.FOLDED)]
    same_at(result, model, (2, 3, 6), (5, 1, 6), (1, 7, 6))


class WritesIntoItsInput(torch.nn.Module):
    """``n = bn(x); x.mul_(3); bn2(conv(n)) + x``: the module writes into the tensor its caller passed."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.bn2 = torch.nn.BatchNorm2d(4)

    def forward(self, inputs):
        normalized = self.bn(inputs)
        inputs.mul_(3)
        return self.bn2(self.conv(normalized)) + inputs


@pytest.mark.filterwarnings("ignore:ONNX Preprocess - Removing mutation")
def test_module_writing_into_its_input_verifies_on_untouched_inputs(tmp_path) -> None:
    # Every run (the original's, the folded module's, the exporter's, the float64 reference's) gets
    # its own copy of the inputs: a run on inputs an earlier run tripled is a false mismatch.
    model = nets.randomized(WritesIntoItsInput())
    example = torch.randn(2, 4, 3, 3)
    untouched = example.clone()
    result = bnfold.fold_module(model, example)
    assert [(d.node, d.outcome, d.reason) for d in result.report.decisions] == [
        ("bn", Outcome.KEPT, Reason.MUTATED_IN_PLACE),
        ("bn2", Outcome.FOLDED, None),
    ]
    assert result.verification, result.verification.to_text()
    exported = bnfold.export(model, example, tmp_path / "model.onnx")
    assert exported.passed and exported.written, exported.to_text()
    assert torch.equal(example, untouched), "the caller's example tensor was written into"
