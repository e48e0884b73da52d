"""``distgraft monitor [TARGET]``: a live table of a running (or finished) run.

The monitor subscribes to the collector's PUB socket. ZeroMQ reconnects a SUB socket by
itself, so a monitor can be started before the run, and keeps working across worker
restarts and a collector that rebinds the same port; it only ever reads, so it cannot
disturb training. Messages go through the collector's own gate
(``telemetry.wire.decode_message``), because anything can connect to a port.

Given a run folder, the monitor reads the collector's endpoints from
``RUN_DIR/telemetry.json`` and first replays ``RUN_DIR/metrics.jsonl``, so the table
starts filled instead of empty until the next epoch ends.

What the monitor prints comes from other processes, so it is treated as untrusted text:
only the networks the run's ``start`` event declares get rows, and every string has its
control characters removed before it reaches the terminal (``format.clean_text``); the
only escape sequences written are the monitor's own redraw codes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import zmq

from distgraft.config import TelemetryConfig
from distgraft.telemetry.collector import ENDPOINTS_FILE, read_endpoints
from distgraft.telemetry.events import read_jsonl
from distgraft.telemetry.format import (
    clean_event,
    clean_text,
    config_value,
    display_epoch,
    format_event,
    mean,
    start_config,
    summary_lines,
)
from distgraft.telemetry.wire import Rejected, allow_ipv6, decode_message, normalize_address

__all__ = ["register", "run", "Board", "resolve_target", "Target", "MonitorError"]

DEFAULTS = TelemetryConfig()
BAR = 20


class MonitorError(Exception):
    """A usage problem (bad target, unreadable run folder): exit code 2."""


@dataclass
class Target:
    publish: str | None
    replay: Path | None = None
    run_dir: Path | None = None


def resolve_target(text: str) -> Target:
    """A run folder (endpoints from telemetry.json, metrics.jsonl replayed) or an address."""
    path = Path(text)
    if path.is_dir():
        metrics = path / "metrics.jsonl"
        try:
            publish = read_endpoints(path)["publish"]
        except FileNotFoundError:
            publish = None
        except (OSError, ValueError) as e:
            raise MonitorError(f"cannot read {path / ENDPOINTS_FILE}: {e}") from e
        return Target(publish, metrics if metrics.is_file() else None, path)
    if "://" in text or re.fullmatch(r"[\w.\-\[\]]*:\d+|\d+", text):
        return Target(normalize_address(text))
    raise MonitorError(f"{text!r} is neither a run folder nor an address like {DEFAULTS.publish}")


@dataclass
class Row:
    """What the table shows for one network; None: not reported yet."""

    epoch: int | None = None
    step: int | None = None
    steps: int | None = None
    done: bool = False
    loss: float | None = None
    train_acc: float | None = None
    test_acc: float | None = None
    images_per_s: float | None = None
    alpha: float | None = None
    graft_ms: float | None = None


@dataclass
class Board:
    """The monitor's state, folded from events in arrival order (replay first).

    Once a ``start`` event has declared the run's networks, events of other networks are
    counted as ``ignored`` and get no row. Before any start (a monitor attached by address
    to a collector that has not seen one) every network's events are shown.
    """

    rows: dict[int, Row] = field(default_factory=dict)
    epochs: int | None = None
    networks: int | None = None
    events: int = 0
    changes: int = 0  # events other than progress: a plain log prints a block per change
    rejected: int = 0
    ignored: int = 0
    skipped_lines: int = 0
    run_dir: str | None = None
    summary: dict[str, Any] | None = None
    collector: dict[str, Any] | None = None
    last_kind: str | None = None

    def update(self, ev: dict[str, Any]) -> list[str]:
        """Fold in one validated event; returns lines worth keeping above the table."""
        raw, ev = ev, clean_event(ev)  # the TOML of a start event needs its line breaks
        self.events += 1
        self.last_kind = kind = ev["event"]
        self.changes += kind not in ("progress", "collector")
        if kind == "start":
            self.epochs = config_value(start_config(raw), "run.epochs", int) or self.epochs
            self.run_dir = ev["run_dir"]
            self.networks = ev["networks"]
            self.rows = {k: r for k, r in self.rows.items() if self._declared(k)}
            self.summary = None  # a resumed run starts again after an old summary
        elif kind == "summary":
            rows = [r for r in ev["networks"] if self._declared(r["network"])]
            self.summary = {**ev, "networks": rows}
        elif kind == "collector":
            self.collector = ev
        if kind not in ("progress", "epoch", "graft", "warning", "error"):
            return []
        if not self._declared(ev["network"]):
            self.ignored += 1
            return []
        row = self.rows.setdefault(ev["network"], Row())
        if kind == "progress":
            if row.epoch is None or ev["epoch"] >= row.epoch:
                row.epoch, row.done = ev["epoch"], False
                row.step, row.steps = ev["step"], ev["steps"]
                row.loss = ev["loss"] if ev["loss"] is not None else row.loss
                row.images_per_s = ev["images_per_s"]
        elif kind == "epoch":
            row.epoch, row.done = ev["epoch"], True
            row.loss, row.train_acc = ev["train_loss"], ev["train_acc"]
            row.test_acc = ev["test_acc"] if ev["test_acc"] is not None else row.test_acc
            row.images_per_s = ev["images_per_s"]
        elif kind == "graft":
            row.alpha = mean(ev["alpha"])
            row.graft_ms = ev["graft_s"] * 1000
            return [f"net {ev['network']} | warning: {w}" for w in ev["warnings"]]
        else:
            return [format_event(ev) or ""]
        return []

    def table(self) -> list[str]:
        """Header, one row per network, in network order."""
        lines = [
            f"{'net':>4}  {'epoch':<9} {'progress':<{BAR + 7}} {'loss':>7} {'train':>7} "
            f"{'test':>7} {'img/s':>8} {'alpha':>6} {'graft':>8}"
        ]
        for net in sorted(self.rows):
            r = self.rows[net]
            ep = "-" if r.epoch is None else str(display_epoch(r.epoch))
            if r.epoch is not None and self.epochs:
                ep += f"/{self.epochs}"
            lines.append(
                f"{net:>4}  {ep:<9} {self._bar(r):<{BAR + 7}} {_f(r.loss, '.3f'):>7} "
                f"{_f(r.train_acc, '.1f', '%'):>7} {_f(r.test_acc, '.1f', '%'):>7} "
                f"{_f(r.images_per_s, '.0f'):>8} {_f(r.alpha, '.3f'):>6} "
                f"{_f(r.graft_ms, '.0f', ' ms'):>8}"
            )
        return lines

    def _declared(self, network: int) -> bool:
        return self.networks is None or 0 <= network < self.networks

    def footer(self, source: str, silent_s: float | None) -> str:
        parts = [f"events {self.events}"]
        if self.rejected:
            parts.append(f"rejected {self.rejected}")
        if self.ignored:
            parts.append(f"ignored {self.ignored} (undeclared networks)")
        c = self.collector
        if c is not None and (c["refused"] or c["rejected"]):
            parts.append(f"collector refused {c['refused']} rejected {c['rejected']}")
        if self.skipped_lines:
            parts.append(f"skipped lines {self.skipped_lines}")
        parts.append(source)
        if silent_s is not None and silent_s >= 2:
            parts.append(f"silent {silent_s:.0f} s")
        return " | ".join(parts)

    @staticmethod
    def _bar(r: Row) -> str:
        if r.done:
            frac = 1.0
        elif r.step is not None and r.steps:
            frac = min(max(r.step / r.steps, 0.0), 1.0)
        else:
            return ""
        k = round(frac * BAR)
        return f"[{'#' * k}{'-' * (BAR - k)}] {frac * 100:3.0f}%"


def _f(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


class Screen:
    """Draws the table in place with ANSI codes, or as plain blocks for logs and pipes."""

    def __init__(self, stream: TextIO, plain: bool) -> None:
        self.stream = stream
        self.plain = plain
        self._drawn = 0  # lines of the last in-place drawing
        self._last_version: int | None = None

    def log(self, line: str) -> None:
        """A line that stays (a warning): printed above the table."""
        self._erase()
        self.stream.write("\n".join(clean_text(part) for part in line.split("\n")) + "\n")
        self.stream.flush()

    def draw(self, lines: list[str], version: int) -> None:
        """Redraw; in plain mode only when ``version`` moved (not for progress ticks)."""
        lines = [clean_text(line) for line in lines]
        if self.plain:
            if version != self._last_version:
                self.stream.write("\n".join(lines) + "\n\n")
                self._last_version = version
        else:
            width = max(shutil.get_terminal_size((120, 24)).columns - 1, 20)
            self._erase()
            self.stream.write("".join(f"\x1b[2K{line[:width]}\n" for line in lines))
            self._drawn = len(lines)
        self.stream.flush()

    def finish(self) -> None:
        self._drawn = 0  # leave the last drawing on screen

    def _erase(self) -> None:
        if not self.plain and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0


def _open_sub(address: str, max_bytes: int) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    allow_ipv6(sock, address)
    sock.connect(address)
    return ctx, sock


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Watch until a summary (0), ``--timeout`` seconds of silence (1) or Ctrl-C (130).

    ``out`` (default stdout) is where the table goes; errors go to stderr.
    """
    try:
        target = resolve_target(args.target)
    except MonitorError as e:
        print(f"distgraft monitor: {e}", file=sys.stderr)
        return 2
    out = out if out is not None else sys.stdout
    screen = Screen(out, plain=args.plain or not out.isatty())
    board = Board()
    sock_pair = _open_sub(target.publish, args.max_message_bytes) if target.publish else None
    try:
        if target.replay is not None:  # subscribed first: nothing falls between the two
            events, board.skipped_lines = read_jsonl(target.replay)
            for ev in events:
                board.update(ev)
            if board.summary is not None and board.last_kind == "summary":
                return _finish(screen, board, "replayed")
        if sock_pair is None:
            print(
                f"distgraft monitor: {clean_text(str(target.run_dir))}/{ENDPOINTS_FILE} not "
                "found and the run "
                "has no summary: start the run with telemetry.zmq = true, or pass the "
                "collector's publish address",
                file=sys.stderr,
            )
            return 2
        return _watch(sock_pair[1], target.publish or "", board, screen, args)
    except KeyboardInterrupt:
        screen.finish()
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if sock_pair is not None:
            sock_pair[1].close(0)
            sock_pair[0].term()


