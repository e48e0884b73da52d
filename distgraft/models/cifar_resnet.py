"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2).

These are the networks of the filter-grafting paper's CIFAR experiments (Meng et al. 2020):
a 3x3 stem of 16 filters, then three stages of n basic blocks with 16/32/64 filters at
resolutions 32/16/8, global average pooling and one linear layer, 6n+2 weighted layers.
Where a stage halves the resolution and doubles the width, the shortcut is the
parameter-free "option A" of the paper: subsample with stride 2 and pad the new channels
with zeros. That keeps the counts of the paper (ResNet-32: 0.46M parameters, 1136 conv
filters) which a 1x1-conv projection shortcut would change.

``width`` multiplies every filter count (stem and the three stages), rounded to the nearest
integer and at least 1: width 0.5 gives 8/16/32 filters, a quarter of the FLOPs (a narrow
network for a CPU budget). Width 1 is the paper's network.

Written from the paper's description. Convs carry no bias because a BatchNorm follows each.
Submodules are assigned in forward order, conv before its BatchNorm: the grafting code pairs
each BatchNorm with the conv registered just before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet20_leaky",
    "resnet32_leaky",
    "resnet56_leaky",
    "resnet110_leaky",
    "stage_widths",
]

LEAKY_SLOPE = 0.1
"""negative_slope of the ``*_leaky`` variants."""


def stage_widths(width: float = 1.0) -> tuple[int, int, int]:
    """Filters of the three stages (the stem has the first stage's) at ``width``."""
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a number > 0, got {width}")
    a, b, c = (max(1, math.floor(filters * width + 0.5)) for filters in (16, 32, 64))
    return a, b, c


def _activation(leaky: bool) -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if leaky else nn.ReLU(inplace=True)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, leaky: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = _activation(leaky)
        self.stride = stride
        extra = planes - in_planes
        # Zero channels added on each side of the channel dim by the option-A shortcut.
        self.pad = (extra // 2, extra - extra // 2)

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad != (0, 0):
            x = F.pad(x, (0, 0, 0, 0, *self.pad))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; global pooling also lets it run on smaller ones."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        leaky: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        widths = stage_widths(width)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = _activation(leaky)
        in_planes = widths[0]
        stages = []
        for planes, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, leaky))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        _kaiming_init(self, leaky)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _kaiming_init(model: nn.Module, leaky: bool) -> None:
    a = LEAKY_SLOPE if leaky else 0.0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=a, nonlinearity="leaky_relu")


def _factory(depth: int, leaky: bool) -> Callable[..., CifarResNet]:
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, leaky, width)

    build.__name__ = f"resnet{depth}" + ("_leaky" if leaky else "")
    build.__doc__ = f"ResNet-{depth} for CIFAR (option-A shortcuts)" + (
        f", LeakyReLU(negative_slope={LEAKY_SLOPE})." if leaky else "."
    )
    return build


resnet20 = _factory(20, leaky=False)
resnet32 = _factory(32, leaky=False)
resnet56 = _factory(56, leaky=False)
resnet110 = _factory(110, leaky=False)
resnet20_leaky = _factory(20, leaky=True)
resnet32_leaky = _factory(32, leaky=True)
resnet56_leaky = _factory(56, leaky=True)
resnet110_leaky = _factory(110, leaky=True)
