"""A lost peer is named, wherever it is lost: real processes, gloo, faults by signals.

Every collective and barrier distgraft issues must fail with a ``PeerError`` naming the
network and rank that did not answer (never the caller) and the epoch, within about
``dist.timeout_s``, on every surviving rank. The faults are real: a rank SIGKILLs or
SIGSTOPs itself at a chosen call (a wrapper around the torch.distributed function it is
about to call, or ``fault_wrapper.py`` under torchrun), or simply never comes.

The first tests run on the session's worker pool (``dist_helpers``); a killed worker is
replaced on the next task. The last ones launch ``distgraft train`` under real torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli_helpers import DIGITS, ROOT, common, env, events, run, torchrun_cmd
from dist_helpers import Outcome, graft_once_then_shorten, shared_pool
from torch import nn

from distgraft.comm.dist import (
    all_reduce_,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
)
from distgraft.config import GraftConfig, load_config, with_overrides
from distgraft.graft.step import Grafter

INIT_S = 60.0  # process-group start: a worker that replaces a killed one imports torch first
SHORT_S = 6.0  # the timeout of the calls under test: a loaded machine still answers in time
SLACK_S = 20.0  # what a loaded 2-core machine may add to a bounded wait
E2E_TIMEOUT_S = 15  # dist.timeout_s of the torchrun runs

pytestmark = pytest.mark.timeout(180)


# -- helpers ------------------------------------------------------------------------------
def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)
    )


def die_when_calling(name: str) -> None:
    """This process SIGKILLs itself as it calls ``torch.distributed.<name>``."""
    setattr(dist, name, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: its sockets are closed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_for(predicate, timeout_s: float = 60.0, what: str = "a condition") -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(0.05)


def attempt(fn, *args) -> tuple[str, str, float]:
    """(exception type or "no error", message, seconds) of ``fn(*args)``."""
    start = time.monotonic()
    try:
        fn(*args)
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start
    return "no error", "", time.monotonic() - start


def survivors(got: list[Outcome], victim: int) -> list[tuple[int, tuple[str, str, float]]]:
    for o in got:
        assert o.rank == victim or o.ok, o.error + (o.trace or "")
    return [(o.rank, o.value) for o in got if o.rank != victim]


def lost_in(message: str) -> set[int]:
    """The ranks a PeerError names as lost or missing (not those noted as gave up)."""
    found = re.findall(r"network \d+ \(ranks? ([\d, ]+)\)(?! gave up)", message)
    return {int(r) for group in found for r in group.split(", ")}


def assert_names_only(message: str, rank: int, lost: int, network: int) -> None:
    """The message names the lost rank, and neither the caller nor anyone else."""
    assert message.startswith(f"rank {rank}: "), message
    assert f"network {network} (rank {lost})" in message, message
    assert lost_in(message) == {lost}, message


# -- a rank killed inside the ring exchange ----------------------------------------------
def exchange_kill_task(rank: int, world: int, folder: str) -> tuple[str, str, float]:
    """Graft 1 runs normally; at graft 2 rank 1 dies as it posts its sends and receives,
    and the others post theirs only once it is gone (a connection already closed)."""
    info = init_distributed(0, "gloo", INIT_S)
    grafter = Grafter(small_net(rank), info, GraftConfig(), INIT_S)
    graft_once_then_shorten(grafter, 1, SHORT_S)
    pid_file = Path(folder, "victim.pid")
    if rank == 1:
        pid_file.write_text(str(os.getpid()))
        die_when_calling("batch_isend_irecv")
        grafter.step(2)
    post = dist.batch_isend_irecv

    def post_late(ops):
        wait_for(pid_file.exists, what="rank 1 starting graft 2")
        wait_for(lambda: gone(int(pid_file.read_text())), what="rank 1 dying")
        time.sleep(0.5)  # let the closed connection reach gloo
        return post(ops)

    dist.batch_isend_irecv = post_late
    try:
        outcome = attempt(grafter.step, 2)
    finally:
        dist.batch_isend_irecv = post
    Path(folder, f"named.{rank}").touch()
    if rank == 0:  # the store lives here; under torchrun it lives in the agent, past workers
        others = [Path(folder, f"named.{r}") for r in range(2, world)]
        wait_for(lambda: all(p.exists() for p in others), what="the other survivors' errors")
    return outcome


@pytest.mark.parametrize("world", [2, 3])
def test_sigkill_during_ring_exchange_names_the_network(world: int, tmp_path: Path) -> None:
    got = shared_pool(4).run(exchange_kill_task, world, str(tmp_path), deadline_s=120)
    assert got[1].exc_type == "WorkerExited", got[1]
    for rank, (kind, message, seconds) in survivors(got, 1):
        assert kind == "PeerError", (rank, kind, message)
        assert_names_only(message, rank, lost=1, network=1)
        assert "graft exchange at epoch 3" in message, message
        assert seconds < SHORT_S + SLACK_S, (rank, seconds)


# -- a rank killed inside the all_gather of the criteria ---------------------------------
def all_gather_kill_task(rank: int, world: int) -> tuple[str, str, float]:
    info = init_distributed(0, "gloo", INIT_S)
    grafter = Grafter(small_net(rank), info, GraftConfig(), INIT_S)
    graft_once_then_shorten(grafter, 1, SHORT_S)
    if rank == 1:
        die_when_calling("all_gather")
    return attempt(grafter.step, 2)


def test_all_gather_failure_names_the_lost_rank_not_the_caller() -> None:
    got = shared_pool(4).run(all_gather_kill_task, 3, deadline_s=120)
    assert got[1].exc_type == "WorkerExited", got[1]
    for rank, (kind, message, seconds) in survivors(got, 1):
        assert kind == "PeerError", (rank, kind, message)
        assert_names_only(message, rank, lost=1, network=1)
        assert "epoch 3" in message, message
        assert seconds < SHORT_S + SLACK_S, (rank, seconds)


# -- a rank that never comes, for each collective ------------------------------------------
COLLECTIVES = {
    "barrier": lambda info: barrier(info, SHORT_S, "the end-of-epoch barrier", 5),
    "all_reduce": lambda info: all_reduce_(torch.ones(3), SHORT_S, "the sum", epoch=5),
    "gather_objects": lambda info: gather_objects({"a": 1}, info, SHORT_S, "the summary", 5),
    "broadcast_object": lambda info: broadcast_object("x", info, 0, SHORT_S, "the address", 5),
}


def absent_task(rank: int, world: int, kind: str, folder: str) -> tuple[str, str, float]:
    """Rank 1 never calls the collective; it waits (alive) until rank 0 has given up."""
    info = init_distributed(0, "gloo", INIT_S)
    done = Path(folder, "done")
    if rank == 1:
        wait_for(done.exists, timeout_s=90, what="rank 0 giving up")
        return "absent", "", 0.0
    try:
        return attempt(COLLECTIVES[kind], info)
    finally:
        done.touch()


@pytest.mark.parametrize("kind", sorted(COLLECTIVES))
def test_every_collective_names_a_peer_that_does_not_come(kind: str, tmp_path: Path) -> None:
    got = shared_pool(4).run(absent_task, 2, kind, str(tmp_path), deadline_s=120)
    (_, (error, message, seconds)), = survivors(got, 1)  # fmt: skip
    assert error == "PeerError", (error, message)
    assert message.startswith("rank 0: network 1 (rank 1) did not reach "), message
    assert "at epoch 6" in message and f"dist.timeout_s = {SHORT_S:g} s" in message, message
    assert SHORT_S * 0.9 <= seconds < SHORT_S + SLACK_S, seconds


def objects_task(rank: int, world: int) -> tuple[list, object]:
    info = init_distributed(0, "gloo", 60)
    mine = {"rank": rank, "blob": "x" * (100 * rank + 1)}  # different sizes
    return gather_objects(mine, info, 60, "the test"), broadcast_object(("from", rank), info, 2)


def test_gather_and_broadcast_objects_in_rank_order() -> None:
    got = [o.value for o in shared_pool(4).run(objects_task, 3)]
    want = [{"rank": r, "blob": "x" * (100 * r + 1)} for r in range(3)]
    assert all(g == (want, ("from", 2)) for g in got), got


# -- DDP: a replica killed while its network trains --------------------------------------
def replica_kill_task(rank: int, world: int, run_dir: str) -> tuple[str, str, float]:
    """2 networks x 2 replicas train digits; rank 3 (network 1) dies in epoch 1."""
    cfg = with_overrides(
        load_config(DIGITS),
        run={"dir": run_dir, "name": "ddp", "epochs": 3, "resume": False},
        graft={"networks": 2},
        dist={"timeout_s": SHORT_S},
    )
    from distgraft.train.trainer import Trainer  # before the rendezvous: imports take seconds

    info = init_distributed(2, "gloo", INIT_S)

    class Quiet:
        def emit(self, *args, **fields) -> None:
            pass

    trainer = Trainer(cfg, info, Quiet())
    if rank == 3:
        step = trainer._train_step

        def dying_step(x, y):
            if trainer.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(x, y)

        trainer._train_step = dying_step
    return attempt(trainer.fit)


def test_lost_ddp_replica_names_its_network(tmp_path: Path) -> None:
    """Rank 2 (its partner in DDP) names the replica; ranks 0 and 1 fail at the graft,
    which network 1 does not reach, and name rank 3 too, not the ranks that gave up."""
    got = shared_pool(4).run(replica_kill_task, 4, str(tmp_path), deadline_s=150)
    assert got[3].exc_type == "WorkerExited", got[3]
    for rank, (kind, message, seconds) in survivors(got, 3):
        assert kind == "PeerError", (rank, kind, message)
        assert_names_only(message, rank, lost=3, network=1)
        assert "at epoch 2" in message, message
        assert seconds < 60, (rank, seconds)  # well before the epoch would have ended
    _, partner = next(s for s in survivors(got, 3) if s[0] == 2)
    assert "lost network 1 (rank 3), a replica of this network" in partner[1], partner[1]


# -- under torchrun: SIGSTOP, the error event, a startup error -----------------------------
def fault_cmd(nproc: int, *args: str) -> list[str]:
    """torchrun of ``fault_wrapper.py`` (distgraft with a fault) in place of ``-m distgraft``."""
    cmd = torchrun_cmd(nproc, *args)
    i = cmd.index("-m", cmd.index("torch.distributed.run") + 1)
    return [*cmd[:i], str(ROOT / "tests" / "fault_wrapper.py"), *cmd[i + 2 :]]


def _worker(agent: int, rank: int) -> int | None:
    """The pid of the agent's worker with this RANK."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == agent and f"RANK={rank}".encode() in environ:
            return int(d.name)
    return None