def _watch(
    sock: zmq.Socket, source: str, board: Board, screen: Screen, args: argparse.Namespace
) -> int:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last_msg = time.monotonic()
    next_draw = 0.0
    while True:
        now = time.monotonic()
        silent = now - last_msg
        if args.timeout is not None and silent >= args.timeout:
            screen.draw(board.table() + [board.footer(source, silent)], -1)
            screen.finish()
            print(f"distgraft monitor: no event for {args.timeout:g} s, giving up", file=sys.stderr)
            return 1
        if now >= next_draw:
            footer = board.footer(source, None if screen.plain else silent)
            screen.draw(board.table() + [footer], board.changes)
            next_draw = now + args.refresh
        wait = min(next_draw - now, (args.timeout - silent) if args.timeout else args.refresh)
        if not poller.poll(max(int(wait * 1000), 1)):
            continue
        while True:  # drain everything queued before drawing again
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            last_msg = time.monotonic()
            try:
                ev = decode_message(frames, args.max_message_bytes)
            except Rejected:
                board.rejected += 1
                continue
            for line in board.update(ev):
                screen.log(line)
            if board.summary is not None and ev["event"] == "summary":
                return _finish(screen, board, source)


def _finish(screen: Screen, board: Board, source: str) -> int:
    screen.draw(board.table() + [board.footer(source, None)], -1)
    screen.finish()
    assert board.summary is not None
    lines = [clean_text(line) for line in summary_lines(board.summary)]
    screen.stream.write("\n".join(["", "final summary", *lines]) + "\n")
    screen.stream.flush()
    return 0


def register(sub: Any) -> None:
    """Add the ``monitor`` command to the ``distgraft`` CLI."""
    p = sub.add_parser(
        "monitor",
        help="live table of a run (via the collector's PUB socket)",
        description="Show a live table of a run: per network epoch, progress, loss, "
        "accuracies, throughput and the last graft. Ends at the run's summary (exit 0), "
        "after --timeout seconds without events (exit 1) or on Ctrl-C.",
    )
    p.add_argument(
        "target",
        nargs="?",
        default=DEFAULTS.publish,
        metavar="TARGET",
        help="a run folder (reads telemetry.json, replays metrics.jsonl) or the "
        f"collector's publish address (default {DEFAULTS.publish})",
    )
    p.add_argument("--plain", action="store_true", help="print plain blocks, no in-place redraw")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit with code 1 after this many seconds without any message (default: never)",
    )
    p.add_argument("--refresh", type=float, default=0.5, metavar="SECONDS", help="redraw interval")
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULTS.max_message_bytes,
        help="drop larger messages (default %(default)s)",
    )
    p.set_defaults(func=run)
