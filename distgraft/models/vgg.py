"""VGG-16 with BatchNorm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks
for Large-Scale Image Recognition", ICLR 2015; BatchNorm per Ioffe & Szegedy 2015).

The grafting paper (Meng et al. 2020) trains VGG16 on CIFAR. The CIFAR form drops the
ImageNet network's three 4096-wide fully connected layers: after five 2x2 max pools a
32x32 input is a 1x1x512 feature map, which one Linear(512, num_classes) classifies, as
in the common CIFAR versions of VGG. Larger inputs are average pooled to 1x1 first.

Inputs smaller than 32x32 (Fashion-MNIST's 28x28, digits' 8x8) would not survive the five
pools, so the model pads them to 32x32 itself, with zeros split evenly on both sides:
more of the zero padding every 3x3 conv already applies (zero is the normalised mean
intensity), done once at the input. Padding in the model rather than in the loader keeps
the datasets model-agnostic and every tool that runs the network (FLOPs counting, pruning
probes, export) sees the same computation; FLOPs are those of the 32x32 network.

``features`` is one nn.Sequential of (Conv2d 3x3, BatchNorm2d, ReLU) triples and MaxPool2d,
so parameter names follow torchvision's ``vgg16_bn`` (``features.0.weight``,
``features.1.running_mean``, ...). Convs carry no bias because a BatchNorm follows each.

``vgg16_li`` is the variant of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR
2017), section 4.1: the same features and a classifier Linear(512, 512), BatchNorm1d, ReLU,
Linear(512, 10), without dropout. Its 1.5E7 parameters and 3.13E8 FLOPs are those of their
Table 1, and pruning it with the ``vgg16-a`` preset gives their 5.4E6 parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VGG", "vgg16_bn", "vgg16_li", "VGG16_STAGES", "pad_to"]

# Conv widths of the five stages; each stage ends with a 2x2 max pool. Flattened with "M"
# for the pools this is the VGG-16 ("D") column of the paper's table 1:
# 64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M.
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


def pad_to(x: Tensor, size: int) -> Tensor:
    """``x`` [N, C, H, W] zero-padded to at least ``size`` x ``size``, centred (an odd
    difference puts the extra row / column at the bottom / right)."""
    dh, dw = max(0, size - x.shape[-2]), max(0, size - x.shape[-1])
    if not (dh or dw):
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


class VGG(nn.Module):
    """VGG features; ``hidden`` > 0 adds Li et al.'s Linear-BN-ReLU layer to the classifier."""

    def __init__(
        self,
        stages: tuple[tuple[int, ...], ...],
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for widths in stages:
            for w in widths:
                layers += [
                    nn.Conv2d(c, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                ]
                c = w
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.min_size = 2 ** len(stages)
        """Smallest input side that survives the pools; smaller inputs are padded to it."""
        self.classifier: nn.Module = nn.Linear(c, num_classes)
        if hidden:
            self.classifier = nn.Sequential(
                nn.Linear(c, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.adaptive_avg_pool2d(self.features(pad_to(x, self.min_size)), 1).flatten(1)
        return self.classifier(out)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm and a single linear classifier, for 32x32 inputs (smaller ones
    are zero-padded to 32x32)."""
    return VGG(VGG16_STAGES, num_classes, in_channels)


def vgg16_li(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm and Li et al.'s classifier (512-512-classes), for 32x32 inputs."""
    return VGG(VGG16_STAGES, num_classes, in_channels, hidden=512)
