"""Atomic checkpoints per network, and which epoch a restarted run continues from.

Each network writes ``net{k}/last.pt`` (and keeps the one before as ``prev.pt``) after
every completed epoch, grafting included: temp file, fsync, rename, fsync of the folder,
so a crash at any instant leaves a complete file. ``best.pt`` is a copy of ``last.pt``
made after every network saved the epoch (the end-of-epoch barrier), so it never holds an
epoch a restart would train again. Networks are at most one epoch apart.

Resume (nothing is lost, every failure named):

* Stale ``.*.tmp`` files of a save killed halfway are removed on start.
* Every network verifies what it has, last then prev: a file that does not load, or holds
  another network (other model, other layer shapes), is named. A file of another network
  stops the run (exit code 2): resuming would silently mix runs.
* The ranks gather what every network can load and agree on the newest epoch all of them
  have, preferring one at which some network is finite (so a run where every network
  diverged continues from the last finite checkpoints). A network with nothing loadable
  while others have checkpoints stops the run (exit code 2) naming the files, before
  anything is written; ``--run.resume=false`` starts afresh instead.
* ``last.pt`` moves to ``prev.pt`` only when it holds a finite state this run saved or
  resumed from: an unreadable or non-finite ``last.pt`` is never rotated over ``prev.pt``.
* ``best.pt`` is brought in line with the record of the state resumed from (a kill between
  writing ``last.pt`` and copying it to ``best.pt`` left it one epoch behind).

Written and read through ``distgraft.files``: atomically, and with
``torch.load(weights_only=True)`` (only tensors and plain containers, never arbitrary
pickled objects, so a checkpoint from elsewhere cannot run code).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distgraft.comm.dist import DistInfo, gather_objects
from distgraft.files import copy_atomic, load, load_reason, save_atomic

__all__ = [
    "FORMAT_VERSION",
    "ResumeError",
    "Candidate",
    "Found",
    "save_atomic",
    "copy_atomic",
    "load",
    "save_epoch",
    "remove_stale",
    "inspect",
    "gather_found",
    "newest_epoch",
    "choose_epoch",
    "reconcile_best",
    "rng_state",
    "set_rng_state",
]

FORMAT_VERSION = 1


class ResumeError(RuntimeError):
    """The run folder's checkpoints cannot be resumed as they are (exit code 2)."""


