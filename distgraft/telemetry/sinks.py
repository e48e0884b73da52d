"""Where events go: console, metrics.jsonl, a ZeroMQ PUSH socket, and the facade over them.

Sinks must never slow down or crash training: ``ZmqSink`` never blocks (it drops and
counts), and ``Telemetry`` contains any exception a sink raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

import zmq

from distgraft.telemetry.auth import ClientKeys
from distgraft.telemetry.events import make_event, to_plain
from distgraft.telemetry.format import format_event
from distgraft.telemetry.wire import allow_ipv6, normalize_address, pack_event

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "ZmqSink", "Telemetry", "forget_epochs"]


@runtime_checkable
class Sink(Protocol):
    """Where events go. ``emit`` must be quick; raising is allowed (the facade contains it)."""

    def emit(self, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    """Readable lines for people watching a terminal or a job log; ignores progress."""

    def __init__(self, stream: TextIO | None = None, epochs: int | None = None) -> None:
        self._stream = stream  # None: sys.stdout at emit time (follows redirection)
        self.epochs = epochs

    def emit(self, event: dict[str, Any]) -> None:
        if event["event"] == "error" and "exit" in event:
            return  # the command prints it as one line and exits with that code
        line = format_event(event, self.epochs)
        if line is None:
            return
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON line per event; safe with several processes on one file.

    The file is opened with O_APPEND and each line goes out in one ``os.write``, so the
    kernel places every line whole at the end even when processes interleave. Writes are
    unbuffered (nothing to flush); no fsync per line (the cost would land on training).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"JsonlSink({self.path}) is closed")
        line = (json.dumps(event, separators=(",", ":"), default=to_plain) + "\n").encode()
        written = os.write(self._fd, line)
        if written < len(line):  # only on a full disk or similar; keep the line whole-ish
            os.write(self._fd, line[written:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# Events that record an epoch's training: a resume that trains the epoch again supersedes them.
EPOCH_EVENTS = frozenset({"epoch", "progress", "graft", "prune"})


def forget_epochs(path: str | os.PathLike[str], start_epoch: int) -> int:
    """Drop the training events of epochs >= ``start_epoch`` from a metrics.jsonl; the count.

    A run that resumes at ``start_epoch`` trains those epochs again (a crash came before
    every network had saved them), so their old lines would appear twice. Starts, errors
    and warnings stay: they are the run's history. The file is rewritten in place (same
    inode) so that appenders holding it open with O_APPEND keep writing to it; call it
    while no process writes (the resume is a collective), and the content always ends
    with a newline, so a line torn by a crash never merges with the next one.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with path.open("r+b") as f:
        for line in f.read().splitlines():
            try:
                ev = json.loads(line)
                stale = ev.get("event") in EPOCH_EVENTS and ev.get("epoch", -1) >= start_epoch
            except (ValueError, AttributeError):
                stale = False  # not ours to judge: keep it as it was
            if stale:
                dropped += 1
            elif line.strip():
                kept.append(line)
        f.seek(0)
        f.write(b"".join(line + b"\n" for line in kept))
        f.truncate()
    return dropped


class ZmqSink:
    """PUSH events to the collector without ever blocking the training step.

    Each ``emit`` is one non-blocking send: while the collector is unreachable, events
    queue in ZeroMQ up to ``sndhwm`` (so a collector that starts late still gets the first
    events); beyond that, or when the collector is slow, ``zmq.Again`` drops the event and
    ``dropped`` counts it. ``linger_ms`` bounds how long ``close`` may wait for the queue.
    ``keys`` (the run's client keys) are needed by a collector that authenticates its
    publishers. Create it in the process that uses it (ZeroMQ sockets do not survive fork).
    """

    def __init__(
        self,
        address: str,
        sndhwm: int = 1000,
        linger_ms: int = 100,
        keys: ClientKeys | None = None,
    ) -> None:
        self.address = normalize_address(address)
        self.sent = 0
        self.dropped = 0
        self._linger_ms = linger_ms
        self._ctx = zmq.Context(io_threads=1)
        self._sock: zmq.Socket | None = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        if keys is not None:
            keys.apply(self._sock)
        allow_ipv6(self._sock, self.address)
        self._sock.connect(self.address)

    def emit(self, event: dict[str, Any]) -> None:
        if self._sock is None:
            self.dropped += 1
            return
        data = pack_event(event)
        try:
            self._sock.send(data, zmq.NOBLOCK, copy=True)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=self._linger_ms)
            self._sock = None
            self._ctx.term()


class Telemetry:
    """The trainer's single entry point: stamps events and fans them out to the sinks.

    A failing sink (full disk, closed stream, encoding bug) must not take training down,
    so every sink call is guarded; failures are counted in ``errors`` per sink and reported
    to stderr once per sink.
    """

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.errors: dict[str, int] = {}
        self._reported: set[int] = set()

    def emit(self, event: str, network: int, epoch: int, **fields: Any) -> dict[str, Any]:
        ev = make_event(event, network, epoch, **fields)
        for sink in self.sinks:
            try:
                sink.emit(ev)
            except Exception as e:
                self._failed(sink, "emit", e)
        return ev

    def forget_epochs(self, start_epoch: int) -> None:
        """A resume trains the epochs from ``start_epoch`` again: sinks that keep their own
        history (TensorBoard) hide what they hold of those epochs."""
        for sink in self.sinks:
            forget = getattr(sink, "forget_epochs", None)
            if forget is None:
                continue
            try:
                forget(start_epoch)
            except Exception as e:
                self._failed(sink, "forget_epochs", e)

    @property
    def dropped(self) -> int:
        """Events the sinks dropped on purpose (a full or absent collector)."""
        return sum(getattr(s, "dropped", 0) for s in self.sinks)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                self._failed(sink, "close", e)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failed(self, sink: Sink, what: str, e: Exception) -> None:
        name = type(sink).__name__
        self.errors[name] = self.errors.get(name, 0) + 1
        if id(sink) in self._reported:
            return
        self._reported.add(id(sink))
        with contextlib.suppress(Exception):  # stderr itself may be gone
            sys.stderr.write(
                f"distgraft telemetry: {name}.{what} failed ({type(e).__name__}: {e}); "
                "training continues, further failures of this sink are counted silently\n"
            )
