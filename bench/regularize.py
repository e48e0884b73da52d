"""What training-time compression costs per step: Force Regularization and sparse masks.

One ResNet-56 training step (CIFAR shapes, SGD with momentum and weight decay) in three
forms, timed in one run with the repetitions interleaved so that machine noise hits all of
them alike:

* **reference:** forward, cross-entropy, backward, optimizer step, written out here.
* **force:** the same plus ``distgraft.compress.force.add_force_to_grads_`` on every
  plain conv (what ``regularize.force = "degradation"`` adds after backward; the kind
  ``gravity`` is a second row: it needs the pairwise distances).
* **masks:** the same plus ``Masks.mask_grads_`` before and ``Masks.apply_`` after the step
  at 90% sparsity on every conv and linear (what ``compress.method = "magnitude"`` adds).

Each row prints the median step time of both and ``ratio`` = with / reference (targets:
force <= 1.15, masks <= 1.05). CPU here; with CUDA available the rows repeat on the GPU.

    .venv/bin/python bench/regularize.py            # about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import cpu_name

from distgraft.compress.force import add_force_to_grads_, force_layers
from distgraft.compress.magnitude import prunable_weights, prune_masks
from distgraft.models import build_model


def make_step(model, opt, x, y, before_step: Callable[[], None], after_step: Callable[[], None]):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        before_step()
        opt.step()
        after_step()

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(device: torch.device, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model("resnet56", 10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    convs = [p for _, p in force_layers(model, "conv")]
    masks = prune_masks(model, prunable_weights(model, skip_first=False), sparsity=0.9)
    nothing = lambda: None  # noqa: E731
    steps = {
        "reference": make_step(model, opt, x, y, nothing, nothing),
        "force": make_step(model, opt, x, y,
                           lambda: add_force_to_grads_(convs, 1e-4, "degradation"), nothing),
        "force_gravity": make_step(model, opt, x, y,
                                   lambda: add_force_to_grads_(convs, 1e-4, "gravity"), nothing),
        "masks": make_step(model, opt, x, y, lambda: masks.mask_grads_(model),
                           lambda: masks.apply_(model)),
    }  # fmt: skip
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    ref = statistics.median(times["reference"])
    name = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    rows = []
    for key, target in (("force", 1.15), ("force_gravity", None), ("masks", 1.05)):
        t = statistics.median(times[key])
        rows.append({"bench": "regularize", "case": key, "model": "resnet56", "batch": batch,
                     "device": str(device), "device_name": name, "threads": torch.get_num_threads(),
                     "reference_ms": round(1e3 * ref, 2), "distgraft_ms": round(1e3 * t, 2),
                     "ratio": round(t / ref, 3), "target": target,
                     "met": None if target is None else t / ref <= target})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        for row in measure(device, args.batch, args.repeats):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
