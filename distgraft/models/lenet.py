"""The LeNets Han et al. prune ("Learning both Weights and Connections", NIPS 2015), sized for
scikit-learn's 8x8 digits so that magnitude pruning can be shown and tested offline.

* ``lenet300_100``: the fully connected LeNet-300-100 with 64 inputs instead of 784:
  64-300-100-10 with ReLU, and dropout after each hidden layer (p = 0.2) so that the
  paper's dropout rescaling during retraining applies. 50,610 weights and biases.
* ``lenet5``: the Caffe LeNet-5 the paper prunes (conv 20, pool, conv 50, pool, fc 500,
  fc 10) with 3x3 kernels padded to keep 8x8 inputs whole: 8x8 -> 4x4 -> 2x2, so fc1 reads
  50 x 2 x 2 = 200 features. 114,760 weights and biases.

Both take any number of input channels; inputs must be 8x8. Layers are attributes in
forward order (conv1, conv2, fc1, ...), which the pruning code names them by.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeNet300100", "LeNet5", "lenet300_100", "lenet5"]

DROPOUT = 0.2
"""Dropout after each hidden layer of LeNet-300-100 before any pruning (D_o)."""


class LeNet300100(nn.Module):
    """MLP in_features-300-100-classes with ReLU and dropout after each hidden layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, size: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * size * size, 300)
        self.drop1 = nn.Dropout(DROPOUT)
        self.fc2 = nn.Linear(300, 100)
        self.drop2 = nn.Dropout(DROPOUT)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(F.relu(self.fc1(x.flatten(1))))
        x = self.drop2(F.relu(self.fc2(x)))
        return self.fc3(x)


class LeNet5(nn.Module):
    """conv20-pool-conv50-pool-fc500-fc for 8x8 images (3x3 kernels, padding 1)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 3, padding=1)
        self.conv2 = nn.Conv2d(20, 50, 3, padding=1)
        self.fc1 = nn.Linear(50 * 2 * 2, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def lenet300_100(num_classes: int = 10, in_channels: int = 1) -> LeNet300100:
    """LeNet-300-100 for 8x8 images (Han et al. prune it 12x)."""
    return LeNet300100(num_classes, in_channels)


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """LeNet-5 (Caffe variant) for 8x8 images (Han et al. prune it 12x)."""
    return LeNet5(num_classes, in_channels)
