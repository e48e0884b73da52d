"""How important each filter of a group is: the pruning criteria.

Higher score = more important = kept. The criteria:

* ``l1`` (Li et al. 2017): sum of |w| over the filter's kernels. ``l2``: its Euclidean
  norm; Li et al. find both rank filters about the same.
* ``entropy``: the histogram entropy of the filter's weights, grafting's per-filter
  information (Meng et al. 2020): a filter with little information goes first.
* ``apoz`` (Hu et al. 2016): the Average Percentage of Zeros of the channel's activation
  over a held-out set; a channel that is mostly zero does little, so the score is -APoZ.
* ``invalid``: grafting's definition of an invalid filter, L1 norm below a threshold;
  every such filter goes, whatever the ratio (see ``prune.select``).

The weight criteria look at the leader conv of a group (for a residual stream, the
projection shortcut: Li's "the second layer follows the shortcut"). With Li's *greedy*
strategy the input kernels that read channels an earlier layer already removed are left
out of the sum (``ignore_inputs``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from distgraft.compress.names import CRITERIA, WEIGHT_CRITERIA
from distgraft.compress.structure import Group, activation
from distgraft.graft.entropy import filter_entropies

__all__ = ["CRITERIA", "WEIGHT_CRITERIA", "filter_scores", "apoz"]



def _filters(weight: Tensor, ignore_inputs: Tensor | None) -> Tensor:
    """[filters, rest] view of a weight, without the input channels to ignore."""
    w = weight.detach()
    if ignore_inputs is not None and ignore_inputs.numel():
        keep = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        keep[ignore_inputs.to(w.device)] = False
        w = w[:, keep]
    return w.reshape(w.shape[0], -1).float()


def filter_scores(
    model: nn.Module, group: Group, kind: str, ignore_inputs: Tensor | None = None
) -> Tensor:
    """Score of each channel of ``group`` by a weight criterion (float32, on the weights' device).

    ``invalid`` scores by L1 like ``l1``; which filters it removes is decided by the
    threshold in ``prune.select``.
    """
    weight = dict(model.named_modules())[group.name].weight
    w = _filters(weight, ignore_inputs)
    if kind in ("l1", "invalid"):
        return w.abs().sum(1)
    if kind == "l2":
        return w.pow(2).sum(1).sqrt()
    if kind == "entropy":
        return filter_entropies(w)
    raise ValueError(f"criterion {kind!r} is not a weight criterion; allowed: {WEIGHT_CRITERIA}")


@torch.no_grad()
def apoz(
    model: nn.Module, groups: Sequence[Group], batches: Iterable[tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """APoZ of every channel of every group, in [0, 1], over all images of ``batches``.

    A forward hook on each group's ``act`` module (the BatchNorm after the conv, or the
    layer itself when nothing normalises it) applies the activation that really follows
    and counts exact zeros per channel: for conv -> BN -> ReLU that is after the ReLU, not
    on the raw conv output. Counts accumulate on the device; one host read at the end.
    The model runs in eval mode (BatchNorm uses its running statistics).
    """
    modules = dict(model.named_modules())
    missing = [g.name for g in groups if g.act is None]
    if missing:
        raise ValueError(
            f"APoZ is not defined for {', '.join(missing)}: the channels are a residual sum, "
            "not the output of one activation; use a weight criterion (l1, l2, entropy)"
        )
    zeros: dict[str, Tensor] = {}
    seen: dict[str, int] = dict.fromkeys((g.name for g in groups), 0)
    hooks = []
    for g in groups:

        def hook(m: nn.Module, args: tuple, out: Tensor, g: Group = g) -> None:
            a = activation(g, out)
            dims = [0, *range(2, a.dim())]  # everything but the channel dimension
            count = (a == 0).sum(dims)
            zeros[g.name] = zeros[g.name] + count if g.name in zeros else count
            seen[g.name] += a.numel() // a.shape[1]

        hooks.append(modules[g.act].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not zeros:
        raise ValueError("APoZ needs at least one batch of held-out data")
    return {name: zeros[name].double().cpu() / seen[name] for name in zeros}
