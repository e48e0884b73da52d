"""Who did not answer: arrival marks and heartbeats in the run's store, and ``PeerError``.

A peer can be lost in two ways, and the survivors see them differently. A rank that
never arrives at a collective (dead before it, hung, SIGSTOPped, or on another schedule)
leaves the others waiting until ``dist.timeout_s``. A rank that dies inside a collective
closes its connections: gloo fails at once on its direct partners (already while posting
a send) and later, by timeout, on the ranks that did not talk to it. Either way the
survivors should learn which network was lost, at which call and epoch, instead of
reading a transport error. So every bounded collective distgraft issues runs as a
``Call``:

1. Before it enters, the rank writes where it is to its key in the store: a per-process
   sequence number (all ranks issue the same collectives in the same order, so equal
   numbers line up), what the call waits for, and the epoch.
2. A thread bumps the rank's heartbeat counter in the store twice a second.
3. When the call fails (timeout, closed connection, an exception while posting), the
   error reads the other participants' positions. After a timeout, those that have not
   reached this call are named. Otherwise (or when all of them had arrived), those
   whose heartbeat stopped are (dead or stopped); a single candidate needs no check.
   The caller never names itself, and a peer that gave up first (it raised its own
   PeerError and noted whom it lost) is cited as such, with the rank it lost.

DDP's collectives among the replicas of a network run inside forward and backward, not
through a ``Call``; ``replica_error`` turns their failure into the same kind of error.

The store is the one of this attempt (``comm.dist`` gives every torchrun restart a fresh
one), hosted by rank 0's process: when it does not answer, rank 0 is what was lost.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = [
    "PeerError",
    "Call",
    "Roll",
    "attach",
    "detach",
    "group_timeout_s",
    "replica_error",
    "unmarked_error",
    "who",
]

_PREFIX = "distgraft/peers"
BEAT_S = 0.5
"""Heartbeat period: a live process bumps its counter this often."""
SILENCE_S = 3.0
"""How long a failing rank watches the candidates' heartbeats: no beat in this window
(six periods, so a loaded machine still gets its beats in) means dead or stopped."""
LOOKUP_TIMEOUT_S = 5.0
"""Timeout of the marks and lookups: they must not wait as long as the collective did."""


class PeerError(RuntimeError):
    """A peer did not answer in time (dead, hung, stopped, or on a different schedule)."""


def who(ranks: Sequence[int], replicas: int) -> str:
    """``network 1 (rank 1)``; ``network 1 (ranks 2, 3)`` for replicas of one network."""
    by_net: dict[int, list[int]] = {}
    for r in sorted(ranks):
        by_net.setdefault(r // replicas, []).append(r)
    parts = []
    for net, rs in by_net.items():
        label = "rank" if len(rs) == 1 else "ranks"
        parts.append(f"network {net} ({label} {', '.join(map(str, rs))})")
    return ", ".join(parts)


def _at(what: str, epoch: int) -> str:
    return what if epoch < 0 else f"{what} at epoch {epoch + 1}"  # 1-based, as on the console


@dataclass(frozen=True)
class Position:
    """The last call a rank marked: its sequence number, what it waited for, the epoch."""

    seq: int
    epoch: int
    what: str

    def text(self) -> str:
        return _at(self.what, self.epoch)


class Roll:
    """Arrival marks and heartbeats of one process group, in its TCP store.

    Uses its own client connections (short timeouts), so a lookup after a failure cannot
    wait as long as the collective did, and the heartbeat thread shares nothing with the
    caller's thread.
    """

    def __init__(
        self, host: str, port: int, rank: int, replicas: int, connect_s: float = 300.0
    ) -> None:
        self.host, self.port, self.rank, self.replicas = host, port, rank, replicas
        self.seq = 0
        self._store = self._client(connect_s)
        self._stop = threading.Event()
        self._beats = self._client(connect_s)
        self._thread = threading.Thread(target=self._beat, name="distgraft-heartbeat",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _client(self, connect_s: float) -> dist.Store:
        """A connection of its own; connecting may take long on a loaded machine, the
        marks and lookups may not."""
        store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                              timeout=timedelta(seconds=connect_s))  # fmt: skip
        store.set_timeout(timedelta(seconds=LOOKUP_TIMEOUT_S))
        return store

    def _beat(self) -> None:
        key = f"{_PREFIX}/beat/{self.rank}"
        while True:
            with contextlib.suppress(Exception):  # host gone or stopped: lookups say so
                self._beats.add(key, 1)
            if self._stop.wait(BEAT_S):
                return

    def close(self) -> None:
        """Stop the heartbeat (a stopped store host delays this by LOOKUP_TIMEOUT_S)."""
        self._stop.set()
        self._thread.join(LOOKUP_TIMEOUT_S + 2 * BEAT_S)

    # -- marks --------------------------------------------------------------------------
    def arrive(self, what: str, epoch: int) -> int:
        """Mark this rank at its next call; returns the call's sequence number."""
        self.seq += 1
        self._store.set(f"{_PREFIX}/at/{self.rank}", f"{self.seq}|{epoch}|{what}")
        return self.seq

    def positions(self, ranks: Sequence[int]) -> dict[int, Position | None]:
        """Where each rank last marked itself (None: at no call yet)."""
        out: dict[int, Position | None] = {}
        for r in ranks:
            key = f"{_PREFIX}/at/{r}"
            if not self._store.check([key]):
                out[r] = None
                continue
            seq, epoch, what = self._store.get(key).decode().split("|", 2)
            out[r] = Position(int(seq), int(epoch), what)
        return out

    def mark_failed(self, what: str, epoch: int, lost: Sequence[int]) -> None:
        """Record that this rank gave up, and whom it lost (the others' errors cite it)."""
        lost_csv = ",".join(map(str, lost))
        self._store.set(f"{_PREFIX}/failed/{self.rank}", f"{self.seq}|{epoch}|{lost_csv}|{what}")

    def gave_up(self, ranks: Sequence[int]) -> dict[int, list[int]]:
        """The ranks that raised a PeerError of their own (left, not lost): whom they lost."""
        out = {}
        for r in ranks:
            key = f"{_PREFIX}/failed/{r}"
            if self._store.check([key]):
                lost = self._store.get(key).decode().split("|", 3)[2]
                out[r] = [int(x) for x in lost.split(",") if x]
        return out

    def silent(self, ranks: Sequence[int], window_s: float = SILENCE_S) -> list[int]:
        """The ranks whose heartbeat does not move during ``window_s`` seconds."""
        keys = {r: f"{_PREFIX}/beat/{r}" for r in ranks}
        before = {r: self._store.add(k, 0) for r, k in keys.items()}
        time.sleep(window_s)
        return [r for r, k in keys.items() if self._store.add(k, 0) == before[r]]


