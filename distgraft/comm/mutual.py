"""The per-step exchange of mutual learning: every network's logits on the same batch.

One all_gather of [batch, classes] in the group of replica j of every network
(``DistInfo.replica_group``), waited with a timeout. It runs every step, so unlike the
other collectives it is not marked in the store on entry (a round trip per step); when it
fails, the peers whose heartbeat stopped are named in the ``PeerError``, with the epoch
(``comm.peers.unmarked_error``).
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from distgraft.comm.dist import DistInfo
from distgraft.comm.peers import unmarked_error

__all__ = ["exchange_logits"]

WHAT = "the mutual-learning exchange of the logits"


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
        peers = [info.rank_of(k) for k in range(info.networks)]
        raise unmarked_error(WHAT, epoch, timeout_s, peers, info.replicas, e,
                             time.monotonic() - start) from e  # fmt: skip
    return out
