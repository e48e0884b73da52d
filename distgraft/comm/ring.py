"""Communication for grafting: ring exchange, criteria all_gather, signature check.

Each process sends its graftable state to its ring successor and receives its
predecessor's, with one non-blocking send and one receive per dtype buffer posted
together (``batch_isend_irecv``: grouped P2P on NCCL) and then waited, so any ring size,
odd ones included, is deadlock-free. Every wait has a timeout, and any failure (a timeout,
a connection closed while posting or waiting) becomes a ``PeerError`` that names the
network that was lost and the epoch (``comm.peers`` looks it up in the store), instead
of hanging like the reference code's polling of checkpoint files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from distgraft.comm.dist import all_gather_objects
from distgraft.comm.peers import Call, PeerError

__all__ = [
    "PeerError",
    "SignatureError",
    "ring_exchange",
    "exchange_buffers",
    "post_exchange",
    "PendingExchange",
    "gather_criteria",
    "check_signature",
    "flatten_by_dtype",
    "unflatten_by_dtype",
]


class SignatureError(RuntimeError):
    """Two ranks hold models that cannot be grafted together."""


def _dense(t: Tensor) -> bool:
    """Elements fill exactly ``numel`` consecutive storage slots (any dense memory format)."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return True
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _tiled(group: Sequence[Tensor]) -> Tensor | None:
    """One 1-D view over ``group`` if its tensors lie back to back in one storage, else None.

    That is the case of one flat buffer, and of the views a ``FlatState`` hands out: the
    exchange can then send the storage itself, without the copy ``torch.cat`` would make.
    """
    first = group[0]
    storage, start = first.untyped_storage().data_ptr(), first.storage_offset()
    end = start
    for t in group:
        if t.untyped_storage().data_ptr() != storage or t.storage_offset() != end:
            return None
        if not _dense(t):
            return None
        end += t.numel()
    return first.detach().as_strided((end - start,), (1,), start)


def _groups(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.detach())
    return groups


def _memory_order(t: Tensor) -> Tensor:
    """A dense tensor's elements as they lie in memory (no copy); others in logical order."""
    if _dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.reshape(-1)


def flatten_by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, Tensor]:
    """One flat buffer per dtype, in order of first appearance.

    Tensors that already tile one storage range (see ``_tiled``) come back as a view of it;
    any others are copied with ``torch.cat``. Dense tensors (channels_last included) travel
    in memory order, so ``unflatten_by_dtype`` gives them back with their strides.
    """
    out = {}
    for dtype, group in _groups(tensors).items():
        view = _tiled(group)
        out[dtype] = view if view is not None else torch.cat([_memory_order(t) for t in group])
    return out


