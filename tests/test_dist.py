"""Process layout and process-group setup: env parsing, networks x replicas, teardown.

Most tests are single-process; the last ones start 4 real processes (gloo, CPU) as
2 networks x 2 replicas and check each rank's DistInfo and that collectives on
``info.network_group`` stay inside the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli_helpers import ROOT, env
from dist_helpers import free_port, shared_pool, values
from torch import nn

from distgraft.comm.dist import (
    DistInfo,
    LayoutError,
    close,
    distributed,
    env_ranks,
    init_distributed,
    layout,
)

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch):
    """A process started without torchrun or srun, and no group left behind."""
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_initialized(), "a previous test left a process group behind"
    yield
    close()


# -- env_ranks ----------------------------------------------------------------------------
def test_env_ranks_torchrun() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert env_ranks(env) == (3, 4, 1, "torchrun")
    assert env_ranks({"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3, 0, "torchrun")


def test_env_ranks_torchrun_wins_over_slurm() -> None:
    """torchrun started inside an srun allocation: torchrun's ranks are the real ones."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}
    env |= {"SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert env_ranks(env) == (1, 2, 1, "torchrun")


def test_env_ranks_slurm() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500",
    }
    assert env_ranks(env) == (5, 8, 1, "slurm")


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_env_ranks_slurm_without_master_is_a_clear_error(missing: str) -> None:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500",
    }
    del env[missing]
    with pytest.raises(LayoutError, match="MASTER_ADDR and MASTER_PORT"):
        env_ranks(env)


def test_env_ranks_without_launcher() -> None:
    assert env_ranks({}) == (0, 1, 0, "single")


# -- layout -------------------------------------------------------------------------------
def test_layout_four_ranks_two_networks() -> None:
    got = [layout(r, 4, 2) for r in range(4)]
    assert got == [(0, 0, 2, 2), (0, 1, 2, 2), (1, 0, 2, 2), (1, 1, 2, 2)]


def test_layout_default_is_one_network_per_rank() -> None:
    assert [layout(r, 3, 0) for r in range(3)] == [(0, 0, 3, 1), (1, 0, 3, 1), (2, 0, 3, 1)]
    assert layout(0, 1) == (0, 0, 1, 1)


@pytest.mark.parametrize(("networks", "world"), [(3, 4), (5, 4), (4, 6), (-1, 4)])
def test_layout_networks_must_divide_world(networks: int, world: int) -> None:
    with pytest.raises(LayoutError) as err:
        layout(0, world, networks)
    assert str(networks) in str(err.value) and str(world) in str(err.value)


def test_distinfo_ring_neighbours() -> None:
    info = DistInfo(5, 6, 1, 2, 1, 3, 2, torch.device("cpu"))  # network 2, replica 1 of 3 x 2
    assert (info.predecessor, info.successor) == (1, 0)
    assert info.rank_of(info.predecessor) == 3 and info.rank_of(info.successor) == 1
    assert info.rank_of(0, 0) == 0 and info.rank_of(4) == 3  # network taken mod N


# -- init_distributed / distributed in this process ---------------------------------------
def test_init_without_launcher_is_world_one(no_launcher) -> None:
    info = init_distributed(env={})
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert (info.network, info.replica, info.networks, info.replicas) == (0, 0, 1, 1)
    assert info.network_group is None
    if not torch.cuda.is_available():
        assert info.backend == "gloo" and info.device == torch.device("cpu")
    close()
    assert not dist.is_initialized()
    close()  # idempotent


def test_init_rejects_nccl_without_cuda(no_launcher) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(LayoutError, match="nccl"):
        init_distributed(backend="nccl", env={})
    assert not dist.is_initialized()


def test_distributed_tears_down_on_success(no_launcher) -> None:
    with distributed() as info:
        assert dist.is_initialized() and info.world_size == 1
        dist.barrier()
    assert not dist.is_initialized()


def test_distributed_tears_down_when_the_body_raises(no_launcher) -> None:
    with pytest.raises(KeyError, match="boom"), distributed():
        assert dist.is_initialized()
        raise KeyError("boom")
    assert not dist.is_initialized()


CLOSE_STOPS_THREADS = """
import os, time, torch
from distgraft.comm.dist import close, init_distributed
init_distributed(0, "gloo", 30)
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # imports torch._dynamo
def gloo():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read())
        except FileNotFoundError:  # the thread ended in between
            pass
    return [n for n in names if "gloo" in n]
deadline = time.monotonic() + 10  # a loaded machine starts and names threads late
while not gloo() and time.monotonic() < deadline:
    time.sleep(0.05)
assert gloo(), "the process group runs gloo threads"
close()
deadline = time.monotonic() + 10  # a loaded machine schedules the exiting threads late
while gloo() and time.monotonic() < deadline:
    time.sleep(0.05)
print("gloo threads after close:", len(gloo()))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_close_stops_the_gloo_threads_after_an_optimizer_exists() -> None:
    """A group that outlives close() aborts the process at exit (SIGABRT from a gloo thread
    releasing tensors during interpreter shutdown). A fresh process: the import order
    that pins the group only shows the first time torch._dynamo is imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", CLOSE_STOPS_THREADS], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gloo threads after close: 0" in proc.stdout, proc.stdout


