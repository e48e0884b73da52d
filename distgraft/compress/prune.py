"""Structured pruning: which filters each layer loses, and the smaller network that results.

One-shot pruning as Li et al. (2017) do it: per layer a ratio p, the int(n * (1 - p))
filters with the highest score stay, all layers are pruned at once, then the network is
retrained. Ratios come per layer (``--layers``), per stage (one ratio per feature-map size)
or from a preset of Li's Table 1 (``presets.py``). Two strategies for consecutive layers:

* *independent*: every layer is scored on its full weights;
* *greedy*: the input kernels that read channels an earlier layer already lost are left
  out of a filter's score (Li et al., section 3.2).

Several networks can be pruned with one shared choice (the scores summed over them): the
networks of a grafting run keep their filters aligned, so grafting the pruned networks
mixes the filters it mixed before.

Every change is recorded as a plain dict (``{"op": "prune", "group": NAME, "keep": [...]}``)
so that a checkpoint can rebuild the smaller network from the base model (``archive.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distgraft.compress.criteria import filter_scores
from distgraft.compress.names import CRITERIA, STRATEGIES
from distgraft.compress.structure import Group, remove

__all__ = [
    "PruneError",
    "PruneSpec",
    "STRATEGIES",
    "layer_ratios",
    "kept_count",
    "select",
    "apply_pruning",
    "prune_edits",
    "apply_prune_edit",
]

class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message names what and why."""


@dataclass(frozen=True)
class PruneSpec:
    """How to choose the filters to remove."""

    ratios: Mapping[str, float]
    """Fraction of filters removed per group name; groups not listed keep all."""
    criterion: str = "l1"
    """l1 | l2 | entropy | apoz | invalid (see criteria.py)."""
    strategy: str = "independent"
    """independent | greedy (Li et al. section 3.2)."""
    threshold: float = 0.01
    """invalid: filters with L1 norm below this go (the grafting paper uses 0.1 and 0.01)."""
    apoz_rule: str = "ratio"
    """apoz: 'ratio' removes the highest-APoZ fraction; 'std' every channel above the layer's
    mean + 1 std (Hu et al.)."""
    extra: dict = field(default_factory=dict)


def _check_ratio(name: str, ratio: float) -> None:
    if not (0.0 <= ratio < 1.0) or not math.isfinite(ratio):
        raise PruneError(f"ratio {ratio:g} for {name} is outside [0, 1): the fraction of "
                         "filters to remove must be at least 0 and below 1")  # fmt: skip


def layer_ratios(
    groups: Sequence[Group],
    ratio: float | None = None,
    layers: Sequence[str] = (),
    stage_ratios: Sequence[float] = (),
    skip: Sequence[str] = (),
) -> dict[str, float]:
    """Ratios per group from the command line's pieces.

    ``ratio`` applies to ``layers`` (names of groups), or to every default group when no
    layer is named; ``stage_ratios[s - 1]`` to the default groups of stage s; ``skip``
    removes groups again. Unknown names and ratios outside [0, 1) raise PruneError.
    """
    names = [g.name for g in groups]
    for name in (*layers, *skip):
        if name not in names:
            raise PruneError(f"unknown layer {name!r}; prunable layers: {', '.join(names)}")
    stages = sorted({g.stage for g in groups if g.default})
    if len(stage_ratios) > len(stages):
        raise PruneError(f"{len(stage_ratios)} stage ratios for a model with "
                         f"{len(stages)} stages")  # fmt: skip
    out: dict[str, float] = {}
    for i, r in enumerate(stage_ratios):
        _check_ratio(f"stage {i + 1}", r)
        out.update({g.name: r for g in groups if g.default and g.stage == stages[i]})
    if ratio is not None:
        _check_ratio("--ratio", ratio)
        chosen = set(layers) if layers else {g.name for g in groups if g.default}
        out.update(dict.fromkeys(chosen, ratio))
    for name in skip:
        out.pop(name, None)
    return {name: r for name, r in out.items() if r > 0 or name in layers}


def kept_count(channels: int, ratio: float) -> int:
    """Li's int(n * (1 - p)), rounded to 9 digits first so 64 * 0.5 never becomes 31."""
    return int(round(channels * (1.0 - ratio), 9))


