"""Small reference architectures for exercising BatchNorm folding.

Each network reproduces the *layer pattern* of a well-known family (ResNet, MobileNet,
GhostNet, ConvNeXt, ...) at toy size, so that exporting and folding take milliseconds
while still covering the graph shapes a folder meets in practice: bias-free convs,
depthwise and grouped convs, dilations, strides, transposed convs with groups and
output padding, Linear layers followed by BatchNorm1d, and a network with LayerNorm
only (nothing to fold).

Channel counts deliberately differ from layer to layer (8, 12, 16, ...) so that a fold
that scales the wrong weight axis produces a shape error or a numeric mismatch instead
of silently passing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from torch import nn

__all__ = [
    "BasicBlock",
    "Conv1dNet",
    "Conv3dNet",
    "ConvNeXtBlock",
    "ConvNeXtDownsample",
    "DecoderTiny",
    "DepthwiseSeparable",
    "GhostModule",
    "GhostNetTiny",
    "LayerNorm2d",
    "LeViTTiny",
    "LinearBN",
    "MLPBatchNorm",
    "MobileNetTiny",
    "PreActBlock",
    "PreActResNetTiny",
    "RepVGGBlock",
    "RepVGGTiny",
    "ResNetTiny",
]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv->BN with a shortcut.

    When the stride or channel count changes, the shortcut is a 1x1 Conv->BN projection,
    which gives the folder a BN whose output meets another branch at an Add.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        residual = self.relu(self.bn1(self.conv1(inputs)))
        residual = self.bn2(self.conv2(residual))
        return self.relu(residual + self.shortcut(inputs))


class ResNetTiny(nn.Module):
    """ResNet pattern: stem, an identity block, a strided block with projection, head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.block1 = BasicBlock(8, 8, stride=1)
        self.block2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.block2(self.block1(self.stem(inputs)))
        return self.head(torch.flatten(self.pool(features), 1))


