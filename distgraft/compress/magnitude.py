"""Magnitude pruning (Han et al., "Learning both Weights and Connections", NIPS 2015).

Train, remove every connection whose |w| is below a per-layer threshold, retrain the
survivors with the removed ones held at zero, repeat with higher thresholds (iterative
pruning keeps more accuracy than one shot). The threshold is ``quality x std`` of the
layer's weights (the paper's rule) or whatever reaches a target sparsity. Conv and linear
weights are pruned, biases never; the first conv, the most sensitive layer, is skipped by
default.

Holding pruned weights at zero (``Masks``): after backward the masked gradients are
zeroed, so with SGD the momentum of a masked weight stays zero (its buffer is zeroed at
pruning time), weight decay adds 0 x wd, and the step leaves it at exactly 0.0;
``apply_`` after the step is the guard. Masks are identical on every replica of a network
(DDP averages gradients before they are masked). A graft mixes a peer's weights into the
network, pruned positions included; the trainer re-applies the network's *own* mask after
every graft, so a graft only changes surviving weights and each network keeps its mask.

Zeros are written with ``masked_fill`` (+0.0, never -0.0), so ``encode_sparse`` /
``decode_sparse`` restore a pruned state dict bit for bit.

Pure tensor code: nothing here imports torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from distgraft.compress.counting import WEIGHTED
from distgraft.compress.names import MAGNITUDE_LAYERS
from distgraft.compress.structure import Group, activation, remove

__all__ = [
    "LayerCount",
    "Masks",
    "prunable_weights",
    "prune_masks",
    "original_dropout",
    "rescale_dropout",
    "apply_dropout_edit",
    "DeadUnits",
    "find_dead",
    "remove_dead",
    "encode_sparse",
    "decode_sparse",
    "masks_of_sparse",
    "SPARSE_FORMAT",
    "SCOPES",
]

SPARSE_FORMAT = 1
SCOPES = ("layer", "global")
"""Where a threshold applies: per layer (Han et al.) or one over all pruned layers."""


@dataclass(frozen=True)
class LayerCount:
    """Connections of one pruned layer."""

    name: str
    """State-dict key of the weight."""
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


def prunable_weights(
    model: nn.Module, layers: str = "conv+linear", skip_first: bool = True,
    skip: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """State-dict keys of the weights magnitude pruning may touch, in module order.

    ``layers``: conv | linear | conv+linear. ``skip`` holds module names (``conv1``) or
    weight keys (``conv1.weight``); an unknown one raises ValueError listing the choices.
    """
    kinds = {"conv": WEIGHTED[:3], "linear": (nn.Linear,), "conv+linear": WEIGHTED}
    if layers not in kinds:
        raise ValueError(f"layers = {layers!r}: allowed {', '.join(MAGNITUDE_LAYERS)}")
    names = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    unknown = [s for s in skip if s.removesuffix(".weight") not in names]
    if unknown:
        raise ValueError(f"unknown layer {unknown[0]!r}; prunable layers: {', '.join(names)}")
    modules = dict(model.named_modules())
    first_conv = next((n for n in names if isinstance(modules[n], WEIGHTED[:3])), None)
    skipped = {s.removesuffix(".weight") for s in skip}
    if skip_first and first_conv is not None:
        skipped.add(first_conv)
    chosen = [n for n in names if isinstance(modules[n], kinds[layers]) and n not in skipped]
    return [f"{n}.weight" for n in chosen]


class Masks:
    """One bool mask per pruned weight (True = connection kept), keyed by state-dict name."""

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        self.masks = {k: v.bool() for k, v in masks.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.masks

    def _pairs(self, model: nn.Module) -> Iterable[tuple[Tensor, Tensor]]:
        for key, mask in self.masks.items():
            param = model.get_parameter(key)
            if mask.device != param.device:
                self.masks[key] = mask = mask.to(param.device)
            yield param, mask

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Pruned weights to +0.0, in place (also after a graft: own mask, own zeros)."""
        for param, mask in self._pairs(model):
            param.masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the gradients of pruned weights (call after backward, before the step)."""
        for param, mask in self._pairs(model):
            if param.grad is not None:
                param.grad.masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def mask_optimizer_(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer state (momentum) of pruned weights, once after pruning."""
        for param, mask in self._pairs(model):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.masked_fill_(~mask, 0.0)

    def counts(self) -> list[LayerCount]:
        return [LayerCount(k, int(m.sum()), m.numel()) for k, m in self.masks.items()]

    def compression(self) -> float:
        """Connections before / after over the pruned layers (Han's "9x", "13x")."""
        counts = self.counts()
        kept = sum(c.kept for c in counts)
        return sum(c.total for c in counts) / kept if kept else math.inf

    def state_dict(self) -> dict[str, Tensor]:
        """Plain bool tensors on the CPU (loads with weights_only=True)."""
        return {k: v.cpu() for k, v in self.masks.items()}

    @classmethod
    def from_zeros(cls, model: nn.Module, keys: Sequence[str]) -> Masks:
        """Masks of the weights' current zero pattern (a pruned checkpoint to retrain)."""
        state = model.state_dict()
        return cls({k: state[k] != 0 for k in keys})


