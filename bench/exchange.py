"""Graft exchange cost: raw ring transfer vs Grafter.step vs the reference's file transport.

For each world size (one spawned process per network, gloo on CPU) and each state size
(ResNet-32 and ResNet-50 state dicts), every rank times:

a. ``exchange_buffers`` of one pre-flattened float32 buffer as large as the graftable
   state: the transfer alone, the floor for any ring exchange;
b. ``Grafter.step`` end to end (layer-level entropy, float32 wire): criterion, all_gather,
   ring exchange of the flat state, finiteness checks, fused mix, invalid-filter counts;
c. the reference implementation's transport: ``torch.save`` of the state dict into a shared
   temp folder, a barrier (instead of the reference's polling, so no sleep is counted),
   ``torch.load`` of the predecessor's file. No criterion, no mix;
d. ``ring_exchange`` of the graftable tensors as separate tensors (a model without a
   FlatState): they are packed with ``torch.cat`` first and unpacked after;
e. ``ring_exchange`` of the same tensors as FlatState views: sent without a copy;
f. the packing alone (``flatten_by_dtype`` of d's tensors, no communication).

c moves the whole state dict (every buffer, ``num_batches_tracked`` included), a, b, d and
e the graftable floats: the sizes differ by a few hundred bytes.

Each is run once to warm up, then ``--repeats`` times (default 7 for ResNet-32, 3 for
ResNet-50); a repeat's time is the slowest rank's (the graft is done when the last rank
is), and the row reports the median. One JSON line per (model, world) goes to stdout,
with b/a, c/b, d/e and whether the targets hold
(b <= 1.5 a; c >= 5 b, stated for the ResNet-50 size). With >= 2 CUDA GPUs an NCCL row
(one GPU per rank) adds the transfer in GB/s; otherwise the row says it was not measured.

Run: ``.venv/bin/python bench/exchange.py`` (about 2 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import free_port, set_worker_env  # bench/common.py
from torch import nn

MODELS = ("resnet32", "resnet50")
REPEATS = {"resnet32": 7, "resnet50": 3}  # ResNet-50 steps take seconds on a 2-core CPU
TIMEOUT_S = 120.0


def build(name: str) -> nn.Module:
    """The real models: distgraft's CIFAR ResNet-32 and torchvision's ResNet-50."""
    if name == "resnet32":
        from distgraft.models import build_model

        return build_model("resnet32", 10)
    import torchvision

    return torchvision.models.resnet50()


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Warm-up, then ``repeats`` runs; each run's seconds are the slowest rank's."""
    out = []
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        if i:
            out.append(float(took))
    return out


def measure(model_name: str, info, repeats: int, folder: Path, with_files: bool) -> dict:
    from distgraft.comm.ring import exchange_buffers, flatten_by_dtype, ring_exchange
    from distgraft.config import GraftConfig
    from distgraft.graft.step import Grafter

    torch.manual_seed(1000 * info.network)  # different networks, realistic entropy gaps
    model = build(model_name).to(info.device)
    grafter = Grafter(model, info, GraftConfig(), TIMEOUT_S)
    numel = grafter.flat.numel
    views = list(grafter.flat.tensors().values())
    separate = [v.clone() for v in views]  # same tensors, each in its own storage
    buffer = torch.randn(numel, device=info.device)
    send_to, recv_from = info.rank_of(info.successor), info.rank_of(info.predecessor)

    def raw() -> None:
        exchange_buffers([buffer], send_to, recv_from, TIMEOUT_S)

    records = []

    def step() -> None:
        records.append(grafter.step(len(records) + 1))

    def files() -> None:
        torch.save(model.state_dict(), folder / f"{model_name}-net{info.network}.pt")
        dist.barrier()
        torch.load(
            folder / f"{model_name}-net{info.predecessor}.pt",
            map_location=info.device,
            weights_only=True,
        )

    def ring_separate() -> None:
        ring_exchange(separate, timeout_s=TIMEOUT_S)

    def ring_views() -> None:
        ring_exchange(views, timeout_s=TIMEOUT_S)

    def pack() -> None:
        flatten_by_dtype(separate)

    a = _timed(raw, repeats, info.device)
    b = _timed(step, repeats, info.device)
    c = _timed(files, repeats, info.device) if with_files else None
    d = _timed(ring_separate, repeats, info.device)
    e = _timed(ring_views, repeats, info.device)
    f = _timed(pack, repeats, info.device)
    med = statistics.median
    row = {
        "model": model_name,
        "world": info.world_size,
        "backend": info.backend,
        "device": str(info.device),
        "floats": numel,
        "mb": round(numel * 4 / 1e6, 2),
        "repeats": repeats,
        "a_ms": round(1e3 * med(a), 2),
        "b_ms": round(1e3 * med(b), 2),
        "b_exchange_ms": round(1e3 * med(r.exchange_s for r in records[1:]), 2),
        "a_gb_s": round(numel * 4 / med(a) / 1e9, 3),
        "b_over_a": round(med(b) / med(a), 2),
        "d_ring_separate_ms": round(1e3 * med(d), 2),
        "e_ring_flat_views_ms": round(1e3 * med(e), 2),
        "f_flatten_ms": round(1e3 * med(f), 2),
        "d_over_e": round(med(d) / med(e), 2),
        "tensors": len(views),
    }
    if c is not None:
        row["c_ms"] = round(1e3 * med(c), 2)
        row["c_over_b"] = round(med(c) / med(b), 2)
    row["target_b_le_1.5a"] = row["b_over_a"] <= 1.5
    if c is not None:
        row["target_c_ge_5b"] = row["c_over_b"] >= 5.0
    return row


def worker(
    rank: int, world: int, port: int, backend: str, repeats: int, folder: str, results
) -> None:
    set_worker_env(rank, world, port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from distgraft.comm.dist import close, init_distributed

    try:
        info = init_distributed(0, backend, TIMEOUT_S)
        for name in MODELS:
            n = repeats or REPEATS[name]
            row = measure(name, info, n, Path(folder), with_files=backend == "gloo")
            if rank == 0:
                results.put(row)
    except BaseException as e:
        results.put({"error": f"rank {rank}: {type(e).__name__}: {e}"})
        raise
    finally:
        close()


def run(world: int, backend: str, repeats: int, deadline_s: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    folder = tempfile.mkdtemp(prefix="distgraft-bench-")
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, world, port, backend, repeats, folder, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    rows: list[dict] = []
    end = time.monotonic() + deadline_s
    try:
        while len(rows) < len(MODELS) and time.monotonic() < end:
            try:
                row = results.get(timeout=1.0)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            print(json.dumps(row), flush=True)
            rows.append(row)
            if "error" in row:
                break
    finally:
        for p in procs:
            p.join(5 if len(rows) == len(MODELS) else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(folder, ignore_errors=True)
    if len(rows) < len(MODELS):
        row = {"world": world, "backend": backend, "error": f"no result within {deadline_s} s"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed runs after the warm-up (0: per model)"
    )
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds per world size")
    args = parser.parse_args(argv)
    ok = True
    for world in args.worlds:
        rows = run(world, "gloo", args.repeats, args.deadline)
        ok &= all("error" not in r for r in rows)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        rows = run(min(4, gpus), "nccl", args.repeats, args.deadline)
        ok &= all("error" not in r for r in rows)
    else:
        row = {
            "backend": "nccl",
            "measured": False,
            "reason": f"needs >= 2 CUDA GPUs, found {gpus}",
        }
        print(json.dumps(row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
