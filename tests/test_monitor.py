"""``distgraft monitor`` against real sockets: live, started early, run-folder replay."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq
from dist_helpers import free_port

from distgraft.telemetry import (
    Collector,
    JsonlSink,
    ZmqSink,
    make_event,
    pack_event,
    write_endpoints,
)
from distgraft.telemetry.monitor import Board, Screen, resolve_target
from distgraft.telemetry.monitor import run as monitor_run

pytestmark = pytest.mark.timeout(40)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "[run]\nepochs = 5\n[graft]\na = 0.4\n"


def epoch_event(net: int, epoch: int, test_acc: float | None = 70.0) -> dict:
    return make_event(
        "epoch",
        net,
        epoch,
        train_loss=0.5,
        train_acc=80.0 + net,
        test_loss=None if test_acc is None else 0.7,
        test_acc=test_acc,
        lr=0.1,
        epoch_s=1.5,
        images_per_s=1234.0,
    )


def graft_event(net: int, epoch: int) -> dict:
    return make_event(
        "graft",
        net,
        epoch,
        peer=(net + 1) % 2,
        source="external",
        criterion="entropy",
        level="layer",
        layers=["conv1.weight", "conv2.weight"],
        alpha=[0.25, 0.75] if net == 0 else [0.6, 0.6],
        h_self=[2.0, 2.1],
        h_peer=[2.0, 2.2],
        bytes=4096,
        exchange_s=0.01,
        graft_s=0.0123,
        warnings=[],
        invalid_01=2,
        invalid_001=1,
    )


def summary_event() -> dict:
    rows = [
        {
            "network": n,
            "best_acc": 71.5 + n,
            "final_acc": 70.0 + n,
            "invalid_01": 2,
            "invalid_001": 1,
        }
        for n in range(2)
    ]
    return make_event("summary", 0, 4, networks=rows, ensemble_acc=93.25, run_dir="r")


class MonitorProcess:
    """``python -m distgraft monitor ...`` with its output collected by a reader thread."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distgraft", "monitor", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._chunks.append(line)

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    def until(self, text: str, poke: Callable[[], None], timeout: float = 20.0) -> None:
        """Call ``poke`` every 100 ms until ``text`` shows up (covers ZeroMQ's slow joiner)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise AssertionError(f"monitor never printed {text!r}:\n{self.output}")
            poke()
            time.sleep(0.1)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(2)
        return rc


class InProcessMonitor(MonitorProcess):
    """``monitor.run`` in a thread of this process (no interpreter start-up per test)."""

    def __init__(self, target: str, timeout: float = 10.0) -> None:
        self.buffer = io.StringIO()
        self.result: list[int] = []
        args = argparse.Namespace(
            target=target, plain=True, timeout=timeout, refresh=0.1, max_message_bytes=1 << 20
        )
        self.thread = threading.Thread(
            target=lambda: self.result.append(monitor_run(args, self.buffer)), daemon=True
        )
        self.thread.start()

    @property
    def output(self) -> str:
        return self.buffer.getvalue()

    def until(self, text: str, poke: Callable[[], None], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline and self.thread.is_alive(), self.output
            poke()
            time.sleep(0.1)

    def wait(self, timeout: float = 10.0) -> int:
        self.thread.join(timeout)
        assert self.result, f"monitor still running:\n{self.output}"
        return self.result[0]


def ping(sink: ZmqSink, text: str = "ping") -> Callable[[], None]:
    return lambda: sink.emit(make_event("warning", 0, 0, message=text))


def feed_run(sink: ZmqSink) -> None:
    sink.emit(
        make_event("start", 0, 0, world_size=2, networks=2, replicas=1, run_dir="r", config=CONFIG)
    )
    for epoch in range(2):
        for net in range(2):
            sink.emit(
                make_event("progress", net, epoch, step=3, steps=10, loss=1.0, images_per_s=9.0)
            )
            sink.emit(graft_event(net, epoch))
            sink.emit(epoch_event(net, epoch))


def test_monitor_live_until_summary() -> None:
    with Collector(publish="tcp://127.0.0.1:0") as collector:
        sink = ZmqSink(collector.address)
        mon = MonitorProcess(collector.publish_address, "--plain", "--timeout", "10")
        try:
            mon.until("WARNING: ping", ping(sink))
            feed_run(sink)
            sink.emit(summary_event())
            assert mon.wait() == 0, mon.output
        finally:
            sink.close()
    out = mon.output
    rows = [line for line in out.splitlines() if line.startswith(("   0  2/5", "   1  2/5"))]
    assert len(rows) >= 2, out
    assert "80.0%" in out and "81.0%" in out and "70.0%" in out  # train / test accuracy
    assert "0.500" in out and "0.600" in out and "12 ms" in out  # mean alpha, graft ms
    assert "final summary" in out
    assert "71.50%" in out and "72.50%" in out and "ensemble acc: 93.25%" in out


def test_monitor_started_before_collector_and_across_rebind() -> None:
    port = free_port()
    publish = f"tcp://127.0.0.1:{port}"
    mon = InProcessMonitor(publish)
    time.sleep(0.3)  # the monitor is up (and retrying) before any collector exists
    for round_ in ("one", "two"):  # the second collector rebinds the same port
        with Collector(publish=publish, port_tries=0) as collector:
            assert collector.publish_address == publish
            sink = ZmqSink(collector.address)
            try:
                mon.until(f"WARNING: {round_}", ping(sink, round_))
                if round_ == "two":
                    sink.emit(epoch_event(1, 3))
                    sink.emit(summary_event())
                    assert mon.wait() == 0, mon.output
            finally:
                sink.close()
    assert "   1  4" in mon.output and "final summary" in mon.output


def test_monitor_run_folder_replays_then_goes_live(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = JsonlSink(run_dir / "metrics.jsonl")
    metrics.emit(
        make_event("start", 0, 0, world_size=2, networks=2, replicas=1, run_dir="r", config=CONFIG)
    )
    metrics.emit(epoch_event(0, 0, test_acc=77.7))
    metrics.emit(epoch_event(1, 0, test_acc=66.6))
    metrics.close()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("{torn line\n")
    with Collector(publish="tcp://127.0.0.1:0") as collector:
        write_endpoints(run_dir, collector.address, collector.publish_address)
        sink = ZmqSink(collector.address)
        mon = InProcessMonitor(str(run_dir))
        try:
            mon.until("WARNING: ping", ping(sink))
            sink.emit(summary_event())
            assert mon.wait() == 0, mon.output
        finally:
            sink.close()
    out = mon.output
    assert "77.7%" in out and "66.6%" in out  # from the replay, never sent live
    assert "1/5" in out  # total epochs from the replayed start event's config
    assert "skipped lines 1" in out
    assert "ensemble acc: 93.25%" in out


def _args(target: str, timeout: float | None = 5.0) -> argparse.Namespace:
    return argparse.Namespace(
        target=target, plain=True, timeout=timeout, refresh=0.1, max_message_bytes=1 << 20
    )


def test_monitor_finished_run_folder_needs_no_collector(tmp_path: Path) -> None:
    metrics = JsonlSink(tmp_path / "metrics.jsonl")
    for ev in (epoch_event(0, 0), epoch_event(1, 0), summary_event()):
        metrics.emit(ev)
    metrics.close()
    buffer = io.StringIO()
    assert monitor_run(_args(str(tmp_path), timeout=1.0), buffer) == 0
    assert "final summary" in buffer.getvalue() and "   1  1" in buffer.getvalue()


def test_monitor_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert monitor_run(_args(str(tmp_path / "no such folder"))) == 2
    assert "neither a run folder nor an address" in capsys.readouterr().err
    assert monitor_run(_args(str(tmp_path))) == 2  # a folder without telemetry.json
    assert "telemetry.json" in capsys.readouterr().err
    assert resolve_target("5559").publish == "tcp://127.0.0.1:5559"


def test_monitor_times_out_with_exit_1(capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    assert monitor_run(_args(f"tcp://127.0.0.1:{free_port()}", timeout=0.5)) == 1
    assert time.monotonic() - t0 < 5
    assert "no event for 0.5 s" in capsys.readouterr().err


def test_monitor_validates_what_it_receives() -> None:
    """A raw PUB (not a collector) sends garbage: the monitor counts it and goes on."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        mon = InProcessMonitor(f"tcp://127.0.0.1:{port}")
        hello = pack_event(make_event("warning", 0, 0, message="hello"))
        mon.until("WARNING: hello", lambda: pub.send(hello))
        for bad in (b"\xc1", msgpack.packb([1]), pack_event({"event": "epoch"})):
            pub.send(bad)
        pub.send_multipart([b"a", b"b"])
        pub.send(pack_event(summary_event()))
        assert mon.wait() == 0
        assert "rejected 4" in mon.output
    finally:
        pub.close()


