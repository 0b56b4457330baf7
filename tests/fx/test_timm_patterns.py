"""Blocks built the way timm builds them fold completely in torch (issue 13), and as far as in ONNX.

timm's ConvNormAct runs a BatchNormAct2d that asserts ``x.ndim == 4`` (two reads of ``x.ndim``, one
for the message) before ``F.batch_norm``, then ``drop`` and ``act`` modules that are ``nn.Identity``
when ``apply_act=False``; RepVGG sums ``conv_1x1(x) + conv_kxk(x)`` and ``+= identity``; MobileOne
starts its sum from ``0``. None of that may keep a BN.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import bnfold  # noqa: E402
from bnfold import Outcome  # noqa: E402
from models.export import export_onnx  # noqa: E402
from tests.fx import nets  # noqa: E402

BUILDERS = {
    "conv-norm-act": lambda: nets.TimmConvNormAct(),
    "repvgg-stride-1": lambda: nets.TimmRepVggBlock(8, 8),
    "repvgg-stride-2": lambda: nets.TimmRepVggBlock(8, 8, stride=2),
    "repvgg-grouped": lambda: nets.TimmRepVggBlock(8, 8, groups=2),
    "mobileone-stride-1": lambda: nets.TimmMobileOneBlock(8, 8),
    "mobileone-stride-2": lambda: nets.TimmMobileOneBlock(8, 8, stride=2),
    "mobileone-1x1": lambda: nets.TimmMobileOneBlock(8, 8, kernel_size=1, branches=3),
    "stack": lambda: nets.TimmRepStack(),
}
INPUT_CHANNELS = {"conv-norm-act": 3, "stack": 3}


def batchnorm_count(model: torch.nn.Module) -> int:
    return sum(isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) for layer in model.modules())


def conv_count(module: torch.nn.Module) -> int:
    return sum(isinstance(layer, torch.nn.Conv2d) for layer in module.modules())


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("name", BUILDERS)
def test_timm_block_folds_completely(name: str, tracer: str) -> None:
    model = nets.randomized(BUILDERS[name]())
    channels = INPUT_CHANNELS.get(name, 8)
    example = torch.randn(2, channels, 12, 12)
    result = bnfold.fold_module(model, example, tracer=tracer)

    assert result.report.kept == [], result.report.to_text()
    assert result.report.count(Outcome.FOLDED) == batchnorm_count(model)
    assert result.verification
    if tracer == "fx":
        # One conv per block is left where branches were (RepVGG, MobileOne), and no rank check was
        # needed: BatchNorm2d and the BatchNormAct2d assertion fix the ranks.
        assert "input_rank_checks" not in result.report.extras
        if name.startswith(("repvgg", "mobileone")):
            assert conv_count(result.module) == 1
        shapes = [(2, channels, 12, 12), (1, channels, 7, 9), (3, channels, 16, 5)]
    else:
        shapes = [(2, channels, 12, 12)]
    generator = torch.Generator().manual_seed(5)
    for shape in shapes:
        inputs = torch.randn(shape, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(result.module(inputs), model(inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BUILDERS)
def test_torch_folds_every_bn_the_onnx_path_folds(name: str, tmp_path) -> None:
    model = nets.randomized(BUILDERS[name]())
    example = torch.randn(2, INPUT_CHANNELS.get(name, 8), 12, 12)
    path = export_onnx(model, example, tmp_path / f"{name}.onnx")
    in_onnx = bnfold.fold_onnx(str(path)).report
    in_torch = bnfold.fold_module(model, example).report
    assert in_torch.count(Outcome.FOLDED) >= in_onnx.count(Outcome.FOLDED)
    assert in_torch.kept == []
