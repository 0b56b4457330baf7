"""Patterns torch's own fuse misses: subclasses, functional BN, untraceable models, chains."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold import BnfoldError, Outcome, Reason  # noqa: E402
from tests.fx import nets  # noqa: E402


def folded(result) -> list[tuple[str, str, str, str]]:
    return [(d.node, d.op_type, d.rule, d.into) for d in result.report.folded]


def assert_same_function(result, model, *inputs) -> None:
    with torch.no_grad():
        expected = model(*inputs)
        actual = result.module(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_subclasses_of_conv2d_and_batchnorm2d_fold_as_modules() -> None:
    model = nets.randomized(nets.SubclassNet())
    example = torch.randn(2, 3, 8, 8)
    result = bnfold.fold_module(model, example)

    assert folded(result) == [("bn", "SubclassBN", "conv-bn", "conv")]
    assert isinstance(result.module.conv, nets.SubclassConv), "the folded layer keeps its class"
    assert result.module.conv.tag == "subclass" and result.module.conv.padding_mode == "reflect"
    assert_same_function(result, model, example)


def test_functional_batch_norm_of_a_bn_act_module_folds() -> None:
    model = nets.randomized(nets.FunctionalBNNet())
    example = torch.randn(2, 3, 8, 8)
    result = bnfold.fold_module(model, example)

    assert folded(result) == [
        ("bn1", "BatchNormAct2d", "functional-bn", "conv1"),
        ("bn2", "SyncBatchNorm", "conv-bn", "conv2"),
    ]
    assert result.verification
    # The activation stays; the statistics and affine parameters are gone.
    assert isinstance(result.module.bn1.act, torch.nn.ReLU)
    assert sorted(result.module.state_dict()) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]
    assert_same_function(result, model, torch.randn(3, 3, 8, 8))


def test_functional_batch_norm_through_torch_export() -> None:
    model = nets.randomized(nets.FunctionalBNNet())
    example = torch.randn(2, 3, 8, 8)
    result = bnfold.fold_module(model, example, tracer="export")
    assert result.tracer == "torch.export"
    assert folded(result) == [
        ("bn1", "BatchNormAct2d", "functional-bn", "conv1"),
        ("bn2", "SyncBatchNorm", "conv-bn", "conv2"),
    ]
    assert_same_function(result, model, example)


def test_untraceable_model_falls_back_to_torch_export() -> None:
    model = nets.randomized(nets.ShapeBranchNet())
    example = torch.randn(2, 3, 10, 10)
    result = bnfold.fold_module(model, example)

    assert result.tracer == "torch.export"
    assert result.report.extras["tracer"] == "torch.export"
    assert (
        "symbolically traced variables cannot be used as inputs to control flow"
        in (result.report.extras["symbolic_trace_error"])
    )
    assert folded(result) == [("bn", "BatchNorm2d", "conv-bn", "conv")]
    assert_same_function(result, model, torch.randn(2, 3, 10, 10))
    result.module.eval()  # a plain GraphModule, unlike ExportedProgram.module()
    with pytest.raises(Exception, match="Guard failed"):
        result.module(torch.randn(2, 3, 6, 6))  # specialised to the example shape, and says so


def test_dynamic_shapes_reach_torch_export() -> None:
    model = nets.randomized(nets.ShapeBranchNet())
    batch = torch.export.Dim("batch", min=1, max=64)
    result = bnfold.fold_module(model, torch.randn(2, 3, 10, 10), dynamic_shapes=({0: batch},))
    assert result.tracer == "torch.export"
    assert_same_function(result, model, torch.randn(5, 3, 10, 10))


def test_data_dependent_branch_with_torch_cond_folds_via_torch_export() -> None:
    model = nets.randomized(nets.CondNet())
    example = torch.randn(4, 5)
    result = bnfold.fold_module(model, example)

    assert result.tracer == "torch.export"
    assert folded(result) == [
        ("stem_bn", "BatchNorm1d", "linear-bn", "stem"),
        ("branch_bn", "BatchNorm1d", "linear-bn", "branch"),
    ]
    assert [decision.graph for decision in result.report.folded] == ["main", "true_graph_0"]
    assert not result.report.kept
    for inputs in (example, -example.abs() - 10, example.abs() + 10):
        assert_same_function(result, model, inputs)


def test_data_dependent_python_branch_is_a_clear_error() -> None:
    model = nets.randomized(nets.ValueBranchNet())
    with pytest.raises(BnfoldError, match=r"torch\.export: .*data-dependent.*torch\.cond") as error:
        bnfold.fold_module(model, torch.randn(1, 3, 6, 6))
    assert "\n" not in str(error.value)
    with pytest.raises(BnfoldError, match="pass example_inputs to fall back to torch.export"):
        bnfold.fold_module(model)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_and_conv_transpose_of_every_rank(dims: int, transposed: bool, groups: int) -> None:
    model = nets.randomized(nets.ConvBN(dims=dims, transposed=transposed, groups=groups, bias=groups == 1))
    example = torch.randn(2, 4, *[5] * dims)
    result = bnfold.fold_module(model, example)
    rule = "convtranspose-bn" if transposed else "conv-bn"
    assert [(d.rule, d.into) for d in result.report.folded] == [(rule, "conv")]
    assert result.module.conv.bias is not None
    assert_same_function(result, model, example)


def test_chain_of_two_batchnorms_folds_both() -> None:
    model = nets.randomized(nets.ConvBNBN())
    example = torch.randn(2, 3, 6, 6)
    result = bnfold.fold_module(model, example)
    assert folded(result) == [
        ("bn1", "BatchNorm2d", "conv-bn", "conv"),
        ("bn2", "BatchNorm2d", "conv-bn", "conv"),
    ]
    assert_same_function(result, model, example)


def test_linear_then_batchnorm1d() -> None:
    model = nets.randomized(nets.LinearBN())
    example = torch.randn(3, 5)
    result = bnfold.fold_module(model, example)
    assert folded(result) == [("bn", "BatchNorm1d", "linear-bn", "linear")]
    assert_same_function(result, model, example)


def test_graph_module_and_exported_program_inputs() -> None:
    model = nets.randomized(nets.ConvBN())
    example = torch.randn(2, 4, 5, 5)
    traced = torch.fx.symbolic_trace(model)
    from_graph = bnfold.fold_module(traced, example)
    assert from_graph.tracer == "graph-module" and from_graph.report.count(Outcome.FOLDED) == 1
    assert [node.op for node in traced.graph.nodes].count("call_module") == 2, "input left alone"

    program = torch.export.export(model, (example,))
    from_program = bnfold.fold_module(program, example)
    assert folded(from_program) == [("bn", "BatchNorm2d", "conv-bn", "conv")]
    assert_same_function(from_program, model, example)


def test_folded_graph_is_valid_and_recompiled() -> None:
    model = nets.randomized(nets.ConvBN())
    result = bnfold.fold_module(model, torch.randn(1, 4, 5, 5))
    result.module.graph.lint()
    assert "bn" not in result.module.code
    assert not hasattr(result.module, "bn")


@pytest.mark.parametrize(
    ("layer", "dims", "shape"),
    [
        (torch.nn.Conv2d(4, 6, 3, groups=2, stride=2, dilation=2), 2, (2, 4, 9, 9)),
        (torch.nn.Conv1d(4, 6, 1, bias=False), 1, (2, 4, 7)),
        (torch.nn.Conv3d(4, 2, 2, padding="valid"), 3, (1, 4, 4, 4, 4)),
        (torch.nn.ConvTranspose2d(4, 6, 1, groups=2), 2, (2, 4, 5, 5)),
        (torch.nn.Linear(4, 3), 1, (5, 4)),
    ],
    ids=["conv-grouped-strided", "conv1d-no-bias", "conv3d-valid", "convtranspose-1x1-grouped", "linear"],
)
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_bn_folds_into_the_layer_after_it(layer, dims: int, shape: tuple[int, ...], tracer: str) -> None:
    model = nets.bn_before(layer, 4, dims=dims)
    example = torch.randn(shape)
    result = bnfold.fold_module(model, example, tracer=tracer)

    kind = {torch.nn.Linear: "linear", torch.nn.ConvTranspose2d: "convtranspose"}.get(type(layer), "conv")
    assert [(d.node, d.rule, d.into) for d in result.report.folded] == [("bn", f"bn-{kind}", "layer")]
    assert_same_function(result, model, example)
    assert isinstance(result.module.layer, type(layer)) if tracer == "fx" else True


def test_producer_side_is_preferred_and_refusals_are_combined() -> None:
    # conv -> bn -> conv: the conv before wins.
    model = nets.randomized(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    )
    result = bnfold.fold_module(model, torch.randn(1, 3, 4, 4))
    assert [(d.rule, d.into) for d in result.report.folded] == [("conv-bn", "0")]
    # relu -> bn -> padded conv: no producer, and the consumer refuses; the report says both.
    model = nets.randomized(
        torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 3, padding=1))
    )
    (decision,) = bnfold.fold_module(model, torch.randn(1, 4, 4, 4)).report.decisions
    assert decision.reason is Reason.PADDING_AFTER_BN and decision.rule == "bn-conv"
    # conv (shared output) -> bn -> 1x1 conv: the producer refuses, the consumer folds.
    result = bnfold.fold_module(nets.randomized(nets.SharedOutputThenBN()), torch.randn(1, 3, 4, 4))
    assert [(d.rule, d.into) for d in result.report.folded] == [("bn-conv", "after")]
