"""Registry of reference models and a deterministic builder with randomized BN statistics.

Freshly constructed BatchNorm layers have running_mean=0, running_var=1, weight=1 and
bias=0, which makes BN almost an identity: a broken fold would still pass. ``build``
therefore randomizes every BN's statistics and affine parameters (including negative
gammas and a spread of variances), deterministically from a seed so failures reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.architectures import (
    Conv1dNet,
    Conv3dNet,
    ConvNeXtDownsample,
    DecoderTiny,
    GhostNetTiny,
    LayerNorm2d,
    LeViTTiny,
    MLPBatchNorm,
    MobileNetTiny,
    PreActResNetTiny,
    RepVGGTiny,
    ResNetTiny,
)

__all__ = [
    "REFERENCE_MODELS",
    "ModelSpec",
    "build",
    "count_batchnorms",
    "randomize_batchnorm",
    "randomize_layernorm",
]


@dataclass(frozen=True)
class ModelSpec:
    """What a test or CLI needs to instantiate, feed and check one reference model."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str
    expected_batchnorms: int
    # BNs that no rule can fold exactly (kept, with a reason in the report); the rest must fold.
    expected_kept: int = 0
    # BNs that only the ONNX fold can fold: the PyTorch fold keeps them, and bnfold.export's ONNX
    # pass folds them. None of the reference models has one since the torch fold merges branches
    # (branch-merge) and folds through reshapes (linear-reshape-bn) too.
    folded_in_onnx_only: int = 0


REFERENCE_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="resnet_tiny",
            factory=ResNetTiny,
            input_shape=(2, 3, 16, 16),
            description="ResNet-style: bias-free Conv->BN stem, identity and projection blocks",
            expected_batchnorms=6,
        ),
        ModelSpec(
            name="mobilenet_tiny",
            factory=MobileNetTiny,
            input_shape=(2, 3, 16, 16),
            description="MobileNet-style depthwise separable convs, ReLU6, BN eps=1e-3",
            expected_batchnorms=5,
        ),
        ModelSpec(
            name="ghostnet_tiny",
            factory=GhostNetTiny,
            input_shape=(2, 3, 16, 16),
            description="GhostNet: primary conv + cheap depthwise conv (with multiplier), Concat",
            expected_batchnorms=5,
        ),
        ModelSpec(
            name="convnext_downsample",
            factory=ConvNeXtDownsample,
            input_shape=(2, 3, 16, 16),
            description="ConvNeXt-style LayerNorm + 2x2 stride-2 downsampling, no BatchNorm at all",
            expected_batchnorms=0,
        ),
        ModelSpec(
            name="mlp_batchnorm",
            factory=MLPBatchNorm,
            input_shape=(2, 20),
            description="MLP: Linear->BatchNorm1d->ReLU on 2-D input [N, features]",
            expected_batchnorms=2,
        ),
        ModelSpec(
            name="conv1d_net",
            factory=Conv1dNet,
            input_shape=(2, 4, 32),
            description="1-D convs (plain, dilated, grouped) with BatchNorm1d",
            expected_batchnorms=3,
        ),
        ModelSpec(
            name="conv3d_net",
            factory=Conv3dNet,
            input_shape=(2, 3, 8, 8, 8),
            description="3-D convs (strided, with and without bias) with BatchNorm3d",
            expected_batchnorms=3,
        ),
        ModelSpec(
            name="decoder_tiny",
            factory=DecoderTiny,
            input_shape=(2, 16, 4, 4),
            description="ConvTranspose2d->BN decoder: grouped (groups=2), stride 2, output_padding",
            expected_batchnorms=3,
        ),
        ModelSpec(
            name="preact_resnet_tiny",
            factory=PreActResNetTiny,
            input_shape=(2, 3, 16, 16),
            description="Pre-activation ResNet: BN->ReLU->Conv blocks (kept), BN->Conv1x1 and BN1d->Linear",
            expected_batchnorms=6,
            expected_kept=2,
        ),
        ModelSpec(
            name="repvgg_tiny",
            factory=RepVGGTiny,
            input_shape=(2, 3, 16, 16),
            description="RepVGG: 3x3+BN, 1x1+BN and identity-BN branches summed; stride 2, grouped",
            expected_batchnorms=8,
        ),
        ModelSpec(
            name="levit_tiny",
            factory=LeViTTiny,
            input_shape=(2, 3, 16, 16),
            description="LeViT-style: Conv+BN stem, residual MLP of Linear+BatchNorm1d over flattened "
            "tokens, BatchNorm1d->Linear head",
            expected_batchnorms=5,
        ),
    )
}


def count_batchnorms(module: nn.Module) -> int:
    """Number of BatchNorm1d/2d/3d layers in ``module`` (what the exported graph must keep)."""
    return sum(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in module.modules())


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BN layer non-trivial statistics so that a wrong fold cannot pass unnoticed.

    running_var is uniform in [0.5, 2.0]; running_mean and beta are normal with std 0.5;
    |gamma| is uniform in [0.5, 1.5] with roughly a quarter of the signs flipped (negative
    gammas catch folds that take a square root or absolute value of the scale).
    """
    with torch.no_grad():
        for layer in module.modules():
            if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
                continue
            channels = layer.num_features
            if layer.running_mean is None or layer.running_var is None:
                raise ValueError(f"{type(layer).__name__} does not track running statistics")
            layer.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
            layer.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
            if layer.affine:
                magnitude = 0.5 + torch.rand(channels, generator=generator)
                flip = torch.rand(channels, generator=generator) < 0.25
                # Guarantee at least one negative gamma per layer.
                flip[int(torch.randint(channels, (1,), generator=generator))] = True
                layer.weight.copy_(torch.where(flip, -magnitude, magnitude))
                layer.bias.copy_(0.5 * torch.randn(channels, generator=generator))


def randomize_layernorm(module: nn.Module, generator: torch.Generator) -> None:
    """Move LayerNorm affine parameters off ones/zeros.

    Identical all-ones/all-zeros parameters get deduplicated by the TorchScript exporter
    into Identity-aliased initializers, and a trivial affine hides a tool that wrongly
    treats LayerNorm as foldable.
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.LayerNorm | LayerNorm2d) and layer.weight is not None:
                channels = layer.weight.numel()
                layer.weight.copy_((0.5 + torch.rand(channels, generator=generator)).view_as(layer.weight))
                if layer.bias is not None:
                    layer.bias.copy_((0.2 * torch.randn(channels, generator=generator)).view_as(layer.bias))


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Build reference model ``name`` in eval mode with randomized BN, plus an example input.

    BatchNorm statistics and affine parameters (and LayerNorm affine parameters) are
    randomized. Everything (weights, statistics, input) is a pure function of ``name`` and ``seed``;
    the global torch RNG state is restored afterwards so callers are unaffected.
    Raises KeyError listing the known names for an unknown ``name``.
    """
    try:
        spec = REFERENCE_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(REFERENCE_MODELS))
        raise KeyError(f"unknown reference model {name!r}; known: {known}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.factory()
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm(module, generator)
    randomize_layernorm(module, generator)
    module.eval()
    example_input = torch.randn(spec.input_shape, generator=generator)
    return module, example_input
