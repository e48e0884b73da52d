"""Compression while training: Han et al.'s magnitude pruning (rounds at epoch boundaries,
masks held through every optimizer step, every graft and every restart), the dropout
rescaling it implies, and the ``arch`` record that rebuilds the network from its checkpoint.

``compress.schedule`` (or ``compress.quality``) lists one target per round; round r prunes
at the start of epoch ``start_epoch + r * round_epochs`` and the epochs until the next round
retrain the survivors. Each network prunes its own weights (under DDP its replicas hold
identical weights, so they compute identical masks) and keeps its own mask: after a graft
the mask is applied again, so grafting only changes surviving weights. Masks are saved in
the checkpoints, so a resumed run holds the same zeros. A network started from a pruned
checkpoint (``model.init``) keeps that checkpoint's zeros as its mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distgraft.compress.archive import save_compressed
from distgraft.compress.counting import WEIGHTED
from distgraft.compress.magnitude import (
    Masks,
    apply_dropout_edit,
    encode_sparse,
    original_dropout,
    prunable_weights,
    prune_masks,
    rescale_dropout,
)
from distgraft.config import CompressConfig, Config, ConfigError, layer_sparsity
from distgraft.models import build_model

__all__ = [
    "SparseTraining",
    "TrainingCompression",
    "check_layers",
    "round_epochs",
    "round_sparsity",
    "weight_counts",
]


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


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(conv and linear weights, those of them nonzero): the connections Han et al. count."""
    weights = [m.weight for m in model.modules() if isinstance(m, WEIGHTED)]
    total = sum(w.numel() for w in weights)
    return total, int(sum(int(w.count_nonzero()) for w in weights))


class TrainingCompression:
    """What compression does to one network while it trains, and how to rebuild it.

    Holds the ``arch`` record (the base model and every edit: pruned channels, decomposed
    layers, rescaled dropouts) that the checkpoints carry, and the magnitude-pruning masks
    with their schedule. The trainer calls ``prune`` at the start of an epoch,
    ``after_backward`` and ``after_update`` around each optimizer step (and after a graft),
    and ``save_sparse`` at the end.
    """

    def __init__(self, cfg: CompressConfig, model: nn.Module, arch: dict[str, Any],
                 masks: Masks | None = None) -> None:  # fmt: skip
        self.arch = arch
        self.sparse = SparseTraining(cfg, model, masks)

    @property
    def active(self) -> bool:
        return self.sparse.active

    def prune(self, epoch: int, model: nn.Module, optimizer) -> dict | None:
        """A magnitude-pruning round when one starts at ``epoch``: the event's fields."""
        fields = self.sparse.prune(epoch, model, optimizer)
        if fields is not None:
            self._set_dropout_edits(self.sparse.dropout_edits)
        return fields

    def _set_dropout_edits(self, edits: list[dict]) -> None:
        """Record rescaled dropout rates in the arch (the latest per module)."""
        changed = {e["module"] for e in edits}
        kept = [e for e in self.arch["edits"]
                if not (e["op"] == "dropout" and e["module"] in changed)]  # fmt: skip
        self.arch = {**self.arch, "edits": kept + edits}

    def after_backward(self, model: nn.Module) -> None:
        self.sparse.after_backward(model)

    def after_update(self, model: nn.Module) -> None:
        self.sparse.after_update(model)

    def state_dict(self) -> dict:
        return {"arch": self.arch, "masks": self.sparse.state_dict()}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """From a training checkpoint: arch (dropout rates re-applied) and masks."""
        self.arch = state.get("arch", self.arch)
        for edit in self.arch["edits"]:
            if edit["op"] == "dropout":
                apply_dropout_edit(model, edit)
        self.sparse.load_state_dict(state.get("masks"), model)

    def save_sparse(self, path: Path, model: nn.Module, config: str, final_acc: float) -> None:
        """With masks: the network as a sparse checkpoint (bitmask + values)."""
        if not self.active:
            return
        masks = self.sparse.masks
        assert masks is not None
        report = {"compression": masks.compression(), "final_acc": final_acc,
                  "layers": {c.name: [c.kept, c.total] for c in masks.counts()}}  # fmt: skip
        encoded = encode_sparse(model.state_dict(), masks)
        save_compressed(path, None, self.arch, kind="sparse", config=config, report=report,
                        source=str(path.parent), sparse=encoded)  # fmt: skip
