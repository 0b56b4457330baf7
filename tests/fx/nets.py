"""Small torch modules for the PyTorch-path tests: one pattern (or one refusal) each.

Every builder returns the module in eval mode with randomized BN statistics (negative gammas
included), so a wrong fold cannot pass by accident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from torch import nn


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in eval mode with non-trivial BN statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None:
                channels = layer.num_features
                layer.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
                layer.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
                if layer.affine:
                    sign = torch.where(torch.rand(channels, generator=generator) < 0.3, -1.0, 1.0)
                    layer.weight.copy_(sign * (0.5 + torch.rand(channels, generator=generator)))
                    layer.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    return module.eval()


class SubclassBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass that only changes validation (like torchvision's and timm's)."""

    def _check_input_dim(self, inputs: torch.Tensor) -> None:
        if inputs.dim() != 4:
            raise ValueError(f"expected 4-D input, got {inputs.dim()}-D")


class SubclassConv(nn.Conv2d):
    """A Conv2d subclass that adds an attribute and keeps torch's forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = "subclass"


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN + activation: forward calls F.batch_norm itself, then the activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        normalized = functional.batch_norm(
            inputs,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(normalized)


class SubclassNet(nn.Module):
    """Subclassed Conv2d -> subclassed BatchNorm2d: exact-type matching (torch's fuse) misses both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = SubclassConv(3, 6, 3, padding=1, padding_mode="reflect")
        self.bn = SubclassBN(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(inputs))))


class FunctionalBNNet(nn.Module):
    """Conv -> BatchNormAct2d (functional batch norm) and a dilated grouped conv -> SyncBatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.bn2 = nn.SyncBatchNorm(8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv1(inputs))))


class ShapeBranchNet(nn.Module):
    """Python control flow on a shape: symbolic_trace cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-1] > 8:
            inputs = inputs[..., :8]
        return self.bn(self.conv(inputs))


class ValueBranchNet(nn.Module):
    """Python control flow on a tensor value: neither symbolic_trace nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.bn(self.conv(inputs))
        if inputs.sum() > 0:
            return features
        return -features


class CondNet(nn.Module):
    """The same data-dependent branch written with torch.cond, which torch.export captures."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.stem_bn = nn.BatchNorm1d(6)
        self.branch = nn.Linear(6, 4)
        self.branch_bn = nn.BatchNorm1d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.stem_bn(self.stem(inputs))
        return torch.cond(
            features.sum() > 0,
            lambda values: self.branch_bn(self.branch(values)),
            lambda values: -self.branch(values),
            (features,),
        )


class ConvCalledTwice(nn.Module):
    """One conv module at two call sites, a BN after only the first (torch's fuse gets this wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(inputs)) + self.conv(torch.relu(inputs))


class BNCalledTwice(nn.Module):
    """One BN module after two different convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1(inputs)) + self.bn(self.conv2(inputs))


class TiedWeights(nn.Module):
    """Two Linear modules sharing one weight Parameter; a BN after the first."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.bn = nn.BatchNorm1d(6)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.second(self.bn(self.first(inputs)))


class ConvOutputReused(nn.Module):
    """The conv's raw output also feeds an Add: folding would change what the Add sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.conv(inputs)
        return self.bn(features) + features


class ConvOutputReturned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.conv(inputs)
        return self.bn(features), features


class ConvBN(nn.Module):
    """The plain pattern, parameterized: dims 1-3, transposed or not, groups, bias."""

    def __init__(
        self,
        dims: int = 2,
        transposed: bool = False,
        groups: int = 1,
        bias: bool = True,
        in_channels: int = 4,
        out_channels: int = 6,
        **bn_options,
    ) -> None:
        super().__init__()
        conv_class = {
            (1, False): nn.Conv1d,
            (2, False): nn.Conv2d,
            (3, False): nn.Conv3d,
            (1, True): nn.ConvTranspose1d,
            (2, True): nn.ConvTranspose2d,
            (3, True): nn.ConvTranspose3d,
        }[(dims, transposed)]
        bn_class = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        options = {"stride": 2, "padding": 1, "output_padding": 1} if transposed else {"padding": 1}
        self.conv = conv_class(in_channels, out_channels, 3, groups=groups, bias=bias, **options)
        self.bn = bn_class(out_channels, **bn_options)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(inputs))


class LinearBN(nn.Module):
    def __init__(self, in_features: int = 5, out_features: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(inputs))