def errors(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [e for e in events(run_dir) if e["event"] == "error"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigstop_names_the_network_at_the_end_of_epoch_barrier(tmp_path: Path) -> None:
    """Rank 1 is stopped (SIGSTOP) as epoch 1 starts; with --graft.every=5 nothing grafts,
    so rank 0 waits at the end-of-epoch barrier and must name network 1 there, within
    about the timeout, in one error event whose message says "rank 0:" once."""
    mark = tmp_path / "stopped"
    args = [*common(tmp_path, "stop", 3), "--graft.every=5", f"--dist.timeout_s={E2E_TIMEOUT_S}"]
    fault = {"FAULT_RANK": "1", "FAULT_AT": "train_epoch", "FAULT_EPOCH": "1",
             "FAULT_ACTION": "stop", "FAULT_MARK": str(mark)}  # fmt: skip
    agent = subprocess.Popen(fault_cmd(2, *args), cwd=ROOT, env={**env(), **fault}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    run_dir = tmp_path / "stop"
    try:
        wait_for(lambda: errors(run_dir) or agent.poll() is not None, 240, "an error event")
    finally:
        victim = _worker(agent.pid, 1)
        if victim is not None:
            os.kill(victim, signal.SIGKILL)  # stopped: the agent's SIGTERM waits for SIGCONT
        out, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0, out[-3000:]
    (error,) = errors(run_dir)
    assert (error["network"], error["epoch"]) == (0, 1), error
    message = error["message"]
    assert message.startswith("rank 0: network 1 (rank 1) did not reach the end-of-epoch "
                              "barrier at epoch 2"), message  # fmt: skip
    assert message.count("rank 0:") == 1, message
    assert f"dist.timeout_s = {E2E_TIMEOUT_S} s" in message, message
    waited = error["time"] - float(mark.read_text())
    assert E2E_TIMEOUT_S * 0.9 <= waited < E2E_TIMEOUT_S + SLACK_S + 10, waited  # + epoch 1
    assert "PeerError" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_startup_error_of_a_resumed_run_reports_its_epoch(tmp_path: Path) -> None:
    """A run with epoch 0 done is resumed; rank 1 hangs before the ranks agree on the
    epoch (the trainer is not ready yet). Rank 0's error event says epoch 1, the epoch
    the run is at, and names network 1."""
    first = run(torchrun_cmd(2, *common(tmp_path, "resumed", 1)))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    args = [*common(tmp_path, "resumed", 3), f"--dist.timeout_s={E2E_TIMEOUT_S}"]
    fault = {"FAULT_RANK": "1", "FAULT_AT": "agree_epoch", "FAULT_ACTION": "hang"}
    proc = subprocess.run(fault_cmd(2, *args), cwd=ROOT, env={**env(), **fault},
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-3000:]
    (error,) = errors(tmp_path / "resumed")
    assert (error["network"], error["epoch"]) == (0, 1), error
    assert error["message"].startswith("rank 0: network 1 (rank 1) did not reach the "
                                       "agreement on the epoch to resume from"), error  # fmt: skip
    assert error["message"].count("rank 0:") == 1, error