_roll: Roll | None = None
_timeout_s = 300.0


def attach(store: Any, rank: int, replicas: int, timeout_s: float) -> None:
    """Start marking and beating in ``store`` (a TCPStore) for this process group."""
    global _roll, _timeout_s
    detach()
    _timeout_s = timeout_s
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if host is None or port is None:
        return  # another kind of store: errors still name the candidates, unchecked
    _roll = Roll(host, int(port), rank, replicas, connect_s=timeout_s)


@atexit.register
def detach() -> None:
    """Stop the heartbeat; the next process group starts counting calls from zero.

    Also at exit, for a process that never tore its group down: a daemon thread still
    inside a store call when the interpreter finalizes can abort the process.
    """
    global _roll
    if _roll is not None:
        _roll.close()
        _roll = None


def group_timeout_s() -> float:
    """The timeout the process group was started with (``dist.timeout_s``)."""
    return _timeout_s


class Call:
    """One bounded collective: marked on entry; any failure becomes a ``PeerError``.

    ``peers``: the global ranks this call depends on (all others for a collective; the
    two partners for a ring exchange). Use ``post`` around the call that starts the
    operation (gloo may refuse to post to a closed connection) and ``wait`` for its
    work items.
    """

    def __init__(
        self,
        what: str,
        epoch: int,
        timeout_s: float,
        peers: Sequence[int],
        replicas: int | None = None,
    ) -> None:
        self.what, self.epoch, self.timeout_s = what, epoch, timeout_s
        self.rank = dist.get_rank()
        self.peers = sorted({p for p in peers if p != self.rank})
        self.roll = _roll
        self.replicas = replicas or (self.roll.replicas if self.roll else 1)
        self.start = time.monotonic()
        self.seq = -1
        if self.roll is not None:
            try:
                self.seq = self.roll.arrive(what, epoch)
            except Exception as e:  # the store's host does not answer
                raise self._store_lost(e) from e

    def post(self, start: Callable[[], Any]) -> Any:
        """``start()``, with a failure already there (a closed connection) explained."""
        try:
            return start()
        except RuntimeError as e:
            raise self.error(e) from e

    def wait(self, works: Sequence[Any]) -> None:
        """Wait for every work item; the time left shrinks across them."""
        start = time.monotonic()
        for work in works:
            left = max(self.timeout_s - (time.monotonic() - start), 0.001)
            try:
                ok = work.wait(timedelta(seconds=left))
            except RuntimeError as e:
                raise self.error(e, time.monotonic() - start) from e
            if ok is False:
                raise self.error(TimeoutError("wait returned False"), time.monotonic() - start)

    # -- the error ----------------------------------------------------------------------
    def error(self, cause: BaseException, waited_s: float | None = None) -> PeerError:
        """The PeerError for a failure of this call after ``waited_s`` seconds of waiting."""
        waited = time.monotonic() - self.start if waited_s is None else waited_s
        timed_out = waited >= 0.95 * self.timeout_s or "timed out" in str(cause).lower()
        how = (
            f"no answer within dist.timeout_s = {self.timeout_s:g} s"
            if timed_out
            else f"the connection failed after {waited:.1f} s"
        )
        try:
            named, clause, notes = self._diagnose(timed_out)
            if self.roll is not None:
                self.roll.mark_failed(self.what, self.epoch, named)
        except Exception as e:  # the store's host does not answer
            return self._store_lost(e, cause)
        return PeerError(
            f"rank {self.rank}: {clause} ({'; '.join([how, *notes])}). The peer process died, "
            f"hangs, is stopped, or runs a different schedule. Cause: {_cause(cause)}"
        )

    def _diagnose(self, timed_out: bool) -> tuple[list[int], str, list[str]]:
        """(the ranks named, the sentence, notes). Candidates are the peers less those that
        gave up on their own. After a timeout, the candidates that have not arrived are
        named; otherwise, or when all have, those whose heartbeat stopped (a single
        candidate needs no check); failing that, those that have not arrived."""
        at = _at(self.what, self.epoch)
        if self.roll is None or not self.peers:
            return self.peers, f"{at} failed with {who(self.peers, self.replicas)}", []
        positions = self.roll.positions(self.peers)
        gave_up = self.roll.gave_up(self.peers)
        candidates = [r for r in self.peers if r not in gave_up]
        behind = [r for r in candidates if not self._reached(positions[r])]
        named, silent = behind, False
        if candidates and not (timed_out and behind):
            lost = candidates if len(candidates) == 1 else self.roll.silent(candidates)
            gave_up.update(self.roll.gave_up(lost))  # gave up during the check: left
            lost = [r for r in lost if r not in gave_up]
            if lost:
                named, silent = lost, len(candidates) > 1
            else:
                named = [r for r in behind if r not in gave_up]
        return self._describe(named, positions, at, silent, gave_up, candidates)

    def _reached(self, pos: Position | None) -> bool:
        return pos is not None and pos.seq >= self.seq

    def _describe(
        self,
        named: list[int],
        positions: dict[int, Position | None],
        at: str,
        silent: bool,
        gave_up: dict[int, list[int]],
        candidates: list[int],
    ) -> tuple[list[int], str, list[str]]:
        """``X did not reach <call>`` (and where X was last), ``lost Y during <call>``, and
        the peers that gave up before, with whom they had lost."""
        quiet = " and stopped answering" if silent else ""
        clauses, notes = [], []
        behind = [r for r in named if not self._reached(positions[r])]
        if behind:
            clauses.append(f"{who(behind, self.replicas)} did not reach {at}{quiet}")
            if len(behind) == 1:
                seen = _seen(positions[behind[0]])
            else:
                seen = ", ".join(f"rank {r} at {_seen(positions[r])}" for r in behind)
            notes.append(f"last seen at {seen}")
        inside = [r for r in named if self._reached(positions[r])]
        if inside:
            clauses.append(f"lost {who(inside, self.replicas)} during {at}{quiet}")
        if gave_up:
            root = sorted({r for lost in gave_up.values() for r in lost}
                          - set(gave_up) - set(named) - {self.rank})  # fmt: skip
            left = f"{who(list(gave_up), self.replicas)} gave up before"
            left += f", having lost {who(root, self.replicas)}" if root else " (see its error)"
            if clauses:
                notes.append(left)
            else:
                clauses.append(left.replace(" gave up before", f" gave up before {at}", 1))
                named = root
        if not clauses:
            clauses.append(f"{at} failed with {who(candidates, self.replicas)}, which answer")
        return named, "; ".join(clauses), notes

    def _store_lost(self, e: BaseException, cause: BaseException | None = None) -> PeerError:
        at = _at(self.what, self.epoch)
        lost = "" if self.rank == 0 else f"; lost {who([0], self.replicas)}, which hosts it"
        return PeerError(
            f"rank {self.rank}: the run's store does not answer at {at}{lost} (store: "
            f"{_cause(e)}). Cause: {_cause(cause or e)}"
        )


