"""A tiny CNN for the 8x8 grey-scale digits of scikit-learn (UCI optical digits).

Not from the grafting paper: it exists so that a multi-process grafting run can be
demonstrated and tested end to end on CPU in seconds, with the same conv+BatchNorm
structure the grafting code sees in the paper's networks. It has 14,458 parameters (10
classes, one input channel) and reaches over 90% test accuracy on digits after about 100
SGD steps (two epochs at batch 32, lr 0.05, momentum 0.9; three at batch 128, lr 0.1) and
about 99% after eight epochs. Global average pooling lets it run on any input of at least
2x2 pixels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsCNN", "digits_cnn"]


class DigitsCNN(nn.Module):
    """conv16-conv32-pool-conv32 (3x3, BN, ReLU), global average pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.linear = nn.Linear(32, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.max_pool2d(out, 2)
        out = F.relu(self.bn3(self.conv3(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    """Small CNN for 8x8 single-channel digits."""
    return DigitsCNN(num_classes, in_channels)
