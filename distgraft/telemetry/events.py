"""Training telemetry: typed events, sinks that never stall training, and a safe collector.

Every process of a run reports what it does as small dict *events* (see ``SCHEMA``). The
trainer hands them to a ``Telemetry`` facade, which fans them out to sinks: the console,
an append-only ``metrics.jsonl`` and a ZeroMQ PUSH socket towards the ``Collector`` that
rank 0 runs. The collector validates every message and republishes it on a PUB socket,
where any number of ``distgraft monitor`` processes can watch the run live.

Two rules shape this module:

* Telemetry must never slow down or crash training. ``ZmqSink`` sends without blocking
  and drops (and counts) an event when the collector is absent or its queue is full; the
  facade swallows (and reports once) any exception a sink raises.
* The collector and the monitors listen on sockets, so their input is untrusted. It is
  decoded with msgpack only (no pickle anywhere), with size and nesting limits, ext types
  rejected, and a schema check; a bad message is counted under a reason and dropped, and
  the receiving thread never dies. ``decode_message`` is that shared gate.

Conventions of the values (the trainer follows them, the displays rely on them):
``epoch`` is the 0-based index of the epoch (shown as ``epoch + 1`` of E), accuracies are
percentages in [0, 100], times are seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

import msgpack
import tomllib
import zmq

__all__ = [
    "SCHEMA",
    "COMMON_FIELDS",
    "REJECT_REASONS",
    "ENDPOINTS_FILE",
    "SchemaError",
    "Rejected",
    "make_event",
    "validate_event",
    "decode_message",
    "pack_event",
    "Sink",
    "ConsoleSink",
    "JsonlSink",
    "ZmqSink",
    "Telemetry",
    "Collector",
    "normalize_address",
    "write_endpoints",
    "read_endpoints",
    "read_jsonl",
    "format_event",
    "summary_lines",
    "display_epoch",
    "mean",
    "start_config",
    "config_value",
]

# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------

# Field type codes: "int", "float" (int accepted), "str"; a trailing "?" allows null;
# "[x]" is a list of x; "[net]" a list of summary rows (see SUMMARY_ROW).
COMMON_FIELDS: dict[str, str] = {"event": "str", "time": "float", "network": "int", "epoch": "int"}

SUMMARY_ROW: dict[str, str] = {
    "network": "int",
    "best_acc": "float",
    "final_acc": "float",
    "invalid_01": "int",
    "invalid_001": "int",
}

SCHEMA: dict[str, dict[str, str]] = {
    "epoch": {
        "train_loss": "float",
        "train_acc": "float",
        "test_loss": "float?",
        "test_acc": "float?",
        "lr": "float",
        "epoch_s": "float",
        "images_per_s": "float",
    },
    "progress": {"step": "int", "steps": "int", "loss": "float?", "images_per_s": "float"},
    "graft": {
        "peer": "int",
        "source": "str",
        "criterion": "str",
        "level": "str",
        "layers": "[str]",
        "alpha": "[float]",
        "h_self": "[float]",
        "h_peer": "[float]",
        "bytes": "int",
        "exchange_s": "float",
        "graft_s": "float",
        "warnings": "[str]",
        "invalid_01": "int?",
        "invalid_001": "int?",
    },
    "summary": {"networks": "[net]", "ensemble_acc": "float?", "run_dir": "str"},
    "warning": {"message": "str"},
    "error": {"message": "str"},
    "start": {
        "world_size": "int",
        "networks": "int",
        "replicas": "int",
        "run_dir": "str",
        "config": "str",
    },
}

# Extra (unknown) keys may hold any JSON-like value, but not arbitrarily deep ones.
MAX_DEPTH = 32


class SchemaError(ValueError):
    """An event does not follow ``SCHEMA``; ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _type_ok(value: Any, code: str) -> bool:
    if code.endswith("?"):
        return value is None or _type_ok(value, code[:-1])
    if code == "str":
        return isinstance(value, str)
    if isinstance(value, bool):  # bool is an int subclass; never a number here
        return False
    if code == "int":
        return isinstance(value, int)
    if code == "float":
        return isinstance(value, int | float)
    raise AssertionError(f"unknown type code {code}")  # pragma: no cover


