"""What distillation costs per training step: the teachers' forward pass and the logits
exchange of mutual learning.

Both rows time distgraft's own ``Trainer.train_epoch`` on synthetic Fashion-MNIST-shaped
data (1x28x28, batch 128, ``--student``), in windows of ``--window`` steps, alternating the
method on and off inside one run so that machine noise hits both alike (medians of the
windows' per-step times):

* **teachers:** one process; the loss with a frozen ``--teacher`` (random weights: the cost
  does not depend on them) against cross-entropy alone. ``teacher_share`` = (with - without)
  / with: the share of a distillation step spent on the teacher (its forward pass and the
  KD term). No target: it is what a teacher costs.
* **mutual:** two processes (gloo, one thread each, 2 networks as in the paper); the loss
  with ``distill.mutual`` (one all_gather of the [batch, classes] logits per step and the
  KL terms) against without. Every window starts and ends with a barrier of both
  networks, as an epoch ends with one in a run, so both modes are timed until the slower
  network is done. ``ratio`` = with / without; target <= 1.05.

    .venv/bin/python bench/distill.py           # about 3 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
from common import NullTelemetry, cpu_name, free_port, set_worker_env  # bench/common.py

TIMEOUT_S = 300.0


def _config(opts: dict, name: str, mutual: bool, teacher: str | None):
    from distgraft.config import Config, with_overrides

    return with_overrides(
        Config(),
        run={"dir": opts["run_dir"], "name": name, "resume": False},
        data={"name": "synthetic", "synthetic_train": opts["batch"] * opts["window"],
              "synthetic_test": 128, "synthetic_shape": (1, 28, 28), "synthetic_classes": 10,
              "batch_size": opts["batch"], "val_size": 0},
        model={"name": opts["student"]},
        distill={"mutual": mutual, "teachers": (teacher,) if teacher else ()},
        graft={"source": "none"},
        dist={"timeout_s": TIMEOUT_S},
    )  # fmt: skip


def _windows(trainer, toggle, opts: dict, sync=lambda: None) -> dict[str, list[float]]:
    """Per-step seconds of alternating windows with the method on and off.

    ``sync`` (a barrier across the networks) starts every window together and ends it when
    the last network is done, as the end-of-epoch barrier ends an epoch in a run: without
    it, the drift between independent networks in an "off" window would be charged to the
    next "on" window, whose first exchange waits for the slower network."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    trainer.train_epoch(0, max_steps=2)  # warm-up
    for i in range(2 * opts["pairs"]):
        state = "on" if i % 2 == 0 else "off"
        toggle(state == "on")
        sync()
        start = time.perf_counter()
        trainer.train_epoch(i + 1, max_steps=opts["window"])
        sync()
        times[state].append((time.perf_counter() - start) / opts["window"])
    return times


def teachers_row(opts: dict) -> dict:
    from distgraft.comm.dist import close, init_distributed
    from distgraft.compress.archive import base_arch, save_compressed
    from distgraft.models import build_model
    from distgraft.train.trainer import Trainer

    torch.set_num_threads(opts["threads"])
    path = os.path.join(opts["run_dir"], "teacher.pt")
    teacher = build_model(opts["teacher"], 10, 1)
    save_compressed(path, teacher, base_arch(opts["teacher"], 10, 1, (1, 28, 28)), kind="teacher")
    info = init_distributed(env={})
    try:
        trainer = Trainer(_config(opts, "teachers", False, path), info, NullTelemetry())
        objective, teachers = trainer.objective, trainer.objective.teachers

        def toggle(on: bool) -> None:
            objective.teachers = teachers if on else None

        times = _windows(trainer, toggle, opts)
    finally:
        close()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"bench": "distill", "case": "teachers", "student": opts["student"],
            "teacher": opts["teacher"], "batch": opts["batch"], "device": "cpu",
            "device_name": cpu_name(), "threads": torch.get_num_threads(),
            "without_ms": round(1e3 * off, 2), "with_ms": round(1e3 * on, 2),
            "teacher_share": round((on - off) / on, 3), "windows": opts["pairs"]}  # fmt: skip


def mutual_worker(rank: int, world: int, port: int, opts: dict, results) -> None:
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from distgraft.comm.dist import barrier, close, init_distributed
    from distgraft.train.trainer import Trainer

    try:
        info = init_distributed(0, "gloo", TIMEOUT_S, replica_groups=True)
        trainer = Trainer(_config(opts, "mutual", True, None), info, NullTelemetry())
        objective, peers = trainer.objective, trainer.objective.peers
        barrier(info, TIMEOUT_S, "the start")

        def toggle(on: bool) -> None:  # every rank toggles at the same step: in step
            objective.peers = peers if on else None

        def sync() -> None:
            barrier(info, TIMEOUT_S, "a window")

        results.put((rank, _windows(trainer, toggle, opts, sync)))
    except BaseException as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        close()


def mutual_row(opts: dict) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=mutual_worker, args=(r, 2, port, opts, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=TIMEOUT_S * 2) for _ in procs)
    for p in procs:
        p.join(30)
    bad = [v for v in got.values() if isinstance(v, str)]
    if bad:
        raise SystemExit(f"bench/distill.py: a worker failed: {bad[0]}")
    on = statistics.median(t for r in got.values() for t in r["on"])
    off = statistics.median(t for r in got.values() for t in r["off"])
    return {"bench": "distill", "case": "mutual", "student": opts["student"], "networks": 2,
            "batch": opts["batch"], "device": "cpu", "device_name": cpu_name(),
            "threads_per_process": 1, "without_ms": round(1e3 * off, 2),
            "with_ms": round(1e3 * on, 2), "ratio": round(on / off, 3), "target": 1.05,
            "met": on / off <= 1.05, "windows": opts["pairs"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="resnet20")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--window", type=int, default=8, help="steps per timed window")
    p.add_argument("--pairs", type=int, default=5, help="on/off window pairs")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--only", choices=("teachers", "mutual"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        opts = {**vars(args), "run_dir": run_dir}
        if args.only in (None, "teachers"):
            print(json.dumps(teachers_row(opts)), flush=True)
        if args.only in (None, "mutual"):
            print(json.dumps(mutual_row(opts)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