def _threshold_mask(weight: Tensor, quality: float | None, sparsity: float | None) -> Tensor:
    w = weight.detach().abs().float().flatten()
    if quality is not None:  # Han et al.: quality parameter x the layer's standard deviation
        limit = quality * float(weight.detach().float().std())
        return (weight.detach().abs() >= limit).reshape(weight.shape)
    drop = int(round(sparsity * w.numel()))
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if drop:  # the smallest |w| go; ties broken by position, so the count is exact
        order = torch.argsort(w, stable=True)
        keep[order[:drop]] = False
    return keep.reshape(weight.shape)


def prune_masks(
    model: nn.Module,
    keys: Sequence[str],
    *,
    quality: float | None = None,
    sparsity: float | Mapping[str, float] | None = None,
    previous: Masks | None = None,
    scope: str = "layer",
) -> Masks:
    """Masks after one pruning round: below the threshold, or the smallest ``sparsity``.

    ``scope = "layer"`` (Han et al.) gives every layer its own threshold; ``"global"`` one
    threshold over all the pruned weights (quality x their pooled std, or the overall
    sparsity), so large redundant layers lose more than small sensitive ones.

    Exactly one of ``quality`` (threshold = quality x std of the layer's weights) and
    ``sparsity`` (fraction of each layer's weights removed, in [0, 1); a mapping gives each
    weight key its own, as Han et al. prune each layer to its own rate). With ``previous``
    masks, pruned connections stay pruned (masks only shrink); a target sparsity then
    counts the already pruned weights too (their |w| is 0, so they go first).
    """
    if (quality is None) == (sparsity is None):
        raise ValueError("give exactly one of quality (threshold = q x std) and sparsity")
    per_key = dict(sparsity) if isinstance(sparsity, Mapping) else dict.fromkeys(keys, sparsity)
    if sparsity is not None:
        if set(per_key) != set(keys):
            raise ValueError(f"sparsity per layer for {sorted(per_key)}, pruned: {list(keys)}")
        for key, s in per_key.items():
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity {s:g} of {key} is outside [0, 1)")
        if isinstance(sparsity, Mapping) and scope == "global":
            raise ValueError("scope 'global' takes one sparsity, not one per layer")
    if quality is not None and not (quality >= 0 and math.isfinite(quality)):
        raise ValueError(f"quality {quality:g} must be a finite number >= 0")
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: allowed {', '.join(SCOPES)}")
    state = model.state_dict()
    weights = {}
    for key in keys:
        weight = state[key]
        if previous is not None and key in previous:
            weight = weight.masked_fill(~previous.masks[key].to(weight.device), 0.0)
        weights[key] = weight
    if scope == "global":
        return Masks(_global_masks(weights, quality, sparsity, previous))
    masks = {}
    for key, weight in weights.items():
        mask = _threshold_mask(weight, quality, per_key[key])
        if previous is not None and key in previous:
            mask &= previous.masks[key].to(mask.device)
        masks[key] = mask
    return Masks(masks)


def _global_masks(
    weights: Mapping[str, Tensor], quality: float | None, sparsity: float | None,
    previous: Masks | None,
) -> dict[str, Tensor]:  # fmt: skip
    """One threshold over all layers: the layers with many small weights give up more."""
    flat = torch.cat([w.detach().flatten().float().cpu() for w in weights.values()])
    keep = _threshold_mask(flat, quality, sparsity)
    masks, start = {}, 0
    for key, w in weights.items():
        mask = keep[start : start + w.numel()].reshape(w.shape).to(w.device)
        start += w.numel()
        if previous is not None and key in previous:
            mask &= previous.masks[key].to(mask.device)
        masks[key] = mask
    return masks


# -- dropout ------------------------------------------------------------------------------