class DepthwiseSeparable(nn.Module):
    """MobileNet unit: depthwise 3x3 Conv->BN->ReLU6, then pointwise 1x1 Conv->BN->ReLU6.

    The BNs use eps=1e-3 (the TensorFlow-trained MobileNet default), so a folder that
    hard-codes 1e-5 is caught.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            3,
            stride=stride,
            padding=1,
            groups=in_channels,
            bias=False,
        )
        self.depthwise_bn = nn.BatchNorm2d(in_channels, eps=1e-3)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.activation = nn.ReLU6()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.activation(self.depthwise_bn(self.depthwise(inputs)))
        return self.activation(self.pointwise_bn(self.pointwise(features)))


class MobileNetTiny(nn.Module):
    """MobileNet-v1 pattern: strided stem, two depthwise-separable units, head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8, eps=1e-3),
            nn.ReLU6(),
        )
        self.blocks = nn.Sequential(
            DepthwiseSeparable(8, 12, stride=1),
            DepthwiseSeparable(12, 16, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(inputs))
        return self.head(torch.flatten(self.pool(features), 1))


class GhostModule(nn.Module):
    """GhostNet module: a primary conv makes a few maps, a cheap depthwise conv derives more.

    With ``ratio > 2`` the cheap conv is a depthwise conv with a channel multiplier
    (``groups == in_channels`` but ``out_channels == (ratio - 1) * in_channels``), a
    weight layout that folders often get wrong. The two halves meet at a Concat.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ratio: int = 2,
        kernel_size: int = 1,
        cheap_kernel_size: int = 3,
        relu: bool = True,
    ) -> None:
        super().__init__()
        if out_channels % ratio != 0:
            raise ValueError(f"out_channels ({out_channels}) must be a multiple of ratio ({ratio})")
        primary_channels = out_channels // ratio
        cheap_channels = primary_channels * (ratio - 1)
        self.primary_conv = nn.Conv2d(
            in_channels, primary_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.primary_bn = nn.BatchNorm2d(primary_channels)
        self.cheap_conv = nn.Conv2d(
            primary_channels,
            cheap_channels,
            cheap_kernel_size,
            padding=cheap_kernel_size // 2,
            groups=primary_channels,
            bias=False,
        )
        self.cheap_bn = nn.BatchNorm2d(cheap_channels)
        self.activation: nn.Module = nn.ReLU() if relu else nn.Identity()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        primary = self.activation(self.primary_bn(self.primary_conv(inputs)))
        cheap = self.activation(self.cheap_bn(self.cheap_conv(primary)))
        return torch.cat([primary, cheap], dim=1)


class GhostNetTiny(nn.Module):
    """Stem plus two Ghost modules (one with a channel-multiplier cheap conv), then a head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.ghost1 = GhostModule(8, 12, ratio=3)
        self.ghost2 = GhostModule(12, 16, ratio=2, relu=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.ghost2(self.ghost1(self.stem(inputs)))
        return self.head(torch.flatten(self.pool(features), 1))


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm as ConvNeXt uses it: permute to NHWC, normalize C, permute back."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        # A Python constant, not inputs.shape[-1]: a traced shape breaks dynamic-batch export.
        self.normalized_shape = (channels,)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        channels_last = inputs.permute(0, 2, 3, 1)
        normalized = functional.layer_norm(
            channels_last, self.normalized_shape, self.weight, self.bias, self.eps
        )
        return normalized.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv, LayerNorm, Linear-GELU-Linear, layer scale, residual."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.expand = nn.Linear(channels, expansion * channels)
        self.activation = nn.GELU()
        self.project = nn.Linear(expansion * channels, channels)
        self.layer_scale = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.depthwise(inputs).permute(0, 2, 3, 1)
        features = self.project(self.activation(self.expand(self.norm(features))))
        return inputs + (self.layer_scale * features).permute(0, 3, 1, 2)


class ConvNeXtDownsample(nn.Module):
    """ConvNeXt pattern with LayerNorm only: a negative case where nothing may be folded.

    Stem (2x2 stride-2 conv, LayerNorm), downsampling layer (LayerNorm, 2x2 stride-2 conv),
    one ConvNeXt block, and a LayerNorm+Linear head. There is no BatchNorm anywhere.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 2, stride=2), LayerNorm2d(8))
        self.downsample = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 16, 2, stride=2))
        self.block = ConvNeXtBlock(16)
        self.head_norm = nn.LayerNorm(16, eps=1e-6)
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.block(self.downsample(self.stem(inputs)))
        pooled = features.mean(dim=(2, 3))
        return self.head(self.head_norm(pooled))


class MLPBatchNorm(nn.Module):
    """Linear->BN1d->ReLU twice, then Linear, on 2-D input [N, features] (Gemm/MatMul folding)."""

    def __init__(self, in_features: int = 20, num_classes: int = 5) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 12, bias=False),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Linear(12, num_classes),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class Conv1dNet(nn.Module):
    """1-D conv net: plain, dilated and grouped Conv1d, each followed by BN1d and ReLU."""

    def __init__(self, in_channels: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 12, 3, padding=2, dilation=2),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Conv1d(12, 16, 3, padding=1, groups=4, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(inputs)), 1))


class Conv3dNet(nn.Module):
    """3-D conv net: bias-free, strided-with-bias and 1x1x1 Conv3d layers, each with BN3d."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            nn.Conv3d(8, 12, 3, stride=2, padding=1, bias=True),
            nn.BatchNorm3d(12),
            nn.ReLU(),
            nn.Conv3d(12, 16, 1, bias=False),
            nn.BatchNorm3d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(inputs)), 1))


