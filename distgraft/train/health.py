"""Non-finite values in a network's state, found by layer, and what a recovery resets.

A network diverges when a weight, a running statistic or an optimizer buffer becomes NaN or
Inf: from then on every step spreads it. The trainer checks at the end of every epoch (not
only at grafts) so that it can pause the network, warn with the layers, keep the non-finite
state away from its last finite checkpoint and, at the next graft, take its peer's finite
layers. Layers are the graft plan's (a conv/linear with its bias and the norm that follows
it), so a warning names what a user recognises and a recovery replaces whole layers.

Momentum matters as much as the weights: a layer whose weights were replaced but whose
momentum buffer is still NaN is poisoned again by the next step. So the check covers the
optimizer's state, and a recovered layer's optimizer state is dropped (SGD starts a fresh
momentum buffer for it at the next step).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distgraft.graft.math import graft_plan

__all__ = ["Health"]


class Health:
    """Finds the layers of ``model`` (and of ``optimizer``'s state) that are not finite."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.plan = graft_plan(model)
        self.names = [layer.name for layer in self.plan.layers]
        layer_of = self.plan.layer_of()
        params = dict(model.named_parameters())
        self._param_layer = {id(params[k]): i for k, i in layer_of.items() if k in params}

    def _tensors(self) -> list[tuple[int, Tensor]]:
        """(layer index, tensor) of every floating weight, buffer and optimizer buffer."""
        state = self.model.state_dict(keep_vars=True)
        out = [(i, state[k].detach()) for k, i in self.plan.layer_of().items()]
        for p, entry in self.optimizer.state.items():
            i = self._param_layer.get(id(p))
            if i is None:
                continue
            out += [(i, v) for v in entry.values()
                    if isinstance(v, Tensor) and v.is_floating_point()]  # fmt: skip
        return out

    def bad_layers(self) -> list[bool]:
        """Per layer of the plan: does any of its tensors hold NaN or Inf? One host sync.

        A tensor's sum is finite iff its elements are, barring an overflow of the sum (a
        finite tensor summing to Inf is reported too: harmless, such weights are broken).
        """
        tensors = self._tensors()
        if not tensors:
            return [False] * len(self.names)
        sums = torch.stack([t.sum(dtype=torch.float32) for _, t in tensors])
        finite = torch.isfinite(sums).tolist()
        bad = [False] * len(self.names)
        for (i, _), ok in zip(tensors, finite, strict=True):
            bad[i] = bad[i] or not ok
        return bad

    def layer_names(self, flags: list[bool]) -> list[str]:
        return [n for n, f in zip(self.names, flags, strict=True) if f]

    def reset_optimizer(self, flags: list[bool]) -> None:
        """Forget the optimizer state (momentum) of the parameters of the flagged layers."""
        for p in list(self.optimizer.state):
            i = self._param_layer.get(id(p))
            if i is not None and flags[i]:
                del self.optimizer.state[p]
