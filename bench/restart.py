"""Restart latency under ``torchrun --max-restarts``: from SIGKILL of a worker to the first
trained batch of the restarted attempt, with distgraft's attempt store and with the
previous lookup (written below as the reference), measured side by side in one run.

Each try launches ``torchrun --nproc-per-node 2 --max-restarts 1`` on the digits config
(this file, in worker mode, stands in for ``-m distgraft``: it notes times in a folder and
then runs ``distgraft train`` unchanged). Once both ranks have trained a few batches of
the first attempt, rank 1 gets SIGKILL; torchrun stops rank 0, runs the rendezvous again
and restarts both; they resume from the last checkpoint (or start again) and train.

Per try, all times from the kill (``time.time()`` just before ``os.kill``):

* ``store_s``: the slowest rank of the new attempt holding its attempt store;
* ``first_batch_s``: the slowest rank's first trained batch (the restart's cost);
* ``stale_dials``: how often restarted rank 1 dialled a store other than its attempt's
  (an address the previous attempt left; TCPStore wrapped in the worker to note them);
* ``join_lag_s``: from rank 0's new store being up to rank 1 holding it (the lookup's
  own cost, without the restart's imports and rendezvous, which vary with the load).

Which rank reaches the lookup first is a race. ``--rank0-delay S`` makes rank 0 of the
restarted attempt start its lookup S seconds late (in both variants), as a rank 0 with
more to do at startup would; the reference then dials the stale port every time.

``reference`` is the lookup distgraft used before: rank 0 published its store's address in
torchrun's agent store, which keeps it across restarts, and the other ranks read it
without waiting for the new one, so a restarted rank dialled the dead port of the
previous attempt first whenever it got there before the new rank 0 (a TCPStore client
retries a refused port for its whole 5 s connect timeout). ``distgraft``: rank 0
withdraws the address once every rank has connected, so the restarted ranks wait for the
new one. Tries alternate between the two. One JSON line per try, then one line with the
medians and their ratio (reference / distgraft).

    .venv/bin/python bench/restart.py                 # 6 tries each, about 8 minutes
    .venv/bin/python bench/restart.py --rank0-delay 1
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 .venv/bin/python bench/restart.py  # store per round
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.toml"
WAIT_S = 180.0


# -- the reference: the attempt store lookup as it was --------------------------------------
def reference_attempt_store(rank: int, world: int, timeout: timedelta):
    """The previous ``distgraft.comm.dist._attempt_store``, verbatim in behaviour."""
    import torch.distributed as dist

    url = f"env://?rank={rank}&world_size={world}"
    store, _, _ = next(dist.rendezvous(url, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    host = os.environ["MASTER_ADDR"]
    if rank == 0:
        token = uuid.uuid4().hex
        own = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout,
                            wait_for_workers=False)  # fmt: skip
        own.set("distgraft/token", token)
        store.set("distgraft/store", f"{own.port}:{token}")
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, token = store.get("distgraft/store").decode().split(":")
        try:
            own = dist.TCPStore(host, int(port), world, is_master=False,
                                timeout=timedelta(seconds=5))  # fmt: skip
            if own.get("distgraft/token").decode() == token:
                return own
        except (RuntimeError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0's store at {host}:{port} did not answer")
        time.sleep(0.2)


# -- worker mode: note the times, then run distgraft ----------------------------------------
def worker(lookup: str, folder: Path, rank0_delay_s: float, argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    from distgraft.cli import main
    from distgraft.comm import dist as comm_dist
    from distgraft.train.trainer import Trainer

    rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
    _put(folder / f"pid-{attempt}-{rank}", str(os.getpid()))
    attempt_store = reference_attempt_store if lookup == "reference" else comm_dist._attempt_store
    dialled, tcp_store = [], dist.TCPStore

    hosted: list[float] = []

    def noted_tcp_store(*args, **kwargs):  # the ports this rank dials as a store client
        if not kwargs.get("is_master", args[3] if len(args) > 3 else False):
            dialled.append(int(kwargs.get("port", args[1] if len(args) > 1 else 0)))
            return tcp_store(*args, **kwargs)
        store = tcp_store(*args, **kwargs)
        hosted.append(time.time())  # rank 0's attempt store is up: it publishes it next
        return store

    def noted_attempt_store(*args, **kwargs):
        if attempt != "0" and rank == "0":
            time.sleep(rank0_delay_s)
        store = attempt_store(*args, **kwargs)
        note = {"time": time.time(), "port": store.port, "dialled": dialled, "hosted": hosted}
        _put(folder / f"store-{attempt}-{rank}", json.dumps(note))
        return store

    dist.TCPStore = noted_tcp_store

    comm_dist._attempt_store = noted_attempt_store
    train_step = Trainer._train_step
    steps = [0]

    def noted_train_step(self, x, y):
        out = train_step(self, x, y)
        steps[0] += 1
        if steps[0] in (1, 5):  # the first batch; a few, before the kill
            _put(folder / f"batch{steps[0]}-{attempt}-{rank}", repr(time.time()))
        return out

    Trainer._train_step = noted_train_step
    return main(argv)


def _put(path: Path, text: str) -> None:
    """Write whole or not at all: the controller reads a file as soon as it exists."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- one try ------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(paths: list[Path], agent: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not all(p.exists() for p in paths):
        if agent.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{what} did not happen (torchrun exit code {agent.poll()})")
        time.sleep(0.01)


