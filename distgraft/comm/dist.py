"""Process-group setup from torchrun, SLURM or nothing; the networks x replicas layout.

One process per (network, replica). ``world_size = networks * replicas``; rank r is
replica ``r % R`` of network ``r // R``. With R > 1 the replicas of a network form a
DDP group (one network spread over several GPUs, the ImageNet case); R = 1 is the
paper's setup. The same script runs under torchrun, under a plain ``srun`` (SLURM
variables mapped like timm does) and alone (world size 1, an in-process store).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "LayoutError",
    "Disagreement",
    "env_ranks",
    "layout",
    "init_distributed",
    "close",
    "distributed",
    "barrier",
    "all_reduce_",
    "agree_min",
    "gather_objects",
    "gather_ints",
    "broadcast_object",
]


_STORE_KEY = "distgraft/store"
_TOKEN_KEY = "distgraft/token"


class LayoutError(ValueError):
    """The networks x replicas layout does not fit the world size."""


class Disagreement(RuntimeError):
    """The ranks were started with values that must agree but do not; ``views`` holds each
    rank's, in rank order, so that every rank can say what differs."""

    def __init__(self, views: list[Any]) -> None:
        super().__init__("the ranks disagree on values that must be equal")
        self.views = views


_AGREE_KEY = "distgraft/agree"


def _agree(store: dist.Store, rank: int, world: int, view: Any, timeout: timedelta) -> None:
    """Compare ``view`` (JSON-able) across ranks through the rendezvous store.

    Through the store rather than a collective: it runs before the process group exists,
    so ranks that disagree on the backend, the layout or the wire format fail here, with a
    message, instead of inside gloo or NCCL.
    """
    store.set(f"{_AGREE_KEY}/{rank}", json.dumps(view, sort_keys=True))
    keys = [f"{_AGREE_KEY}/{r}" for r in range(world)]
    try:
        store.wait(keys, timeout)
    except RuntimeError as e:
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise TimeoutError(
            f"rank {rank}: ranks {missing} did not start within {timeout.total_seconds():.0f} s "
            f"(they died, or run another command): {e}"
        ) from e
    views = [json.loads(store.get(k).decode()) for k in keys]
    if any(v != views[0] for v in views):
        raise Disagreement(views)


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: global rank, its network and replica, its device."""

    rank: int
    world_size: int
    local_rank: int
    network: int
    replica: int
    networks: int
    replicas: int
    device: torch.device
    backend: str = "gloo"
    network_group: object | None = field(default=None, compare=False, repr=False)
    """Process group of this network's replicas (for DDP); None when replicas == 1."""
    replica_group: object | None = field(default=None, compare=False, repr=False)
    """Process group of replica ``replica`` of every network (ranks j, R + j, 2R + j, ...),
    for per-step exchanges between networks (mutual learning); None unless asked for."""

    def rank_of(self, network: int, replica: int | None = None) -> int:
        """Global rank of ``replica`` (default: this one) of ``network`` (taken mod N)."""
        j = self.replica if replica is None else replica
        return (network % self.networks) * self.replicas + j

    @property
    def predecessor(self) -> int:
        """Network this one grafts from (ring: k - 1 mod N)."""
        return (self.network - 1) % self.networks

    @property
    def successor(self) -> int:
        return (self.network + 1) % self.networks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_network_lead(self) -> bool:
        """Replica 0 of its network: writes the network's checkpoints and events."""
        return self.replica == 0


def env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, source) from torchrun, SLURM or nothing."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise LayoutError(
                "running under srun without torchrun needs MASTER_ADDR and MASTER_PORT "
                "exported by the job script (see launch/slurm/srun_plain.sbatch)"
            )
        return (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            "slurm",
        )
    return 0, 1, 0, "single"


def layout(rank: int, world_size: int, networks: int = 0) -> tuple[int, int, int, int]:
    """(network, replica, networks, replicas) of ``rank``; networks 0 means world size."""
    n = networks or world_size
    if n < 1 or n > world_size or world_size % n:
        raise LayoutError(
            f"graft.networks = {networks} does not fit world size {world_size}: the number "
            f"of networks must divide the number of processes (replicas = world / networks)"
        )
    replicas = world_size // n
    return rank // replicas, rank % replicas, n, replicas


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """A store that holds only this attempt's keys.

    torchrun's agent keeps one store for all ``--max-restarts`` rounds and hands it to the
    workers (TORCHELASTIC_USE_AGENT_STORE). Restarted workers would find the dead workers'
    gloo addresses there, and the restart count cannot serve as a key prefix because
    agents on different nodes count differently. So rank 0 hosts a fresh store and
    publishes its port with a random token; the others connect and check the token,
    which tells a live store from an address left by the previous attempt.
    """
    url = f"env://?rank={rank}&world_size={world}"
    store, _, _ = next(dist.rendezvous(url, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store  # rank 0 hosts a new store for every attempt already
    host = os.environ["MASTER_ADDR"]
    if rank == 0:
        token = uuid.uuid4().hex
        own = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout,
                            wait_for_workers=False)  # fmt: skip
        own.set(_TOKEN_KEY, token)
        store.set(_STORE_KEY, f"{own.port}:{token}")
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, token = store.get(_STORE_KEY).decode().split(":")
        try:
            own = dist.TCPStore(host, int(port), world, is_master=False,
                                timeout=timedelta(seconds=5))  # fmt: skip
            if own.get(_TOKEN_KEY).decode() == token:
                return own
        except (RuntimeError, ValueError):  # refused or stale: rank 0 has not published yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: rank 0's store at {host}:{port} did not answer "
                f"within {timeout.total_seconds():.0f} s"
            )
        time.sleep(0.2)


