"""The per-step exchange of mutual learning: every network's logits on the same batch.

One all_gather of [batch, classes] in the group of replica j of every network
(``DistInfo.replica_group``), waited with a timeout. When it fails (a peer died, hangs, or
runs another schedule), the survivors say so in the store and wait a little for each
other's word: the ranks that never answer are named in the ``PeerError``, with the epoch.
No store traffic on the normal path: that would cost a round trip every step.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from distgraft.comm.dist import DistInfo
from distgraft.comm.ring import PeerError, _store

__all__ = ["exchange_logits"]

_ROLL_CALL = "distgraft/mutual-alive"
_ROLL_CALL_S = 10.0


def exchange_logits(logits: Tensor, info: DistInfo, timeout_s: float, epoch: int) -> list[Tensor]:
    """Every network's ``logits`` (same shape on every rank), in network order."""
    if info.networks == 1:
        return [logits]
    out = [torch.empty_like(logits) for _ in range(info.networks)]
    start = time.monotonic()
    try:
        work = dist.all_gather(out, logits.contiguous(), group=info.replica_group, async_op=True)
        ok = work.wait(timedelta(seconds=timeout_s))
        if ok is False:
            raise RuntimeError("wait returned False")
    except RuntimeError as e:
        raise _lost(info, epoch, timeout_s, time.monotonic() - start, e) from e
    return out


def _lost(
    info: DistInfo, epoch: int, timeout_s: float, waited: float, cause: Exception
) -> PeerError:
    """A PeerError naming the networks whose replica did not answer the roll call."""
    peers = [info.rank_of(k) for k in range(info.networks) if k != info.network]
    missing = peers
    store = _store()
    if store is not None:
        try:
            store.set(f"{_ROLL_CALL}/{epoch}/{info.rank}", "1")
            deadline = time.monotonic() + min(_ROLL_CALL_S, timeout_s)
            while True:
                missing = [r for r in peers if not store.check([f"{_ROLL_CALL}/{epoch}/{r}"])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        except Exception:  # the store's host is gone too: name every peer
            missing = peers
    who = ", ".join(f"network {r // info.replicas} (rank {r})" for r in missing) or "a peer"
    how = (f"no answer within dist.timeout_s = {timeout_s:g} s" if waited >= 0.95 * timeout_s
           else f"the connection failed after {waited:.1f} s")  # fmt: skip
    return PeerError(
        f"rank {info.rank}: {who} did not answer the mutual-learning exchange of the logits in "
        f"epoch {epoch + 1} ({how}); the peer died, hangs, or runs another schedule "
        f"(cause: {cause})"
    )
