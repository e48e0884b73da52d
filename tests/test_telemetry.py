"""Telemetry over real sockets: sinks, the collector's gate, multi-process JSONL appends."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq
from dist_helpers import free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from distgraft.telemetry import (
    KEY_FILE,
    REJECT_REASONS,
    ClientKeys,
    Collector,
    ConsoleSink,
    JsonlSink,
    Rejected,
    SchemaError,
    Telemetry,
    ZmqSink,
    decode_message,
    forget_epochs,
    make_event,
    new_keys,
    normalize_address,
    pack_event,
    read_endpoints,
    read_jsonl,
    read_keys,
    validate_event,
    write_endpoints,
    write_keys,
)

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def sample_events() -> list[dict]:
    """One valid event of every kind."""
    return [
        make_event(
            "start", 0, 0, world_size=2, networks=2, replicas=1, run_dir="r", config="[run]\n"
        ),
        make_event("progress", 1, 0, step=5, steps=10, loss=None, images_per_s=100),
        make_event(
            "epoch",
            1,
            0,
            train_loss=0.5,
            train_acc=80,
            test_loss=None,
            test_acc=None,
            lr=0.1,
            epoch_s=2.0,
            images_per_s=300.0,
        ),
        make_event(
            "graft",
            0,
            0,
            peer=1,
            source="external",
            criterion="entropy",
            level="layer",
            layers=["a", "b"],
            alpha=[0.3, 0.7],
            h_self=[1.0, 2.0],
            h_peer=[1.5, 2.5],
            bytes=1000,
            exchange_s=0.01,
            graft_s=0.002,
            warnings=[],
            invalid_01=None,
            invalid_001=0,
        ),
        make_event("warning", 0, 0, message="careful"),
        make_event("error", 1, 0, message="broken"),
        make_event(
            "summary",
            0,
            1,
            networks=[
                {"network": 0, "best_acc": 90.0, "final_acc": 89, "invalid_01": 1, "invalid_001": 0}
            ],
            ensemble_acc=None,
            run_dir="r",
        ),
    ]


@pytest.fixture
def collector():
    got: list[dict] = []
    c = Collector(publish="tcp://127.0.0.1:0", max_message_bytes=4096, on_event=got.append)
    c.start()
    c.got = got  # type: ignore[attr-defined]
    yield c
    c.stop()


# -- schema ------------------------------------------------------------------------------


def test_sample_events_are_valid() -> None:
    for ev in sample_events():
        assert validate_event(ev) is ev
    assert validate_event({**sample_events()[1], "extra": {"nested": [1, "x", None]}})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event": None}, "event"),
        ({"event": "nope"}, "event"),
        ({"network": "1"}, "network"),
        ({"network": True}, "network"),
        ({"network": -1}, "network"),
        ({"epoch": 1.5}, "epoch"),
        ({"time": "now"}, "time"),
        ({"time": float("nan")}, "time"),
        ({"step": 1.0}, "step"),
        ({"images_per_s": None}, "images_per_s"),
        ({"loss": False}, "loss"),
        ({"extra": b"bytes"}, "extra"),
        ({"extra": {1: 2}}, "extra"),
    ],
)
def test_schema_errors_name_the_field(change: dict, field: str) -> None:
    ev = {**sample_events()[1], **change}
    with pytest.raises(SchemaError) as info:
        validate_event(ev)
    assert info.value.field == field
    assert field in str(info.value)


def test_schema_missing_and_nested_fields() -> None:
    ev = sample_events()[1]
    del ev["steps"]
    with pytest.raises(SchemaError, match="steps: missing"):
        validate_event(ev)
    graft = sample_events()[3]
    with pytest.raises(SchemaError, match="alpha"):
        validate_event({**graft, "alpha": [0.5]})  # one value for two layers
    with pytest.raises(SchemaError, match=r"layers\[1\]"):
        validate_event({**graft, "layers": ["a", 2]})
    summary = sample_events()[-1]
    bad_row = {**summary["networks"][0], "best_acc": "high"}
    with pytest.raises(SchemaError, match=r"networks\[0\]\.best_acc"):
        validate_event({**summary, "networks": [bad_row]})
    with pytest.raises(SchemaError, match="deeper"):
        deep: list = []
        for _ in range(40):
            deep = [deep]
        validate_event({**ev, "steps": 1, "extra": deep})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_never_raises_anything_but_rejected(data: bytes) -> None:
    try:
        decode_message([data], 4096)
    except Rejected as r:
        assert r.reason in REJECT_REASONS


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text()
        | st.binary(),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
        max_leaves=20,
    )
)
def test_decode_of_arbitrary_msgpack(obj: object) -> None:
    try:
        decode_message([msgpack.packb(obj, use_bin_type=True)], 4096)
    except Rejected as r:
        assert r.reason in REJECT_REASONS


# -- sinks -------------------------------------------------------------------------------


def test_console_sink_lines() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, epochs=20)
    sink.emit(
        make_event(
            "epoch",
            1,
            2,
            train_loss=0.5123,
            train_acc=83.14,
            test_loss=0.6,
            test_acc=82.0,
            lr=0.1,
            epoch_s=4.23,
            images_per_s=3400.2,
        )
    )
    sink.emit(sample_events()[1])  # progress: ignored
    sink.emit(sample_events()[3])
    sink.emit(make_event("warning", 2, 0, message="slow peer"))
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "net 1 | epoch 3/20 | loss 0.512 acc 83.1% | test 82.0% | lr 0.1 | 4.2 s | 3400 img/s"
    )
    assert lines[1].startswith("net 0 | graft 1/20 <- net 1 | alpha 0.500")
    assert "2 ms" in lines[1]
    assert lines[2] == "net 2 | WARNING: slow peer"
    assert len(lines) == 3


def test_trim_lines_show_the_validation_drop_and_older_events_still_read() -> None:
    trim = {"round": 2, "layers": ["conv2"], "params": 9000, "flops": 20000, "test_acc": 96.0}
    new = make_event("trim", 0, 2, **trim, val_acc=97.5, acc_drop=0.5)
    old = make_event("trim", 0, 2, **trim, acc_drop=1.0)  # written before the validation split
    out = io.StringIO()
    sink = ConsoleSink(out, epochs=5)
    sink.emit(new)
    sink.emit(old)
    assert out.getvalue().splitlines() == [
        "trim round 2 | conv2 | 9,000 params 20,000 FLOPs | val 97.50% (-0.50) | test 96.00%",
        "trim round 2 | conv2 | 9,000 params 20,000 FLOPs | test 96.00% (-1.00)",
    ]
    with pytest.raises(SchemaError, match="val_acc"):
        validate_event({**new, "val_acc": "high"})


def test_roundtrip_zmqsink_collector_pub(collector: Collector) -> None:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(collector.publish_address)
    sink = ZmqSink(collector.address)
    try:
        events = sample_events()
        for ev in events:
            sink.emit(ev)
        assert wait_until(lambda: len(collector.got) == len(events))
        assert collector.got == events
        assert collector.stats()["accepted"] == len(events)
        # The PUB side: keep emitting until the subscription has propagated.
        deadline = time.monotonic() + 5
        received = None
        while received is None and time.monotonic() < deadline:
            sink.emit(events[4])
            if sub.poll(50):
                received = msgpack.unpackb(sub.recv())
        assert received in events  # republished as sent
        assert sink.dropped == 0
    finally:
        sink.close()
        sub.close()


def test_zmqsink_without_collector_drops_without_blocking() -> None:
    sink = ZmqSink(f"tcp://127.0.0.1:{free_port()}", sndhwm=100, linger_ms=50)
    ev = sample_events()[1]
    durations = []
    for _ in range(1000):
        t0 = time.perf_counter()
        sink.emit(ev)
        durations.append(time.perf_counter() - t0)
    # A blocking send would wait forever here (no collector), so any finite bound tells the
    # two apart; 0.5 s leaves room for a preempted call on a loaded 2-core machine.
    assert max(durations) < 0.5
    assert sink.dropped + sink.sent == 1000
    assert sink.dropped >= 800  # at most the high-water mark (plus a little) is queued
    t0 = time.perf_counter()
    sink.close()
    assert time.perf_counter() - t0 < 5.0  # linger 50 ms; without a linger close never returns
    sink.emit(ev)  # after close: dropped, not raised
    assert sink.dropped + sink.sent == 1001


def test_collector_counts_every_rejection_and_keeps_going(collector: Collector) -> None:
    good = sample_events()[4]
    packed = pack_event(good)
    oversized = pack_event({**good, "message": "x" * 6000})  # > 4096, < the zmq hard limit
    cases = [
        ([b"\xc1\xc1 this is not msgpack"], "malformed"),
        ([packed[:-3]], "malformed"),
        ([b""], "malformed"),
        ([msgpack.packb({1: 2})], "malformed"),  # non-string map key (strict_map_key)
        ([b"\xa3\xff\xfe\xfd"], "malformed"),  # invalid UTF-8 string
        ([oversized], "oversized"),
        ([msgpack.packb([1, 2, 3])], "not_a_map"),
        ([msgpack.packb(42)], "not_a_map"),
        ([msgpack.packb({k: v for k, v in good.items() if k != "event"})], "schema"),
        ([pack_event({**good, "network": "1"})], "schema"),
        ([pack_event({**good, "epoch": 1.5})], "schema"),
        ([pack_event({**good, "network": True})], "schema"),
        ([msgpack.packb({**good, "x": msgpack.ExtType(7, b"data")})], "ext"),
        ([msgpack.packb({**good, "x": msgpack.Timestamp(1, 0)})], "ext"),
        ([packed, packed], "multipart"),
    ]
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(collector.address)
    try:
        for frames, _ in cases:
            push.send_multipart(frames)
        push.send(packed)  # same connection: arrives after every bad one
        assert wait_until(lambda: collector.stats()["accepted"] == 1)
        stats = collector.stats()
        expected = dict.fromkeys(REJECT_REASONS, 0)
        for _, reason in cases:
            expected[reason] += 1
        assert {r: stats[r] for r in REJECT_REASONS} == expected
        assert stats["received"] == len(cases) + 1
        assert collector.got == [good]

        # Beyond the hard limit ZeroMQ drops the sender's connection; the collector lives.
        brute = ctx.socket(zmq.PUSH)
        brute.setsockopt(zmq.LINGER, 0)
        brute.connect(collector.address)
        brute.send(b"\x00" * (3 * 4096))
        time.sleep(0.2)
        brute.close()
        push.send(packed)
        assert wait_until(lambda: collector.stats()["accepted"] == 2)
    finally:
        push.close()


def test_collector_callback_errors_are_contained() -> None:
    def boom(ev: dict) -> None:
        raise RuntimeError("callback bug")

    with Collector(publish=None, on_event=boom) as c:
        sink = ZmqSink(c.address)
        for ev in sample_events()[:3]:
            sink.emit(ev)
        assert wait_until(lambda: c.stats()["callback_errors"] == 3)
        assert c.stats()["accepted"] == 3
        sink.close()


def test_publish_port_moves_up_when_taken_and_stop_is_quick() -> None:
    ctx = zmq.Context.instance()
    blocker = ctx.socket(zmq.PUB)
    blocker.setsockopt(zmq.LINGER, 0)
    port = free_port()
    blocker.bind(f"tcp://127.0.0.1:{port}")
    try:
        c = Collector(publish=f"tcp://127.0.0.1:{port}").start()
        got = int(c.publish_address.rsplit(":", 1)[1])
        assert port < got <= port + 20
        assert c.address.startswith("tcp://127.0.0.1:")
        t0 = time.perf_counter()
        c.stop()
        assert time.perf_counter() - t0 < 5.0  # the thread polls every 50 ms
        # The ports are released: the same publish address binds again.
        c2 = Collector(publish=c.publish_address, port_tries=0).start()
        assert c2.publish_address == c.publish_address
        c2.stop()
    finally:
        blocker.close()


def test_normalize_address() -> None:
    assert normalize_address("5558") == "tcp://127.0.0.1:5558"
    assert normalize_address(":5558") == "tcp://127.0.0.1:5558"
    assert normalize_address("host:1") == "tcp://host:1"
    assert normalize_address("tcp://*:0") == "tcp://*:0"
    assert normalize_address("ipc:///tmp/x") == "ipc:///tmp/x"


def test_jsonl_sink_from_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    code = (
        "import sys\n"
        "from distgraft.telemetry import JsonlSink, make_event\n"
        "sink = JsonlSink(sys.argv[1])\n"
        "for i in range(200):\n"
        "    sink.emit(make_event('warning', int(sys.argv[2]), i, message='x' * 5000))\n"
        "sink.close()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), str(k)], cwd=ROOT)
        for k in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=20) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    events = [validate_event(json.loads(line)) for line in lines]
    for k in range(2):
        assert sorted(e["epoch"] for e in events if e["network"] == k) == list(range(200))
    assert read_jsonl(path) == (events, 0)


def test_read_jsonl_skips_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    written = sample_events()
    for ev in written:
        sink.emit(ev)
    sink.close()
    with open(path, "a") as f:
        f.write('not json\n{"event": "epoch"}\n[1, 2]\n\n{"event": "warn')  # torn line
    events, bad = read_jsonl(path)
    assert events == written
    assert bad == 4


START_FIELDS = {"world_size": 2, "networks": 2, "replicas": 1, "run_dir": "r", "config": ""}
EPOCH_FIELDS = {"train_loss": 0.5, "train_acc": 80, "test_loss": None, "test_acc": None,
                "lr": 0.1, "epoch_s": 2.0, "images_per_s": 300.0}  # fmt: skip


def test_a_resume_forgets_the_epochs_it_trains_again(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)  # stays open across the rewrite, like the leads' sinks
    sink.emit(make_event("start", 0, 0, **START_FIELDS))
    for epoch in range(4):
        for net in (0, 1):
            sink.emit(make_event("epoch", net, epoch, **EPOCH_FIELDS))
    sink.emit(make_event("error", 0, 3, message="peer died"))
    with open(path, "a") as f:
        f.write('{"event": "epo')  # the last line torn by the crash
    assert forget_epochs(path, 2) == 4
    sink.emit(make_event("epoch", 0, 2, **EPOCH_FIELDS))  # the resumed run goes on
    sink.close()
    events, bad = read_jsonl(path)
    kept = [(e["event"], e["network"], e["epoch"]) for e in events]
    assert kept == [("start", 0, 0), ("epoch", 0, 0), ("epoch", 1, 0), ("epoch", 0, 1),
                    ("epoch", 1, 1), ("error", 0, 3), ("epoch", 0, 2)]  # fmt: skip
    assert bad == 1  # the torn line is kept as it was, on a line of its own
    assert forget_epochs(tmp_path / "absent.jsonl", 0) == 0


def test_endpoints_file(tmp_path: Path) -> None:
    write_endpoints(tmp_path / "run", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    assert read_endpoints(tmp_path / "run") == {
        "address": "tcp://127.0.0.1:1",
        "publish": "tcp://127.0.0.1:2",
    }


class Exploding:
    def __init__(self) -> None:
        self.calls = 0

    def emit(self, event: dict) -> None:
        self.calls += 1
        raise OSError("disk full")

    def close(self) -> None:
        raise OSError("still full")


class Keeping:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.closed = False

    def emit(self, event: dict) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True


def test_telemetry_facade_survives_a_raising_sink(capsys: pytest.CaptureFixture) -> None:
    bad, good = Exploding(), Keeping()
    with Telemetry([bad, good]) as tel:
        for epoch in range(5):
            ev = tel.emit("warning", 0, epoch, message="m")
            assert ev["event"] == "warning" and isinstance(ev["time"], float)
    assert bad.calls == 5
    assert len(good.events) == 5 and good.closed
    assert tel.errors == {"Exploding": 6}  # 5 emits + close
    err = capsys.readouterr().err
    assert err.count("Exploding") == 1 and "disk full" in err


# -- authentication: only the run's processes publish ------------------------------------


def forged_summary() -> dict:
    row = {"network": 0, "best_acc": 100.0, "final_acc": 100.0, "invalid_01": 0, "invalid_001": 0}
    return make_event("summary", 0, 0, networks=[row], ensemble_acc=100.0, run_dir="r")


def test_only_the_runs_own_publishers_get_through() -> None:
    keys = new_keys()
    strangers = {
        "no keys": None,
        "a client key of its own": ClientKeys(keys.server_public, *zmq.curve_keypair()),
        "a wrong server key": ClientKeys(
            zmq.curve_keypair()[0], keys.client_public, keys.client_secret
        ),
    }
    got: list[dict] = []
    with Collector(publish=None, keys=keys, on_event=got.append) as c:
        for name, client in strangers.items():
            refused = c.stats()["refused"]
            sink = ZmqSink(c.address, keys=client, linger_ms=0)
            try:
                sink.emit(forged_summary())
                assert wait_until(lambda r=refused: c.stats()["refused"] > r), name
            finally:
                sink.close()
        assert c.stats()["received"] == 0  # refused in the handshake: nothing reached decoding
        own = ZmqSink(c.address, keys=keys.client())
        try:
            events = sample_events()
            for ev in events:
                own.emit(ev)
            assert wait_until(lambda: len(got) == len(events))
        finally:
            own.close()
        stats = c.stats()
    assert got == events and stats["received"] == stats["accepted"] == len(events)
    assert stats["refused"] >= len(strangers)
    assert f"{stats['refused']} connections refused" in (c.stats_line() or "")


def test_the_key_file_is_private_and_reads_back(tmp_path: Path) -> None:
    keys = new_keys()
    old_umask = os.umask(0)  # the most permissive umask must not widen the mode
    try:
        path = write_keys(tmp_path / "run", keys)
    finally:
        os.umask(old_umask)
    assert path == tmp_path / "run" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keys(tmp_path / "run") == keys
    assert keys.client() == ClientKeys(keys.server_public, keys.client_public, keys.client_secret)
    assert len({keys.server_public, keys.client_public}) == 2
    assert new_keys() != keys  # fresh per run
    path.write_text('{"server_public": "short"}')
    with pytest.raises(ValueError, match="not a distgraft key file"):
        read_keys(tmp_path / "run")


# -- bad telemetry addresses stop a run before it starts -----------------------------------


def _wait_until_free(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


def test_preflight_names_the_option_and_the_problem(tmp_path: Path, monkeypatch) -> None:
    from distgraft.config import ConfigError, TelemetryConfig
    from distgraft.telemetry.preflight import check_telemetry

    taken = zmq.Context.instance().socket(zmq.PUB)
    taken.setsockopt(zmq.LINGER, 0)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        cases = {
            ("address", "tcp://203.0.113.7:0"): "it is not an address of this machine",
            ("address", "tcp://no-such-host.invalid:0"): "it names no interface",
            ("address", f"tcp://127.0.0.1:{port}"): "the port is in use",
            ("address", f"ipc://{tmp_path}/missing/collector"): "its folder does not exist",
            ("publish", "tcp://203.0.113.7:5558"): "it is not an address of this machine",
        }
        for (key, value), why in cases.items():
            with pytest.raises(ConfigError) as info:
                check_telemetry(TelemetryConfig(**{key: value}))
            assert f"telemetry.{key} = {value!r} cannot be bound: {why}" in str(info.value)
        # a taken publish port is no error: the collector moves to the next free one
        check_telemetry(TelemetryConfig(publish=f"tcp://127.0.0.1:{port}"))
        check_telemetry(TelemetryConfig(address="tcp://203.0.113.7:0", zmq=False))
        check_telemetry(TelemetryConfig(address=f"ipc://{tmp_path}/collector", publish=""))
    finally:
        taken.close()
    _wait_until_free(port)  # libzmq closes in its I/O thread: the port comes back a bit later
    c = Collector(f"tcp://127.0.0.1:{port}", publish=None).start()  # the checks let go
    c.stop()
    monkeypatch.setattr(zmq, "has", lambda feature: feature != "curve")  # a libzmq without it
    with pytest.raises(ConfigError, match="telemetry.auth = 'curve' needs a libzmq with CURVE"):
        check_telemetry(TelemetryConfig())
    check_telemetry(TelemetryConfig(auth="none"))


@pytest.mark.parametrize(
    "override",
    [
        "--telemetry.address=tcp://127.0.0.1:99999",  # syntax: config validation
        "--telemetry.address=tcp://203.0.113.7:0",  # another host's: the bind on rank 0
        "--telemetry.publish=tcp://203.0.113.7:5558",
    ],
)
def test_bad_telemetry_settings_stop_train_with_exit_2(tmp_path: Path, override: str) -> None:
    from cli_helpers import common, run

    key = override[2:].split("=")[0]
    cmd = [sys.executable, "-m", "distgraft", "train", *common(tmp_path, "bad", 1), override]
    proc = run(cmd, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distgraft train: error: {key} = "), lines
    assert not (tmp_path / "bad").exists()  # nothing started, nothing written
