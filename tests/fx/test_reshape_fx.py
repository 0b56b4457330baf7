"""linear-reshape-bn on the PyTorch path: LeViT's Linear + BatchNorm1d over flattened tokens folds into
the Linear through flatten/reshape/view; a reshape that does not keep the features on the BN's axis 1
is refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold import Outcome, Reason  # noqa: E402
from tests.fx import nets  # noqa: E402

FOLDING_RESHAPES = {
    "flatten(0, 1)": (lambda features: features.flatten(0, 1), (2, 5, 4)),
    "torch.flatten(0, -2)": (lambda features: torch.flatten(features, 0, -2), (2, 3, 5, 4)),
    "reshape(-1, C)": (lambda features: features.reshape(-1, 6), (2, 5, 4)),
    "view(B*N, C)": (lambda features: features.view(features.shape[0] * features.shape[1], 6), (2, 5, 4)),
    "reshape(-1, C, 1)": (lambda features: features.reshape(-1, 6, 1), (2, 5, 4)),
}


def fold(model, example, dtype=torch.float32, tolerance=1e-5, **options):
    model = nets.randomized(model).to(dtype)
    example = example.to(dtype)
    result = bnfold.fold_module(model, example, **options)
    with torch.no_grad():
        fresh = torch.randn(example.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        torch.testing.assert_close(result.module(fresh), model(fresh), rtol=tolerance, atol=tolerance)
    return result


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("case", FOLDING_RESHAPES, ids=str)
def test_linear_bn_folds_through_the_reshape(case: str, tracer: str) -> None:
    reshape, shape = FOLDING_RESHAPES[case]
    result = fold(nets.LeViTLinearBN(4, 6, reshape), torch.randn(shape), tracer=tracer)
    assert [(d.node, d.outcome, d.rule, d.into) for d in result.report.decisions] == [
        ("bn", Outcome.FOLDED, "linear-reshape-bn", "linear")
    ]
    assert sorted(result.module.state_dict()) == ["linear.bias", "linear.weight"]
    assert result.verification


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)]
)
def test_linear_bn_folds_in_every_float_dtype(dtype: torch.dtype, tolerance: float) -> None:
    model = nets.LeViTLinearBN(4, 6, lambda features: features.flatten(0, 1))
    result = fold(model, torch.randn(2, 5, 4), dtype=dtype, tolerance=tolerance)
    assert result.report.count(Outcome.FOLDED) == 1
    assert result.module.linear.weight.dtype == dtype and result.module.linear.bias.dtype == dtype


def refused(model, example, **options):
    result = (
        fold(model, example, **options)
        if example is not None
        else bnfold.fold_module(nets.randomized(model), None, **options)
    )
    (decision,) = result.report.decisions
    assert decision.outcome is Outcome.KEPT and decision.detail
    return decision


def test_reshape_that_moves_the_features_is_refused() -> None:
    # [2, 3, 3] -> reshape(B, C, N): axis 1 has C = 3 entries, but they are not the Linear's features.
    model = nets.LeViTLinearBN(4, 3, lambda features: features.reshape(features.shape[0], 3, -1))
    decision = refused(model, torch.randn(2, 3, 4))
    assert (decision.reason, decision.rule) == (Reason.RESHAPE_NOT_CHANNEL_PRESERVING, "linear-reshape-bn")
    assert "axis 1 of `reshape` [2, 3, 3]" in decision.detail


def test_flatten_of_tokens_and_features_together_does_not_match_the_features() -> None:
    # [2, 5, 6] -> flatten(1): a BN over 30 values per sample, not over the Linear's 6 features.
    model = nets.LeViTLinearBN(4, 6, lambda features: features.flatten(1), bn_features=30)
    decision = refused(model, torch.randn(2, 5, 4))
    assert decision.reason is Reason.PARAM_SHAPE_MISMATCH


def test_without_example_inputs_the_shapes_are_unknown() -> None:
    decision = refused(nets.LeViTLinearBN(4, 6, lambda features: features.flatten(0, 1)), None)
    assert decision.reason is Reason.UNKNOWN_SHAPE


def test_linear_output_read_elsewhere_is_refused() -> None:
    class AlsoReturned(nets.LeViTLinearBN):
        def forward(self, inputs):
            features = self.linear(inputs)
            return self.bn(features.flatten(0, 1)).reshape_as(features) + features

    decision = refused(AlsoReturned(4, 6, None), torch.randn(2, 5, 4))
    assert decision.reason is Reason.PRODUCER_HAS_OTHER_CONSUMERS
    assert "also feeds add" in decision.detail


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_reshaped_output_read_besides_the_bn_is_refused(tracer: str) -> None:
    # bn(y) + y: folding would hand the scaled values to the second reader of y as well.
    class FlattenedAlsoRead(nets.LeViTLinearBN):
        def forward(self, inputs):
            flattened = self.linear(inputs).flatten(0, 1)
            return self.bn(flattened) + flattened

    decision = refused(FlattenedAlsoRead(4, 6, None), torch.randn(2, 3, 4), tracer=tracer)
    assert decision.reason is Reason.PRODUCER_HAS_OTHER_CONSUMERS