class ConvBNBN(nn.Module):
    """Conv -> BN -> BN: both fold, the second into the already folded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4, eps=1e-3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn1(self.conv(inputs)))


class BNAfterReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(inputs)))


class ComputedStatistics(nn.Module):
    """F.batch_norm whose running mean is computed in forward from a parameter (not a constant).

    (Arithmetic on buffers alone is evaluated while tracing and becomes a constant, which folds.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.offset = nn.Parameter(torch.full((4,), 0.25))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        mean = self.bn.running_mean + self.offset
        bn = self.bn
        return functional.batch_norm(self.conv(inputs), mean, bn.running_var, bn.weight, bn.bias)


class StandardizedConv(nn.Conv2d):
    """Weight standardization (timm's StdConv2d): the weight is computed at run time."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) * 0.5
        return functional.conv2d(inputs, weight, self.bias, self.stride, self.padding)


class StandardizedConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StandardizedConv(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(inputs))


class SavedStatisticsRead(nn.Module):
    """The ATen batch norm whose saved mean (output 1) is read: not a plain normalization."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        output, saved_mean, _ = torch.ops.aten._native_batch_norm_legit_no_training(
            self.conv(inputs), bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, 1e-5
        )
        return output + saved_mean.sum()


class Linear3D(nn.Module):
    """Linear on [N, L, F] -> BatchNorm1d(L): the BN normalizes axis 1 (L), not the Linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(inputs))


class WithGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.instance = nn.InstanceNorm2d(4, affine=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.instance(self.norm(self.conv(inputs)))


class ResidualHead(nn.Module):
    """Conv -> BN, then an unfolded head conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(inputs)))


class BNBeforeLayer(nn.Module):
    """BN on the graph input, then a layer: only the layer after it (its input channels) can absorb it."""

    def __init__(self, bn: nn.Module, layer: nn.Module, also_return_bn: bool = False) -> None:
        super().__init__()
        self.bn = bn
        self.layer = layer
        self.also_return_bn = also_return_bn

    def forward(self, inputs: torch.Tensor):
        normalized = self.bn(inputs)
        if self.also_return_bn:
            return self.layer(normalized), normalized
        return self.layer(normalized)


def bn_before(layer: nn.Module, channels: int, dims: int = 2, **options) -> BNBeforeLayer:
    bn_class = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return randomized(BNBeforeLayer(bn_class(channels), layer, **options))


