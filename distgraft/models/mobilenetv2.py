"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018), as used in the filter-grafting paper (Meng et al. 2020).

The ImageNet network downsamples 32x; for 32x32 inputs the common CIFAR adaptation (the one
in Kuang Liu's widely used pytorch-cifar collection) makes the stem conv stride 1 and the
second stage (24 channels) stride 1, so the final feature map is 4x4. It also keeps the 1x1
expand conv in the t=1 first block and uses plain ReLU instead of ReLU6.

That collection adds a 1x1 conv+BN shortcut to stride-1 blocks whose width changes. Without
those shortcut convs the model has exactly 17088 conv filters (sum of conv output channels),
the count the grafting paper gives for its CIFAR MobileNetV2; with them it has 17544. So the
default here has no shortcut convs: a block is residual only when stride is 1 and its input
and output widths match. ``conv_shortcut=True`` gives the other variant.

``width`` is the paper's width multiplier: every layer's channels x width, rounded to a
multiple of 8 (never below 8, never more than 10% below the exact product), except that the
last 1x1 conv keeps its 1280 channels for widths below 1, as in the paper (section 6.1).

Written from the paper's table 2 and the description above. Convs carry no bias because a
BatchNorm follows each. Submodules are assigned in forward order, conv before its BatchNorm:
the grafting code pairs each BatchNorm with the conv registered just before it.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MobileNetV2", "mobilenetv2", "CIFAR_CFG", "make_divisible"]

# (expansion t, output channels c, repeats n, stride of the first block s); paper's table 2
# with the second stage's stride changed from 2 to 1 for 32x32 inputs.
CIFAR_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to a multiple of ``divisor``, at least ``divisor`` and never more
    than 10% below ``value`` (the rounding of the MobileNet reference implementations)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, each followed by BatchNorm."""

    def __init__(
        self, in_planes: int, out_planes: int, expansion: int, stride: int, conv_shortcut: bool
    ) -> None:
        super().__init__()
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.act = nn.ReLU(inplace=True)
        self.residual = stride == 1 and (in_planes == out_planes or conv_shortcut)
        self.shortcut: nn.Module = nn.Identity()
        if stride == 1 and in_planes != out_planes and conv_shortcut:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: 32-filter stem, 17 inverted residual blocks, 1280-d last conv."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        conv_shortcut: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not (width > 0 and math.isfinite(width)):
            raise ValueError(f"width must be a number > 0, got {width}")
        stem = make_divisible(32 * width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act = nn.ReLU(inplace=True)
        blocks = []
        in_planes = stem
        for t, c, n, s in CIFAR_CFG:
            out_planes = make_divisible(c * width)
            for i in range(n):
                blocks.append(
                    InvertedResidual(in_planes, out_planes, t, s if i == 0 else 1, conv_shortcut)
                )
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        last = make_divisible(1280 * max(1.0, width))
        self.conv2 = nn.Conv2d(in_planes, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = self.act(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    """The CIFAR MobileNetV2 of the grafting paper (no shortcut convs, 17088 conv filters)."""
    return MobileNetV2(num_classes, in_channels, conv_shortcut=False, width=width)