def init_distributed(
    networks: int = 0,
    backend: str = "auto",
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    agree: Any = None,
    replica_groups: bool = False,
) -> DistInfo:
    """Start the default process group and the per-network groups.

    World size 1 without any launcher gets an in-process store, so the rest of the code
    never special-cases "not distributed". ``agree`` (JSON-able, e.g. the settings that
    must be equal on every rank) is compared across ranks first: ``Disagreement`` if not.
    """
    rank, world, local_rank, source = env_ranks(env)
    network, replica, n, r = layout(rank, world, networks)
    device = _device(local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LayoutError("dist.backend = 'nccl' needs CUDA; use gloo (or auto) on CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    _import_compiler_first()
    if not dist.is_initialized():
        if source == "single":
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        else:
            store = _attempt_store(rank, world, timeout)
            if agree is not None:
                _agree(store, rank, world, agree, timeout)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=timeout
            )
    group = across = None
    for k in range(n):  # every rank must create every group, in the same order
        ranks = list(range(k * r, (k + 1) * r))
        g = dist.new_group(ranks, timeout=timeout) if r > 1 else None
        if k == network:
            group = g
    for j in range(r) if replica_groups and n > 1 else ():
        g = dist.new_group([k * r + j for k in range(n)], timeout=timeout)
        if j == replica:
            across = g
    return DistInfo(rank, world, local_rank, network, replica, n, r, device, backend, group,
                    across)  # fmt: skip


def _import_compiler_first() -> None:
    """Import torch._dynamo before any process group exists.

    The first optimizer (or torch.compile) imports it lazily; when that happens after
    init_process_group, a reference taken during the import keeps the gloo group alive in
    C++ after destroy_process_group. Its worker threads then outlive Python: one of them
    releasing a finished all_gather's tensors during interpreter shutdown cannot take
    the GIL and aborts the process ("terminate called without an active exception",
    SIGABRT after a run that completed). Imported first, nothing pins the group and
    close() really stops its threads (tests/test_dist.py checks it).
    """
    import torch._dynamo  # noqa: F401


def close() -> None:
    """Tear the process group down (idempotent)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def distributed(
    networks: int = 0,
    backend: str = "auto",
    timeout_s: float = 300.0,
    agree: Any = None,
    replica_groups: bool = False,
) -> Iterator[DistInfo]:
    """``with distributed(...) as info:`` -- tears down on success and on error."""
    info = init_distributed(networks, backend, timeout_s, agree=agree,
                            replica_groups=replica_groups)  # fmt: skip
    try:
        yield info
    finally:
        close()


def barrier(info: DistInfo, timeout_s: float, what: str) -> None:
    """A barrier that fails after ``timeout_s`` with a message saying what it waited for."""
    if info.world_size > 1:
        _bounded(dist.barrier(async_op=True), timeout_s, what)


def _bounded(work: Any, timeout_s: float, what: str) -> None:
    """Wait for an async collective; a peer that never comes turns into an error, not a hang."""
    try:
        work.wait(timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise TimeoutError(
            f"rank {dist.get_rank()}: peers did not reach {what} within {timeout_s:.0f} s ({e})"
        ) from e


def all_reduce_(tensor: torch.Tensor, timeout_s: float, what: str, op: str = "sum") -> torch.Tensor:
    """In-place all_reduce over every rank (``op``: sum | min | max), bounded by the timeout."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        _bounded(dist.all_reduce(tensor, op=ops[op], async_op=True), timeout_s, what)
    return tensor


def agree_min(value: int, device: torch.device, timeout_s: float, what: str) -> int:
    """The smallest of every rank's ``value`` (e.g. the latest epoch all can resume from)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    return int(all_reduce_(t, timeout_s, what, op="min").item())


def gather_objects(obj: Any, info: DistInfo, timeout_s: float, what: str) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order.

    ``all_gather_object`` has no timeout of its own, so a bounded barrier goes first: a
    lost peer raises there instead of hanging the gather.
    """
    if info.world_size == 1:
        return [obj]
    barrier(info, timeout_s, what)
    every: list[Any] = [None] * info.world_size
    dist.all_gather_object(every, obj)
    return every


def gather_ints(values: list[int], info: DistInfo, timeout_s: float, what: str) -> list[list[int]]:
    """Every rank's short list of integers (all of the same length), in rank order.

    Bounded by ``timeout_s`` like a barrier, which it also is: no rank returns before every
    rank has called it.
    """
    if info.world_size == 1:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.long, device=info.device)
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    _bounded(dist.all_gather(out, t, async_op=True), timeout_s, what)
    return [o.tolist() for o in out]


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
