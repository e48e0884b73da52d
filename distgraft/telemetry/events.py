"""The event schema: what every telemetry event holds, its validation, and reading it back.

Every line of ``metrics.jsonl`` and every message on the telemetry sockets is one event:
a flat map with ``event``, ``time``, ``network`` and ``epoch`` plus the fields its type
lists in ``SCHEMA``. ``validate_event`` is the schema check shared by the collector, the
monitor and the readers of the file.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

__all__ = [
    "SCHEMA",
    "COMMON_FIELDS",
    "SUMMARY_ROW",
    "OPTIONAL",
    "MAX_DEPTH",
    "SchemaError",
    "validate_event",
    "make_event",
    "to_plain",
    "read_jsonl",
]

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
        "train_loss": "float?",
        "train_acc": "float?",
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
    "prune": {
        "round": "int",
        "rounds": "int",
        "layers": "[str]",
        "kept": "[int]",
        "total": "[int]",
        "compression": "float",
        "dropout": "[float]",
    },
    "trim": {
        "round": "int",
        "layers": "[str]",
        "params": "int",
        "flops": "int",
        "test_acc": "float",
        "acc_drop": "float",  # below the start, on the validation split (test: older files)
    },
    "warning": {"message": "str"},
    "error": {"message": "str"},
    "start": {
        "world_size": "int",
        "networks": "int",
        "replicas": "int",
        "run_dir": "str",
        "config": "str",
    },
    # Published by the collector itself (never written to metrics.jsonl): its counts.
    "collector": {"received": "int", "accepted": "int", "rejected": "int", "refused": "int"},
}

# Fields an event may lack (files written by earlier versions) but, when present, must have
# these types.
OPTIONAL: dict[str, dict[str, str]] = {
    "epoch": {"val_loss": "float?", "val_acc": "float?"},
    "trim": {"val_acc": "float"},
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
    for key, code in OPTIONAL.get(kind, {}).items():
        if key in obj:
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


def to_plain(obj: Any) -> Any:
    """Encoder fallback so numpy / torch scalars and arrays can be emitted as they are."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot encode a {type(obj).__name__} in a telemetry event")


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
