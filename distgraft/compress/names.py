"""The vocabulary of distgraft.compress, free of torch so that ``distgraft --help`` stays fast.

Criteria, strategies and the presets of Li et al.'s Table 1 are data; the modules that use
them (criteria.py, prune.py, presets.py) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "WEIGHT_CRITERIA",
    "CRITERIA",
    "STRATEGIES",
    "MAGNITUDE_LAYERS",
    "Preset",
    "PRESETS",
]

WEIGHT_CRITERIA = ("l1", "l2", "entropy", "invalid")
"""Criteria computed from the weights alone."""
CRITERIA = (*WEIGHT_CRITERIA, "apoz")
"""Every pruning criterion; apoz needs held-out data."""
STRATEGIES = ("independent", "greedy")
"""How consecutive pruned layers are scored (Li et al. section 3.2)."""
MAGNITUDE_LAYERS = ("conv", "linear", "conv+linear")
"""The weights magnitude pruning may touch (biases never)."""


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
    model: str = ""
    """The distgraft model the preset's figures are for."""
    table: tuple[str, str, float, str, str, float] = ("", "", 0.0, "", "", 0.0)
    """Li's Table 1 as printed: FLOPs before, after, % fewer; params before, after, % fewer."""


PRESETS: dict[str, Preset] = {
    "vgg16-a": Preset("VGG", 13, (0.5,), only=(1, 8, 9, 10, 11, 12, 13),
                      note="conv1 and conv8-13 by 50% (VGG-16-pruned-A)", model="vgg16_li",
                      table=("3.13E8", "2.06E8", 34.2, "1.5E7", "5.4E6", 64.0)),
    "resnet56-a": Preset("CifarResNet", 27, (0.1,), skip=(16, 20, 38, 54),
                         note="10% of each block's first conv, skipping 16, 20, 38, 54",
                         model="resnet56",
                         table=("1.25E8", "1.12E8", 10.4, "8.5E5", "7.7E5", 9.4)),
    "resnet56-b": Preset("CifarResNet", 27, (0.6, 0.3, 0.1), skip=(16, 18, 20, 34, 38, 54),
                         note="60/30/10% per stage, skipping 16, 18, 20, 34, 38, 54",
                         model="resnet56",
                         table=("1.25E8", "9.09E7", 27.6, "8.5E5", "7.3E5", 13.7)),
    "resnet110-a": Preset("CifarResNet", 54, (0.5, 0.0, 0.0), skip=(36,),
                          note="50% in stage 1, skipping 36", model="resnet110",
                          table=("2.53E8", "2.13E8", 15.9, "1.72E6", "1.68E6", 2.3)),
    "resnet110-b": Preset("CifarResNet", 54, (0.5, 0.4, 0.3), skip=(36, 38, 74),
                          note="50/40/30% per stage, skipping 36, 38, 74", model="resnet110",
                          table=("2.53E8", "1.55E8", 38.6, "1.72E6", "1.16E6", 32.4)),
}  # fmt: skip
"""Name -> preset, the pruned networks of Li et al. (2017), Table 1."""
