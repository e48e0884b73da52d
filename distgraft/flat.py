"""Graftable model state kept as views into one flat buffer per dtype.

A graft sends every graftable tensor to the ring successor and mixes the predecessor's
into it. Gathering ~100 tensors into a send buffer (torch.cat) and scattering them back
costs about as much as the transfer itself, so, like DDP buckets and FSDP flat
parameters, the model's parameters and buffers are re-pointed once at start-up to views
of a flat storage. The exchange then sends that storage without a copy and the mix is one
fused lerp per dtype with alpha expanded per segment.

Pure tensor code (no torch.distributed). The views survive the optimizer, DDP,
``load_state_dict`` (in-place copies) and BatchNorm's in-place running-stat updates; they
do not survive ``model.to(...)``, so build the FlatState after moving the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distgraft.graft import GraftPlan, expand_alpha, mix_

__all__ = ["FlatState", "Segments"]


@dataclass(frozen=True)
class Segments:
    """How alphas map onto one flat buffer: segment s has sizes[s] elements, alpha index[s]."""

    sizes: Tensor
    index: Tensor


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
        self._segments: dict[tuple[str, torch.dtype], Segments] = {}

    @staticmethod
    def _view(flat: Tensor, slot: _Slot) -> Tensor:
        return flat.as_strided(slot.shape, slot.stride, slot.offset)

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.buffers.values())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def signature(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(key, shape, dtype) of every slot in wire order: peers must agree on it."""
        return [(s.key, tuple(s.shape), str(s.dtype)) for s in self.slots]

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

    def segments(self, level: str, dtype: torch.dtype) -> Segments:
        """Alpha segments of the ``dtype`` buffer for "layer" or "filter" level (cached)."""
        cached = self._segments.get((level, dtype))
        if cached is not None:
            return cached
        starts = [0]
        for layer in self.plan.layers:
            starts.append(starts[-1] + layer.filters)
        sizes: list[int] = []
        index: list[int] = []
        for s in self.slots:
            if s.dtype != dtype:
                continue
            n = s.shape.numel()
            if level == "layer":
                sizes.append(n)
                index.append(s.layer)
                continue
            filters = self.plan.layers[s.layer].filters
            if n % filters:
                raise ValueError(f"{s.key}: {n} elements do not split into {filters} filters")
            sizes.extend([n // filters] * filters)
            index.extend(range(starts[s.layer], starts[s.layer] + filters))
        device = self.buffers[dtype].device
        seg = Segments(
            torch.tensor(sizes, dtype=torch.long, device=device),
            torch.tensor(index, dtype=torch.long, device=device),
        )
        self._segments[(level, dtype)] = seg
        return seg

    def mix_(self, peer: dict[torch.dtype, Tensor], alpha: Tensor, level: str) -> None:
        """own <- alpha * own + (1 - alpha) * peer, one fused pass per dtype buffer."""
        for dtype, own in self.buffers.items():
            if not own.is_floating_point():
                continue
            seg = self.segments(level, dtype)
            a = expand_alpha(alpha.to(own.device), seg.sizes, seg.index, own.numel(), dtype)
            with torch.no_grad():
                mix_(own, peer[dtype], a)


def _rebind(model: nn.Module, key: str, view: Tensor) -> None:
    """Point parameter or buffer ``key`` of ``model`` at ``view``, keeping its identity."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        module._parameters[name].data = view
    else:
        module._buffers[name] = view
