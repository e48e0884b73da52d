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
import pickle
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distgraft.comm import peers
from distgraft.comm.peers import Call, PeerError

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
    "all_gather_objects",
    "broadcast_object",
    "replica_guard",
    "PeerError",
]


_STORE_KEY = "distgraft/store"
_TOKEN_KEY = "distgraft/token"
_JOINED_KEY = "distgraft/joined"
_DIAL_S = 2.0
"""Connect timeout for a published address: a live store answers in milliseconds."""


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
        _all_have_read(store, rank, world, timeout)
        raise Disagreement(views)


def _all_have_read(store: dist.Store, rank: int, world: int, timeout: timedelta) -> None:
    """Wait until every rank has read the views before exiting: the store may live in this
    process or its node's agent, and a rank that leaves first takes it away from the
    others before they could say what differs (they would die of a lost connection)."""
    store.set(f"{_AGREE_KEY}/read/{rank}", "1")
    with contextlib.suppress(Exception):  # a rank that died meanwhile: nothing more to wait for
        store.wait([f"{_AGREE_KEY}/read/{r}" for r in range(world)],
                   min(timeout, timedelta(seconds=30)))  # fmt: skip


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
    workers (TORCHELASTIC_USE_AGENT_STORE; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 turns that
    off, and then rank 0 hosts a new store every round, at a new MASTER_PORT). Restarted
    workers would find the dead workers' gloo addresses there, and the restart count
    cannot serve as a key prefix because agents on different nodes count differently. So
    rank 0 hosts a fresh store and publishes its address, with a random token, in the
    agent's store; the others connect and check the token.

    The address outlives the attempt in the agent's store. Rank 0 therefore withdraws it
    as soon as every rank has connected: a restarted rank then waits for the new rank 0
    to publish instead of first dialling the previous attempt's port (a dead port costs
    a TCPStore client its whole connect timeout). Only an attempt that died before all
    its ranks connected leaves an address behind; the token tells it from a live one.
    """
    url = f"env://?rank={rank}&world_size={world}"
    store, _, _ = next(dist.rendezvous(url, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store  # rank 0 hosts a new store for every attempt already
    host = os.environ["MASTER_ADDR"]
    if rank == 0:
        return _host_attempt_store(store, host, world, timeout)
    return _join_attempt_store(store, host, rank, world, timeout)


def _host_attempt_store(agent: dist.Store, host: str, world: int, timeout: timedelta):
    """Rank 0: host the store, publish it, withdraw the address once all have joined."""
    token = uuid.uuid4().hex
    own = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
    own.set(_TOKEN_KEY, token)
    agent.set(_STORE_KEY, f"{own.port}:{token}")
    try:
        own.wait([f"{_JOINED_KEY}/{r}" for r in range(1, world)], timeout)
    except RuntimeError as e:
        raise TimeoutError(
            f"rank 0: not every rank connected to this attempt's store within "
            f"{timeout.total_seconds():.0f} s (dist.timeout_s)"
        ) from e
    agent.delete_key(_STORE_KEY)
    return own


def _join_attempt_store(agent: dist.Store, host: str, rank: int, world: int, timeout: timedelta):
    """Other ranks: wait for rank 0's address, connect, check the token, say so."""
    deadline = time.monotonic() + timeout.total_seconds()
    port = "?"
    while time.monotonic() < deadline:
        try:
            port, token = agent.get(_STORE_KEY).decode().split(":")
            own = dist.TCPStore(host, int(port), world, is_master=False,
                                timeout=timedelta(seconds=_DIAL_S))  # fmt: skip
            if own.get(_TOKEN_KEY).decode() == token:
                own.set_timeout(timeout)
                own.set(f"{_JOINED_KEY}/{rank}", "1")
                return own
        except (RuntimeError, ValueError):  # no address yet, or one a dead attempt left
            pass
        time.sleep(0.1)
    raise TimeoutError(
        f"rank {rank}: rank 0's store (last published at {host}:{port}) did not answer "
        f"within {timeout.total_seconds():.0f} s (dist.timeout_s)"
    )


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
            peers.attach(store, rank, r, timeout_s)
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
    peers.detach()
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


def barrier(info: DistInfo, timeout_s: float, what: str, epoch: int = -1) -> None:
    """A barrier that fails after ``timeout_s`` with a PeerError naming who did not come.

    ``what`` says what the ranks wait for ("the end-of-epoch barrier"), ``epoch`` the
    epoch the caller is in (-1: none); both go into the error.
    """
    if info.world_size > 1:
        call = _call(what, epoch, timeout_s)
        call.wait([call.post(lambda: dist.barrier(async_op=True))])


