"""A worker for torchrun ``--max-restarts 1`` that records which stores it dials.

Used by tests/test_dist.py. Each attempt starts the process group with
``init_distributed``, checks it with an all_reduce and writes
``OUT/rank{R}-try{N}.json``: the port of the attempt's store, and every TCPStore port
this rank dialled as a client (torch.distributed.TCPStore wrapped to note them). The
first attempt ends with rank 1 failing, so torchrun restarts both; in the second, rank 0
starts late (``STUB_RANK0_DELAY_S``) so that the others look the store up before it is
published: they must wait for it, not dial the address the first attempt left.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's distgraft

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from distgraft.comm.dist import close, init_distributed  # noqa: E402

dialled: list[int] = []
TCPStore = dist.TCPStore


def noting_tcpstore(*args, **kwargs):
    """torch.distributed.TCPStore, noting the port of each client connection."""
    if not kwargs.get("is_master", args[3] if len(args) > 3 else False):
        dialled.append(int(kwargs.get("port", args[1] if len(args) > 1 else 0)))
    return TCPStore(*args, **kwargs)


def main() -> int:
    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt > 0 and rank == 0:
        time.sleep(float(os.environ.get("STUB_RANK0_DELAY_S", "3")))
    dist.TCPStore = noting_tcpstore
    info = init_distributed(0, "gloo", 60)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    store = dist.distributed_c10d._get_default_store()
    while not hasattr(store, "port"):  # the group wraps the store it was given
        store = store.underlying_store
    out = Path(os.environ["STUB_OUT"], f"rank{rank}-try{attempt}.json")
    out.write_text(json.dumps({"store_port": store.port, "dialled": dialled,
                               "sum": total.item(), "world": info.world_size}))  # fmt: skip
    dist.barrier()
    close()
    return 3 if attempt == 0 and rank == 1 else 0


if __name__ == "__main__":
    sys.exit(main())
