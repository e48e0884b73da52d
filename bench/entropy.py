"""Benchmark: whole-layer entropy of every graftable layer of a model.

Compares, in one process and one run, on the graft plan's weights (conv + linear) of
ResNet-56 (CIFAR) and ResNet-50 (torchvision):

* ``distgraft``: ``distgraft.graft.entropy.layer_entropies``: all layers' min/max in one
  host sync, then per layer a bin index and one bincount, one entropy over all counts;
* ``reference``: the authors' style: per layer ``.min().item()``/``.max().item()``, then a
  Python loop over the bins with two comparisons and a ``.sum().item()`` each (one host sync
  per bin), then the entropy in Python;
* ``histc``: per layer ``torch.histc(w, bins, min=lo, max=hi)`` with lo/hi from ``.item()``,
  then one batched entropy over the stacked counts.

Each timing is the median of ``--repeats`` runs after warm-up; CUDA timings synchronise
before and after. Prints one JSON line per (model, device) on stdout and nothing else.

    .venv/bin/python bench/entropy.py --repeats 20 --device all
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from distgraft.graft.entropy import entropy_from_counts, layer_entropies
from distgraft.graft.math import graft_plan

BINS = 10


def reference_entropies(weights: list[Tensor], bins: int = BINS) -> list[float]:
    out = []
    for w in weights:
        lo = w.min().item()
        hi = w.max().item()
        step = (hi - lo) / bins
        n = w.numel()
        h = 0.0
        for k in range(bins):
            a, b = lo + k * step, lo + (k + 1) * step
            count = ((w >= a) & (w < b)).sum().item()
            if count:
                p = count / n
                h -= p * math.log(p)
        out.append(h)
    return out


def histc_entropies(weights: list[Tensor], bins: int = BINS) -> Tensor:
    counts = []
    for w in weights:
        lo = w.min().item()
        hi = w.max().item()
        counts.append(torch.histc(w, bins, min=lo, max=hi))
    return entropy_from_counts(torch.stack(counts)).float()


def resnet56() -> nn.Module:
    try:
        from distgraft.models import build_model
    except ImportError:
        return _resnet56_shapes()
    return build_model("resnet56", 10)


def _resnet56_shapes() -> nn.Module:
    """Fallback with the same conv/linear weight shapes as CIFAR ResNet-56 (option A)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, bias=False)]
    cin = 16
    for planes in (16, 32, 64):
        for _ in range(9):
            layers += [nn.Conv2d(cin, planes, 3, bias=False), nn.Conv2d(planes, planes, 3)]
            cin = planes
    layers.append(nn.Linear(64, 10))
    return nn.Sequential(*layers)


def resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def plan_weights(model: nn.Module, device: torch.device) -> list[Tensor]:
    model = model.to(device)
    state = model.state_dict()
    return [state[k].detach() for k in graft_plan(model).weights if state[k].dim() > 1]


def median_ms(
    fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int
) -> list[float]:
    """Median wall time of each function; the functions take turns in every repeat, so a
    load change on a shared machine hits all of them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for i in ((r + j) % len(fns) for j in range(len(fns))):
            sync()
            t0 = time.perf_counter()
            fns[i]()
            sync()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def bench(name: str, model: nn.Module, device: torch.device, repeats: int, warmup: int) -> dict:
    weights = plan_weights(model, device)
    ours = layer_entropies(weights, BINS)
    ref = torch.tensor(reference_entropies(weights, BINS))
    hist = histc_entropies(weights, BINS)
    # Sanity: the three agree up to the reference's missing max element (at most ln n / n,
    # see tests/test_entropy.py) and values that round to either side of a bin edge.
    n = torch.tensor([w.numel() for w in weights], dtype=torch.float64)
    bound = (n.log() / n + 1e-4).float()
    if bool(((ours.cpu() - ref).abs() > bound).any() or ((ours - hist).abs().cpu() > bound).any()):
        raise RuntimeError(f"{name}: implementations disagree")

    load = os.getloadavg()[0]
    t_ours, t_ref, t_hist = median_ms(
        [
            lambda: layer_entropies(weights, BINS).cpu(),
            lambda: reference_entropies(weights, BINS),
            lambda: histc_entropies(weights, BINS).cpu(),
        ],
        device,
        repeats,
        warmup,
    )
    return {
        "model": name,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "layers": len(weights),
        "numel": sum(w.numel() for w in weights),
        "repeats": repeats,
        "loadavg_1m": round(max(load, os.getloadavg()[0]), 2),
        "distgraft_ms": round(t_ours, 3),
        "reference_ms": round(t_ref, 3),
        "histc_ms": round(t_hist, 3),
        "reference_over_distgraft": round(t_ref / t_ours, 2),
        "histc_over_distgraft": round(t_hist / t_ours, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="all = CPU, plus CUDA when torch.cuda.is_available()",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        devices.append(torch.device("cuda"))

    torch.manual_seed(0)
    models = {"resnet56": resnet56(), "resnet50": resnet50()}
    for device in devices:
        for name, model in models.items():
            print(json.dumps(bench(name, model, device, args.repeats, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
