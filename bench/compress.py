"""Compression: what pruning buys in latency, and what distributing the sensitivity costs.

Two measurements, one JSON line each:

a. ``latency``: eval-mode forward time of a batch (default 128 CIFAR images, median of 20
   passes after 3 warm-up ones) of the network before and after a preset of Li et al.'s
   Table 1 (``resnet56-b``, ``vgg16-a`` on ``vgg16_li``), with the FLOP counts; the
   reference is the unpruned network, ``ratio`` = before / after (the speedup).
b. ``sensitivity``: wall time of ``distgraft compress sensitivity`` on a ResNet-56
   checkpoint (all 27 prunable layers, ratios 0.25/0.5/0.75, 512 synthetic test images)
   as one process and under torchrun with 2 processes, in one run; the reference is the
   single process, ``ratio`` = 1 rank / 2 ranks (the speedup; at most 2 on 2 cores). Both
   must write the same CSV (checked).

CPU here; with CUDA available the latency rows are repeated on the GPU.

    .venv/bin/python bench/compress.py            # about 3 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name, free_port

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"resnet56-b": "resnet56", "vgg16-a": "vgg16_li"}
CIFAR = (3, 32, 32)


def latency_row(preset: str, batch: int, device: torch.device) -> dict:
    from distgraft.compress.counting import count, latency_ms
    from distgraft.compress.presets import preset_ratios
    from distgraft.compress.prune import PruneSpec, apply_pruning, select
    from distgraft.compress.structure import groups_of
    from distgraft.models import build_model

    torch.manual_seed(0)
    model = build_model(PRESETS[preset], 10).eval()
    groups = groups_of(model, CIFAR)
    small = copy.deepcopy(model)
    keep = select([model], groups, PruneSpec(preset_ratios(preset, model, groups)))
    apply_pruning(small, groups, keep)
    before = latency_ms(model.to(device), CIFAR, batch, device)
    after = latency_ms(small.to(device), CIFAR, batch, device)
    c0, c1 = count(model, CIFAR), count(small, CIFAR)
    name = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {"bench": "latency", "preset": preset, "model": PRESETS[preset], "device": str(device),
            "device_name": name, "batch": batch, "before_ms": round(before, 2),
            "after_ms": round(after, 2), "ratio": round(before / after, 3),
            "flops_before": c0.flops, "flops_after": c1.flops,
            "flops_ratio": round(c0.flops / c1.flops, 3),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def checkpoint(folder: Path) -> Path:
    """A ResNet-56 checkpoint whose config points at 512 synthetic CIFAR-shaped test images."""
    from distgraft.compress.archive import base_arch
    from distgraft.config import Config, to_toml, with_overrides
    from distgraft.files import save_atomic
    from distgraft.models import build_model

    torch.manual_seed(0)
    cfg = with_overrides(Config(), model={"name": "resnet56"},
                         data={"name": "synthetic", "synthetic_train": 512,
                               "synthetic_test": 512, "test_batch_size": 256})  # fmt: skip
    path = folder / "r56.pt"
    save_atomic({"model": build_model("resnet56", 10).state_dict(), "config": to_toml(cfg),
                 "arch": base_arch("resnet56", 10, 3, CIFAR)}, path)  # fmt: skip
    return path


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def sensitivity_row(folder: Path) -> dict:
    ckpt = checkpoint(folder)
    args = ["compress", "sensitivity", str(ckpt), "--ratios", "0.25,0.5,0.75", "--json"]
    one = timed([sys.executable, "-m", "distgraft", *args, "--out", str(folder / "one")])
    two = timed([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                 "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "distgraft", *args,
                 "--out", str(folder / "two")])  # fmt: skip
    same = (folder / "one" / "sensitivity.csv").read_text() == (
        folder / "two" / "sensitivity.csv"
    ).read_text()
    return {"bench": "sensitivity", "model": "resnet56", "layers": 27, "ratios": 3,
            "test_images": 512, "one_rank_s": round(one, 1), "two_ranks_s": round(two, 1),
            "ratio": round(one / two, 2), "same_csv": same, "cpu": cpu_name(),
            "omp_threads_per_rank": 1}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="latency batch size")
    parser.add_argument("--skip-sensitivity", action="store_true")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])  # fmt: skip
    for device in devices:
        for preset in PRESETS:
            print(json.dumps(latency_row(preset, args.batch, device)), flush=True)
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "latency", "device": "cuda", "measured": False,
                          "reason": "no CUDA device"}), flush=True)  # fmt: skip
    if not args.skip_sensitivity:
        with tempfile.TemporaryDirectory(prefix="distgraft-bench-") as tmp:
            print(json.dumps(sensitivity_row(Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
