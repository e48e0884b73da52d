"""The training loss of one network.

Cross-entropy on the labels, the paper's loss. The distillation and mutual-learning terms
join it here, so the trainer makes one call per step whatever the method.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["Objective"]


class Objective:
    """``objective(x, y, logits)``: the loss to minimise on a batch (x, y) whose logits are
    ``logits``; ``terms`` holds the last batch's parts, detached, for reporting."""

    def __init__(self) -> None:
        self.terms: dict[str, Tensor] = {}

    def __call__(self, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, y)
        self.terms = {"ce": loss.detach()}
        return loss