def _dropouts(model: nn.Module) -> list[tuple[str, nn.Dropout, str | None]]:
    """(name, dropout, weight key of the conv/linear registered just before it)."""
    out, last = [], None
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED):
            last = f"{name}.weight"
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            out.append((name, module, last))
    return out


def original_dropout(model: nn.Module) -> dict[str, float]:
    """D_o of every dropout module, read before any pruning."""
    return {name: float(m.p) for name, m, _ in _dropouts(model)}


def rescale_dropout(model: nn.Module, masks: Masks, original: Mapping[str, float]) -> list[dict]:
    """Set each dropout to D_r = D_o sqrt(C_r / C_o) and return the architecture edits.

    C is the number of connections of the layer before the dropout: C_o its weights, C_r
    those its mask keeps (Han et al. section 3.1: pruning already reduced the capacity,
    so less dropout is needed while retraining).
    """
    edits = []
    for name, module, layer in _dropouts(model):
        if layer is None or layer not in masks or name not in original:
            continue
        mask = masks.masks[layer]
        module.p = original[name] * math.sqrt(int(mask.sum()) / mask.numel())
        edits.append({"op": "dropout", "module": name, "p": float(module.p)})
    return edits


def apply_dropout_edit(model: nn.Module, edit: dict) -> None:
    """Replay a recorded dropout rate on a freshly built model."""
    module = dict(model.named_modules()).get(edit["module"])
    if not isinstance(module, nn.modules.dropout._DropoutNd):
        raise ValueError(f"the checkpoint sets dropout {edit['module']!r}, which is no dropout")
    module.p = float(edit["p"])


# -- dead neurons -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadUnits:
    """Units of one layer that pruning left without inputs or without outputs."""

    layer: str
    units: int
    no_inputs: tuple[int, ...]
    no_outputs: tuple[int, ...]
    removed: tuple[int, ...]
    """The ones removed (exactly: see ``remove_dead``)."""


def _mask(masks: Masks, state: Mapping[str, Tensor], key: str) -> Tensor:
    m = masks.masks.get(key)
    return torch.ones_like(state[key], dtype=torch.bool) if m is None else m.cpu()


def _read_per_unit(mask: Tensor, units: int, spatial: int) -> Tensor:
    """Whether any connection of a consumer reads each unit."""
    if mask.dim() == 2:  # linear, maybe after a flatten of [units, spatial]
        return mask.reshape(mask.shape[0], units, spatial).any(2).any(0)
    return mask.transpose(0, 1).reshape(units, -1).any(1)


def find_dead(model: nn.Module, masks: Masks, groups: Sequence[Group]) -> dict[str, tuple]:
    """Per group: (units without inputs, units without outputs) as index tensors."""
    state = model.state_dict()
    out = {}
    for g in groups:
        producer = _mask(masks, state, f"{g.name}.weight")
        no_inputs = ~producer.reshape(producer.shape[0], -1).any(1)
        reads = torch.zeros(g.channels, dtype=torch.bool)
        for c in g.consumers:
            spatial = (g.spatial or {}).get(c, 1)
            reads |= _read_per_unit(_mask(masks, state, f"{c}.weight"), g.channels, spatial)
        out[g.name] = (no_inputs.nonzero().flatten(), (~reads).nonzero().flatten())
    return out


def _constant(model: nn.Module, group: Group, unit: int) -> float:
    """What a unit without inputs outputs: act(bias)."""
    bias = dict(model.named_modules())[group.name].bias
    value = torch.tensor(0.0 if bias is None else float(bias.detach()[unit]), dtype=torch.float64)
    return float(activation(group, value))


@torch.no_grad()
def _fold(model: nn.Module, group: Group, unit: int, value: float) -> None:
    """Add a constant input unit's contribution to its linear consumers' biases."""
    modules = dict(model.named_modules())
    for c in group.consumers:
        linear = modules[c]
        spatial = (group.spatial or {}).get(c, 1)
        cols = linear.weight[:, unit * spatial : (unit + 1) * spatial]
        linear.bias += value * cols.sum(1)


