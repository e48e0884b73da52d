"""Information criteria of layers and filters: histogram entropy and L1.

Grafting decides how much of a peer layer to take from how much "information" each
layer holds (Meng et al. 2020, eq. 6). The entropy of a layer is the entropy of the
histogram of *all* its weights (B equal-width bins between the layer's min and max),
not the sum of per-filter entropies, so that the layer is judged as a whole.

Everything here is pure tensor code: batched over layers, no Python loop over bins and no
host synchronisation per layer, so it runs as well on CUDA as on CPU. The only host sync
is one finiteness check per call, which turns a NaN weight into a clear error instead of
a silently meaningless coefficient.

Bins follow ``torch.histc``: the maximum value is counted in the last bin. The authors'
code uses half-open bins, so its probabilities miss one element per layer and sum to
slightly less than one; see ``tests/test_entropy.py`` for the tolerance that implies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "layer_entropies",
    "filter_entropies",
    "layer_l1",
    "filter_l1",
    "entropy_from_counts",
    "invalid_filters",
]


def entropy_from_counts(counts: Tensor) -> Tensor:
    """Natural-log entropy of histograms along the last dim, with 0 log 0 = 0."""
    counts = counts.to(torch.float64)
    total = counts.sum(-1, keepdim=True).clamp_min(1.0)
    p = counts / total
    return -torch.special.xlogy(p, p).sum(-1) + 0.0  # + 0.0 turns -0.0 into 0.0


def _check_finite(lo: Tensor, hi: Tensor, what: str) -> None:
    """One host sync for the whole batch: min/max propagate NaN and Inf."""
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{what} {idx[:8]} contain NaN or Inf values; entropy is only defined for "
            "finite weights (did training diverge?)"
        )


def _bin_index(x: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Bin of each value, in [0, bins): equal-width bins on [lo, hi], max in the last bin.

    A constant tensor (hi == lo) puts everything in bin 0, so its entropy is 0.
    """
    width = hi - lo
    scale = torch.where(width > 0, bins / width, torch.zeros_like(width))
    # Compute in float64 for float64 input only; float32 is exact enough for 10-1000 bins.
    idx = ((x - lo) * scale).floor_().clamp_(0, bins - 1)
    return idx.to(torch.int64)


def layer_entropies(tensors: Sequence[Tensor], bins: int = 10) -> Tensor:
    """Whole-layer histogram entropy of each tensor, in one batched pass.

    Args:
        tensors: the layers' weight tensors (any shapes, one device, floating dtype).
        bins: number of equal-width bins B (>= 2); the result lies in [0, ln B].

    Returns:
        float32 tensor of shape [len(tensors)] on the tensors' device.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if len(tensors) == 0:
        return torch.zeros(0)
    flat = [t.detach().reshape(-1) for t in tensors]
    device = flat[0].device
    if any(f.numel() == 0 for f in flat):
        raise ValueError("layer_entropies got an empty tensor; every layer needs weights")
    ext = torch.stack([torch.stack(torch.aminmax(f)) for f in flat]).float()  # [L, 2]
    lo, hi = ext[:, 0], ext[:, 1]
    _check_finite(lo, hi, "layers")
    sizes = torch.tensor([f.numel() for f in flat], device=device)
    values = torch.cat([f.float() for f in flat])
    lo_e = torch.repeat_interleave(lo, sizes, output_size=values.numel())
    hi_e = torch.repeat_interleave(hi, sizes, output_size=values.numel())
    offset = torch.repeat_interleave(
        torch.arange(len(flat), device=device) * bins, sizes, output_size=values.numel()
    )
    idx = _bin_index(values, lo_e, hi_e, bins).add_(offset)
    counts = torch.bincount(idx, minlength=len(flat) * bins).view(len(flat), bins)
    return entropy_from_counts(counts).float()


def filter_entropies(weight: Tensor, bins: int = 10) -> Tensor:
    """Histogram entropy of each output filter (dim 0) of a weight tensor.

    Each filter gets its own bins between its own min and max (the per-filter entropy of
    the paper's eq. 4). Returns float32 [out_channels].
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    w = weight.detach().reshape(weight.shape[0], -1).float()
    lo, hi = torch.aminmax(w, dim=1)
    _check_finite(lo, hi, "filters")
    idx = _bin_index(w, lo[:, None], hi[:, None], bins)
    idx += torch.arange(w.shape[0], device=w.device)[:, None] * bins
    counts = torch.bincount(idx.reshape(-1), minlength=w.shape[0] * bins)
    return entropy_from_counts(counts.view(w.shape[0], bins)).float()


def layer_l1(tensors: Sequence[Tensor]) -> Tensor:
    """Mean absolute weight of each layer.

    The mean rather than the sum keeps layers of different sizes comparable, so the
    coefficient reacts to how large the weights are, not to how many there are.
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    out = torch.stack([t.detach().abs().float().mean() for t in tensors])
    _check_finite(out, out, "layers")
    return out


def filter_l1(weight: Tensor) -> Tensor:
    """L1 norm (sum of |w|) of each output filter; the pruning literature's criterion."""
    out = weight.detach().reshape(weight.shape[0], -1).abs().float().sum(1)
    _check_finite(out, out, "filters")
    return out


def invalid_filters(weights: Sequence[Tensor], thresholds: Sequence[float]) -> list[int]:
    """Number of filters with L1 norm below each threshold (the paper's "invalid" filters).

    One host sync for all layers and thresholds.
    """
    if len(weights) == 0:
        return [0 for _ in thresholds]
    l1 = torch.cat([filter_l1(w) for w in weights])
    limits = torch.tensor(list(thresholds), device=l1.device, dtype=l1.dtype)
    return (l1[None, :] < limits[:, None]).sum(1).tolist()
