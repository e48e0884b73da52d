"""Gradient edits while training: Force Regularization (Wen et al. 2017).

The filters of each chosen layer attract each other, so that a low-rank approximation after
training keeps fewer basis filters. The force is added to the gradients after backward,
i.e. after DDP averaged them, so every replica of a network adds the same force.
"""

from __future__ import annotations

from torch import nn

from distgraft.compress.force import add_force_to_grads_, force_layers
from distgraft.config import RegularizeConfig

__all__ = ["ForceRegularization"]


class ForceRegularization:
    """``after_backward()`` subtracts force_decay x the force from the weights' gradients."""

    def __init__(self, cfg: RegularizeConfig, model: nn.Module) -> None:
        self.cfg = cfg
        chosen = [] if cfg.force == "none" else force_layers(model, cfg.force_layers)
        self.weights = [p for _, p in chosen]

    def after_backward(self) -> None:
        if self.weights:
            add_force_to_grads_(self.weights, self.cfg.force_decay, self.cfg.force)