class DecoderTiny(nn.Module):
    """Upsampling decoder of ConvTranspose2d->BN->ReLU stages, ending in a 1x1 Conv.

    ConvTranspose weights are laid out [C_in, C_out / groups, kH, kW], so a fold must
    scale axis 1 (per group), not axis 0. The grouped stage (groups=2, 12 -> 8 channels)
    makes an axis or grouping mistake visible; the last stage has stride 2 with
    output_padding=1.
    """

    def __init__(self, in_channels: int = 16, out_channels: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_channels, 12, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.ConvTranspose2d(12, 8, 3, padding=1, groups=2, bias=True),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, out_channels, 1),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class PreActBlock(nn.Module):
    """Pre-activation ResNet block: BN -> ReLU -> Conv, twice, plus an identity shortcut.

    The first BN reads the block input, which the shortcut reads too, and a ReLU sits between it and
    its conv: nothing can absorb it exactly, and the report must say so. The second BN follows a
    conv whose only reader it is, so it folds into that conv.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(self.relu(self.bn1(inputs)))
        residual = self.conv2(self.relu(self.bn2(residual)))
        return inputs + residual


class PreActResNetTiny(nn.Module):
    """Pre-activation ResNet pattern with BNs *before* linear layers.

    stem conv, two pre-activation blocks, then a transition BN -> 1x1 Conv (no padding) that reads the
    residual sum — no layer before it, so it folds into the conv's input channels — and a head
    pool -> flatten -> BatchNorm1d -> Linear that folds into the Linear's input features. Of its six
    BNs, the two block-input BNs stay (BN -> ReLU -> Conv cannot be folded exactly).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.block1 = PreActBlock(8)
        self.block2 = PreActBlock(8)
        self.transition_bn = nn.BatchNorm2d(8)
        self.transition = nn.Conv2d(8, 12, 1, bias=True)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_bn = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.block2(self.block1(self.stem(inputs)))
        features = self.relu(self.transition(self.transition_bn(features)))
        return self.head(self.head_bn(torch.flatten(self.pool(features), 1)))


class RepVGGBlock(nn.Module):
    """RepVGG block in its training-time form: ``relu(bn(conv3x3(x)) + bn(conv1x1(x)) [+ bn(x)])``.

    The identity branch (a BN of the input) exists only when the block keeps the shape (same channels,
    stride 1). Folding each branch's BN into its conv and summing the branches (1x1 kernel padded to
    3x3, identity as a Dirac kernel, groups respected) leaves one 3x3 conv per block and no BN.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dense = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, padding=0, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        has_identity = in_channels == out_channels and stride == 1
        self.identity = nn.BatchNorm2d(in_channels) if has_identity else None
        self.relu = nn.ReLU()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.dense(inputs) + self.pointwise(inputs)
        if self.identity is not None:
            features = features + self.identity(inputs)
        return self.relu(features)


class RepVGGTiny(nn.Module):
    """RepVGG: a stride-2 block (no identity branch), a stride-1 block and a grouped stride-1 block
    (both with an identity BN), then pool -> Linear. Eight BNs, all foldable: two per conv branch,
    the identity ones by merging the branches."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            RepVGGBlock(in_channels, 8, stride=2),
            RepVGGBlock(8, 8),
            RepVGGBlock(8, 8, groups=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(inputs)), 1))


class LinearBN(nn.Module):
    """LeViT's ``Linear_BN``: a bias-free Linear whose BatchNorm1d runs over the flattened tokens.

    ``[B, N, C_in] -> Linear -> [B, N, C] -> flatten(0, 1) -> BatchNorm1d(C) -> reshape back``: the
    BN's channel axis is the Linear's output features, so it folds through the flatten into the
    Linear's columns.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.linear(inputs)
        return self.bn(features.flatten(0, 1)).reshape_as(features)


class LeViTTiny(nn.Module):
    """LeViT-style, attention-free: Conv+BN+Hardswish stem (two stride-2 convs), tokens, a residual
    MLP of two ``LinearBN`` (BN over the flattened tokens), then LeViT's ``BN_Linear`` head
    (mean over tokens -> BatchNorm1d -> Linear). Five BNs, all foldable."""

    def __init__(self, in_channels: int = 3, dim: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim // 2),
            nn.Hardswish(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim),
        )
        self.mlp = nn.Sequential(LinearBN(dim, 2 * dim), nn.Hardswish(), LinearBN(2 * dim, dim))
        self.head_bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(inputs).flatten(2).transpose(1, 2)  # [B, H*W, dim]
        tokens = tokens + self.mlp(tokens)
        return self.head(self.head_bn(tokens.mean(1)))
