"""Sensitivity analysis (Li et al. 2017, Figure 2): prune one layer alone, evaluate, restore.

A layer whose accuracy falls fast as its filters go is sensitive: it is skipped or pruned
less. Pruning is simulated by zeroing the chosen filters with their BatchNorm channels
(``structure.mask_``), which gives the outputs of the physically smaller network (the
contract tests/test_prune.py checks), and the zeroed tensors are restored afterwards, so
one copy of the network serves every (layer, ratio) pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distgraft.compress.criteria import filter_scores
from distgraft.compress.prune import kept_count
from distgraft.compress.structure import Group, mask_

__all__ = ["Point", "layer_curve"]


@dataclass(frozen=True)
class Point:
    """Accuracy of the network with one layer pruned at one ratio (no retraining)."""

    layer: str
    ratio: float
    kept: int
    accuracy: float


def _saved(model: nn.Module, group: Group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) of everything ``mask_`` writes for ``group``."""
    modules = dict(model.named_modules())
    out = []
    for name in (*group.producers, *group.depthwise, *group.norms):
        m = modules[name]
        out += [(t, t.detach().clone()) for t in (m.weight, m.bias) if t is not None]
    return out


@torch.no_grad()
def layer_curve(
    model: nn.Module,
    group: Group,
    ratios: Sequence[float],
    evaluate: Callable[[nn.Module], float],
    criterion: str = "l1",
) -> list[Point]:
    """Accuracy after pruning ``group`` alone at each ratio, ranking filters by ``criterion``.

    Ratios that would remove every filter are skipped. The model is unchanged afterwards.
    """
    order = torch.argsort(filter_scores(model, group, criterion).cpu(), descending=True,
                          stable=True)  # fmt: skip
    saved = _saved(model, group)
    points = []
    try:
        for ratio in ratios:
            n = kept_count(group.channels, ratio)
            if n < 1:
                continue
            mask_(model, group, order[n:])
            points.append(Point(group.name, float(ratio), n, float(evaluate(model))))
            for t, copy in saved:
                t.copy_(copy)
    finally:
        for t, copy in saved:
            t.copy_(copy)
    return points
