"""The grafting math: coefficients, which tensors graft together, and the three sources.

Pure tensor code: nothing here imports ``torch.distributed``. ``distgraft.comm.ring``
moves peer tensors between processes; this module decides what to do with them.

Terms (Meng et al. 2020): a *scion* is the information grafted into a network; its
*source* is another network (external), Gaussian noise, or the network's own strong
filters (internal). ``alpha`` is the share a network keeps of itself:
``W' = alpha * W + (1 - alpha) * W_scion``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distgraft.graft.entropy import filter_entropies, filter_l1, layer_entropies, layer_l1

__all__ = [
    "coefficient",
    "GraftLayer",
    "GraftPlan",
    "graft_plan",
    "criterion",
    "graft_noise_",
    "graft_internal_",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def coefficient(
    h_self: Tensor | float, h_peer: Tensor | float, a: float = 0.4, c: float = 500.0
) -> Tensor:
    """alpha = a/pi * arctan(c * (h_self - h_peer)) + 0.5  (paper eq. 7 with A = a/pi).

    0.5 for equal information, more than 0.5 when self holds more, and always inside
    (0.5 - a/2, 0.5 + a/2) so that each network keeps part of itself. c = 500 is the
    authors' value; it saturates at entropy gaps of ~0.01, c = 1 is smoother.
    """
    d = torch.as_tensor(h_self, dtype=torch.float32) - torch.as_tensor(h_peer, dtype=torch.float32)
    return (a / math.pi) * torch.atan(c * d) + 0.5


@dataclass(frozen=True)
class GraftLayer:
    """One unit that shares an alpha: a conv/linear weight and what follows it.

    ``members`` are state keys (``model.state_dict()`` names) mixed with this layer's
    alpha: the weight first, then its bias, then the weight, bias, running_mean and
    running_var of the normalisation layer that follows it.
    """

    name: str
    weight: str
    members: tuple[str, ...]
    filters: int
    conv: bool


@dataclass(frozen=True)
class GraftPlan:
    """Every graftable tensor of a model, grouped into layers, in state order."""

    layers: tuple[GraftLayer, ...]

    @property
    def keys(self) -> list[str]:
        return [k for layer in self.layers for k in layer.members]

    @property
    def weights(self) -> list[str]:
        return [layer.weight for layer in self.layers]

    def layer_of(self) -> dict[str, int]:
        return {k: i for i, layer in enumerate(self.layers) for k in layer.members}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _float_tensors(module: nn.Module, name: str) -> list[tuple[str, Tensor]]:
    """The module's own floating parameters and buffers, as (state key, tensor)."""
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return [(_prefix(name) + n, t) for n, t in own if t is not None and t.is_floating_point()]


def graft_plan(model: nn.Module) -> GraftPlan:
    """Find the graftable layers of ``model`` by module type, not by parameter name.

    Conv and Linear weights get their own alpha; a norm layer (BatchNorm, GroupNorm,
    LayerNorm) that follows a conv/linear with as many channels joins it, so its affine
    parameters and running statistics move with the filters they normalise; integer
    buffers (num_batches_tracked) are never mixed. Any other floating tensor (a norm with
    nothing before it, an embedding, a class token) forms a layer of its own, judged by
    its own criterion. Works for any architecture, including ``features.N`` naming.
    """
    layers: list[dict] = []
    last: dict | None = None  # the latest conv/linear layer still open for a norm
    for name, module in model.named_modules():
        tensors = _float_tensors(module, name)
        if isinstance(module, (*_CONV, nn.Linear)):
            last = {
                "name": name,
                "weight": _prefix(name) + "weight",
                "members": [k for k, _ in tensors if k.endswith(".weight") or k == "weight"]
                + [k for k, _ in tensors if not (k.endswith(".weight") or k == "weight")],
                "filters": module.weight.shape[0],
                "conv": isinstance(module, _CONV),
                "has_norm": False,
            }
            layers.append(last)
        elif isinstance(module, _NORM) and tensors:
            channels = _norm_channels(module)
            if last is not None and not last["has_norm"] and channels == last["filters"]:
                last["members"].extend(k for k, _ in tensors)
                last["has_norm"] = True
            else:
                layers.extend(_standalone(name, tensors))
        else:
            layers.extend(_standalone(name, tensors))
    return GraftPlan(
        tuple(
            GraftLayer(d["name"], d["weight"], tuple(d["members"]), d["filters"], d["conv"])
            for d in layers
        )
    )


