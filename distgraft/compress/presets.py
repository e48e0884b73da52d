"""The pruned networks of Li et al. (2017), Table 1, as named presets.

Layer numbers follow the paper: in a CIFAR ResNet the stem conv is layer 1 and block k
(counted from 1 over the whole network) has its first conv at layer 2k and its second at
2k + 1; in VGG-16 conv1 to conv13 are the convs in order. Filters kept per layer are
int(n * (1 - p)). With these rules the FLOP reductions land within 0.07 points of the
table (measured by tests/test_prune.py):

=============  ================================================  ==========  ===========
preset         what it prunes                                    FLOPs       Li's Table 1
=============  ================================================  ==========  ===========
vgg16-a        conv1 and conv8-conv13 by 50%                     -34.19%     -34.2%
resnet56-a     10% of every block's first conv, skipping          -10.40%     -10.4%
               layers 16, 20, 38, 54
resnet56-b     60% / 30% / 10% per stage, skipping layers 16,     -27.56%     -27.6%
               18, 20, 34, 38, 54
resnet110-a    50% in stage 1, skipping layer 36                  -15.86%     -15.9%
resnet110-b    50% / 40% / 30% per stage, skipping 36, 38, 74     -38.66%     -38.6%
=============  ================================================  ==========  ===========

VGG-16-A's 5.4E6 parameters need Li's CIFAR classifier: use the model ``vgg16_li``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from distgraft.compress.names import PRESETS, Preset
from distgraft.compress.prune import PruneError
from distgraft.compress.structure import Group, family_of

__all__ = ["PRESETS", "Preset", "preset_ratios", "layer_numbers"]


def layer_numbers(model: nn.Module, groups: Sequence[Group]) -> dict[str, int]:
    """Li's layer number of every group of a CIFAR ResNet or VGG."""
    family = family_of(model)
    if family == "CifarResNet":  # group k (block k, from 1) is the block's first conv
        return {g.name: 2 * (k + 1) for k, g in enumerate(groups)}
    if family == "VGG":
        return {g.name: k + 1 for k, g in enumerate(groups) if g.name.startswith("features.")}
    raise PruneError(f"Li's layer numbers are defined for CIFAR ResNets and VGG, not {family}")


def preset_ratios(name: str, model: nn.Module, groups: Sequence[Group]) -> dict[str, float]:
    """Ratios per group of preset ``name`` for ``model`` (which must be the preset's network)."""
    if name not in PRESETS:
        raise PruneError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    p = PRESETS[name]
    numbers = layer_numbers(model, groups) if family_of(model) == p.family else {}
    if len(numbers) != p.depth:
        raise PruneError(
            f"preset {name} is defined for {_network(p)}; this checkpoint holds a "
            f"{type(model).__name__} with {len(groups)} prunable layers"
        )
    stages = sorted({g.stage for g in groups if g.name in numbers})
    out = {}
    for g in groups:
        n = numbers.get(g.name)
        if n is None or n in p.skip or (p.only and n not in p.only):
            continue
        ratio = p.stage_ratios[min(stages.index(g.stage), len(p.stage_ratios) - 1)]
        if ratio > 0:
            out[g.name] = ratio
    return out


def _network(p: Preset) -> str:
    if p.family == "VGG":
        return "VGG-16 (vgg16_li, or vgg16_bn)"
    return f"ResNet-{2 * p.depth + 2} (resnet{2 * p.depth + 2})"
