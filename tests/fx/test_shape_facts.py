"""A torch fold relies only on what holds for every input the folded module accepts (issue 12, item 3).

Sizes are symbols, never the example's values; ranks come from the graph (a BN's own input check, an
assertion, flatten/view with explicit sizes) or from the example, in which case the folded module
checks that rank. Every fold is checked at several input sizes.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402
from tests.fx import nets  # noqa: E402


def same_at(result, model, *shapes) -> None:
    """The folded module computes the original function at every one of ``shapes``."""
    generator = torch.Generator().manual_seed(7)
    for shape in shapes:
        inputs = torch.randn(shape, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-5, atol=1e-5)


def decisions(result) -> list[tuple[str, Outcome, str | None, Reason | None]]:
    return [(d.node, d.outcome, d.rule, d.reason) for d in result.report.decisions]


def test_view_that_keeps_the_features_only_for_one_token_is_refused() -> None:
    model = nets.randomized(nets.LinearViewBN(4))
    result = bnfold.fold_module(model, torch.randn(2, 1, 4))
    ((node, outcome, rule, reason),) = decisions(result)
    assert (node, outcome, rule, reason) == ("bn", Outcome.KEPT, "linear-reshape-bn", Reason.SHAPE_DEPENDENT)
    assert "for the example [2, 4, 1] only" in result.report.decisions[0].detail
    same_at(result, model, (2, 1, 4), (2, 3, 4), (5, 7, 4))


def test_view_with_a_static_token_count_under_torch_export_folds() -> None:
    # torch.export without dynamic shapes guards the example's sizes: T = 1 is then a fact.
    model = nets.randomized(nets.LinearViewBN(4))
    result = bnfold.fold_module(model, torch.randn(2, 1, 4), tracer="export")
    assert decisions(result) == [("bn", Outcome.FOLDED, "linear-reshape-bn", None)]
    same_at(result, model, (2, 1, 4))
    with pytest.raises(Exception, match="Guard failed|Expected input"):
        result.module(torch.randn(2, 3, 4))


def test_exported_onnx_with_dynamic_tokens_is_exact_at_other_token_counts(tmp_path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    model = nets.randomized(nets.LinearViewBN(4))
    path = tmp_path / "view.onnx"
    result = bnfold.export(
        model, torch.randn(2, 1, 4), path, dynamic_axes={"input": {0: "batch", 1: "tokens"}}
    )
    assert result.written and [d.reason for d in result.report.kept] == [Reason.SHAPE_DEPENDENT]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 1, 4), (2, 3, 4), (3, 5, 4)):
        inputs = torch.randn(shape)
        (output,) = session.run(None, {"input": inputs.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(output), model(inputs), rtol=1e-4, atol=1e-5)


def test_linear_bn_from_a_2d_example_checks_the_rank() -> None:
    # The module would accept [N, L, F] with L == F (BatchNorm1d(F) normalizes axis L): the folded
    # module refuses that rank instead of computing something else.
    model = nets.randomized(nets.LinearBN(5, 6))
    result = bnfold.fold_module(model, torch.randn(3, 5))
    assert decisions(result) == [("bn", Outcome.FOLDED, "linear-bn", None)]
    assert result.report.extras["input_rank_checks"] == {"inputs": 2}
    same_at(result, model, (3, 5), (1, 5), (8, 5))
    with pytest.raises(AssertionError, match="2-D `inputs`"):
        result.module(torch.randn(2, 6, 5))


@pytest.mark.parametrize("source", ["export tracer", "ExportedProgram"])
def test_linear_bn_through_torch_export_checks_the_rank(source) -> None:
    # torch.export's guards check the size of each axis the example had, not the rank: the exported
    # module also runs [N, F, F], where BatchNorm1d normalizes axis 1 and the fold would be wrong.
    model = nets.randomized(nets.LinearBN(5, 5))
    example = torch.randn(5, 5)
    if source == "ExportedProgram":
        result = bnfold.fold_module(torch.export.export(model, (example,)), example)
    else:
        result = bnfold.fold_module(model, example, tracer="export")
    assert decisions(result) == [("bn", Outcome.FOLDED, "linear-bn", None)]
    assert list(result.report.extras["input_rank_checks"].values()) == [2]
    same_at(result, model, (5, 5))
    with pytest.raises(AssertionError, match="2-D"):
        result.module(torch.randn(5, 5, 5))


def test_linear_bn_after_flatten_needs_no_rank_check() -> None:
    class FlattenLinearBN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(12, 6)
            self.bn = torch.nn.BatchNorm1d(6)

        def forward(self, inputs):
            return self.bn(self.linear(inputs.flatten(1)))

    model = nets.randomized(FlattenLinearBN())
    for example in (torch.randn(2, 3, 4), None):
        result = bnfold.fold_module(model, example)
        assert decisions(result) == [("bn", Outcome.FOLDED, "linear-bn", None)]
        assert "input_rank_checks" not in result.report.extras
        same_at(result, model, (2, 3, 4), (5, 12), (1, 2, 2, 3))


def test_conv1d_bn1d_relies_on_the_batched_example_and_says_so() -> None:
    model = nets.randomized(nets.ConvBN(dims=1, in_channels=4, out_channels=6))
    result = bnfold.fold_module(model, torch.randn(2, 4, 7))
    assert decisions(result) == [("bn", Outcome.FOLDED, "conv-bn", None)]
    assert result.report.extras["input_rank_checks"] == {"inputs": 3}
    same_at(result, model, (2, 4, 7), (1, 4, 3), (3, 4, 11))
    # Unbatched [C, L] with L == 6 runs in the original (BN over L) and is refused by the folded one.
    with pytest.raises(AssertionError, match="3-D"):
        result.module(torch.randn(4, 8))


def test_batchnorm2d_fixes_the_rank_itself() -> None:
    model = nets.randomized(nets.ConvBN(dims=2))
    result = bnfold.fold_module(model)  # no example needed: BatchNorm2d accepts 4-D input only
    assert decisions(result) == [("bn", Outcome.FOLDED, "conv-bn", None)]
    assert "input_rank_checks" not in result.report.extras
    same_at(result, model, (2, 4, 5, 5), (1, 4, 9, 3))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_identity_branch_batchnorm1d_needs_a_batched_input(tracer: str) -> None:
    model = nets.randomized(nets.Branches(4, [dict(kernel_size=3, padding=1)], dims=1))
    result = bnfold.fold_module(model, torch.randn(2, 4, 6), tracer=tracer)
    assert result.report.count(Outcome.FOLDED) == 2 and len(result.report.merged) == 1
    same_at(result, model, (2, 4, 6), (3, 4, 9) if tracer == "fx" else (2, 4, 6))
    if tracer == "fx":
        assert result.report.extras["input_rank_checks"] == {"inputs": 3}


def test_shape_readers_do_not_block_and_assert_proves_the_rank() -> None:
    # timm's BatchNormAct2d: _assert(x.ndim == 4, f"... {x.ndim} ...") then F.batch_norm, inplace ReLU.
    model = nets.randomized(nets.TimmConvNormAct())
    result = bnfold.fold_module(model)
    assert [(d.node, d.rule) for d in result.report.folded] == [("bn", "functional-bn"), ("bn2", "conv-bn")]
    assert "input_rank_checks" not in result.report.extras
    same_at(result, model, (2, 3, 8, 8), (1, 3, 5, 7))