def save_epoch(state: dict, net_dir: str | Path, rotate: bool = True) -> None:
    """Save a completed epoch as last.pt; with ``rotate`` the previous last.pt becomes prev.pt.

    last.pt exists at every instant: the new file is written beside it first, then the old
    one is hard-linked as prev.pt, then the new one renamed over it.
    """
    net_dir = Path(net_dir)
    last, prev = net_dir / "last.pt", net_dir / "prev.pt"

    def keep_previous() -> None:
        if rotate and last.exists():
            tmp = prev.with_name(f".prev.pt.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(last, tmp)
            except OSError:  # a filesystem without hard links: copy instead
                shutil.copyfile(last, tmp)
            os.replace(tmp, prev)

    save_atomic(state, last, before_replace=keep_previous)


def remove_stale(net_dir: str | Path) -> list[Path]:
    """Delete the temp files of saves that were killed halfway (``.NAME.XXXX.tmp``)."""
    folder = Path(net_dir)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a network can resume from."""

    epoch: int
    path: Path
    finite: bool


@dataclass
class Found:
    """What one rank found in its network's folder."""

    rank: int
    network: int
    folder: str
    epochs: dict[int, Candidate] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Files that exist but cannot be resumed from, with the reason."""
    refused: list[str] = field(default_factory=list)
    """Files that belong to another run: another network, or other teachers."""


def _finite(tensors: list[Any]) -> bool:
    floats = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in floats)


def _optimizer_tensors(state: Mapping) -> list[Any]:
    per_param = state.get("optimizer", {}).get("state", {})
    return [v for entry in per_param.values() for v in entry.values()]


def _foreign(state: Mapping, expected: Mapping[str, Tensor], model: str) -> str | None:
    """Why ``state`` is not a checkpoint of this network (None when it is)."""
    arch = state.get("arch") if isinstance(state.get("arch"), dict) else {}
    theirs = arch.get("model", "an unknown")
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        return "no model weights"
    if theirs != model and "model" in arch:
        return f"a {theirs} network, this run trains {model}"
    if set(weights) != set(expected):
        return f"{theirs} weights with other layer names than this run's {model}"
    for key, t in expected.items():
        if tuple(weights[key].shape) != tuple(t.shape):
            return (f"{theirs} weights of other shapes ({key}: {list(weights[key].shape)}, this "
                    f"run {list(t.shape)})")  # fmt: skip
    return None


def inspect(
    net_dir: str | Path,
    expected: Mapping[str, Tensor],
    model: str,
    teachers: Callable[[Any], list[str]] | None = None,
) -> Found:
    """Load last.pt then prev.pt of ``net_dir`` and say which epochs can be resumed from.

    ``expected`` is the model's state_dict (names and shapes), ``model`` its name;
    ``teachers(recorded)`` says how a checkpoint's recorded teachers differ from this run's.
    """
    folder = Path(net_dir)
    found = Found(0, 0, str(folder))
    for name in ("last.pt", "prev.pt"):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = load(path)
            epoch = int(state["epoch"])
        except Exception as e:  # torn, truncated, not a torch file, not ours
            found.problems.append(f"{path} cannot be read ({load_reason(e)})")
            continue
        why = _foreign(state, expected, model)
        if why is not None:
            found.refused.append(f"{path} holds {why}")
            continue
        changed = teachers(state.get("teachers", [])) if teachers is not None else []
        if changed:
            found.refused.append(f"{path}: {'; '.join(changed)}")
            continue
        finite = _finite(list(state["model"].values()) + _optimizer_tensors(state))
        found.epochs.setdefault(epoch, Candidate(epoch, path, finite))
    return found


def gather_found(found: Found, info: DistInfo, timeout_s: float) -> list[Found]:
    """Every rank's findings (with its rank and network filled in), in rank order."""
    found.rank, found.network = info.rank, info.network
    epoch = max(found.epochs) + 1 if found.epochs else 0  # where this network would go on
    return gather_objects(found, info, timeout_s, "the agreement on the epoch to resume from",
                          epoch=epoch)  # fmt: skip


def newest_epoch(net_dir: str | Path) -> int:
    """The newest epoch last.pt or prev.pt holds (-1: none readable); reads only the field."""
    newest = -1
    for name in ("last.pt", "prev.pt"):
        path = Path(net_dir) / name
        try:
            newest = max(newest, int(torch.load(path, mmap=True, weights_only=True)["epoch"]))
        except Exception:  # missing, torn or foreign: not an epoch to go on from
            continue
    return newest


def choose_epoch(every: list[Found]) -> int:
    """The epoch every network resumes from (-1: start afresh), or ResumeError.

    The newest epoch that every rank can load, preferring one at which some network is
    finite; nothing at all (a new run folder) starts afresh.
    """
    refused = sorted({line for f in every for line in f.refused})
    if refused:
        raise ResumeError(
            f"the run folder holds checkpoints of another run: {'; '.join(refused)}; use "
            "another --run.name, or --run.resume=false to start afresh and overwrite them"
        )
    if not any(f.epochs for f in every):
        problems = [p for f in every for p in f.problems]
        if problems:
            raise ResumeError(
                f"no checkpoint can be resumed from: {'; '.join(problems)}; move them away, or "
                "start afresh with --run.resume=false"
            )
        return -1
    if _killed_in_the_first_save(every):
        return -1
    for f in every:
        if not f.epochs:
            have = next(g for g in every if g.epochs)
            why = "; ".join(f.problems) or f"no last.pt or prev.pt in {f.folder}"
            raise ResumeError(
                f"network {f.network} (rank {f.rank}) has nothing to resume from ({why}) while "
                f"network {have.network} has epochs {_epochs(have)} in {have.folder}; restore "
                "the files, or start every network afresh with --run.resume=false"
            )
    common = set.intersection(*(set(f.epochs) for f in every))
    if not common:
        sets = ", ".join(f"network {f.network}: {_epochs(f)}" for f in every)
        raise ResumeError(
            f"the networks have no epoch in common to resume from ({sets}); start afresh "
            "with --run.resume=false"
        )
    newest = sorted(common, reverse=True)
    finite = [e for e in newest if any(f.epochs[e].finite for f in every)]
    return (finite or newest)[0]


def _killed_in_the_first_save(every: list[Found]) -> bool:
    """Some networks saved the first epoch and the others never wrote a file: the run was
    killed while the first epoch was being saved (networks save an epoch before any of them
    trains the next, so this is the only way to get there without deleting files). No
    epoch was ever saved by every network, so starting afresh loses nothing resumable."""
    never_saved = [f for f in every if not f.epochs and not f.problems]
    return bool(never_saved) and all(f in never_saved or set(f.epochs) == {0} for f in every)


def _epochs(f: Found) -> str:
    return "[" + ", ".join(str(e + 1) for e in sorted(f.epochs)) + "]"


def reconcile_best(net_dir: str | Path, resumed: Path, epoch: int, best_epoch: int) -> bool:
    """Make best.pt the resumed state when its record says it is the best; True if copied.

    best.pt is copied from last.pt after the end-of-epoch barrier: a kill in between left
    the previous best there while the resumed record names this epoch.
    """
    best = Path(net_dir) / "best.pt"
    if best_epoch != epoch:
        return False
    try:
        if best.exists() and int(torch.load(best, mmap=True, weights_only=True)["epoch"]) == epoch:
            return False
    except Exception:  # an unreadable best.pt is replaced too
        pass
    copy_atomic(resumed, best)
    return True


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
