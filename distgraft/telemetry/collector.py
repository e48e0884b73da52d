"""The collector rank 0 runs (PULL, validate, republish on PUB) and the run's endpoint file."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from distgraft.telemetry.wire import (
    REJECT_REASONS,
    Rejected,
    decode_message,
    normalize_address,
    split_tcp,
)

__all__ = ["ENDPOINTS_FILE", "Collector", "write_endpoints", "read_endpoints"]

ENDPOINTS_FILE = "telemetry.json"


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

    ``start`` binds both sockets (so bind errors surface in the caller) and then hands
    them to a daemon thread, which alone uses them from then on. The thread survives any
    input: every message ends up either accepted or counted under one of
    ``REJECT_REASONS``. ZeroMQ's ``MAXMSGSIZE`` is set to twice ``max_message_bytes`` as a
    memory guard (ZeroMQ silently drops the connection of a peer that exceeds it); messages
    between the two limits are received and counted as ``oversized``.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:0",
        publish: str | None = "tcp://127.0.0.1:5558",
        max_message_bytes: int = 1 << 20,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        port_tries: int = 20,
    ) -> None:
        self._want_address = normalize_address(address)
        self._want_publish = normalize_address(publish) if publish else None
        self.max_message_bytes = max_message_bytes
        self.on_event = on_event
        self.port_tries = port_tries
        self.last_rejection = ""
        self._address: str | None = None
        self._publish: str | None = None
        self._counts = dict.fromkeys(("received", "accepted", *REJECT_REASONS), 0)
        self._counts["callback_errors"] = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None

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
        pull = ctx.socket(zmq.PULL)
        pub = ctx.socket(zmq.PUB) if self._want_publish else None
        try:
            pull.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
            pull.setsockopt(zmq.RCVHWM, 10_000)
            pull.setsockopt(zmq.LINGER, 0)
            self._address = _bind(pull, self._want_address, 0)
            if pub is not None:
                pub.setsockopt(zmq.SNDHWM, 10_000)
                pub.setsockopt(zmq.LINGER, 0)
                self._publish = _bind(pub, self._want_publish or "", self.port_tries)
        except BaseException:
            pull.close(0)
            if pub is not None:
                pub.close(0)
            ctx.term()
            raise
        self._ctx = ctx
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(pull, pub), name="distgraft-collector", daemon=True
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
        """Counts: received, accepted, each rejection reason, callback_errors."""
        with self._lock:
            return dict(self._counts)

    def __enter__(self) -> Collector:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _run(self, pull: zmq.Socket, pub: zmq.Socket | None) -> None:
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    if not poller.poll(50):
                        continue
                    for _ in range(1000):  # drain a burst, then check the stop flag
                        frames = pull.recv_multipart(zmq.NOBLOCK)
                        self._handle(frames, pub)
                except zmq.Again:
                    continue
                except zmq.ContextTerminated:
                    return
                except Exception as e:  # keep receiving whatever happened
                    self.last_rejection = f"internal: {type(e).__name__}: {e}"
                    time.sleep(0.01)
        finally:
            pull.close(0)
            if pub is not None:
                pub.close(0)

    def _handle(self, frames: list[bytes], pub: zmq.Socket | None) -> None:
        self._count("received")
        try:
            event = decode_message(frames, self.max_message_bytes)
        except Rejected as r:
            self._count(r.reason)
            self.last_rejection = str(r)
            return
        self._count("accepted")
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
                raise OSError(f"cannot bind {candidate}: {e}") from e
            error = e
            continue
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    raise OSError(
        f"cannot bind {address}: ports {candidates[0]} .. {candidates[-1]} are in use ({error})"
    )
