"""Evaluation of a network over a loader: shared by training, compression and the tools.

Kept out of the trainer so that commands which only evaluate (pruning with ``--eval``,
sensitivity, trimming) need neither the Trainer nor a process group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["evaluate", "accuracy"]


@torch.no_grad()
def evaluate(
    net: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, float, Tensor]:
    """(loss, accuracy %, logits) of ``net`` over every batch of ``loader``, in eval mode."""
    net.eval()
    outputs, labels = [], []
    for x, y in loader:
        with autocast():
            outputs.append(net(x).float())
        labels.append(y)
    logits, y = torch.cat(outputs), torch.cat(labels)
    loss = F.cross_entropy(logits, y)
    acc = (logits.argmax(1) == y).float().mean() * 100
    return float(loss), float(acc), logits


def accuracy(net: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Accuracy (%) of ``net`` over ``loader``."""
    return evaluate(net, loader)[1]
