"""Counting what compression buys: parameters, FLOPs and latency.

FLOPs follow Li et al. (2017), Table 1: the multiply-accumulates of conv and linear layers
for one image at the dataset's input size (per conv: output elements x in_channels/groups x
k x k; per linear: in x out per output row). BatchNorm, activations, pooling and additions
are not counted, which is why library counters (thop, fvcore, ptflops, Torch-Pruning's)
come out 0.2-1.7% higher than the paper on the same networks. With this convention the
counter reproduces Table 1's absolute numbers (ResNet-56: 125,485,696; VGG-16: 313,201,664).

Two parameter counts: ``params`` is every parameter (``sum(p.numel())``, what users
expect), ``paper_params`` only the conv and linear weights and biases, the count of Li's
table (no BatchNorm).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "WEIGHTED",
    "Counts",
    "count",
    "layer_flops",
    "hooked_forward",
    "count_params",
    "paper_params",
    "latency_ms",
]

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The layers whose multiply-accumulates and weights count."""


@dataclass(frozen=True)
class Counts:
    """Size and cost of a model for one input of ``input_shape`` (C, H, W)."""

    params: int
    """Every parameter (BatchNorm included)."""
    paper_params: int
    """Conv and linear weights and biases: the parameters of Li et al.'s Table 1."""
    flops: int
    """Multiply-accumulates of conv and linear layers for one image."""

    def reduction(self, after: Counts) -> dict[str, float]:
        """Percent fewer params / paper params / FLOPs in ``after`` (Li's "pruned %")."""
        def pct(a: int, b: int) -> float:
            return 100.0 * (a - b) / a if a else 0.0

        return {
            "params": pct(self.params, after.params),
            "paper_params": pct(self.paper_params, after.paper_params),
            "flops": pct(self.flops, after.flops),
        }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def paper_params(model: nn.Module) -> int:
    """Weights and biases of conv and linear layers only."""
    total = 0
    for m in model.modules():
        if isinstance(m, WEIGHTED):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    return total


def _macs(module: nn.Module, output: Tensor) -> int:
    """Multiply-accumulates of one conv/linear call, per image (batch of 1)."""
    if isinstance(module, nn.Linear):
        rows = output.numel() // output.shape[-1]
        return rows * module.in_features * module.out_features
    kernel = module.weight[0].numel()  # in_channels / groups x k x k
    return output.numel() * kernel


@torch.no_grad()
def hooked_forward(
    model: nn.Module,
    input_shape: Sequence[int],
    wanted: Callable[[str, nn.Module], bool],
    seen: Callable[[str, nn.Module, Tensor], None],
) -> None:
    """One eval-mode forward pass of a zero image, ``seen(name, module, output)`` after every
    call of a module for which ``wanted(name, module)`` holds.

    Shapes and multiply-accumulates depend on the architecture, not on the values, so one
    image of zeros tells them for any model: the FLOPs here and the feature-map sizes of
    ``structure.groups_of`` are read off this pass. The model's mode is restored and the
    hooks removed, also when the forward pass fails.
    """
    hooks = []
    for name, module in model.named_modules():
        if wanted(name, module):

            def hook(m: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                seen(name, m, out)

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def layer_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs of each conv/linear module (by name) for one image of ``input_shape``.

    A module called twice is counted twice.
    """
    flops: dict[str, int] = {}

    def seen(name: str, module: nn.Module, out: Tensor) -> None:
        flops[name] = flops.get(name, 0) + _macs(module, out)

    hooked_forward(model, input_shape, lambda _, m: isinstance(m, WEIGHTED), seen)
    return flops


def count(model: nn.Module, input_shape: Sequence[int]) -> Counts:
    """Params, paper params and FLOPs of ``model`` for one image of ``input_shape``."""
    return Counts(
        params=count_params(model),
        paper_params=paper_params(model),
        flops=sum(layer_flops(model, input_shape).values()),
    )


@torch.no_grad()
def latency_ms(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall time of one eval-mode forward pass of a batch, in milliseconds.

    The median over ``repeats`` passes (after ``warmup`` untimed ones) resists the odd
    slow pass on a shared machine; on CUDA every pass is synchronised before it is timed.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    times = []
    try:
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1e3 * statistics.median(times)
