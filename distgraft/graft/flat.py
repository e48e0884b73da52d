"""Graftable model state kept as views into one flat buffer per dtype.

A graft sends every graftable tensor to the ring successor and mixes the predecessor's
into it. Gathering ~100 tensors into a send buffer (torch.cat) and scattering them back
costs about as much as the transfer itself, so, like DDP buckets and FSDP flat
parameters, the model's parameters and buffers are re-pointed once at start-up to views
of a flat storage. The exchange then sends that storage without a copy and the mix is one
single foreach lerp over views of it.

Pure tensor code (no torch.distributed). The views survive the optimizer, DDP,
``load_state_dict`` (in-place copies) and BatchNorm's in-place running-stat updates; they
do not survive ``model.to(...)``, so build the FlatState after moving the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distgraft.graft.math import GraftPlan

__all__ = ["FlatState"]


@dataclass(frozen=True)
class _Slot:
    key: str
    dtype: torch.dtype
    offset: int
    shape: torch.Size
    stride: tuple[int, ...]
    layer: int


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the tensor's elements fill exactly numel storage slots."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


class FlatState:
    """The plan's tensors of ``model``, rebound to views into ``buffers[dtype]``."""

    def __init__(self, model: nn.Module, plan: GraftPlan) -> None:
        self.plan = plan
        state = model.state_dict(keep_vars=True)
        layer_of = plan.layer_of()
        by_dtype: dict[torch.dtype, list[str]] = {}
        for key in plan.keys:
            by_dtype.setdefault(state[key].dtype, []).append(key)
        self.buffers: dict[torch.dtype, Tensor] = {}
        self.slots: list[_Slot] = []
        for dtype, keys in by_dtype.items():
            device = state[keys[0]].device
            total = sum(state[k].numel() for k in keys)
            flat = torch.empty(total, dtype=dtype, device=device)
            offset = 0
            for key in keys:
                t = state[key]
                if not _is_dense(t):
                    t = t.contiguous()
                slot = _Slot(key, dtype, offset, t.shape, t.stride(), layer_of[key])
                view = self._view(flat, slot)
                with torch.no_grad():
                    view.copy_(t)
                _rebind(model, key, view)
                self.slots.append(slot)
                offset += t.numel()
            self.buffers[dtype] = flat
        self._model = model

    @staticmethod
    def _view(flat: Tensor, slot: _Slot) -> Tensor:
        return flat.as_strided(slot.shape, slot.stride, slot.offset)

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.buffers.values())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def signature(self) -> list[tuple[str, tuple[int, ...], str, tuple[int, ...]]]:
        """(key, shape, dtype, strides) of every slot in wire order: peers must agree on it.

        Strides matter: a channels_last peer stores the same conv weight in another element
        order, and mixing the two flat buffers would blend unrelated weights.
        """
        return [(s.key, tuple(s.shape), str(s.dtype), tuple(s.stride)) for s in self.slots]

    def views(self, buffers: dict[torch.dtype, Tensor]) -> dict[str, Tensor]:
        """Split flat buffers laid out like this state into per-key tensors (no copy)."""
        return {s.key: self._view(buffers[s.dtype], s) for s in self.slots}

    def tensors(self) -> dict[str, Tensor]:
        return self.views(self.buffers)

    def verify(self) -> None:
        """Fail loudly if something replaced the model's tensors (e.g. ``model.to``)."""
        state = self._model.state_dict(keep_vars=True)
        for s in self.slots:
            expected = (
                self.buffers[s.dtype].data_ptr() + s.offset * self.buffers[s.dtype].element_size()
            )
            if state[s.key].data_ptr() != expected:
                raise RuntimeError(
                    f"{s.key} no longer lives in the flat graft buffer; build the FlatState "
                    "after moving the model to its device and memory format"
                )

    def filter_starts(self) -> list[int]:
        """Offset of each layer's first filter in a per-filter vector (filter level)."""
        starts = [0]
        for layer in self.plan.layers:
            starts.append(starts[-1] + layer.filters)
        return starts

    def mix_(
        self,
        peer: dict[torch.dtype, Tensor],
        alpha: Tensor,
        level: str,
        keep: list[bool] | None = None,
        take: list[bool] | None = None,
    ) -> None:
        """own <- alpha * own + (1 - alpha) * peer, in place, tensor by tensor.

        ``alpha`` has one value per layer (level "layer") or per filter ("filter"); BN
        channels and biases follow their filter. Layers flagged in ``keep`` are left
        untouched (the peer's values are unusable: NaN * 0 is still NaN, so a lerp with
        alpha = 1 would not protect them); layers flagged in ``take`` get the peer's values.
        One foreach lerp over views at layer level: no per-element alpha is materialised.
        """
        starts = self.filter_starts()
        own_views = self.tensors()
        peer = {d: b if b.dtype == d else b.to(d) for d, b in peer.items()}  # bf16 wire
        peer_views = self.views(peer)
        weight = {d: (1.0 - alpha).to(device=b.device, dtype=d) for d, b in peer.items()}
        selfs, ends, weights = [], [], []
        with torch.no_grad():
            for s in self.slots:
                if not s.dtype.is_floating_point or (keep is not None and keep[s.layer]):
                    continue
                own, other = own_views[s.key], peer_views[s.key]
                if take is not None and take[s.layer]:
                    own.copy_(other)
                    continue
                w = weight[s.dtype]
                if level == "layer":
                    w = w[s.layer]
                else:
                    n = self.plan.layers[s.layer].filters
                    w = w[starts[s.layer] : starts[s.layer] + n]
                    w = w.view(n, *[1] * (own.dim() - 1)) if own.dim() else w.view(())
                selfs.append(own)
                ends.append(other)
                weights.append(w)
            if not selfs:  # every layer kept or taken (a diverged network's first graft)
                return
            if level == "layer":
                torch._foreach_lerp_(selfs, ends, weights)
            else:
                for own, other, w in zip(selfs, ends, weights, strict=True):
                    own.lerp_(other, w)


def _rebind(model: nn.Module, key: str, view: Tensor) -> None:
    """Point parameter or buffer ``key`` of ``model`` at ``view``, keeping its identity."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        module._parameters[name].data = view
    else:
        module._buffers[name] = view