def _call(what: str, epoch: int, timeout_s: float) -> Call:
    """A bounded collective over every rank (see ``comm.peers``)."""
    return Call(what, epoch, timeout_s, range(dist.get_world_size()))


def all_reduce_(
    tensor: torch.Tensor, timeout_s: float, what: str, op: str = "sum", epoch: int = -1
) -> torch.Tensor:
    """In-place all_reduce over every rank (``op``: sum | min | max), bounded by the timeout."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        call = _call(what, epoch, timeout_s)
        call.wait([call.post(lambda: dist.all_reduce(tensor, op=ops[op], async_op=True))])
    return tensor


def agree_min(
    value: int, device: torch.device, timeout_s: float, what: str, epoch: int = -1
) -> int:
    """The smallest of every rank's ``value`` (e.g. the latest epoch all can resume from)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    return int(all_reduce_(t, timeout_s, what, op="min", epoch=epoch).item())


def _all_gather(t: torch.Tensor, timeout_s: float, what: str, epoch: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    call = _call(what, epoch, timeout_s)
    call.wait([call.post(lambda: dist.all_gather(out, t, async_op=True))])
    return out


def gather_objects(
    obj: Any, info: DistInfo, timeout_s: float, what: str, epoch: int = -1
) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (bounded, unlike all_gather_object)."""
    if info.world_size == 1:
        return [obj]
    return all_gather_objects(obj, info.device, timeout_s, what, epoch)


def gather_ints(
    values: list[int], info: DistInfo, timeout_s: float, what: str, epoch: int = -1
) -> list[list[int]]:
    """Every rank's short list of integers (all of the same length), in rank order.

    Bounded by ``timeout_s`` like a barrier, which it also is: no rank returns before every
    rank has called it.
    """
    if info.world_size == 1:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.long, device=info.device)
    return [o.tolist() for o in _all_gather(t, timeout_s, what, epoch)]


def all_gather_objects(
    obj: Any, device: torch.device, timeout_s: float, what: str, epoch: int = -1
) -> list[Any]:
    """``all_gather_object`` with a timeout: pickled bytes in two bounded all_gathers.

    The sizes go first, then the bytes padded to the longest (``all_gather_object`` does
    the same, but waits without a bound).
    """
    data = _pickled(obj, device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = [int(s) for s in _all_gather(size, timeout_s, what, epoch)]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = _all_gather(padded, timeout_s, what, epoch)
    return [_unpickled(p[:n]) for p, n in zip(parts, sizes, strict=True)]


def broadcast_object(
    obj: Any,
    info: DistInfo,
    src: int = 0,
    timeout_s: float | None = None,
    what: str = "a value broadcast by rank 0",
    epoch: int = -1,
) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (default timeout: the group's)."""
    if info.world_size == 1:
        return obj
    timeout_s = peers.group_timeout_s() if timeout_s is None else timeout_s
    data = _pickled(obj, info.device) if info.rank == src else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.long,
                        device=info.device)  # fmt: skip
    _broadcast(size, src, timeout_s, what, epoch)
    box = data if data is not None else torch.empty(int(size), dtype=torch.uint8,
                                                     device=info.device)  # fmt: skip
    _broadcast(box, src, timeout_s, what, epoch)
    return obj if info.rank == src else _unpickled(box)


def _broadcast(t: torch.Tensor, src: int, timeout_s: float, what: str, epoch: int) -> None:
    call = _call(what, epoch, timeout_s)
    call.wait([call.post(lambda: dist.broadcast(t, src, async_op=True))])


def _pickled(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _unpickled(t: torch.Tensor) -> Any:
    """Objects come from the other ranks of this job, as with ``all_gather_object``."""
    return pickle.loads(t.cpu().numpy().tobytes())


@contextlib.contextmanager
def replica_guard(info: DistInfo, epoch: int) -> Iterator[None]:
    """Turn a failure of DDP's collectives among this network's replicas into a PeerError.

    DDP all-reduces gradients (and broadcasts buffers) inside forward and backward, on
    the network's group with the group's timeout (``dist.timeout_s``): a lost replica
    makes them raise the transport's error there. Wrapped around each training step, this
    names the network, the replica that stopped answering and the epoch. Errors of the
    training itself (a shape mismatch, out of memory) pass through unchanged.
    """
    if info.replicas == 1:
        yield
        return
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, PeerError):
            raise
        error = peers.replica_error(e, info.rank, info.rank_of(info.network, 0),
                                    info.replicas, epoch)  # fmt: skip
        if error is None:
            raise
        raise error from e