# -- 4 processes: 2 networks x 2 replicas -------------------------------------------------
def layout_task(rank: int, world: int) -> dict:
    info = init_distributed(networks=2, backend="gloo", timeout_s=60)
    group_ranks = dist.get_process_group_ranks(info.network_group)
    # DDP-style gradient sum inside the network only
    summed = torch.tensor([10.0**rank])
    dist.all_reduce(summed, group=info.network_group)
    # real DDP on the network group: broadcast of replica 0's weights, averaged gradients
    torch.manual_seed(rank)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 1), process_group=info.network_group)
    start = ddp.module.weight.detach().clone()
    ddp(torch.full((2, 3), float(rank + 1))).sum().backward()
    return {
        "info": (info.rank, info.world_size, info.local_rank, info.network, info.replica),
        "shape": (info.networks, info.replicas, str(info.device), info.backend),
        "ring": (info.predecessor, info.successor, info.rank_of(info.predecessor)),
        "group": group_ranks,
        "summed": summed.item(),
        "weight": start.numpy().copy(),
        "grad": ddp.module.weight.grad.numpy().copy(),
    }


@pytest.mark.timeout(120)
def test_two_networks_times_two_replicas() -> None:
    got = values(shared_pool(4).run(layout_task, 4))
    for rank, out in enumerate(got):
        network, replica = divmod(rank, 2)
        assert out["info"] == (rank, 4, rank, network, replica)
        assert out["shape"] == (2, 2, "cpu", "gloo")
        assert out["ring"] == (
            (network - 1) % 2,
            (network + 1) % 2,
            2 * ((network - 1) % 2) + replica,
        )
        assert out["group"] == [2 * network, 2 * network + 1]
        assert out["summed"] == 10.0 ** (2 * network) + 10.0 ** (2 * network + 1)
        lead = got[2 * network]
        assert (out["weight"] == lead["weight"]).all()  # DDP broadcast within the network
        # d/dw sum(w . x + b) over 2 rows of x = rank + 1: 2 (rank + 1); DDP averages
        mean_grad = 2 * ((2 * network + 1) + (2 * network + 2)) / 2
        assert (out["grad"] == mean_grad).all(), (rank, out["grad"])
    assert not (got[0]["weight"] == got[2]["weight"]).all()  # networks stay apart


def slurm_task(rank: int, world: int) -> tuple:
    """A plain ``srun`` launch: SLURM_* variables plus the exported MASTER_ADDR/PORT."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        del os.environ[key]
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank))
    try:
        info = init_distributed(backend="gloo", timeout_s=60)
        total = torch.tensor([rank + 1])
        dist.all_reduce(total)
        return info.rank, info.world_size, info.local_rank, info.network, total.item()
    finally:
        for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            os.environ.pop(key, None)


@pytest.mark.timeout(120)
def test_slurm_launch_without_torchrun() -> None:
    got = values(shared_pool(4).run(slurm_task, 2))
    assert got == [(0, 2, 0, 0, 3), (1, 2, 1, 1, 3)]


# -- torchrun restarts: the store of each attempt -----------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("shared", [True, False], ids=["agent-store", "store-per-round"])
def test_restarted_rank_goes_straight_to_the_new_store(shared: bool, tmp_path: Path) -> None:
    """torchrun --max-restarts 1 with the agent's store shared across rounds (torchrun's
    default) and with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the multi-node scripts).
    In the second attempt rank 0 starts 3 s late: rank 1 must wait for the new store's
    address, never dial the one the first attempt left (a dead port costs a TCPStore
    client its connect timeout: the restarts lost 5-12 s that way)."""
    out = tmp_path / "out"
    out.mkdir()
    extra = {"STUB_OUT": str(out), "STUB_RANK0_DELAY_S": "3"}
    if not shared:
        extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           str(ROOT / "tests" / "attempt_stub.py")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **extra}, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {p.stem: json.loads(p.read_text()) for p in out.iterdir()}
    assert sorted(got) == ["rank0-try0", "rank0-try1", "rank1-try0", "rank1-try1"]
    assert all(r["sum"] == 3.0 and r["world"] == 2 for r in got.values()), got
    old, new = got["rank0-try0"]["store_port"], got["rank0-try1"]["store_port"]
    assert old != new and got["rank1-try1"]["store_port"] == new
    assert old not in got["rank1-try1"]["dialled"], got["rank1-try1"]
    assert "failed to connect" not in proc.stderr, proc.stderr[-3000:]
