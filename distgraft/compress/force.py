"""Force Regularization (Wen et al., "Coordinating Filters for Faster Deep Neural Networks",
ICCV 2017).

Low-rank approximation removes what the filters of a layer have in common; training
leaves them spread out, so much of the energy sits in many small singular values. Force
Regularization treats the filters of a layer as particles that attract each other during
training, so their directions gather and a low-rank approximation afterwards keeps fewer
basis filters at the same accuracy. Only directions move: each force is projected on the
tangent of the filter's sphere, so the filter norms are left to the data loss.

With filter i flattened to W_i, its direction w_i = W_i / |W_i| and d = |w_j - w_i|:

    f_ji = (w_j - w_i) s(d)        s = 1 (degradation), 1/d (constant), 1/d^2 (linear),
                                        1/d^3 (gravity); pairs at one point add nothing
    Delta W_i = |W_i| sum_j (f_ji - (f_ji . w_i) w_i)

Two filters are at one point when their directions are closer than sqrt(eps) of the
weights' dtype (3.5e-4 in float32, 1.5e-8 in float64), i.e. when scaled to the same norm
they differ by less than that fraction of it. Directions are rounded to about eps, so a
closer distance has fewer than half its digits right: 2.5 x a filter lies 1e-7 from it in
float32, and 1/d^3 of that rounding noise would swamp the layer. Every pair that does
count is at least sqrt(eps) apart, which bounds its pull |w_j - w_i| s(d) by
eps^((1 - p) / 2) for s = d^-p (p > 1; at most 2 otherwise), and float32 gives the float64
force with the pairs below its resolution left out.

Training subtracts ``force_decay x Delta W`` from the gradient (Wen et al.'s lambda_s), so
an SGD step moves every filter towards the others. The sums over j are matrix products
over all pairs at once (a Gram matrix; no N x N x D tensor, no Python loop over filters),
on whatever device the weights live. Pure tensor code: nothing here imports
torch.distributed; the trainer adds the term after DDP averaged the gradients, so every
replica of a network adds the same force.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "FORCE_LAYERS",
    "force_term",
    "same_point",
    "force_layers",
    "add_force_to_grads_",
    "rank_at_energy",
]

KINDS = ("degradation", "constant", "linear", "gravity")
"""The scaling s(d) of the attraction: 1, 1/d, 1/d^2, 1/d^3 (Wen et al. section 3.1)."""
FORCE_LAYERS = ("conv", "conv+linear")
"""The layers whose filters attract each other."""

_POWER = {"degradation": 0, "constant": 1, "linear": 2, "gravity": 3}


def same_point(dtype: torch.dtype) -> float:
    """Distance of unit directions below which two filters are one point: sqrt(eps)."""
    return torch.finfo(dtype).eps ** 0.5


@torch.no_grad()
def force_term(weight: Tensor, kind: str = "degradation") -> Tensor:
    """Delta W of every filter of one layer (same shape and dtype as ``weight``)."""
    if kind not in _POWER:
        raise ValueError(f"force kind {kind!r}: allowed {', '.join(KINDS)}")
    W = weight.detach().reshape(weight.shape[0], -1)
    norm = W.norm(dim=1, keepdim=True)
    w = _directions(W)
    if kind == "degradation":  # s = 1 for every pair: sum_j (w_j - w_i) = S - N w_i
        pull = w.sum(0, keepdim=True) - w.shape[0] * w
    else:
        pull = _scaled_pull(w, _POWER[kind])
    tangent = pull - (pull * w).sum(1, keepdim=True) * w
    return (norm * tangent).reshape(weight.shape)


def _directions(W: Tensor) -> Tensor:
    """Unit rows (0 for a zero row). Each row is first divided by its largest |entry|, so
    the squares of a tiny filter neither underflow nor lose the direction's digits."""
    peak = W.abs().amax(dim=1, keepdim=True)
    scaled = W / torch.where(peak > 0, peak, 1.0)
    norm = scaled.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, scaled / torch.where(norm > 0, norm, 1.0), 0.0)


def _scaled_pull(w: Tensor, power: int) -> Tensor:
    """sum_j (w_j - w_i) / d_ij^power = A w - rowsum(A) w_i with A_ij = d_ij^-power, over
    the pairs farther apart than ``same_point`` (the others are one point)."""
    # Differences, not the Gram matrix: 2 - 2 w_i.w_j cancels to ~sqrt(eps) for nearly equal
    # directions, which is all the resolution there is.
    d = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")
    tol = same_point(w.dtype)
    scale = torch.where(d > tol, d.clamp_min(tol).pow(-power), 0.0)
    return scale @ w - scale.sum(1, keepdim=True) * w


def force_layers(model: nn.Module, which: str = "conv") -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of the layers Force Regularization applies to.

    ``conv``: every Conv2d with groups == 1 (a depthwise filter sees one channel, so its
    filters share no space to gather in); ``conv+linear``: Linear layers too (rows).
    """
    if which not in FORCE_LAYERS:
        raise ValueError(f"force layers {which!r}: allowed {', '.join(FORCE_LAYERS)}")
    out = []
    for name, m in model.named_modules():
        plain_conv = isinstance(m, nn.Conv2d) and m.groups == 1
        if plain_conv or (which == "conv+linear" and isinstance(m, nn.Linear)):
            out.append((f"{name}.weight", m.weight))
    return out


@torch.no_grad()
def add_force_to_grads_(weights: Iterable[Tensor], decay: float, kind: str = "degradation") -> None:
    """grad -= decay x Delta W for each weight (a missing grad becomes -decay x Delta W)."""
    if decay == 0:
        return
    for p in weights:
        force = force_term(p, kind).mul_(-decay)
        if p.grad is None:
            p.grad = force
        else:
            p.grad.add_(force)


def rank_at_energy(weight: Tensor, energy: float = 0.95) -> int:
    """Singular values of the N x (C k k) filter matrix needed to hold ``energy`` of the
    sum of their squares: the K a low-rank approximation at that energy keeps."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy {energy:g} is outside (0, 1]")
    s = torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).double())
    if not s.any():
        return 0
    cumulative = (s * s).cumsum(0) / (s * s).sum()
    return int((cumulative < energy - 1e-12).sum()) + 1
