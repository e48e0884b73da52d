"""The collector rank 0 runs (PULL, authenticate, validate, republish on PUB) and the
run's endpoint file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from distgraft.telemetry.auth import CurveKeys, ZapHandler
from distgraft.telemetry.events import make_event
from distgraft.telemetry.wire import (
    REJECT_REASONS,
    Rejected,
    allow_ipv6,
    decode_message,
    normalize_address,
    pack_event,
    split_tcp,
)

__all__ = ["ENDPOINTS_FILE", "Collector", "write_endpoints", "read_endpoints"]

ENDPOINTS_FILE = "telemetry.json"

# Handshakes libzmq reports as failed: no keys or the wrong mechanism, a wrong server key
# (the client's HELLO cannot be decrypted), a client key the ZAP handler refused.
_REFUSED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
START_RESEND_S = 0.2
"""New subscribers get the start event again at most this often (many subscriptions at
once share one resend), so a storm of subscriptions costs the collector little."""
STATS_INTERVAL_S = 1.0
"""The collector publishes a ``collector`` event at most this often, when its refused or
rejected counts changed (so that monitors can show them)."""


def write_endpoints(run_dir: str | os.PathLike[str], address: str, publish: str | None) -> Path:
    """Record where the collector listens, so ``distgraft monitor RUN_DIR`` can find it."""
    path = Path(run_dir) / ENDPOINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{ENDPOINTS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"address": address, "publish": publish}) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def read_endpoints(run_dir: str | os.PathLike[str]) -> dict[str, str | None]:
    """The ``{"address", "publish"}`` of a run; raises OSError / ValueError when unusable."""
    path = Path(run_dir) / ENDPOINTS_FILE
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("publish"), str | None):
        raise ValueError(f"{path}: expected {{'address': ..., 'publish': ...}}")
    return {"address": data.get("address"), "publish": data.get("publish")}


class Collector:
    """Receives events from every process (PULL), validates them, republishes them (PUB).

    With ``keys`` (what a run uses) the PULL socket is a CURVE server: only clients with the
    run's client key pair complete the handshake (see ``telemetry.auth``); a refused
    handshake never delivers a message, and ``stats()["refused"]`` counts them from the
    socket's monitor events. Without ``keys`` anyone who can reach the port may publish.

    ``start`` binds the sockets (so bind errors surface in the caller) and then hands them
    to a daemon thread, which alone uses them from then on. The thread survives any
    input: every message ends up either accepted or counted under one of
    ``REJECT_REASONS``. ZeroMQ's ``MAXMSGSIZE`` is set to twice ``max_message_bytes`` as a
    memory guard (ZeroMQ silently drops the connection of a peer that exceeds it); messages
    between the two limits are received and counted as ``oversized``.

    The publishing side is an XPUB socket: when a monitor subscribes, the collector sends
    the run's latest ``start`` event again, so a monitor that attaches mid-run learns the
    run's networks and epochs at once. It also publishes a ``collector`` event with its
    counts when the refused or rejected counts change (at most once a second).
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:0",
        publish: str | None = "tcp://127.0.0.1:5558",
        max_message_bytes: int = 1 << 20,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        port_tries: int = 20,
        keys: CurveKeys | None = None,
    ) -> None:
        self._want_address = normalize_address(address)
        self._want_publish = normalize_address(publish) if publish else None
        self.max_message_bytes = max_message_bytes
        self.on_event = on_event
        self.port_tries = port_tries
        self.keys = keys
        self.last_rejection = ""
        self._address: str | None = None
        self._publish: str | None = None
        self._counts = dict.fromkeys(("received", "accepted", *REJECT_REASONS), 0)
        self._counts["callback_errors"] = 0
        self._counts["refused"] = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._start_frame: bytes | None = None  # the latest start event, as received
        self._start_wanted = False  # a monitor subscribed since the last resend
        self._stats_wanted = False  # a monitor subscribed since the counts went out
        self._next_start = 0.0
        self._epoch = 0  # the latest epoch seen: the stamp of ``collector`` events
        self._published_counts: tuple[int, int] = (0, 0)
        self._next_stats = 0.0

    @property
    def address(self) -> str:
        """The PULL endpoint workers connect to, with the real port."""
        if self._address is None:
            raise RuntimeError("Collector.address is known after start()")
        return self._address

    @property
    def publish_address(self) -> str | None:
        """The PUB endpoint monitors subscribe to (None when publishing is off)."""
        return self._publish

    def start(self) -> Collector:
        if self._thread is not None:
            raise RuntimeError("Collector already started")
        ctx = zmq.Context(io_threads=1)
        sockets: list[zmq.Socket] = []
        try:
            zap = ZapHandler(ctx, self.keys.client_public) if self.keys is not None else None
            if zap is not None:
                sockets.append(zap.socket)
            pull = ctx.socket(zmq.PULL)
            sockets.append(pull)
            if self.keys is not None:
                self.keys.apply_server(pull)
            pull.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
            pull.setsockopt(zmq.RCVHWM, 10_000)
            pull.setsockopt(zmq.LINGER, 0)
            events = pull.get_monitor_socket(_REFUSED)
            sockets.append(events)
            self._address = _bind(pull, self._want_address, 0)
            pub = None
            if self._want_publish:
                pub = ctx.socket(zmq.XPUB)
                sockets.append(pub)
                pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only the first
                pub.setsockopt(zmq.SNDHWM, 10_000)
                pub.setsockopt(zmq.LINGER, 0)
                self._publish = _bind(pub, self._want_publish, self.port_tries)
        except BaseException:
            for sock in sockets:
                sock.close(0)
            ctx.term()
            raise
        self._ctx = ctx
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run,
            args=(pull, pub, events, zap),
            name="distgraft-collector",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (it polls every 50 ms, so this is quick) and release the ports.

        The generous ``timeout`` matters on a loaded machine: the sockets are closed and the
        ports freed only once the thread has seen the flag, and a port still bound would
        make the next collector on it fail.
        """
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if not self._thread.is_alive() and self._ctx is not None:
            self._ctx.term()
        self._thread = None
        self._ctx = None

    def stats(self) -> dict[str, int]:
        """Counts: received, accepted, each rejection reason, callback_errors, refused.

        ``refused`` counts failed handshakes: peers without the run's keys, with a wrong
        server key or a client key the run does not know (and peers that hang up in the
        middle of one). Their messages never arrive, so they appear in no other count. A
        peer that does not speak ZeroMQ at all is disconnected before any handshake and
        is not counted.
        """
        with self._lock:
            return dict(self._counts)

    def stats_line(self) -> str | None:
        """One line for people when something was refused or rejected, else None."""
        s = self.stats()
        rejected = sum(s[r] for r in REJECT_REASONS)
        if not (s["refused"] or rejected):
            return None
        return (
            f"telemetry collector: {s['accepted']} events accepted, {rejected} malformed "
            f"messages rejected, {s['refused']} connections refused in the handshake"
        )

    def __enter__(self) -> Collector:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _run(
        self,
        pull: zmq.Socket,
        pub: zmq.Socket | None,
        events: zmq.Socket,
        zap: ZapHandler | None,
    ) -> None:
        poller = zmq.Poller()
        for sock in (pull, events, pub, zap.socket if zap else None):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    ready = dict(poller.poll(50))
                    if zap is not None and zap.socket in ready:
                        zap.serve_one()
                    if events in ready:
                        self._drain_monitor(events)
                    if pub is not None and pub in ready:
                        self._drain_subscriptions(pub)
                    if pull in ready:
                        for _ in range(1000):  # drain a burst, then check the stop flag
                            frames = pull.recv_multipart(zmq.NOBLOCK)
                            self._handle(frames, pub)
                except zmq.Again:
                    pass
                except zmq.ContextTerminated:
                    return
                except Exception as e:  # keep receiving whatever happened
                    self.last_rejection = f"internal: {type(e).__name__}: {e}"
                    time.sleep(0.01)
                if pub is not None:
                    self._resend_start(pub)
                    self._publish_stats(pub)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                pull.disable_monitor()
            for sock in (events, pull, pub, zap.socket if zap else None):
                if sock is not None:
                    sock.close(0)

    def _drain_monitor(self, events: zmq.Socket) -> None:
        refused = 0
        with contextlib.suppress(zmq.Again):
            for _ in range(1000):
                # a monitor message: (uint16 event, uint32 value) in host order, endpoint
                # (parsed here: zmq.utils.monitor would import asyncio into every command)
                head = events.recv_multipart(zmq.NOBLOCK)[0]
                if len(head) >= 6 and struct.unpack("=HI", head[:6])[0] & _REFUSED:
                    refused += 1
        if refused:
            self._count("refused", refused)

    def _drain_subscriptions(self, pub: zmq.Socket) -> None:
        with contextlib.suppress(zmq.Again):
            for _ in range(100):
                if pub.recv(zmq.NOBLOCK)[:1] == b"\x01":  # a subscription (0: its end)
                    self._start_wanted = self._stats_wanted = True

    def _resend_start(self, pub: zmq.Socket) -> None:
        """A new subscriber gets the run's start event again (if there was one)."""
        now = time.monotonic()
        if not self._start_wanted or self._start_frame is None or now < self._next_start:
            return
        self._start_wanted, self._next_start = False, now + START_RESEND_S
        with contextlib.suppress(zmq.ZMQError):
            pub.send(self._start_frame, zmq.NOBLOCK)

    def _publish_stats(self, pub: zmq.Socket) -> None:
        now = time.monotonic()
        if now < self._next_stats:
            return
        s = self.stats()
        rejected = sum(s[r] for r in REJECT_REASONS)
        now_counts = (s["refused"], rejected)
        if now_counts == self._published_counts and not (self._stats_wanted and any(now_counts)):
            return  # nothing new, and every subscriber has these counts
        self._next_stats = now + STATS_INTERVAL_S
        counts = {"received": s["received"], "accepted": s["accepted"], "rejected": rejected}
        ev = make_event("collector", 0, self._epoch, **counts, refused=s["refused"])
        try:
            pub.send(pack_event(ev), zmq.NOBLOCK)
        except zmq.ZMQError:
            return  # not sent (queue full): the same counts go out at the next interval
        self._published_counts, self._stats_wanted = now_counts, False

    def _handle(self, frames: list[bytes], pub: zmq.Socket | None) -> None:
        self._count("received")
        try:
            event = decode_message(frames, self.max_message_bytes)
        except Rejected as r:
            self._count(r.reason)
            self.last_rejection = str(r)
            return
        self._count("accepted")
        self._epoch = max(self._epoch, event["epoch"])
        if event["event"] == "start":  # sent live below to every current subscriber
            self._start_frame, self._start_wanted = frames[0], False
        if pub is not None:
            with contextlib.suppress(zmq.ZMQError):  # PUB drops for slow subscribers anyway
                pub.send(frames[0], zmq.NOBLOCK)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as e:
                self._count("callback_errors")
                if self._counts["callback_errors"] == 1:
                    sys.stderr.write(
                        f"distgraft collector: on_event failed ({type(e).__name__}: {e}); "
                        "further failures are only counted\n"
                    )


def _bind(sock: zmq.Socket, address: str, tries: int) -> str:
    """Bind, moving up to ``tries`` ports up when a fixed TCP port is taken; real endpoint."""
    allow_ipv6(sock, address)
    split = split_tcp(address)
    candidates = [address]
    if split is not None and split[1] != 0 and tries > 0:
        host, port = split
        candidates = [f"tcp://{host}:{p}" for p in range(port, min(port + tries, 65535) + 1)]
    error: zmq.ZMQError | None = None
    for candidate in candidates:
        try:
            sock.bind(candidate)
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise OSError(e.errno, f"cannot bind {candidate}: {e}") from e
            error = e
            continue
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    raise OSError(
        errno.EADDRINUSE,
        f"cannot bind {address}: ports {candidates[0]} .. {candidates[-1]} are in use ({error})",
    )