def _stop(agent: subprocess.Popen) -> str:
    """Stop the torchrun this bench started (it stops its workers), return its output."""
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
    try:
        out, _ = agent.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        agent.kill()
        out, _ = agent.communicate()
    return out


def one_try(lookup: str, index: int, work: Path, rank0_delay_s: float) -> dict:
    folder = work / f"{lookup}-{index}"
    folder.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
        "2", "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}", __file__, "--worker", lookup, "--folder", str(folder),
        "--rank0-delay", str(rank0_delay_s),
        "train", "--config", str(CONFIG), f"--run.dir={folder}", "--run.name=run",
        "--run.epochs=100", "--telemetry.console=false", "--telemetry.zmq=false",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait([folder / f"batch5-0-{r}" for r in (0, 1)], agent, "the first attempt's batches")
        victim = int((folder / "pid-0-1").read_text())
        killed = time.time()
        os.kill(victim, signal.SIGKILL)
        _wait([folder / f"batch1-1-{r}" for r in (0, 1)], agent, "the restarted attempt's batch")
    finally:
        out = _stop(agent)
        (folder / "torchrun.log").write_text(out)

    def since_kill(name: str) -> float:
        return max(_note(folder / f"{name}-1-{r}")["time"] for r in (0, 1)) - killed

    rank0, rank1 = _note(folder / "store-1-0"), _note(folder / "store-1-1")
    published = rank0.get("hosted", [])
    return {
        "lookup": lookup,
        "try": index,
        "store_s": round(since_kill("store"), 3),
        "first_batch_s": round(since_kill("batch1"), 3),
        "stale_dials": sum(port != rank1["port"] for port in rank1["dialled"]),
        "join_lag_s": round(rank1["time"] - published[0], 3) if published else None,
    }


def _note(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text) if text.startswith("{") else {"time": float(text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tries", type=int, default=6, help="tries of each lookup (default 6)")
    parser.add_argument("--rank0-delay", type=float, default=0.0, metavar="S",
                        help="rank 0 of the restarted attempt starts its lookup S s late, "
                        "as a rank 0 with more to do at startup would (default 0)")  # fmt: skip
    parser.add_argument("--worker", choices=("reference", "distgraft"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.folder), args.rank0_delay, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from common import cpu_name  # bench/common.py

    rows = []
    with tempfile.TemporaryDirectory(prefix="distgraft-restart-") as tmp:
        for i in range(args.tries):
            order = ("reference", "distgraft") if i % 2 == 0 else ("distgraft", "reference")
            for lookup in order:
                row = one_try(lookup, i, Path(tmp), args.rank0_delay)
                rows.append(row)
                print(json.dumps(row), flush=True)
    shared = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"
    summary: dict = {"bench": "restart", "cpu": cpu_name(), "cores": os.cpu_count(),
                     "tries": args.tries, "rank0_delay_s": args.rank0_delay,
                     "agent_store_shared": shared, "load_average": os.getloadavg()[0]}  # fmt: skip
    for lookup in ("reference", "distgraft"):
        mine = [r for r in rows if r["lookup"] == lookup]
        lags = [r["join_lag_s"] for r in mine if r["join_lag_s"] is not None]
        summary[lookup] = {
            "median_first_batch_s": round(statistics.median(r["first_batch_s"] for r in mine), 2),
            "median_store_s": round(statistics.median(r["store_s"] for r in mine), 2),
            "median_join_lag_s": round(statistics.median(lags), 3) if lags else None,
            "tries_with_stale_dials": sum(r["stale_dials"] > 0 for r in mine),
        }
    ref, new = (summary[k]["median_first_batch_s"] for k in ("reference", "distgraft"))
    summary["ratio"] = round(ref / new, 2)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
