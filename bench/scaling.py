"""Scaling with the number of networks: aggregate training throughput and the graft's share.

For each network count N (default 1, 2, 4), N processes are spawned (torch.multiprocessing,
one network each, gloo on CPU / nccl on GPU with one GPU per process). Every process builds
a ``Trainer`` of ``--model`` on synthetic CIFAR-shaped data (``--images`` uint8 images,
3x32x32, batch 128) and runs ``--epochs`` epochs of ``train_epoch`` + ``graft`` (external
source, layer-level entropy: the paper's setup) followed by a barrier, as ``Trainer.fit``
does, minus evaluation and checkpoints. Epoch 0 is warm-up (first graft checks model
signatures, allocator and oneDNN warm-up) and is reported but not counted.

Per N, over the counted epochs:

* ``aggregate_images_per_s`` = N * images * epochs / wall seconds (the slowest rank's);
* ``per_network_images_per_s`` = aggregate / N, and ``efficiency_vs_1`` = aggregate(N) /
  aggregate(1);
* ``graft_share`` = sum over ranks of graft seconds / sum over ranks of epoch wall seconds
  (train + graft + barrier wait);
* ``graft_share_cifar_epoch``: the same graft seconds against a 50000-image epoch at the
  measured per-network rate (the small ``--images`` inflates ``graft_share``).

``other_processes_cores``: CPU that processes outside this bench took during the run
(/proc/stat, steal included), in cores; on a shared machine, read the row with it.

N = 1 has no graft (a single network has no peer; the trainer builds no grafter).
Each process uses ``torch.set_num_threads(max(1, cores // N))``: on a 2-core machine
N = 4 oversubscribes the cores 2x (reported as ``threads_per_process``). One JSON line
per N on stdout. Default CPU run: about 1.5 minutes on 2 idle cores.

    .venv/bin/python bench/scaling.py
    .venv/bin/python bench/scaling.py --model mobilenetv2 --networks 1 2 --images 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
from common import NullTelemetry, cpu_name, cpu_ticks, free_port, set_worker_env  # bench/common.py

TIMEOUT_S = 300.0
CIFAR_TRAIN = 50000


def worker(rank: int, world: int, port: int, opts: dict, results) -> None:
    set_worker_env(rank, world, port)
    torch.set_num_threads(opts["threads"])
    from distgraft.comm.dist import barrier, close, init_distributed
    from distgraft.config import Config, with_overrides
    from distgraft.train.trainer import Trainer

    try:
        info = init_distributed(0, "gloo" if opts["device"] == "cpu" else "nccl", TIMEOUT_S)
        if opts["device"] == "cpu":
            info = dataclasses.replace(info, device=torch.device("cpu"))
        cfg = with_overrides(
            Config(),
            run={"dir": opts["run_dir"], "name": f"scaling{world}", "resume": False},
            data={
                "name": "synthetic",
                "synthetic_train": opts["images"],
                "synthetic_test": 128,
                "synthetic_shape": (3, 32, 32),
                "synthetic_classes": 10,
                "batch_size": 128,
            },
            model={"name": opts["model"]},
            optim={"amp": opts["amp"]},
            dist={"timeout_s": TIMEOUT_S},
        )
        trainer = Trainer(cfg, info, NullTelemetry())
        epochs = []
        barrier(info, TIMEOUT_S, "the start")
        for epoch in range(opts["epochs"]):
            start = time.perf_counter()
            stats = trainer.train_epoch(epoch)
            record = trainer.graft(epoch)
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            done = time.perf_counter()
            barrier(info, TIMEOUT_S, f"the end of epoch {epoch}")
            end = time.perf_counter()
            epochs.append(
                {
                    "epoch": epoch,
                    "train_s": stats["epoch_s"],
                    "graft_s": 0.0 if record is None else record.graft_s,
                    "exchange_s": 0.0 if record is None else record.exchange_s,
                    "wait_s": end - done,
                    "wall_s": end - start,
                }
            )
        results.put({"rank": rank, "device": str(info.device), "epochs": epochs})
    except BaseException as e:
        results.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        close()


def summarise(world: int, opts: dict, per_rank: list[dict]) -> dict:
    counted = [e for e in range(opts["epochs"]) if e >= opts["warmup_epochs"]]

    def total(key: str, epochs: list[int]) -> float:
        return sum(r["epochs"][e][key] for r in per_rank for e in epochs)

    wall = sum(max(r["epochs"][e]["wall_s"] for r in per_rank) for e in counted)
    images = world * opts["images"] * len(counted)
    aggregate = images / wall
    per_net = aggregate / world
    graft_s = total("graft_s", counted)
    graft_per_epoch = graft_s / (world * len(counted))
    cifar_epoch_s = CIFAR_TRAIN / per_net
    warmup = list(range(opts["warmup_epochs"]))
    warmup_graft = total("graft_s", warmup) / (world * len(warmup)) if warmup else 0.0
    return {
        "bench": "scaling",
        "model": opts["model"],
        "networks": world,
        "device": opts["device"],
        "device_name": opts["device_name"],
        "backend": "nccl" if opts["device"] == "cuda" else "gloo",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads_per_process": opts["threads"],
        "threads_note": "max(1, cores // networks); more processes than cores oversubscribe",
        "images_per_network": opts["images"],
        "batch_size": 128,
        "epochs_counted": len(counted),
        "warmup_epochs": opts["warmup_epochs"],
        "aggregate_images_per_s": round(aggregate, 2),
        "per_network_images_per_s": round(per_net, 2),
        "graft_s_per_epoch": round(graft_per_epoch, 4),
        "exchange_s_per_epoch": round(total("exchange_s", counted) / (world * len(counted)), 4),
        "graft_share": round(graft_s / total("wall_s", counted), 5),
        "barrier_wait_share": round(total("wait_s", counted) / total("wall_s", counted), 4),
        "graft_share_cifar_epoch": round(graft_per_epoch / (graft_per_epoch + cifar_epoch_s), 6),
        "warmup_graft_s": round(warmup_graft, 4) if warmup else None,
        "wall_s": round(wall, 2),
    }


def run(world: int, opts: dict, deadline_s: float) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, opts, results)) for r in range(world)]
    before, started = cpu_ticks(), time.perf_counter()
    for p in procs:
        p.start()
    rows: list[dict] = []
    error = None
    end = time.monotonic() + deadline_s
    try:
        while len(rows) < world and time.monotonic() < end:
            try:
                row = results.get(timeout=1.0)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            if "error" in row:
                error = f"rank {row['rank']}: {row['error']}"
                break
            rows.append(row)
    finally:
        for p in procs:
            p.join(10 if len(rows) == world else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if error is None and len(rows) < world:
        error = f"{world - len(rows)} rank(s) gave no result within {deadline_s:.0f} s"
    if error is not None:
        return {"bench": "scaling", "networks": world, "error": error}
    rows.sort(key=lambda r: r["rank"])
    row = summarise(world, opts, rows)
    after = cpu_ticks()  # after the join: the workers' ticks are in RUSAGE_CHILDREN
    if before is not None and after is not None:
        ticks = (after[0] - before[0]) - (after[1] - before[1])
        others = ticks / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - started)
        row["other_processes_cores"] = round(max(0.0, others), 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--networks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=1024, help="training images per network")
    parser.add_argument("--epochs", type=int, default=3, help="epochs, warm-up included")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds per N")
    args = parser.parse_args(argv)
    if args.epochs <= args.warmup_epochs or args.warmup_epochs < 0:
        parser.error("--epochs must exceed --warmup-epochs (>= 0)")
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device available")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    cores = os.cpu_count() or 1
    ok = True
    base = None
    with tempfile.TemporaryDirectory(prefix="distgraft-scaling-") as run_dir:
        for world in args.networks:
            if device == "cuda" and world > gpus:
                row = {
                    "bench": "scaling",
                    "networks": world,
                    "measured": False,
                    "reason": f"nccl needs one GPU per network; {gpus} available",
                }
                print(json.dumps(row), flush=True)
                continue
            opts = {
                "model": args.model,
                "images": args.images,
                "epochs": args.epochs,
                "warmup_epochs": args.warmup_epochs,
                "device": device,
                "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
                "amp": args.amp,
                "threads": max(1, cores // world) if device == "cpu" else torch.get_num_threads(),
                "run_dir": run_dir,
            }
            load_before = round(os.getloadavg()[0], 2)
            row = run(world, opts, args.deadline)
            if "error" not in row:
                row["loadavg_1min"] = [load_before, round(os.getloadavg()[0], 2)]
            ok &= "error" not in row
            if "error" not in row:
                base = base or (row["aggregate_images_per_s"] if world == 1 else None)
                if base:
                    row["efficiency_vs_1"] = round(row["aggregate_images_per_s"] / base, 3)
            print(json.dumps(row), flush=True)
    if not cuda and args.device == "auto":
        row = {"bench": "scaling", "device": "cuda", "measured": False, "reason": "no CUDA"}
        print(json.dumps(row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