def _ignored_inputs(group: Group, groups: Sequence[Group], keep: dict[str, Tensor]) -> Tensor:
    """Input channels of ``group``'s leader that earlier layers removed (greedy strategy)."""
    for g in groups:
        if group.name in g.consumers and g.name in keep:
            kept = torch.zeros(g.channels, dtype=torch.bool)
            kept[keep[g.name]] = True
            return (~kept).nonzero().flatten()
    return torch.zeros(0, dtype=torch.long)


def _scores(
    models: Sequence[nn.Module],
    group: Group,
    spec: PruneSpec,
    ignore: Tensor | None,
    apoz: Sequence[Mapping[str, Tensor]] | None,
) -> Tensor:
    if spec.criterion == "apoz":
        if apoz is None:
            raise PruneError("criterion apoz needs APoZ values measured on held-out data")
        return -sum(a[group.name].double() for a in apoz)
    return sum(filter_scores(m, group, spec.criterion, ignore).double().cpu() for m in models)


def _drop_by_rule(group: Group, spec: PruneSpec, scores: Tensor, n_models: int) -> Tensor:
    """Channels a thresholding rule removes (invalid, Hu's APoZ rule)."""
    if spec.criterion == "invalid":  # scores are L1 summed over the models
        return (scores < spec.threshold * n_models).nonzero().flatten()
    values = -scores / n_models  # mean APoZ over the models
    limit = values.mean() + values.std(unbiased=False)
    return (values > limit).nonzero().flatten()


def _keep(group: Group, ratio: float, spec: PruneSpec, scores: Tensor, n_models: int) -> Tensor:
    if spec.criterion == "invalid" or (spec.criterion == "apoz" and spec.apoz_rule == "std"):
        drop = _drop_by_rule(group, spec, scores, n_models)
        keep_mask = torch.ones(group.channels, dtype=torch.bool)
        keep_mask[drop] = False
        keep = keep_mask.nonzero().flatten()
        if keep.numel() == 0:
            raise PruneError(
                f"pruning every filter of {group.name}: all {group.channels} filters meet "
                f"the {spec.criterion} rule; skip this layer"
            )
        return keep
    n = kept_count(group.channels, ratio)
    if n < 1:
        raise PruneError(
            f"ratio {ratio:g} removes every filter of {group.name} ({group.channels} filters); "
            f"use a ratio below {1 - 1 / group.channels:.4g} for this layer"
        )
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:n].sort().values


def select(
    models: Sequence[nn.Module],
    groups: Sequence[Group],
    spec: PruneSpec,
    apoz: Sequence[Mapping[str, Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Kept channel indices (sorted, CPU int64) per pruned group, one choice for all models.

    Scores are summed over ``models`` (which must share the architecture), so a single
    network and a grafting ring of them are pruned by the same rule.
    """
    if spec.criterion not in CRITERIA:
        raise PruneError(f"unknown criterion {spec.criterion!r}; allowed: {', '.join(CRITERIA)}")
    if spec.strategy not in STRATEGIES:
        raise PruneError(f"unknown strategy {spec.strategy!r}; allowed: {', '.join(STRATEGIES)}")
    keep: dict[str, Tensor] = {}
    for group in groups:  # forward order: greedy sees what earlier layers removed
        if group.name not in spec.ratios:
            continue
        ignore = _ignored_inputs(group, groups, keep) if spec.strategy == "greedy" else None
        scores = _scores(models, group, spec, ignore, apoz)
        keep[group.name] = _keep(group, spec.ratios[group.name], spec, scores, len(models))
    return keep


def apply_pruning(model: nn.Module, groups: Sequence[Group], keep: Mapping[str, Tensor]) -> None:
    """Remove the channels not in ``keep`` from ``model``, in place."""
    by_name = {g.name: g for g in groups}
    for name, idx in keep.items():
        remove(model, by_name[name], idx)


def prune_edits(keep: Mapping[str, Tensor]) -> list[dict]:
    """The architecture edits that rebuild this pruning from the base model."""
    return [{"op": "prune", "group": name, "keep": idx.tolist()} for name, idx in keep.items()]


def apply_prune_edit(model: nn.Module, groups: Mapping[str, Group], edit: dict) -> None:
    """Replay one recorded pruning on a model of the same base architecture."""
    name = edit["group"]
    if name not in groups:
        raise PruneError(f"the checkpoint prunes {name!r}, which this model does not have")
    remove(model, groups[name], edit["keep"])