def _seen(pos: Position | None) -> str:
    return "startup, before any collective" if pos is None else pos.text()


def _cause(e: BaseException) -> str:
    """The gist of a transport error: its first line, without gloo's source location and
    advice (``[.../pair.cc:561] Connection closed by peer ... This is typically ...``)."""
    text = str(e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(" This is typically")[0][:300]


def unmarked_error(
    what: str, epoch: int, timeout_s: float, peers: Sequence[int], replicas: int,
    cause: BaseException, waited_s: float,
) -> PeerError:  # fmt: skip
    """The PeerError of a collective too frequent to be marked on entry (one every training
    step: a store write each time would cost a round trip). The peers whose heartbeat
    stopped are named (a single peer needs no check), else every peer that did not give up.
    """
    rank = dist.get_rank()
    others = sorted({p for p in peers if p != rank})
    at = _at(what, epoch)
    try:
        gave_up = _roll.gave_up(others) if _roll is not None else {}
        candidates = [r for r in others if r not in gave_up]
        lost = candidates
        if _roll is not None and len(candidates) > 1:
            lost = _roll.silent(candidates) or candidates
        if _roll is not None:
            _roll.mark_failed(what, epoch, lost)
    except Exception:  # the store's host (rank 0) is gone too
        lost = [0] if rank != 0 and 0 in others else others
    timed_out = waited_s >= 0.95 * timeout_s
    how = (f"no answer within dist.timeout_s = {timeout_s:g} s" if timed_out
           else f"the connection failed after {waited_s:.1f} s")  # fmt: skip
    return PeerError(
        f"rank {rank}: {who(lost, replicas)} did not answer {at} ({how}). The peer process "
        f"died, hangs, is stopped, or runs a different schedule. Cause: {_cause(cause)}"
    )


_TRANSPORT = ("gloo/", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out")
"""Words of the transports' errors (gloo names its sources; NCCL and timeouts say so)."""


def replica_error(
    cause: RuntimeError, rank: int, first: int, replicas: int, epoch: int
) -> PeerError | None:
    """The PeerError for a failure of DDP among ranks ``first .. first + replicas - 1``.

    None when ``cause`` is no failure of a replica: not a transport error, and every
    other replica's heartbeat still moves (an error of the training itself).
    """
    others = [r for r in range(first, first + replicas) if r != rank]
    transport = isinstance(cause, dist.DistError) or any(w in str(cause) for w in _TRANSPORT)
    try:
        gave_up = _roll.gave_up(others) if _roll is not None else {}
        candidates = [r for r in others if r not in gave_up]
        if transport and len(candidates) == 1:
            lost = candidates
        else:
            lost = _roll.silent(candidates) if _roll is not None else []
        if _roll is not None and (lost or transport):
            _roll.mark_failed("training", epoch, lost)
    except Exception:  # the store's host (rank 0) is gone too
        lost = [0] if first == 0 and rank != 0 else []
    if not lost and not transport:
        return None
    net, last = first // replicas, first + replicas - 1
    group = f"DDP's collectives among ranks {first}-{last} failed"
    if lost:
        clause = f"lost {who(lost, replicas)}, a replica of this network, during training"
        tail = "Its process died, hangs, or is stopped"
    else:
        clause = f"training network {net} failed among its replicas ({who(others, replicas)})"
        tail = "They still answer: one of them hangs or runs a different schedule"
    return PeerError(f"rank {rank}: {clause} at epoch {epoch + 1} ({group}; dist.timeout_s = "
                     f"{_timeout_s:g} s). {tail}. Cause: {_cause(cause)}")  # fmt: skip