def _removable(model: nn.Module, group: Group, no_inputs: Tensor, no_outputs: Tensor) -> list:
    """Dead units whose removal leaves the outputs exactly as they are (eval mode).

    Units without outputs always. Units without inputs output a constant act(bias): 0 is
    removable as is; another constant is folded into the next layers' biases when they are
    all linear (a conv's zero padding would make the constant's effect position-dependent).
    Only plain layers (no BatchNorm, no depthwise conv) are touched.
    """
    if group.norms or group.depthwise or len(group.producers) != 1:
        return []
    modules = dict(model.named_modules())
    linear_next = all(isinstance(modules[c], nn.Linear) for c in group.consumers)
    out = set(no_outputs.tolist())
    for unit in no_inputs.tolist():
        value = _constant(model, group, unit)
        if value == 0.0 or linear_next:
            if value != 0.0 and unit not in out:
                _fold(model, group, unit, value)
            out.add(unit)
    return sorted(out)


def _slice_masks(masks: Masks, group: Group, keep: Tensor) -> None:
    for key in (f"{p}.weight" for p in group.producers):
        if key in masks:
            masks.masks[key] = masks.masks[key][keep.to(masks.masks[key].device)]
    for c in group.consumers:
        key = f"{c}.weight"
        if key in masks:
            m = masks.masks[key]
            spatial = (group.spatial or {}).get(c, 1)
            cols = (keep[:, None] * spatial + torch.arange(spatial)).reshape(-1)
            masks.masks[key] = m[:, cols.to(m.device)]


def remove_dead(
    model: nn.Module, masks: Masks, groups: Sequence[Group]
) -> tuple[list[DeadUnits], dict[str, Tensor]]:
    """Remove dead units for real (structured); (report, kept indices per group).

    The model and the masks shrink in place; the kept indices are recorded as ``prune``
    edits by the caller, so the checkpoint rebuilds the smaller network.
    """
    report, keep = [], {}
    for g in groups:  # forward order; one group's removal never changes another's masks' units
        no_inputs, no_outputs = find_dead(model, masks, [g])[g.name]
        removed = _removable(model, g, no_inputs, no_outputs)
        if removed and len(removed) < g.channels:
            kept = torch.ones(g.channels, dtype=torch.bool)
            kept[removed] = False
            keep[g.name] = kept.nonzero().flatten()
            remove(model, g, keep[g.name])
            _slice_masks(masks, g, keep[g.name])
        report.append(DeadUnits(g.name, g.channels, tuple(no_inputs.tolist()),
                                tuple(no_outputs.tolist()), tuple(removed)))  # fmt: skip
    return report, keep


# -- the sparse checkpoint ----------------------------------------------------------------


def encode_sparse(state: Mapping[str, Tensor], masks: Masks) -> dict:
    """The state dict with every masked weight stored as a bitmask plus its kept values.

    A bitmask (numpy.packbits, 1 bit per connection) plus the kept values in their own
    dtype takes numel / 8 + 4 kept bytes for float32: 7.6x smaller than dense at 90%
    sparsity. Index lists only win above ~97% sparsity; one simple format is kept.
    Plain tensors and containers only: loads with torch.load(weights_only=True).

    Every tensor is a copy with a storage of its own: torch.save writes whole storages,
    and training keeps the weights as views of one flat buffer (the graft's), so a view
    kept as it is would take the whole buffer to disk.
    """
    dense, sparse = {}, {}
    for key, value in state.items():
        if key not in masks:
            dense[key] = value.detach().to("cpu", copy=True)
            continue
        mask = masks.masks[key].cpu()
        bits = torch.from_numpy(np.packbits(mask.flatten().numpy()))
        values = value.detach().cpu().flatten()[mask.flatten()]  # indexing copies
        sparse[key] = {"shape": list(value.shape), "bits": bits, "values": values}
    return {"format": SPARSE_FORMAT, "dense": dense, "sparse": sparse, "order": list(state)}


def _bits(item: Mapping) -> Tensor:
    numel = math.prod(item["shape"])
    return torch.from_numpy(np.unpackbits(item["bits"].numpy(), count=numel).astype(bool))


def masks_of_sparse(encoded: Mapping) -> Masks:
    """The masks a sparse checkpoint was pruned with (to retrain it with the zeros held)."""
    return Masks({k: _bits(v).reshape(v["shape"]) for k, v in encoded["sparse"].items()})


def decode_sparse(encoded: Mapping) -> dict[str, Tensor]:
    """The dense state dict back, bit for bit (pruned positions are +0.0)."""
    out = {}
    for key in encoded["order"]:
        if key in encoded["dense"]:
            out[key] = encoded["dense"][key]
            continue
        item = encoded["sparse"][key]
        mask = _bits(item)
        flat = torch.zeros(mask.numel(), dtype=item["values"].dtype)
        flat[mask] = item["values"]
        out[key] = flat.reshape(item["shape"])
    return out
