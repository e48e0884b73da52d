"""ONNX export: file size and latency before and after compression, PyTorch eager vs
onnxruntime CPU.

For each case, the network before and after a compression step is exported with
``distgraft export``'s code (torch.onnx.export(dynamo=True), weights inside the file),
checked against eager (max|ort - eager| / max|eager| <= 1e-4, or the bench stops), and
timed: eager before, onnxruntime before, eager after, onnxruntime after take turns in
blocks (3 rounds, warm-up in each), median per call. The reference is PyTorch eager on the
same network and input; ``speedup`` = eager / onnxruntime, ``after_vs_before`` =
onnxruntime before / onnxruntime after. One JSON line per network and batch size.

Cases:
* ``vgg16-a`` and ``resnet56-b``: Li et al.'s presets on freshly initialised 32x32x3
  networks (vgg16_li, resnet56, seed 0): file size and latency do not depend on the
  weights, only on the shapes the preset leaves.
* ``resnet56-b-x8``: the same layers as resnet56-b, each kept width rounded up to a
  multiple of 8 (6 -> 8, 22 -> 24, 57 -> 64 filters): more FLOPs than resnet56-b, but
  widths that fill the 8-wide vector blocks of onnxruntime's CPU conv kernels.
* ``--pair LABEL BEFORE.pt AFTER.pt`` (repeatable): any two checkpoints distgraft wrote,
  e.g. a trained network and its ``distgraft compress lowrank`` output (low-rank
  approximation needs trained weights: on random ones it keeps nearly the full rank).

    python bench/export.py                                   # the presets, ~5 minutes
    python bench/export.py --presets --batches 1 360 \\
        --pair lowrank runs/digits_lra/net0/last.pt lra.pt   # checkpoints of your own
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from typing import Any

import torch
from common import cpu_name, cpu_ticks

from distgraft.compress.counting import count
from distgraft.tools.export import (
    compare,
    export_onnx,
    median_ms,
    model_input,
    open_model,
    session,
)

PRESETS = {"vgg16-a": "vgg16_li", "resnet56-b": "resnet56", "resnet56-b-x8": "resnet56"}
CIFAR = (3, 32, 32)
CLOCKS = {"wall": time.perf_counter, "thread-cpu": time.thread_time}


def preset_pair(preset: str) -> tuple[Any, Any, tuple[int, ...]]:
    """A fresh network (seed 0) and the same network pruned by ``preset``."""
    from distgraft.compress.presets import preset_ratios
    from distgraft.compress.prune import PruneSpec, apply_pruning, select
    from distgraft.compress.structure import groups_of
    from distgraft.models import build_model

    torch.manual_seed(0)
    before = build_model(PRESETS[preset], 10).eval()
    groups = groups_of(before, CIFAR)
    after = copy.deepcopy(before)
    ratios = preset_ratios(preset.removesuffix("-x8"), before, groups)
    if preset.endswith("-x8"):
        ratios = rounded_up(ratios, groups, 8)
    keep = select([before], groups, PruneSpec(ratios))
    apply_pruning(after, groups, keep)
    return before, after.eval(), CIFAR


def rounded_up(ratios: dict[str, float], groups: list, multiple: int) -> dict[str, float]:
    """Ratios whose kept widths are those of ``ratios`` rounded up to ``multiple``."""
    from distgraft.compress.prune import kept_count

    out = {}
    for g in groups:
        if g.name in ratios:
            n = g.channels
            width = min(n, -(-kept_count(n, ratios[g.name]) // multiple) * multiple)
            if width < n:
                out[g.name] = (n - width) / n
                assert kept_count(n, out[g.name]) == width
    return out


def checkpoint_pair(before: str, after: str) -> tuple[Any, Any, tuple[int, ...]]:
    a, b = open_model(before), open_model(after)
    if a.input_shape != b.input_shape:
        raise SystemExit(f"{before} and {after} take different inputs")
    return a.model, b.model, a.input_shape


def measure(label: str, models: dict[str, Any], shape: tuple[int, ...], batches: list[int],
            repeats: int, threads: int, clock: str = "wall") -> list[dict]:  # fmt: skip
    """Export, check and time the networks of one case at every batch size."""
    files = {}
    for name, model in models.items():
        start = time.perf_counter()
        files[name] = export_onnx(model, shape)
        files[name + "_s"] = time.perf_counter() - start
    sessions = {name: session(files[name].data, threads) for name in models}
    rows = []
    for batch in batches:
        checks = {name: compare(model, sessions[name], shape, batch)
                  for name, model in models.items()}  # fmt: skip
        for name, check in checks.items():
            if not check.ok(1e-4):
                raise SystemExit(f"{label} {name}: onnxruntime differs from eager ({check})")
        x = model_input(batch, shape)
        calls = {}
        for name, model in models.items():
            feed = {sessions[name].get_inputs()[0].name: x.numpy()}
            calls[f"eager {name}"] = lambda m=model, x=x: m(x)
            calls[f"ort {name}"] = lambda s=sessions[name], f=feed: s.run(None, f)
        ticks = cpu_ticks()
        load = os.getloadavg()[0]
        with torch.inference_mode():
            ms = median_ms(calls, repeats, warmup=3, rounds=3, clock=CLOCKS[clock])
        others = _others_share(ticks, cpu_ticks())
        for name, model in models.items():
            c = count(model, shape)
            rows.append({
                "bench": "export", "case": label, "network": name, "batch": batch,
                "onnx_bytes": len(files[name].data), "opset": files[name].opset,
                "export_s": round(files[name + "_s"], 1), "params": c.params,
                "flops": c.flops, "eager_ms": round(ms[f"eager {name}"], 3),
                "onnxruntime_ms": round(ms[f"ort {name}"], 3),
                "speedup": round(ms[f"eager {name}"] / ms[f"ort {name}"], 2),
                "after_vs_before": round(ms["ort before"] / ms[f"ort {name}"], 2),
                "rel_err": float(f"{checks[name].rel_err:.3g}"), "threads": threads,
                "clock": clock,
                "repeats": repeats, "load_avg_1min": round(load, 2),
                "others_cpu_share": others, "cpu": cpu_name(),
                "torch": torch.__version__, "onnxruntime": _ort_version(),
            })  # fmt: skip
    return rows


def _others_share(start, end) -> float | None:
    """Share of the machine's busy CPU time that other processes took while timing."""
    if start is None or end is None:
        return None
    busy, own = end[0] - start[0], end[1] - start[1]
    return round(max(0.0, busy - own) / busy, 3) if busy > 0 else 0.0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per call")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads of torch and onnxruntime (default: torch's)")
    parser.add_argument("--pair", nargs=3, action="append", default=[],
                        metavar=("LABEL", "BEFORE", "AFTER"))
    parser.add_argument("--presets", nargs="*", choices=PRESETS, default=list(PRESETS),
                        help="preset cases to run (default: all; none with an empty list)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="thread-cpu: CPU time of the calling thread, for --threads 1 on a "
                             "busy machine (everything then runs on that thread)")
    args = parser.parse_args()
    if args.clock == "thread-cpu" and args.threads != 1:
        parser.error("--clock thread-cpu needs --threads 1")
    torch.set_num_threads(args.threads)
    cases = [(p, lambda p=p: preset_pair(p)) for p in args.presets]
    cases += [(label, lambda b=b, a=a: checkpoint_pair(b, a)) for label, b, a in args.pair]
    print(json.dumps({"bench": "export", "machine": platform.machine(), "cpu": cpu_name(),
                      "cores": os.cpu_count(), "threads": args.threads}), flush=True)  # fmt: skip
    for label, make in cases:
        before, after, shape = make()
        for row in measure(label, {"before": before, "after": after}, shape, args.batches,
                           args.repeats, args.threads, args.clock):  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
