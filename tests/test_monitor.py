"""``distgraft monitor`` against real sockets: live, started early, run-folder replay."""

from __future__ import annotations

import argparse
import io
import os
import re
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
    new_keys,
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


# -- untrusted input: forged events, undeclared networks, terminal control characters ------

EVIL = "evil\x1b]0;pwned\x07\x1b[2J\x9b31m\rfake row\nnet 0 | forged line\u202e"


def start_event(networks: int = 2, run_dir: str = "r") -> dict:
    return make_event("start", 0, 0, world_size=networks, networks=networks, replicas=1,
                      run_dir=run_dir, config=CONFIG)  # fmt: skip


def forged_summary() -> dict:
    row = {"network": 0, "best_acc": 100.0, "final_acc": 100.0, "invalid_01": 0, "invalid_001": 0}
    return make_event("summary", 0, 4, networks=[row], ensemble_acc=100.0, run_dir="r")


def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_a_monitor_started_after_a_refusal_still_shows_the_count() -> None:
    """The counts go out when they change; a monitor that subscribes later gets them too."""
    keys = new_keys()
    with Collector(publish="tcp://127.0.0.1:0", keys=keys) as collector:
        run_sink = ZmqSink(collector.address, keys=keys.client())
        stranger = ZmqSink(collector.address, linger_ms=0)
        try:
            stranger.emit(forged_summary())
            assert wait_for(lambda: collector.stats()["refused"] >= 1)
            time.sleep(1.5)  # the counts were published, to nobody
            mon = InProcessMonitor(collector.publish_address, timeout=20.0)
            mon.until("collector refused ", ping(run_sink), timeout=30.0)
        finally:
            run_sink.close()
            stranger.close()
    assert mon.thread.is_alive() or mon.result


@pytest.mark.timeout(180)  # its waits add up on a loaded machine
def test_a_forged_summary_cannot_end_the_monitor() -> None:
    keys = new_keys()
    with Collector(publish="tcp://127.0.0.1:0", keys=keys) as collector:
        run_sink = ZmqSink(collector.address, keys=keys.client())
        stranger = ZmqSink(collector.address, linger_ms=0)  # any process on the host
        mon = InProcessMonitor(collector.publish_address, timeout=20.0)
        try:
            mon.until("WARNING: ping", ping(run_sink))
            feed_run(run_sink)
            stranger.emit(forged_summary())
            stranger.emit(epoch_event(99, 0))
            assert wait_for(lambda: collector.stats()["refused"] >= 1)
            # the collector publishes its counts; the monitor's footer shows them
            mon.until("collector refused ", ping(run_sink, "still running"), timeout=60.0)
            assert mon.thread.is_alive() and "final summary" not in mon.output
            run_sink.emit(summary_event())
            assert mon.wait() == 0, mon.output
            assert collector.stats()["received"] == collector.stats()["accepted"]
        finally:
            run_sink.close()
            stranger.close()
    out = mon.output
    assert "ensemble acc: 93.25%" in out and "100.00%" not in out
    assert not [line for line in out.splitlines() if line.startswith("  99")]


def test_monitor_rows_only_for_declared_networks_and_no_control_characters(
    tmp_path: Path,
) -> None:
    """A replayed metrics.jsonl: network 99 gets no row, ESC/BEL/CR never reach the output."""
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.emit(start_event(run_dir=f"runs/{EVIL}"))
    for net in (0, 1, 99):
        sink.emit(epoch_event(net, 0))
    graft = graft_event(0, 0)
    sink.emit({**graft, "layers": [EVIL, "conv2.weight"], "warnings": [EVIL]})
    sink.emit(make_event("warning", 1, 0, message=EVIL))
    sink.emit(make_event("error", 99, 0, message="from nowhere"))
    summary = summary_event()
    rows = [*summary["networks"], {**summary["networks"][0], "network": 99}]
    sink.emit({**summary, "networks": rows, "run_dir": EVIL})
    sink.close()
    buffer = io.StringIO()
    assert monitor_run(_args(str(tmp_path), timeout=1.0), buffer) == 0
    out = buffer.getvalue()
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", out), repr(out)
    table_rows = [line.split()[0] for line in out.splitlines() if re.match(r" +\d+  \d", line)]
    assert set(table_rows) == {"0", "1"}  # no row for network 99, in the table or summary
    assert "from nowhere" not in out and "ignored 2 (undeclared networks)" in out
    summary_rows = [line for line in out.splitlines() if re.match(r" +99 +\d", line)]
    assert not summary_rows


def test_only_the_monitors_own_escape_codes_reach_a_terminal() -> None:
    board, out = Board(), io.StringIO()
    screen = Screen(out, plain=False)
    board.update(start_event())
    for line in board.update(make_event("warning", 0, 0, message=EVIL)):
        screen.log(line)
    board.update(epoch_event(0, 0))
    screen.draw([*board.table(), board.footer(f"tcp://x{EVIL}", None)], board.changes)
    screen.log("two\nlines")  # the monitor's own line breaks stay
    text = out.getvalue()
    own = re.compile(r"\x1b\[(2K|\d+F\x1b\[J)")
    assert "\x1b" not in own.sub("", text), repr(text)
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", own.sub("", text))
    assert "net 0 | WARNING: evil]0;pwned[2J31m fake row net 0 | forged line\n" in text
    assert text.endswith("\x1b[Jtwo\nlines\n")


def test_a_monitor_attached_mid_run_learns_the_runs_networks() -> None:
    """The collector sends the start event again to every new subscriber."""
    keys = new_keys()
    with Collector(publish="tcp://127.0.0.1:0", keys=keys) as collector:
        sink = ZmqSink(collector.address, keys=keys.client())
        try:
            sink.emit(start_event())
            assert wait_for(lambda: collector.stats()["accepted"] == 1)
            mon = InProcessMonitor(collector.publish_address)  # after the start was sent
            mon.until("WARNING: ping", ping(sink))
            sink.emit(epoch_event(1, 2))
            sink.emit(epoch_event(99, 2))  # even an authenticated sender gets no extra row
            sink.emit(graft_event(1, 2) | {"warnings": [EVIL]})
            sink.emit(summary_event())
            assert mon.wait() == 0, mon.output
        finally:
            sink.close()
    assert "   1  3/5" in mon.output  # total epochs from the start event sent again
    assert "net 1 | warning: evil]0;pwned[2J31m fake row net 0 | forged line\n" in mon.output
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", mon.output)
    assert not [line for line in mon.output.splitlines() if line.startswith("  99")]
