"""The wire format of telemetry: msgpack encoding, the safe decoding gate, addresses.

``decode_message`` is the one gate every received message passes (collector and monitor
alike): msgpack only, never pickle, with size and nesting limits, ext types rejected and a
schema check. Any input ends as a validated event or as ``Rejected`` with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from distgraft.telemetry.events import MAX_DEPTH, SchemaError, to_plain, validate_event

__all__ = [
    "REJECT_REASONS",
    "Rejected",
    "pack_event",
    "decode_message",
    "DEFAULT_HOST",
    "normalize_address",
    "split_tcp",
    "allow_ipv6",
]


def pack_event(event: dict[str, Any]) -> bytes:
    """msgpack encoding used on every socket."""
    return msgpack.packb(event, use_bin_type=True, default=to_plain)


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


def split_tcp(address: str) -> tuple[str, int] | None:
    """(host, port) of a tcp address with a numeric port, else None."""
    if not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://") :].rpartition(":")
    return (host, int(port)) if port.isdigit() and host else None


def allow_ipv6(sock: Any, address: str) -> None:
    """ZeroMQ sockets speak IPv4 only unless told otherwise; ``tcp://[::1]:...`` needs it."""
    if address.startswith("tcp://["):
        import zmq

        sock.setsockopt(zmq.IPV6, 1)
