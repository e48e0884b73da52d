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

import math
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
    "filter_tail",
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
        _raise_non_finite(bad.nonzero().flatten().tolist(), what)


def _raise_non_finite(idx: list[int], what: str) -> None:
    raise ValueError(
        f"{what} {idx[:8]} contain NaN or Inf values; entropy is only defined for "
        "finite weights (did training diverge?)"
    )


_F32_MAX = torch.finfo(torch.float32).max


def _binning_dtype(dtype: torch.dtype, width: float, bins: int) -> torch.dtype:
    """float32 for the binning unless the input is float64 or float32 would overflow.

    Half and bfloat16 are upcast: their 8-11 bit mantissas misplace values near bin edges
    and bins / width overflows float16 for ranges below 1.5e-4.
    """
    if dtype == torch.float64:
        return dtype
    if width >= _F32_MAX or bins / width >= _F32_MAX:
        return torch.float64  # a range beyond float32, or one of a few subnormals
    return torch.float32


def _bin_index(x: Tensor, lo: Tensor | float, scale: Tensor | float, bins: int) -> Tensor:
    """Bin of each value, in [0, bins): ``(x - lo) * scale`` with scale = bins / (hi - lo).

    x >= lo, so the product is >= 0 and the integer cast truncates like floor; the clamp
    puts the maximum (product == bins) into the last bin. int32 indices make the cast and
    bincount about 5x cheaper than int64 on CPU. scale = 0 (a constant tensor) puts
    everything into bin 0, so its entropy is 0.
    """
    return ((x - lo) * scale).clamp_max_(bins - 1).to(torch.int32)


def _flat_view(t: Tensor) -> Tensor:
    """All elements as 1-D, without a copy for dense layouts (channels_last included).

    A histogram does not care about element order, so a channels_last conv weight can be
    read straight from its storage instead of being copied into NCHW order first.
    """
    if t.is_contiguous():
        return t.view(-1)
    if t.is_contiguous(memory_format=torch.channels_last) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.reshape(-1)


def _histogram(w: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """Counts of one flat tensor in ``bins`` equal-width bins on [lo, hi]."""
    width = hi - lo  # Python float (double): no overflow for any float32 range
    if width <= 0:  # a constant tensor: everything in bin 0, entropy 0
        counts = torch.zeros(bins, dtype=torch.long, device=w.device)
        counts[0] = w.numel()
        return counts
    dtype = _binning_dtype(w.dtype, width, bins)
    return torch.bincount(_bin_index(w.to(dtype), lo, bins / width, bins), minlength=bins)


def layer_entropies(tensors: Sequence[Tensor], bins: int = 10) -> Tensor:
    """Whole-layer histogram entropy of each tensor.

    Args:
        tensors: the layers' weight tensors (any shapes and layouts, one device).
        bins: number of equal-width bins B (>= 2); the result lies in [0, ln B].

    Returns:
        float32 tensor of shape [len(tensors)] on the tensors' device.

    All layers' min/max are computed on the device and read back in one host sync (which
    also rejects NaN/Inf with a clear error); then each layer is binned with its bounds as
    scalars and counted with one bincount, and one entropy runs over the stacked [L, B]
    counts. One bincount over all layers concatenated would need per-element copies of the
    bounds: that memory traffic costs more than the few hundred small kernels it saves.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if len(tensors) == 0:
        return torch.zeros(0)
    flat = [_flat_view(t.detach()) for t in tensors]
    if any(w.numel() == 0 for w in flat):
        raise ValueError("layer_entropies got an empty tensor; every layer needs weights")
    bounds = torch.stack([torch.stack(torch.aminmax(w)).double() for w in flat]).tolist()
    bad = [i for i, (lo, hi) in enumerate(bounds) if not (math.isfinite(lo) and math.isfinite(hi))]
    if bad:
        _raise_non_finite(bad, "layers")
    counts = [_histogram(w, lo, hi, bins) for w, (lo, hi) in zip(flat, bounds, strict=True)]
    return entropy_from_counts(torch.stack(counts)).float()


def filter_entropies(weight: Tensor, bins: int = 10) -> Tensor:
    """Histogram entropy of each output filter (dim 0) of a weight tensor.

    Each filter gets its own bins between its own min and max (the per-filter entropy of
    the paper's eq. 4), binned exactly like ``layer_entropies`` bins a layer, so a filter
    gives the same entropy either way. Returns float32 [out_channels].
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    w = weight.detach().reshape(weight.shape[0], -1)
    lo, hi = torch.aminmax(w, dim=1)
    lo, hi = lo.double(), hi.double()
    _check_finite(lo, hi, "filters")
    width = hi - lo
    scale = torch.where(width > 0, bins / width, torch.zeros_like(width))
    unsafe = (width >= _F32_MAX) | (scale >= _F32_MAX)
    dtype = torch.float64 if w.dtype == torch.float64 or bool(unsafe.any()) else torch.float32
    idx = _bin_index(w.to(dtype), lo.to(dtype)[:, None], scale.to(dtype)[:, None], bins)
    idx += torch.arange(w.shape[0], device=w.device, dtype=torch.int32)[:, None] * bins
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


TAIL_THRESHOLDS = (0.01, 0.1, 1.0)


def filter_tail(weights: Sequence[Tensor]) -> dict[str, float | int]:
    """The low end of the filter-L1 distribution of ``weights`` (conv layers), in one sync.

    Counts below the grafting paper's thresholds 0.01 and 0.1 (its "invalid" filters) and
    below 1, and the minimum, 1st and 5th percentile: a drift of the weakest filters shows
    here long before any filter crosses the paper's thresholds. Non-finite filters raise.
    """
    if len(weights) == 0:
        return {}
    l1 = torch.cat([filter_l1(w) for w in weights]).double()
    stats = torch.cat([
        (l1[None, :] < torch.tensor(TAIL_THRESHOLDS, dtype=l1.dtype, device=l1.device)[:, None])
        .sum(1).double(),
        l1.min()[None],
        torch.quantile(l1, torch.tensor([0.01, 0.05], dtype=l1.dtype, device=l1.device)),
    ]).tolist()  # fmt: skip
    below = {f"below_{t:g}": int(n) for t, n in zip(TAIL_THRESHOLDS, stats, strict=False)}
    return {**below, "min": stats[3], "p1": stats[4], "p5": stats[5], "filters": l1.numel()}
