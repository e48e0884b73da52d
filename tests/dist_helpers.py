"""Spawn utilities for the multi-process tests (real processes, gloo, CPU).

Starting a Python process that imports torch costs 3-5 s of CPU, so on a 2-core machine
the distributed tests would spend most of their time in imports if every test spawned its
own processes. ``WorkerPool`` therefore keeps a few spawned workers alive for the whole
pytest session and hands them tasks; each task still gets a fresh process group (a new
free port and a new rendezvous store), so tasks do not share any distributed state.

A task is a top-level function ``fn(rank, world, *args)`` run by workers ``0..world-1``
with the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set;
it calls ``init_distributed`` itself, and the worker tears the group down afterwards.
Return values must be picklable without torch tensors (a tensor sent through a queue
breaks when its sender frees it): convert them with ``to_numpy``.

Every wait has a deadline: a worker that has not answered in time is killed (with the
rest of the pool, whose process group state is then unknown) and reported as such, so a
hung collective fails the test instead of hanging the run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

__all__ = [
    "Outcome",
    "WorkerPool",
    "free_port",
    "run_workers",
    "shared_pool",
    "to_numpy",
    "values",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SETUP_FAILURE = "Gloo connectFullMesh failed"
"""What gloo reports when it could not connect the ranks of a new process group."""


@dataclass
class Outcome:
    """What one rank's task did: a value, or an error as text."""

    rank: int
    value: Any = None
    error: str | None = None
    """``"ExceptionType: message"``; also set when the worker died or timed out."""
    exc_type: str | None = None
    trace: str | None = None
    seconds: float = 0.0
    """Wall time of the task inside the worker (init included)."""

    @property
    def ok(self) -> bool:
        return self.error is None


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0 by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy a state dict to numpy (bfloat16 -> float32) so it can cross a queue safely."""
    out = {}
    for key, t in state.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[key] = t.numpy().copy()
    return out


def graft_once_then_shorten(grafter: Any, epoch: int, timeout_s: float) -> None:
    """Graft at ``epoch`` under the grafter's own (long) timeout, then set ``timeout_s``.

    The first graft is where the ranks first meet after their process group starts: a
    pool worker that replaced a killed one imports torch first, and a loaded 2-core
    machine can hold one rank back for seconds. A short timeout there would measure the
    machine, not the code; the fault tests want it on the call under test only.
    """
    grafter.step(epoch)
    grafter.timeout_s = timeout_s


def values(outcomes: Sequence[Outcome]) -> list[Any]:
    """Every rank's value; fails with every rank's error and traceback otherwise."""
    bad = [o for o in outcomes if not o.ok]
    if bad:
        text = "\n".join(f"rank {o.rank}: {o.error}\n{o.trace or ''}" for o in bad)
        raise AssertionError(f"{len(bad)} rank(s) failed:\n{text}")
    return [o.value for o in outcomes]


def _serve(slot: int, tasks: mp.Queue, results: mp.Queue) -> None:
    """Worker loop: run tasks until told to stop (None)."""
    torch.set_num_threads(1)  # several workers share 2 cores; threads only add contention
    from distgraft.comm.dist import close

    while True:
        task = tasks.get()
        if task is None:
            return
        task_id, fn, world, port, args = task
        os.environ.update(
            RANK=str(slot),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(slot),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        start = time.perf_counter()
        try:
            value = fn(slot, world, *args)
            out = Outcome(slot, value=value)
        except BaseException as e:  # report everything, including KeyboardInterrupt
            out = Outcome(
                slot,
                error=f"{type(e).__name__}: {e}",
                exc_type=type(e).__name__,
                trace=traceback.format_exc(),
            )
        finally:
            close()
            for key in _ENV:
                os.environ.pop(key, None)
        out.seconds = time.perf_counter() - start
        results.put((task_id, out))


class WorkerPool:
    """``size`` spawned worker processes that run tasks on a fresh process group each."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._next_id = 0

    # -- lifecycle ----------------------------------------------------------------------
    def _start(self, slot: int) -> None:
        tasks = self._ctx.Queue()
        proc = self._ctx.Process(
            target=_serve, args=(slot, tasks, self._results), name=f"dist-worker-{slot}"
        )
        proc.daemon = True
        proc.start()
        self._procs[slot], self._tasks[slot] = proc, tasks

    def _ensure(self, world: int) -> None:
        """Workers 0..world-1 running (started on first use, restarted if they died)."""
        if self._results is None:
            self._results = self._ctx.Queue()
            self._procs = [None] * self.size
            self._tasks = [None] * self.size
        for slot in range(world):
            proc = self._procs[slot]
            if proc is None or not proc.is_alive():
                self._start(slot)

    def kill(self) -> None:
        """Kill every worker now (stragglers of a timed-out task, or at exit)."""
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.kill()
        for proc in self._procs:
            if proc is not None:
                proc.join(5)
        self._procs, self._tasks, self._results = [], [], None

    def close(self) -> None:
        """Ask idle workers to stop; kill what does not stop within a few seconds."""
        for proc, tasks in zip(self._procs, self._tasks, strict=True):
            if proc is not None and proc.is_alive():
                with contextlib.suppress(Exception):
                    tasks.put(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            if proc is not None:
                proc.join(max(0.1, deadline - time.monotonic()))
        self.kill()

    # -- tasks --------------------------------------------------------------------------
    def run(
        self,
        fn: Callable[..., Any],
        world: int,
        *args: Any,
        deadline_s: float = 90.0,
    ) -> list[Outcome]:
        """Run ``fn(rank, world, *args)`` on ranks ``0..world-1``; one Outcome per rank.

        A rank whose process ends without answering gets an error saying so; when the
        deadline passes, every rank that has not answered is reported as timed out and the
        whole pool is killed (it restarts on the next call).

        Gloo sometimes fails to set up its connections on a heavily loaded machine
        (``connectFullMesh ... Connection closed by peer`` inside init_process_group, seen
        about once in 30 runs with both cores oversubscribed). That happens before the
        task's own code runs, so the task is run once more on fresh processes; a failure of
        the task itself is never retried.
        """
        outcomes = self._run_once(fn, world, args, deadline_s)
        if any(SETUP_FAILURE in (o.error or "") for o in outcomes):
            self.kill()
            outcomes = self._run_once(fn, world, args, deadline_s)
        return outcomes

    def _run_once(
        self, fn: Callable[..., Any], world: int, args: tuple, deadline_s: float
    ) -> list[Outcome]:
        if not 1 <= world <= self.size:
            raise ValueError(f"world {world} does not fit a pool of {self.size}")
        self._ensure(world)
        task_id, self._next_id = self._next_id, self._next_id + 1
        port = free_port()
        for rank in range(world):
            self._tasks[rank].put((task_id, fn, world, port, args))
        got: dict[int, Outcome] = {}
        dead_since: dict[int, float] = {}
        end = time.monotonic() + deadline_s
        while len(got) < world and time.monotonic() < end:
            try:
                tid, out = self._results.get(timeout=0.2)
            except queue.Empty:
                pass
            else:
                if tid == task_id:
                    got[out.rank] = out
                continue
            now = time.monotonic()
            for rank in range(world):
                if rank in got or self._procs[rank].is_alive():
                    continue
                # give a result it put just before exiting a moment to arrive
                if now - dead_since.setdefault(rank, now) > 1.0:
                    code = self._procs[rank].exitcode
                    got[rank] = Outcome(
                        rank,
                        error=f"WorkerExited: rank {rank} exited with code {code}",
                        exc_type="WorkerExited",
                    )
        if len(got) < world:
            for rank in range(world):
                if rank not in got:
                    got[rank] = Outcome(
                        rank,
                        error=f"Timeout: rank {rank} gave no result within {deadline_s:g} s "
                        "(killed)",
                        exc_type="Timeout",
                    )
            self.kill()
        return [got[r] for r in range(world)]


_POOLS: dict[int, WorkerPool] = {}


def shared_pool(size: int = 4) -> WorkerPool:
    """One pool per size for the whole pytest session (both test modules use it)."""
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = WorkerPool(size)
    return pool


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def run_workers(
    fn: Callable[..., Any], world: int, *args: Any, deadline_s: float = 90.0
) -> list[Outcome]:
    """Spawn ``world`` fresh processes, run ``fn(rank, world, *args)`` once, stop them."""
    pool = WorkerPool(world)
    try:
        return pool.run(fn, world, *args, deadline_s=deadline_s)
    finally:
        pool.close()
