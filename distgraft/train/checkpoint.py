"""Atomic checkpoints per network and agreement on the epoch to resume from.

Each network writes ``net{k}/last.pt`` (and keeps the one before as ``prev.pt``) after
every completed epoch, grafting included: temp file, fsync, rename, fsync of the folder,
so a crash at any instant leaves a complete file. Networks can be at most one epoch apart
(every epoch ends with a barrier), so on restart the ranks all_reduce MIN over their
latest epochs and each loads whichever of last/prev holds that epoch: a killed worker
(torchrun ``--max-restarts``) continues as if nothing happened.

Written and read through ``distgraft.files``: atomically, and with
``torch.load(weights_only=True)`` (only tensors and plain containers, never arbitrary
pickled objects, so a checkpoint from elsewhere cannot run code).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from distgraft.comm.dist import agree_min
from distgraft.files import copy_atomic, load, save_atomic

__all__ = [
    "FORMAT_VERSION",
    "save_atomic",
    "copy_atomic",
    "load",
    "save_epoch",
    "available_epochs",
    "agree_epoch",
    "load_epoch",
    "rng_state",
    "set_rng_state",
]

FORMAT_VERSION = 1


def save_epoch(state: dict, net_dir: str | Path) -> None:
    """Save a completed epoch as last.pt, keeping the previous last.pt as prev.pt."""
    net_dir = Path(net_dir)
    last = net_dir / "last.pt"
    if last.exists():
        os.replace(last, net_dir / "prev.pt")
    save_atomic(state, last)


def available_epochs(net_dir: str | Path) -> dict[int, Path]:
    """Completed epochs that can be resumed from, epoch -> file (unreadable files skipped)."""
    found: dict[int, Path] = {}
    for name in ("prev.pt", "last.pt"):
        path = Path(net_dir) / name
        if not path.exists():
            continue
        try:
            found[int(load(path)["epoch"])] = path
        except Exception:  # a torn or foreign file: never resume from it
            continue
    return found


def agree_epoch(local: int, device: torch.device, timeout_s: float) -> int:
    """The latest epoch every rank can resume from: all_reduce MIN (-1: start fresh).

    A lost peer's error names the epoch this rank would resume at (``local + 1``).
    """
    what = "the agreement on the epoch to resume from"
    return agree_min(local, device, timeout_s, what, epoch=local + 1)


def load_epoch(net_dir: str | Path, epoch: int, map_location: torch.device) -> dict:
    """The checkpoint of ``epoch`` from last.pt or prev.pt; a clear error if neither."""
    files = available_epochs(net_dir)
    if epoch not in files:
        raise FileNotFoundError(
            f"{net_dir}: no checkpoint of epoch {epoch} to resume from (have epochs "
            f"{sorted(files) or 'none'}); start afresh with --run.resume=false"
        )
    return load(files[epoch], map_location)


def rng_state() -> dict:
    """Every RNG a training step may touch, as tensors and plain types (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
