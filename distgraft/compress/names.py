"""The vocabulary of distgraft.compress, free of torch so that ``distgraft --help`` stays fast.

Criteria, strategies and the presets of Li et al.'s Table 1 are data; the modules that use
them (criteria.py, prune.py, presets.py) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WEIGHT_CRITERIA", "CRITERIA", "STRATEGIES", "Preset", "PRESETS"]

WEIGHT_CRITERIA = ("l1", "l2", "entropy", "invalid")
"""Criteria computed from the weights alone."""
CRITERIA = (*WEIGHT_CRITERIA, "apoz")
"""Every pruning criterion; apoz needs held-out data."""
STRATEGIES = ("independent", "greedy")
"""How consecutive pruned layers are scored (Li et al. section 3.2)."""


@dataclass(frozen=True)
class Preset:
    """One row of Li's Table 1."""

    family: str
    """Model family the preset applies to (structure.family_of)."""
    depth: int
    """Prunable layers numbered by Li: the blocks of a CIFAR ResNet (27 for ResNet-56), the
    13 convs of VGG-16."""
    stage_ratios: tuple[float, ...]
    """Ratio per stage for the pruned layers (one value: every stage)."""
    skip: tuple[int, ...] = ()
    """Layer numbers left alone (the sensitive ones of Li's Figure 2)."""
    only: tuple[int, ...] = ()
    """VGG: the layer numbers pruned (empty: every prunable layer)."""
    note: str = ""


PRESETS: dict[str, Preset] = {
    "vgg16-a": Preset("VGG", 13, (0.5,), only=(1, 8, 9, 10, 11, 12, 13),
                      note="conv1 and conv8-13 by 50% (VGG-16-pruned-A)"),
    "resnet56-a": Preset("CifarResNet", 27, (0.1,), skip=(16, 20, 38, 54),
                         note="10% of each block's first conv, skipping 16, 20, 38, 54"),
    "resnet56-b": Preset("CifarResNet", 27, (0.6, 0.3, 0.1), skip=(16, 18, 20, 34, 38, 54),
                         note="60/30/10% per stage, skipping 16, 18, 20, 34, 38, 54"),
    "resnet110-a": Preset("CifarResNet", 54, (0.5, 0.0, 0.0), skip=(36,),
                          note="50% in stage 1, skipping 36"),
    "resnet110-b": Preset("CifarResNet", 54, (0.5, 0.4, 0.3), skip=(36, 38, 74),
                          note="50/40/30% per stage, skipping 36, 38, 74"),
}  # fmt: skip
"""Name -> preset, the pruned networks of Li et al. (2017), Table 1."""
