"""Magnitude pruning while training (Han et al. 2015): rounds at epoch boundaries, masks
held through every optimizer step, every graft and every restart.

``compress.schedule`` (or ``compress.quality``) lists one target per round; round r prunes
at the start of epoch ``start_epoch + r * round_epochs`` and the epochs until the next round
retrain the survivors. Each network prunes its own weights (under DDP its replicas hold
identical weights, so they compute identical masks) and keeps its own mask: after a graft
the mask is applied again, so grafting only changes surviving weights. Masks are saved in
the checkpoints, so a resumed run holds the same zeros. A network started from a pruned
checkpoint (``model.init``) keeps that checkpoint's zeros as its mask.
"""

from __future__ import annotations

import torch
from torch import nn

from distgraft.compress.magnitude import (
    Masks,
    original_dropout,
    prunable_weights,
    prune_masks,
    rescale_dropout,
)
from distgraft.config import CompressConfig, Config, ConfigError, layer_sparsity
from distgraft.models import build_model

__all__ = ["SparseTraining", "check_layers", "round_epochs", "round_sparsity"]


def round_epochs(cfg: CompressConfig) -> list[int]:
    """The epochs at whose start a round prunes."""
    if cfg.method != "magnitude":
        return []
    rounds = len(cfg.schedule or cfg.quality)
    return [cfg.start_epoch + r * cfg.round_epochs for r in range(rounds)]


def round_sparsity(c: CompressConfig, r: int, keys: list[str]) -> dict[str, float]:
    """Round ``r``'s sparsity of each pruned weight: the schedule's entry, scaled by
    final / last entry for the layers compress.layer_sparsity names."""
    finals, last = layer_sparsity(c), c.schedule[-1]
    layer = {k: k.removesuffix(".weight") for k in keys}
    unknown = sorted(set(finals) - set(layer.values()))
    if unknown:
        raise ValueError(f"compress.layer_sparsity names {unknown}, which are not pruned; "
                         f"pruned layers: {', '.join(layer.values())}")  # fmt: skip
    return {k: c.schedule[r] * finals.get(layer[k], last) / last for k in keys}


def check_layers(cfg: Config) -> None:
    """Pre-flight: compress.skip and compress.layer_sparsity name layers magnitude pruning
    would touch (ConfigError before any process starts, not at the first round)."""
    c = cfg.compress
    if c.method != "magnitude" or not (c.skip or c.layer_sparsity):
        return
    with torch.device("meta"):  # names only: no memory, no init cost
        model = build_model(cfg.model.name, 10)
    try:
        keys = prunable_weights(model, c.layers, c.skip_first, c.skip)
        if c.schedule:
            round_sparsity(c, 0, keys)
    except ValueError as e:
        raise ConfigError(f"compress: {e}") from None


class SparseTraining:
    """The masks of one network and the schedule that tightens them."""

    def __init__(self, cfg: CompressConfig, model: nn.Module, masks: Masks | None = None):
        self.cfg = cfg
        self.masks = masks
        self.rounds = round_epochs(cfg)
        self.dropout0 = original_dropout(model)
        self.dropout_edits: list[dict] = []

    @property
    def active(self) -> bool:
        return self.masks is not None

    def prune(self, epoch: int, model: nn.Module, optimizer) -> dict | None:
        """Prune if a round starts at ``epoch``; the ``prune`` event's fields, else None."""
        if epoch not in self.rounds:
            return None
        r = self.rounds.index(epoch)
        c = self.cfg
        keys = prunable_weights(model, c.layers, c.skip_first, c.skip)
        if c.schedule:
            target = {"sparsity": round_sparsity(c, r, keys)}
        else:
            target = {"quality": c.quality[r]}
        self.masks = prune_masks(model, keys, previous=self.masks, scope=c.scope, **target)
        self.masks.apply_(model)
        self.masks.mask_optimizer_(model, optimizer)
        if c.rescale_dropout:
            self.dropout_edits = rescale_dropout(model, self.masks, self.dropout0)
        counts = self.masks.counts()
        return {
            "round": r + 1,
            "rounds": len(self.rounds),
            "layers": [x.name for x in counts],
            "kept": [x.kept for x in counts],
            "total": [x.total for x in counts],
            "compression": self.masks.compression(),
            "dropout": [e["p"] for e in self.dropout_edits],
        }

    def after_backward(self, model: nn.Module) -> None:
        if self.masks is not None:
            self.masks.mask_grads_(model)

    def after_update(self, model: nn.Module) -> None:
        """After an optimizer step or a graft: pruned weights back to exactly zero."""
        if self.masks is not None:
            self.masks.apply_(model)

    def state_dict(self) -> dict | None:
        return None if self.masks is None else self.masks.state_dict()

    def load_state_dict(self, state: dict | None, model: nn.Module) -> None:
        self.masks = None if state is None else Masks(state)
        self.after_update(model)
