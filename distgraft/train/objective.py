"""The training loss of one network: cross-entropy, and what distillation adds to it.

    L = CE + distill.weight * KD(teachers) + distill.mutual_weight * mutual(peers)

The trainer makes one call per step whatever the method (``objective(x, y, logits)``, under
the step's autocast, so the teachers run under it too); the terms' pure math lives in
``distgraft.distill``, the teachers and the peers' exchange in ``train/distill.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distgraft.config import DistillConfig
from distgraft.distill import kd_loss
from distgraft.train.distill import Peers, Teachers, masked_mutual

__all__ = ["Objective"]


class Objective:
    """``objective(x, y, logits)``: the loss to minimise on a batch (x, y) whose logits are
    ``logits``; ``terms`` holds the last batch's parts, detached, for reporting."""

    def __init__(self, cfg: DistillConfig | None = None, teachers: Teachers | None = None,
                 peers: Peers | None = None) -> None:  # fmt: skip
        self.cfg = cfg or DistillConfig()
        self.teachers = teachers if teachers else None
        self.peers = peers
        self.terms: dict[str, Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """The epoch in progress, for the peers' error messages."""
        if self.peers is not None:
            self.peers.epoch = epoch

    def __call__(self, x: Tensor, y: Tensor, logits: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, y)
        self.terms = {"ce": loss.detach()}
        if self.teachers is not None:
            kd = kd_loss(logits, self.teachers(x), self.cfg.tau, self.cfg.combine)
            self.terms["kd"] = kd.detach()
            loss = loss + self.cfg.weight * kd
        if self.peers is not None:
            mutual = masked_mutual(logits, self.peers(logits))
            self.terms["mutual"] = mutual.detach()
            loss = loss + self.cfg.mutual_weight * mutual
        return loss

    def skip(self, batch_size: int, classes: int, device: torch.device) -> None:
        """A paused (diverged) network's step: the peers still get our (NaN) logits."""
        if self.peers is not None:
            self.peers(torch.full((batch_size, classes), float("nan"), device=device))
