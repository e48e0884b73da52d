"""Distillation losses: teachers' knowledge (Hinton et al. 2015) and peers' outputs (Zhang et
al. 2018, Deep Mutual Learning). Pure tensor code: nothing here talks to other processes.

Cultivation (Meng et al., "Filter Grafting for Deep Neural Networks: Reason, Method, and
Cultivation", arXiv 2004.12311, section 3.5) trains students that graft each other every
epoch and distil from frozen teachers every step:

    L = CE + weight * KD,   KD = tau^2 * mean over the batch of
                                 ( - sum over classes c of pbar_c * log softmax(z / tau)_c )

with ``pbar`` the mean over teachers of ``softmax(teacher / tau)`` (``combine = "probs"``,
the paper) or the softmax of the mean teacher logits over tau (``"logits"``). The tau^2 keeps
the gradient's scale independent of tau (Hinton et al.). The authors' code differs in two
ways distgraft does not copy: its ``distillation.py`` averages teacher logits without
dividing them by tau, and ``grafting+.py`` sums the teachers instead of averaging them.

Deep Mutual Learning mixes outputs instead of weights: every step each network adds the mean
over its peers l of KL(p_l || p_own) at temperature 1 (summed over classes, mean over the
batch), the peers' probabilities held fixed (detached).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["COMBINE", "kd_loss", "teacher_targets", "mutual_loss"]

COMBINE = ("probs", "logits")


def _wide(t: Tensor) -> Tensor:
    """float32 at least: half and bfloat16 logits (autocast) are upcast, float64 kept."""
    return t if t.dtype == torch.float64 else t.float()


def teacher_targets(teacher_logits: Sequence[Tensor], tau: float, combine: str = "probs") -> Tensor:
    """The soft targets pbar [batch, classes] from one or several teachers' logits."""
    if not teacher_logits:
        raise ValueError("distillation needs at least one teacher's logits")
    if combine not in COMBINE:
        raise ValueError(f"combine = {combine!r}: allowed values are {', '.join(COMBINE)}")
    stacked = torch.stack([_wide(t.detach()) for t in teacher_logits])
    if combine == "logits":
        return F.softmax(stacked.mean(0) / tau, dim=1)
    return F.softmax(stacked / tau, dim=2).mean(0)


def kd_loss(
    student_logits: Tensor, teacher_logits: Sequence[Tensor], tau: float, combine: str = "probs"
) -> Tensor:
    """tau^2 * soft cross-entropy of the student at temperature tau against the teachers'
    combined targets, mean over the batch (the distillation term without its weight)."""
    if tau <= 0:
        raise ValueError(f"tau = {tau}: the temperature must be > 0")
    targets = teacher_targets(teacher_logits, tau, combine)
    log_p = F.log_softmax(_wide(student_logits) / tau, dim=1)
    return tau * tau * -(targets * log_p).sum(1).mean()


def mutual_loss(own_logits: Tensor, peer_logits: Sequence[Tensor]) -> Tensor:
    """Mean over peers of KL(p_peer || p_own) at temperature 1; sum over classes, mean over
    the batch; the peers' probabilities are constants (detached)."""
    if not peer_logits:
        raise ValueError("mutual learning needs at least one peer's logits")
    log_own = F.log_softmax(_wide(own_logits), dim=1)
    terms = []
    for peer in peer_logits:
        log_peer = F.log_softmax(_wide(peer.detach()), dim=1)
        terms.append((log_peer.exp() * (log_peer - log_own)).sum(1).mean())
    return torch.stack(terms).mean()