def test_board_progress_and_epochs() -> None:
    board = Board()
    board.update(
        make_event("start", 0, 0, world_size=1, networks=1, replicas=1, run_dir="r", config=CONFIG)
    )
    board.update(make_event("progress", 0, 2, step=5, steps=10, loss=0.9, images_per_s=50.0))
    (row,) = board.table()[1:]
    assert row.split()[:2] == ["0", "3/5"]
    assert "[##########----------]  50%" in row and "0.900" in row
    board.update(epoch_event(0, 2, test_acc=None))
    (row,) = board.table()[1:]
    assert "100%" in row and "80.0%" in row and row.split()[6] == "-"  # no test acc yet
    assert board.update(make_event("error", 0, 2, message="nan loss")) == [
        "net 0 | ERROR: nan loss"
    ]


def test_screen_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    screen = Screen(out, plain=False)
    screen.draw(["a", "b", "c"], 0)
    screen.draw(["a", "B"], 0)  # same version: redrawn anyway on a terminal
    screen.log("net 0 | WARNING: w")
    text = out.getvalue()
    assert text.startswith("\x1b[2Ka\n\x1b[2Kb\n\x1b[2Kc\n")
    assert "\x1b[3F\x1b[J\x1b[2Ka\n\x1b[2KB\n" in text  # up 3 lines, clear, redraw
    assert text.endswith("\x1b[2F\x1b[Jnet 0 | WARNING: w\n")  # logs go above the table
    plain = io.StringIO()
    screen = Screen(plain, plain=True)
    screen.draw(["x"], 1)
    screen.draw(["y"], 1)  # plain: only a new version prints a new block
    screen.draw(["z"], 2)
    assert plain.getvalue() == "x\n\nz\n\n"