def _check_field(obj: dict[str, Any], key: str, code: str, where: str) -> None:
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise SchemaError(name, "missing")
    value = obj[key]
    if code.startswith("["):
        if not isinstance(value, list):
            raise SchemaError(name, f"expected a list, got {type(value).__name__}")
        item = code[1:-1]
        for i, v in enumerate(value):
            if item == "net":
                if not isinstance(v, dict):
                    raise SchemaError(f"{name}[{i}]", "expected a map")
                for k, c in SUMMARY_ROW.items():
                    _check_field(v, k, c, f"{name}[{i}]")
            elif not _type_ok(v, item):
                raise SchemaError(f"{name}[{i}]", f"expected {item}, got {type(v).__name__}")
        return
    if not _type_ok(value, code):
        want = code.rstrip("?") + (" or null" if code.endswith("?") else "")
        raise SchemaError(name, f"expected {want}, got {type(value).__name__} {value!r:.40}")


def _check_plain(value: Any, path: str, depth: int = 0) -> None:
    """JSON-like values only (so every sink can write them), bounded nesting."""
    if depth > MAX_DEPTH:
        raise SchemaError(path, f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(path, f"map key {k!r:.40} is not a string")
            _check_plain(v, f"{path}.{k}", depth + 1)
        return
    raise SchemaError(path, f"unsupported value type {type(value).__name__}")


def validate_event(obj: Any) -> dict[str, Any]:
    """Check ``obj`` against the schema and return it; raise ``SchemaError`` naming the field.

    Known keys must have their listed types (int is accepted for float, bool is never a
    number); extra keys are allowed so that the trainer can add fields without breaking
    older monitors, but must hold JSON-like values.
    """
    if not isinstance(obj, dict):
        raise SchemaError("event", f"an event is a map, got {type(obj).__name__}")
    for key in obj:
        if not isinstance(key, str):
            raise SchemaError(repr(key)[:40], "map keys must be strings")
    for key, code in COMMON_FIELDS.items():
        _check_field(obj, key, code, "")
    kind = obj["event"]
    if kind not in SCHEMA:
        raise SchemaError("event", f"unknown event type {kind!r:.40}; known: {', '.join(SCHEMA)}")
    if obj["network"] < 0:
        raise SchemaError("network", f"must be >= 0, got {obj['network']}")
    if obj["epoch"] < 0:
        raise SchemaError("epoch", f"must be >= 0, got {obj['epoch']}")
    if not math.isfinite(obj["time"]):
        raise SchemaError("time", "must be finite")
    for key, code in SCHEMA[kind].items():
        _check_field(obj, key, code, "")
    if kind == "graft":
        n = len(obj["layers"])
        for key in ("alpha", "h_self", "h_peer"):
            if len(obj[key]) != n:
                raise SchemaError(key, f"has {len(obj[key])} values for {n} layers")
    for key, value in obj.items():
        _check_plain(value, key, 1)
    return obj


def make_event(event: str, network: int, epoch: int, **fields: Any) -> dict[str, Any]:
    """An event dict stamped with the current time (a ``time`` field overrides the stamp)."""
    return {"event": event, "time": time.time(), "network": network, "epoch": epoch, **fields}


def _to_plain(obj: Any) -> Any:
    """Encoder fallback so numpy / torch scalars and arrays can be emitted as they are."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot encode a {type(obj).__name__} in a telemetry event")


def pack_event(event: dict[str, Any]) -> bytes:
    """msgpack encoding used on every socket."""
    return msgpack.packb(event, use_bin_type=True, default=_to_plain)


# ---------------------------------------------------------------------------------------
# Safe decoding (shared by the collector and the monitor)
# ---------------------------------------------------------------------------------------

REJECT_REASONS = ("malformed", "oversized", "schema", "ext", "multipart", "not_a_map")


class Rejected(Exception):
    """A received message was dropped; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _ExtTypeError(ValueError):
    pass


def _reject_ext(code: int, data: bytes) -> Any:
    raise _ExtTypeError(f"msgpack ext type {code} is not accepted")


def _has_ext(value: Any, depth: int = 0) -> bool:
    """msgpack decodes ext type -1 (Timestamp) itself, bypassing ext_hook; find it here."""
    if isinstance(value, msgpack.Timestamp | msgpack.ExtType):
        return True
    if depth > MAX_DEPTH:
        return False  # the schema check reports the depth
    if isinstance(value, list):
        return any(_has_ext(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_has_ext(v, depth + 1) for v in value.values())
    return False


def decode_message(frames: Sequence[bytes], max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Turn the frames of one received ZeroMQ message into a validated event.

    Raises ``Rejected`` with the reason; no other exception escapes for any input.
    """
    if len(frames) != 1:
        raise Rejected("multipart", f"{len(frames)} frames")
    data = frames[0]
    if len(data) > max_bytes:
        raise Rejected("oversized", f"{len(data)} bytes > {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes // 2,
            max_ext_len=max_bytes,
        )
    except _ExtTypeError as e:
        raise Rejected("ext", str(e)) from None
    except Exception as e:  # msgpack raises ValueError subclasses, UnicodeDecodeError, ...
        raise Rejected("malformed", f"{type(e).__name__}: {e}"[:200]) from None
    if not isinstance(obj, dict):
        raise Rejected("not_a_map", type(obj).__name__)
    try:
        if _has_ext(obj):
            raise Rejected("ext", "msgpack timestamp/ext value")
        return validate_event(obj)
    except SchemaError as e:
        raise Rejected("schema", str(e)[:200]) from None
    except Rejected:
        raise
    except Exception as e:  # pragma: no cover - defensive: never let input kill a reader
        raise Rejected("schema", f"{type(e).__name__}: {e}"[:200]) from None


# ---------------------------------------------------------------------------------------
# Formatting (shared by ConsoleSink and the monitor)
# ---------------------------------------------------------------------------------------


def display_epoch(epoch: int) -> int:
    """Events count epochs from 0; people count from 1."""
    return epoch + 1


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def format_event(ev: dict[str, Any], epochs: int | None = None) -> str | None:
    """One human line for an event, or None for events not worth a line (progress)."""
    kind, net = ev["event"], ev["network"]
    ep = display_epoch(ev["epoch"])
    ep_txt = f"{ep}/{epochs}" if epochs else str(ep)
    if kind == "epoch":
        return (
            f"net {net} | epoch {ep_txt} | loss {ev['train_loss']:.3f} "
            f"acc {ev['train_acc']:.1f}% | test {_num(ev['test_acc'], '.1f', '%')} | "
            f"lr {ev['lr']:.4g} | {ev['epoch_s']:.1f} s | {ev['images_per_s']:.0f} img/s"
        )
    if kind == "graft":
        alpha = ev["alpha"]
        lo_hi = f" ({min(alpha):.3f}..{max(alpha):.3f})" if alpha else ""
        line = (
            f"net {net} | graft {ep_txt} <- net {ev['peer']} | "
            f"alpha {_num(mean(alpha), '.3f')}{lo_hi} | {ev['graft_s'] * 1000:.0f} ms"
        )
        if ev.get("invalid_01") is not None:
            line += f" | invalid <0.1: {ev['invalid_01']} <0.01: {_num(ev['invalid_001'], 'd')}"
        return "\n".join([line] + [f"net {net} | warning: {w}" for w in ev["warnings"]])
    if kind in ("warning", "error"):
        return f"net {net} | {kind.upper()}: {ev['message']}"
    if kind == "start":
        return (
            f"run {ev['run_dir']}: {ev['networks']} networks x {ev['replicas']} replicas "
            f"(world size {ev['world_size']})"
        )
    if kind == "summary":
        return "\n".join(summary_lines(ev))
    return None


def summary_lines(ev: dict[str, Any]) -> list[str]:
    """The final table of a ``summary`` event."""
    lines = ["network   best acc  final acc  invalid<0.1  invalid<0.01"]
    for row in sorted(ev["networks"], key=lambda r: r["network"]):
        lines.append(
            f"{row['network']:>7}   {row['best_acc']:7.2f}%  {row['final_acc']:8.2f}%  "
            f"{row['invalid_01']:>11}  {row['invalid_001']:>12}"
        )
    lines.append(f"ensemble acc: {_num(ev['ensemble_acc'], '.2f', '%')}")
    return lines


def start_config(ev: dict[str, Any] | None) -> dict[str, Any]:
    """The run's config parsed from a ``start`` event's TOML ({} when absent or unreadable).

    Displays use it for what the other events do not repeat: total epochs, graft.a.
    """
    if not ev or not isinstance(ev.get("config"), str):
        return {}
    try:
        return tomllib.loads(ev["config"])
    except (tomllib.TOMLDecodeError, ValueError):
        return {}


def config_value(config: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``config["section"]["name"]`` for key "section.name" if it has type ``kind``."""
    section, _, name = key.partition(".")
    value = config.get(section, {}).get(name) if isinstance(config.get(section), dict) else None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    return value if ok else None


# ---------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------


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
        line = (json.dumps(event, separators=(",", ":"), default=_to_plain) + "\n").encode()
        written = os.write(self._fd, line)
        if written < len(line):  # only on a full disk or similar; keep the line whole-ish
            os.write(self._fd, line[written:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ZmqSink:
    """PUSH events to the collector without ever blocking the training step.

    Each ``emit`` is one non-blocking send: while the collector is unreachable, events
    queue in ZeroMQ up to ``sndhwm`` (so a collector that starts late still gets the first
    events); beyond that, or when the collector is slow, ``zmq.Again`` drops the event and
    ``dropped`` counts it. ``linger_ms`` bounds how long ``close`` may wait for the queue.
    Create it in the process that uses it (ZeroMQ sockets do not survive fork).
    """

    def __init__(self, address: str, sndhwm: int = 1000, linger_ms: int = 100) -> None:
        self.address = normalize_address(address)
        self.sent = 0
        self.dropped = 0
        self._linger_ms = linger_ms
        self._ctx = zmq.Context(io_threads=1)
        self._sock: zmq.Socket | None = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
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


# ---------------------------------------------------------------------------------------
# Addresses and the run folder's endpoint file
# ---------------------------------------------------------------------------------------

ENDPOINTS_FILE = "telemetry.json"
DEFAULT_HOST = "127.0.0.1"


def normalize_address(address: str) -> str:
    """``tcp://HOST:PORT`` from ``tcp://...``, ``HOST:PORT`` or ``PORT``; host 127.0.0.1.

    Defaulting to the loopback interface keeps the collector off the network unless the
    user names an interface (or ``*``) explicitly.
    """
    address = address.strip()
    if "://" in address:
        scheme, rest = address.split("://", 1)
        if scheme == "tcp" and rest.startswith(":"):
            return f"tcp://{DEFAULT_HOST}{rest}"
        return address
    if address.isdigit():
        return f"tcp://{DEFAULT_HOST}:{address}"
    if address.startswith(":"):
        return f"tcp://{DEFAULT_HOST}{address}"
    return f"tcp://{address}"


def _split_tcp(address: str) -> tuple[str, int] | None:
    """(host, port) of a tcp address with a numeric port, else None."""
    if not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://") :].rpartition(":")
    return (host, int(port)) if port.isdigit() and host else None


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


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """Valid events of a metrics.jsonl and the number of lines skipped as malformed.

    A crashed writer can leave a partial last line, and a hand-edited file anything; both
    are skipped rather than failing the whole read.
    """
    events: list[dict[str, Any]] = []
    bad = 0
    for line in _lines(path):
        if not line.strip():
            continue
        try:
            events.append(validate_event(json.loads(line)))
        except ValueError:  # JSONDecodeError and SchemaError
            bad += 1
    return events, bad


def _lines(path: str | os.PathLike[str]) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from f


# ---------------------------------------------------------------------------------------
# Collector
# ---------------------------------------------------------------------------------------


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

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread (it polls every 50 ms) and release the ports."""
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
    split = _split_tcp(address)
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