def _norm_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    shape = module.normalized_shape  # LayerNorm
    return shape[-1] if len(shape) == 1 else None


def _standalone(name: str, tensors: list[tuple[str, Tensor]]) -> list[dict]:
    """Each leftover floating tensor is a layer judged by itself."""
    return [
        {
            "name": key,
            "weight": key,
            "members": [key],
            "filters": t.shape[0] if t.dim() > 0 else 1,
            "conv": False,
            "has_norm": True,
        }
        for key, t in tensors
    ]


def criterion(
    weights: Sequence[Tensor], kind: str = "entropy", level: str = "layer", bins: int = 10
) -> Tensor:
    """Information of each layer ([L]) or of each filter of each layer ([sum filters]).

    ``kind`` is "entropy" (histogram entropy) or "l1" (mean |w| per layer; per filter the
    mean |w| of the filter, i.e. its L1 norm over its size, so that filters of different
    layers are on one scale).
    """
    if kind not in ("entropy", "l1"):
        raise ValueError(f"criterion must be 'entropy' or 'l1', got {kind!r}")
    if level == "layer":
        return layer_entropies(weights, bins) if kind == "entropy" else layer_l1(weights)
    if level != "filter":
        raise ValueError(f"level must be 'layer' or 'filter', got {level!r}")
    parts = []
    for w in weights:
        w2 = w.reshape(w.shape[0], -1) if w.dim() > 0 else w.reshape(1, 1)
        if kind == "entropy":
            parts.append(filter_entropies(w2, bins))
        else:
            parts.append(filter_l1(w2) / w2.shape[1])
    return torch.cat(parts) if parts else torch.zeros(0)


def graft_noise_(
    weights: Sequence[Tensor], gamma: float, sigma: float, generator: torch.Generator | None = None
) -> Tensor:
    """Noise source: add N(0, sigma) to every filter whose L1 norm is below gamma.

    Returns the number of invalid filters per layer (tensor; no host sync). The paper
    decays sigma as a_noise ** epoch, so noise revives dead filters early and fades.
    """
    counts = []
    for w in weights:
        invalid = filter_l1(w) < gamma
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
        noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            w.add_(noise * (sigma * invalid.reshape(shape).to(w.dtype)))
        counts.append(invalid.sum())
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.long)


def graft_internal_(
    weights: Sequence[Tensor],
    gamma: float,
    kind: str = "entropy",
    a: float = 0.4,
    c: float = 500.0,
    bins: int = 10,
) -> Tensor:
    """Internal source: the i-th strongest filter of a layer is grafted into its i-th weakest.

    Filters are ranked by L1 norm; only weak filters below gamma receive a scion, and only
    from the stronger half, with the usual coefficient computed from the two filters'
    criterion. Returns invalid filter counts per layer. The paper finds this weak: the
    network gains no information it did not have.
    """
    counts = []
    for w in weights:
        if w.dim() == 0 or w.shape[0] < 2:
            counts.append(torch.zeros((), dtype=torch.long, device=w.device))
            continue
        w2 = w.detach().reshape(w.shape[0], -1)
        l1 = filter_l1(w2)
        order = torch.argsort(l1)
        k = w.shape[0] // 2
        weak, strong = order[:k], order.flip(0)[:k]
        info = criterion([w2], kind, "filter", bins)
        alpha = coefficient(info[weak], info[strong], a, c).to(w.dtype)[:, None]
        alpha = torch.where((l1[weak] < gamma)[:, None], alpha, torch.ones_like(alpha))
        grafted = w2.clone()
        grafted[weak] = alpha * w2[weak] + (1 - alpha) * w2[strong]
        with torch.no_grad():  # copy back: reshape may have copied a channels_last weight
            w.copy_(grafted.reshape(w.shape))
        counts.append((l1 < gamma).sum())
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.long)
