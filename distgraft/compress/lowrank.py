"""Cross-filter low-rank approximation (Wen et al., "Coordinating Filters for Faster Deep
Neural Networks", ICCV 2017, after Jaderberg et al. 2014 and Zhang et al. 2016).

The N filters of a conv W [N, C, k, k], flattened, are the rows of M = W.reshape(N, Ckk).
With the SVD M = U S V^T, keeping the K largest singular values gives M ~ (U_K S_K) V_K^T:
the conv becomes a *basis* conv of K filters (the rows of V_K^T, no bias, the original
stride, padding and dilation) followed by a 1x1 conv that *combines* the K basis maps into
the N outputs (U_K S_K, with the original bias). Params and multiply-accumulates go from
N Ckk to K (Ckk + N) per output position; at K = rank(M) the outputs are unchanged.

K per layer comes from the cumulative energy of the singular values (the smallest K whose
sum of S^2 reaches the fraction ``energy`` of the total) or a fixed ``rank_ratio`` of the
full rank min(N, Ckk). Grouped (depthwise) convs and layers whose decomposition would not
be smaller are left alone. Force Regularization (``compress/force.py``) gathers the
filters' directions during training, so the same energy needs a smaller K.

The model's rank ratio is sum K / sum N over the convs considered, a kept conv counting
K = N: Wen et al. report about 50% for their networks.

Pure tensor code: nothing here imports torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LayerPlan",
    "choose_rank",
    "decompose",
    "beneficial",
    "plan_lowrank",
    "apply_lowrank",
    "apply_lowrank_edit",
    "rank_ratio",
]


@dataclass(frozen=True)
class LayerPlan:
    """What low-rank approximation does to one conv."""

    name: str
    """Module name (``layer2.3.conv1``)."""
    n: int
    """Filters N."""
    rank: int
    """K chosen for the layer (what it would keep, also when it is not decomposed)."""
    full_rank: int
    """min(N, C k k)."""
    decomposed: bool
    reason: str = ""
    """Why not decomposed: grouped, not smaller, excluded."""


def _matrix(weight: Tensor) -> Tensor:
    return weight.detach().reshape(weight.shape[0], -1).double()


def choose_rank(
    weight: Tensor, *, energy: float | None = None, rank_ratio: float | None = None
) -> int:
    """K for one conv weight, from the energy of its singular values or a rank ratio."""
    if (energy is None) == (rank_ratio is None):
        raise ValueError("give exactly one of energy (in (0, 1]) and rank_ratio (in (0, 1])")
    full = min(weight.shape[0], math.prod(weight.shape[1:]))
    if rank_ratio is not None:
        if not 0.0 < rank_ratio <= 1.0:
            raise ValueError(f"rank ratio {rank_ratio:g} is outside (0, 1]")
        return min(full, max(1, math.ceil(rank_ratio * full - 1e-9)))
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy {energy:g} is outside (0, 1]")
    s2 = torch.linalg.svdvals(_matrix(weight)) ** 2
    if not s2.any():
        return 1
    cumulative = s2.cumsum(0) / s2.sum()
    return min(full, int((cumulative < energy - 1e-12).sum()) + 1)


def _shells(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """The basis and combining convs for ``conv`` at rank K (weights not set)."""
    basis = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, bias=False, padding_mode=conv.padding_mode)  # fmt: skip
    combine = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
    like = conv.weight
    return nn.Sequential(basis, combine).to(device=like.device, dtype=like.dtype)


def _check(conv: nn.Module, rank: int, name: str = "conv") -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name} is a {type(conv).__name__}, not a Conv2d")
    if conv.groups != 1:
        raise ValueError(f"{name} is a grouped conv (groups={conv.groups}); LRA needs groups=1")
    full = min(conv.out_channels, math.prod(conv.weight.shape[1:]))
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} of {name} is outside [1, {full}]")


@torch.no_grad()
def decompose(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Sequential(basis conv of ``rank`` filters, 1x1 conv to the N outputs).

    The singular values go to the combining conv (U_K S_K), the basis filters are the
    orthonormal rows of V_K^T; the SVD runs in float64.
    """
    _check(conv, rank)
    u, s, vh = torch.linalg.svd(_matrix(conv.weight), full_matrices=False)
    out = _shells(conv, rank)
    basis, combine = out[0], out[1]
    basis.weight.copy_(vh[:rank].reshape(basis.weight.shape))
    combine.weight.copy_((u[:, :rank] * s[:rank]).reshape(combine.weight.shape))
    if conv.bias is not None:
        combine.bias.copy_(conv.bias)
    return out


def beneficial(conv: nn.Conv2d, rank: int) -> bool:
    """Whether rank K makes the layer smaller: K (C k k + N) < N C k k."""
    ckk = math.prod(conv.weight.shape[1:])
    return rank * (ckk + conv.out_channels) < conv.out_channels * ckk


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _validate(names: Sequence[str], convs: dict[str, nn.Conv2d], what: str) -> None:
    unknown = [n for n in names if n not in convs]
    if unknown:
        some = ", ".join(list(convs)[:6]) + (", ..." if len(convs) > 6 else "")
        raise ValueError(f"{what} {unknown[0]!r} is not a conv of this model (convs: {some})")


def plan_lowrank(
    model: nn.Module,
    *,
    energy: float | None = None,
    rank_ratio: float | None = None,
    layers: Sequence[str] | None = None,
    skip: Sequence[str] = (),
) -> list[LayerPlan]:
    """One plan per Conv2d of ``model``, in module order."""
    convs = _convs(model)
    _validate(layers or (), convs, "layer")
    _validate(skip, convs, "skipped layer")
    plans = []
    for name, conv in convs.items():
        full = min(conv.out_channels, math.prod(conv.weight.shape[1:]))
        if conv.groups != 1:
            plans.append(LayerPlan(name, conv.out_channels, full, full, False, "grouped"))
            continue
        k = choose_rank(conv.weight, energy=energy, rank_ratio=rank_ratio)
        reason = ""
        if name in skip or (layers and name not in layers):
            reason = "excluded"
        elif not beneficial(conv, k):
            reason = "not smaller"
        plans.append(LayerPlan(name, conv.out_channels, k, full, not reason, reason))
    return plans


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lowrank(model: nn.Module, plans: Sequence[LayerPlan]) -> list[dict]:
    """Replace every planned conv in place; the architecture edits that rebuild the model."""
    edits = []
    for p in plans:
        if p.decomposed:
            _set(model, p.name, decompose(model.get_submodule(p.name), p.rank))
            edits.append({"op": "lowrank", "layer": p.name, "rank": p.rank})
    return edits


def apply_lowrank_edit(model: nn.Module, edit: dict) -> None:
    """Replay one edit on a freshly built model: the same modules, weights to be loaded."""
    name, rank = edit["layer"], int(edit["rank"])
    try:
        conv = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the checkpoint decomposes {name!r}, which this model lacks") from None
    _check(conv, rank, repr(name))
    _set(model, name, _shells(conv, rank))


def rank_ratio(plans: Sequence[LayerPlan]) -> float:
    """sum K / sum N over the planned convs, a conv left alone counting K = N."""
    total = sum(p.n for p in plans)
    kept = sum(p.rank if p.decomposed else p.n for p in plans)
    return kept / total if total else 1.0