class SharedOutputThenBN(nn.Module):
    """conv -> (bn -> 1x1 conv) + conv: the BN cannot go into the conv before, but into the one after."""

    def __init__(self) -> None:
        super().__init__()
        self.before = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.after = nn.Conv2d(4, 4, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.before(inputs)
        return self.after(self.bn(features)) + features


# -- parallel branches summed (RepVGG / ACNet / MobileOne) and LeViT's Linear_BN ---------------
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Branches(nn.Module):
    """``sum(bn(conv(x)) for each branch) [+ bn(x) | + x]``, the sum spelled ``a + b + c`` (or ``+=``).

    ``branches`` holds one dict of conv options per branch (``kernel_size``, ``padding`` ...);
    ``identity`` is ``"bn"``, ``"plain"`` or None; ``with_bn=False`` leaves the convs without BN.
    """

    def __init__(
        self,
        channels: int,
        branches: list[dict],
        *,
        dims: int = 2,
        out_channels: int | None = None,
        identity: str | None = "bn",
        with_bn: bool = True,
        in_place: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.convs = nn.ModuleList(_CONVS[dims](channels, out_channels, **options) for options in branches)
        self.bns = nn.ModuleList(_BATCHNORMS[dims](out_channels) for _ in branches) if with_bn else None
        self.identity = _BATCHNORMS[dims](channels) if identity == "bn" else None
        self.plain_identity = identity == "plain"
        self.in_place = in_place

    def branch(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        features = self.convs[index](inputs)
        return self.bns[index](features) if self.bns is not None else features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.branch(0, inputs)
        for index in range(1, len(self.convs)):
            if self.in_place:
                features += self.branch(index, inputs)
            else:
                features = features + self.branch(index, inputs)
        if self.identity is not None:
            features = features + self.identity(inputs)
        elif self.plain_identity:
            features = features + inputs
        return torch.relu(features)


def repvgg_block(channels: int = 4, dims: int = 2, **options) -> Branches:
    """RepVGG: k3 (padding 1) + k1 branches, each with BN, plus an identity BN."""
    return Branches(channels, [dict(kernel_size=3, padding=1), dict(kernel_size=1)], dims=dims, **options)


class LeViTLinearBN(nn.Module):
    """``bn(linear(x).<reshape>).reshape_as(features)`` with the reshape given as a function."""

    def __init__(self, in_features: int, out_features: int, reshape, bn_features: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(bn_features or out_features)
        self.reshape = reshape

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.linear(inputs)
        return self.bn(self.reshape(features)).reshape_as(features)


# -- folds that would depend on the input's shape, or move a read across an in-place write ---------
class LinearViewBN(nn.Module):
    """``bn(linear(x).view(B, C, T))`` for ``x`` of shape ``[B, T, C]``: the features are on the BN's
    axis 1 only when ``T`` is 1 (for ``T > 1`` the view interleaves tokens and features)."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.bn = nn.BatchNorm1d(features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, tokens, features = inputs.shape
        return self.bn(self.linear(inputs).view(batch, features, tokens))


class MutatedBetweenBNAndConv(nn.Module):
    """``n = bn(h); h.mul_(3); conv(n)``: folding the BN into the conv would read the tripled ``h``."""

    def __init__(self, channels: int = 4, write=lambda tensor: tensor.mul_(3)) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, 6, 1)
        self.write = write

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(inputs)
        normalized = self.bn(hidden)
        self.write(hidden)
        return self.conv(normalized) + hidden.sum()


class MutatedBeforeIdentityAdd(nn.Module):
    """``a = conv(h); h.relu_(); a + h``: a merged conv would read ``h`` before the ReLU."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = inputs * 2
        features = self.conv(hidden)
        hidden.relu_()
        return features + hidden


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """Built as timm.layers.BatchNormAct2d is: asserts the rank (reading ``x.ndim`` twice, once for the
    message), calls ``F.batch_norm`` itself, then ``drop`` (Identity) and an in-place activation."""

    def __init__(self, channels: int, act_layer=nn.ReLU, inplace: bool = True) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=inplace)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        torch._assert(inputs.ndim == 4, f"expected 4D input (got {inputs.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        outputs = functional.batch_norm(
            inputs,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            batch_statistics,
            factor,
            self.eps,
        )
        return self.act(self.drop(outputs))


class TimmConvNormAct(nn.Module):
    """timm's ConvNormAct (conv -> BatchNormAct2d), then a conv whose output's shape is read before
    a plain BatchNorm2d (``B, C, H, W = x.shape``), as timm's blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = TimmBatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.conv2(self.bn(self.conv(inputs)))
        batch, _, height, width = features.shape
        channels, dtype = features.size(1), features.dtype
        normalized = self.bn2(features)
        return normalized.view(batch, channels, height * width).mean(-1).to(dtype)


class TimmConvBnAct(nn.Module):
    """timm.layers.ConvNormAct as built by create_conv2d: a conv padded ``((stride - 1) + (k - 1)) // 2``
    without bias, then BatchNormAct2d (its activation an Identity when ``apply_act=False``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        apply_act: bool = True,
    ) -> None:
        super().__init__()
        padding = ((stride - 1) + (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = TimmBatchNormAct2d(
            out_chs, act_layer=nn.ReLU if apply_act else nn.Identity, inplace=apply_act
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(inputs))


class TimmRepVggBlock(nn.Module):
    """timm.models.byobnet.RepVggBlock (train-time form): identity BN computed first, then
    ``conv_1x1(x) + conv_kxk(x)``, ``x += identity``, an in-place ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(out_chs) if in_chs == out_chs and stride == 1 else None
        self.conv_kxk = TimmConvBnAct(in_chs, out_chs, 3, stride, groups, apply_act=False)
        self.conv_1x1 = TimmConvBnAct(in_chs, out_chs, 1, stride, groups, apply_act=False)
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.identity is None:
            features = self.conv_1x1(inputs) + self.conv_kxk(inputs)
        else:
            identity = self.identity(inputs)
            features = self.conv_1x1(inputs) + self.conv_kxk(inputs)
            features = self.drop_path(features)
            features += identity
        return self.act(features)


class TimmMobileOneBlock(nn.Module):
    """timm's MobileOneBlock (train-time form): ``identity_out = 0; scale_out = 0`` replaced by the
    branches that exist, ``out = scale_out + identity_out``, then ``out += rc(x)`` per conv branch."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, branches: int = 2
    ) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(in_chs) if in_chs == out_chs and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            TimmConvBnAct(in_chs, out_chs, kernel_size, stride, apply_act=False) for _ in range(branches)
        )
        self.rbr_scale = (
            TimmConvBnAct(in_chs, out_chs, 1, stride, apply_act=False) if kernel_size > 1 else None
        )
        self.act = nn.GELU()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(inputs)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(inputs)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(inputs)
        return self.act(out)


class TimmRepStack(nn.Module):
    """A stem ConvNormAct, a RepVGG stage (stride 2 then 1) and a MobileOne stage (stride 2 then 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = TimmConvBnAct(3, 8, 3, stride=2)
        self.rep = nn.Sequential(TimmRepVggBlock(8, 8, stride=2), TimmRepVggBlock(8, 8))
        self.mobileone = nn.Sequential(TimmMobileOneBlock(8, 8, stride=2), TimmMobileOneBlock(8, 8))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mobileone(self.rep(self.stem(inputs)))
