"""Training telemetry: typed events, sinks that never stall training, and a safe collector.

Every process of a run reports what it does as small dict *events* (``events.SCHEMA``).
The trainer hands them to a ``Telemetry`` facade (``sinks``), which fans them out to
sinks: the console (lines from ``format``), an append-only ``metrics.jsonl``, TensorBoard
files (``tensorboard``, written from the same events) and a ZeroMQ PUSH socket towards the
``Collector`` that rank 0 runs (``collector``). The collector
validates every message and republishes it on a PUB socket, where any number of
``distgraft monitor`` processes (``monitor``) can watch the run live. ``wire`` is the
msgpack encoding and the one gate every received message passes.

Two rules shape this package:

* Telemetry must never slow down or crash training. ``ZmqSink`` sends without blocking
  and drops (and counts) an event when the collector is absent or its queue is full; the
  facade swallows (and reports once) any exception a sink raises.
* Only the run's own processes may publish: the collector's PULL socket is a CURVE server
  with per-run keys that rank 0 makes and shares through the process group (``auth``), so
  other processes are refused in ZeroMQ's handshake, before any byte reaches Python.
* The collector and the monitors listen on sockets, so their input is untrusted. It is
  decoded with msgpack only (no pickle anywhere), with size and nesting limits, ext types
  rejected, and a schema check; a bad message is counted under a reason and dropped, and
  the receiving thread never dies. ``wire.decode_message`` is that shared gate.

Conventions of the values (the trainer follows them, the displays rely on them):
``epoch`` is the 0-based index of the epoch (shown as ``epoch + 1`` of E), accuracies are
percentages in [0, 100], times are seconds.
"""

from distgraft.telemetry.auth import (
    KEY_FILE,
    ClientKeys,
    CurveKeys,
    has_curve,
    new_keys,
    read_keys,
    write_keys,
)
from distgraft.telemetry.collector import (
    ENDPOINTS_FILE,
    Collector,
    read_endpoints,
    write_endpoints,
)
from distgraft.telemetry.events import (
    COMMON_FIELDS,
    SCHEMA,
    SchemaError,
    make_event,
    read_jsonl,
    validate_event,
)
from distgraft.telemetry.format import (
    config_value,
    display_epoch,
    format_event,
    mean,
    start_config,
    summary_lines,
)
from distgraft.telemetry.sinks import (
    ConsoleSink,
    JsonlSink,
    Sink,
    Telemetry,
    ZmqSink,
    forget_epochs,
)
from distgraft.telemetry.tensorboard import TensorBoardSink
from distgraft.telemetry.wire import (
    REJECT_REASONS,
    Rejected,
    decode_message,
    normalize_address,
    pack_event,
)

__all__ = [
    "SCHEMA",
    "COMMON_FIELDS",
    "REJECT_REASONS",
    "ENDPOINTS_FILE",
    "KEY_FILE",
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
    "TensorBoardSink",
    "Telemetry",
    "forget_epochs",
    "Collector",
    "CurveKeys",
    "ClientKeys",
    "has_curve",
    "new_keys",
    "read_keys",
    "write_keys",
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
