"""What only a bind can tell about the telemetry settings, checked before a run starts.

The config's validation checks the syntax of ``telemetry.address`` and
``telemetry.publish``. Whether rank 0 can actually listen there (an address of another
machine, a port in use, a folder that does not exist for ``ipc://``, a libzmq without
CURVE) only the machine can say. ``check_telemetry`` asks it on rank 0, before the process
group starts, by binding both endpoints and releasing them at once. A taken ``publish``
port is not an error: the collector moves to the next free one, as it will in the run.
"""

from __future__ import annotations

import errno

import zmq

from distgraft.config import ConfigError, TelemetryConfig
from distgraft.telemetry.auth import has_curve
from distgraft.telemetry.collector import _bind
from distgraft.telemetry.wire import normalize_address

__all__ = ["check_telemetry"]

_WHY = {
    errno.EADDRNOTAVAIL: "it is not an address of this machine",
    errno.ENODEV: "it names no interface or address of this machine",
    errno.EADDRINUSE: "the port is in use",
    errno.EACCES: "permission denied (ports below 1024 need root)",
    errno.ENOENT: "its folder does not exist",
}
_ALLOWED = "use an address of rank 0's machine, e.g. tcp://127.0.0.1:0 (any free port) or tcp://*:0"


def check_telemetry(t: TelemetryConfig) -> None:
    """Raise ConfigError (naming the option) if rank 0 could not run the collector."""
    if not t.zmq:
        return
    if t.auth == "curve" and not has_curve():
        raise ConfigError(
            "telemetry.auth = 'curve' needs a libzmq with CURVE, and this one has none "
            "(zmq.has('curve') is False; pyzmq's wheels have it): install those, or use "
            "--telemetry.auth=none (any local process may publish) or --telemetry.zmq=false"
        )
    ctx = zmq.Context(io_threads=1)
    try:
        _try_bind(ctx, zmq.PULL, "telemetry.address", t.address, 0)
        if t.publish:
            _try_bind(ctx, zmq.PUB, "telemetry.publish", t.publish, 20)
    finally:
        ctx.term()


def _try_bind(ctx: zmq.Context, kind: int, key: str, address: str, tries: int) -> None:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        _bind(sock, normalize_address(address), tries)
    except OSError as e:
        why = _WHY.get(e.errno, e.strerror or str(e))
        if e.errno == errno.EADDRINUSE and tries:
            why = f"its port and the {tries} above it are in use"
        raise ConfigError(f"{key} = {address!r} cannot be bound: {why}; {_ALLOWED}") from None
    finally:
        sock.close(0)