def unflatten_by_dtype(buffers: dict[torch.dtype, Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Inverse of flatten_by_dtype: tensors shaped, strided and typed like ``like``."""
    offsets = dict.fromkeys(buffers, 0)
    out = []
    for t in like:
        buf, offset = buffers[t.dtype], offsets[t.dtype]
        if _dense(t):
            view = buf.as_strided(t.shape, t.stride(), buf.storage_offset() + offset)
        else:
            view = buf[offset : offset + t.numel()].view(t.shape)
        offsets[t.dtype] = offset + t.numel()
        out.append(view.to(t.dtype))
    return out


class PendingExchange:
    """Sends and receives in flight; ``wait()`` returns the received buffers."""

    def __init__(self, works: list, received: list[Tensor], call: Call | None) -> None:
        self._works, self._received, self._call = works, received, call

    def wait(self) -> list[Tensor]:
        if self._call is not None:
            self._call.wait(self._works)
        return self._received


def post_exchange(
    buffers: Sequence[Tensor],
    send_to: int,
    recv_from: int,
    timeout_s: float,
    epoch: int = -1,
    replicas: int | None = None,
    wire_dtype: torch.dtype | None = None,
) -> PendingExchange:
    """Post the sends of ``buffers`` to rank ``send_to`` and the receives from ``recv_from``.

    Returns at once, so the caller can compute while the bytes travel. Floating buffers
    travel as ``wire_dtype`` when given (bf16 halves the bytes); received buffers are in
    the wire dtype. The own buffers must not change until ``wait()`` returns. With
    ``send_to == recv_from == self`` (one network) copies of the own buffers come back.
    A lost partner raises PeerError, from here (a connection already closed) or ``wait()``.
    """
    call = Call("the graft exchange", epoch, timeout_s, [send_to, recv_from], replicas)
    if send_to == dist.get_rank() and recv_from == send_to:
        return PendingExchange([], [b.clone() for b in buffers], None)
    sends, recvs = [], []
    for b in buffers:
        dtype = wire_dtype if (wire_dtype is not None and b.is_floating_point()) else b.dtype
        sends.append(b if b.dtype == dtype else b.to(dtype))
        recvs.append(torch.empty(b.numel(), dtype=dtype, device=b.device))
    ops = []
    for s, r in zip(sends, recvs, strict=True):
        ops.append(dist.P2POp(dist.isend, s, send_to))
        ops.append(dist.P2POp(dist.irecv, r, recv_from))
    works = call.post(lambda: dist.batch_isend_irecv(ops))
    return PendingExchange(works, recvs, call)


def exchange_buffers(
    buffers: Sequence[Tensor],
    send_to: int,
    recv_from: int,
    timeout_s: float,
    epoch: int = -1,
    replicas: int | None = None,
    wire_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Send ``buffers`` to global rank ``send_to``; return those received from ``recv_from``."""
    return post_exchange(buffers, send_to, recv_from, timeout_s, epoch, replicas, wire_dtype).wait()


def ring_exchange(
    tensors: Sequence[Tensor],
    group: dist.ProcessGroup | None = None,
    timeout_s: float = 300.0,
    wire_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Send own tensors to the ring successor; return the predecessor's (same shapes, dtypes).

    The ring runs over the ranks of ``group`` (default: all) in rank order. One rank:
    returns copies of its own tensors. Tensors that already tile one buffer per dtype (a
    flat buffer, or a ``FlatState``'s views) are sent without a copy; others are packed
    into one buffer per dtype first (``torch.cat``).
    """
    ranks = (
        list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
    )
    me = ranks.index(dist.get_rank())
    flat = flatten_by_dtype(tensors)
    received = exchange_buffers(
        list(flat.values()),
        send_to=ranks[(me + 1) % len(ranks)],
        recv_from=ranks[(me - 1) % len(ranks)],
        timeout_s=timeout_s,
        wire_dtype=wire_dtype,
    )
    return unflatten_by_dtype(dict(zip(flat, received, strict=True)), tensors)


def gather_criteria(
    values: Tensor,
    timeout_s: float,
    epoch: int = -1,
    replicas: int | None = None,
    what: str = "the criteria all_gather of the graft",
) -> Tensor:
    """all_gather of each rank's criterion vector: row r holds rank r's (tiny)."""
    world = dist.get_world_size()
    if world == 1:
        return values[None].clone()
    out = [torch.empty_like(values) for _ in range(world)]
    call = Call(what, epoch, timeout_s, range(world), replicas)
    call.wait([call.post(lambda: dist.all_gather(out, values.contiguous(), async_op=True))])
    return torch.stack(out)


def _digest(signature: list[tuple]) -> bytes:
    return hashlib.sha256(repr(signature).encode()).digest()


def check_signature(
    signature: list[tuple],
    device: torch.device,
    timeout_s: float,
    epoch: int = -1,
    replicas: int = 1,
) -> None:
    """Every rank must hold the same (name, shape, dtype, strides) list; else all raise.

    Compares 32-byte digests first (cheap, bounded by the timeout); only on a mismatch
    are the full signatures gathered to name both ranks and the first differing tensor.
    """
    world = dist.get_world_size()
    if world == 1:
        return
    mine = torch.tensor(list(_digest(signature)), dtype=torch.uint8, device=device)
    what = "the model signature check of the first graft"
    digests = gather_criteria(mine, timeout_s, epoch, replicas, what)
    if bool((digests == digests[0]).all()):
        return
    every = all_gather_objects(signature, device, timeout_s, what, epoch)
    bad = next(r for r in range(world) if every[r] != every[0])
    raise SignatureError(
        f"models differ between rank 0 (network 0) and rank {bad} (network {bad // replicas}): "
        f"{_first_difference(every[0], every[bad], 0, bad)}; every network must build the "
        "same architecture to graft"
    )


def _first_difference(a: list, b: list, ra: int, rb: int) -> str:
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == y:
            continue
        if x is None:
            return f"tensor {y[0]!r} exists only on rank {rb}"
        if y is None:
            return f"tensor {x[0]!r} exists only on rank {ra}"
        if x[0] != y[0]:
            return f"tensor #{i} is {x[0]!r} on rank {ra} but {y[0]!r} on rank {rb}"

        def describe(sig: tuple) -> str:
            return f"{list(sig[1])} {sig[2]} (strides {list(sig[3])})"

        return f"tensor {x[0]!r} is {describe(x)} on rank {ra} but {describe(y)} on rank {rb}"
    return "signatures differ"  # pragma: no cover - digests differed, lists did not
