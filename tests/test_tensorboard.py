"""TensorBoard files read back with TensorBoard's own reader and compared with metrics.jsonl."""

from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import ROOT, common, env, events, run, torchrun_cmd, worker_with_rank
from dist_helpers import free_port

from distgraft.config import ConfigError, load_config
from distgraft.telemetry import make_event
from distgraft.telemetry.tensorboard import TensorBoardSink, tensorboard_wanted

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402

EVERYTHING = {ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0}

# What a user finds in TensorBoard for each event of metrics.jsonl (step = epoch + 1).
EPOCH_TAGS = {
    "train/loss": "train_loss",
    "train/acc": "train_acc",
    "test/loss": "test_loss",
    "test/acc": "test_acc",
    "val/loss": "val_loss",
    "val/acc": "val_acc",
    "lr": "lr",
    "images_per_s": "images_per_s",
}


def expected_scalars(evs: list[dict], network: int) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as metrics.jsonl says, for one network."""
    out: dict[str, dict[int, float]] = defaultdict(dict)

    def put(tag: str, step: int, value: float | None) -> None:
        if value is not None:
            assert step not in out[tag], f"metrics.jsonl has {tag} at step {step} twice"
            out[tag][step] = value

    for ev in evs:
        if ev["network"] != network:
            continue
        step = ev["epoch"] + 1
        if ev["event"] == "epoch":
            for tag, key in EPOCH_TAGS.items():
                put(tag, step, ev.get(key))
        elif ev["event"] == "graft":
            put("graft/alpha_mean", step, sum(ev["alpha"]) / len(ev["alpha"]))
            put("graft/exchange_ms", step, ev["exchange_s"] * 1000)
            put("graft/invalid_01", step, ev["invalid_01"])
            put("graft/invalid_001", step, ev["invalid_001"])
        elif ev["event"] == "prune":
            put("prune/round", step, ev["round"])
            put("prune/compression", step, ev["compression"])
            put("prune/kept_weights", step, sum(ev["kept"]))
    return dict(out)


def read_back(log_dir: Path) -> tuple[dict[str, dict[int, float]], ea.EventAccumulator]:
    """Every scalar TensorBoard shows for ``log_dir``, with no step twice."""
    acc = ea.EventAccumulator(str(log_dir), size_guidance=EVERYTHING)
    acc.Reload()
    out = {}
    for tag in acc.Tags()[ea.SCALARS]:
        steps = [p.step for p in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: steps {steps} appear twice"
        out[tag] = {p.step: p.value for p in acc.Scalars(tag)}
    return out, acc


def assert_tensorboard_equals_metrics(run_dir: Path, networks: int) -> None:
    evs = events(run_dir)
    for net in range(networks):
        tb, acc = read_back(run_dir / "tb" / f"net{net}")
        want = expected_scalars(evs, net)
        assert tb.keys() == want.keys(), net
        for tag, points in want.items():
            assert tb[tag].keys() == points.keys(), (net, tag)
            for step, value in points.items():  # stored as float32, like every TB scalar
                assert tb[tag][step] == float(np.float32(value)), (net, tag, step)
        grafts = {ev["epoch"] + 1: ev["alpha"] for ev in evs
                  if ev["event"] == "graft" and ev["network"] == net}  # fmt: skip
        hist = {h.step: h.histogram_value for h in acc.Histograms("graft/alpha")}
        assert hist.keys() == grafts.keys()
        for step, alpha in grafts.items():
            assert hist[step].num == len(alpha)
            assert (hist[step].min, hist[step].max) == (min(alpha), max(alpha))
            assert math.isclose(hist[step].sum, sum(alpha), rel_tol=1e-12)
        config = acc.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert "[graft]" in config and "name = " in config


def epoch_event(epoch: int, loss: float, net: int = 0) -> dict:
    return make_event("epoch", net, epoch, train_loss=loss, train_acc=50.0 + epoch,
                      test_loss=None, test_acc=40.0 + epoch, lr=0.1, epoch_s=1.0,
                      images_per_s=100.0, val_loss=0.5, val_acc=None)  # fmt: skip


# -- the sink on its own ------------------------------------------------------------------


def test_a_resume_replaces_the_points_of_the_epochs_it_trains_again(tmp_path: Path) -> None:
    first = TensorBoardSink(tmp_path, config="[run]\nepochs = 4\n")
    for epoch in range(4):
        first.emit(epoch_event(epoch, loss=1.0 + epoch))
    first.emit(make_event("warning", 0, 3, message="not a scalar"))
    # no close(): a killed process never closes; every point was flushed when written
    second = TensorBoardSink(tmp_path, config="[run]\nepochs = 4\n")
    second.forget_epochs(2)  # the resume starts at epoch 2 (0-based): steps 3 and 4 again
    for epoch in (2, 3):
        second.emit(epoch_event(epoch, loss=10.0 + epoch))
    second.close()
    first.close()
    tb, acc = read_back(tmp_path)
    assert tb["train/loss"] == {1: 1.0, 2: 2.0, 3: 12.0, 4: 13.0}
    assert tb["test/acc"] == {1: 40.0, 2: 41.0, 3: 42.0, 4: 43.0}
    assert "val/acc" not in tb and tb["val/loss"] == dict.fromkeys((1, 2, 3, 4), 0.5)
    assert [t.step for t in acc.Tensors("config/text_summary")] == [1, 3]


def test_trim_and_prune_rounds_are_scalars(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "net0")
    sink.emit(make_event("prune", 0, 0, round=1, rounds=2, layers=["fc1"], kept=[30, 10],
                         total=[100, 100], compression=5.0, dropout=[]))  # fmt: skip
    sink.close()
    trim = TensorBoardSink(tmp_path / "trim")
    for rnd in (1, 2):
        fields = {"params": 1000 - rnd, "flops": 9000 - rnd, "test_acc": 90.0 - rnd}
        trim.emit(make_event("trim", 0, rnd, round=rnd, layers=["c"], acc_drop=rnd, **fields))
    trim.close()
    prune, _ = read_back(tmp_path / "net0")
    assert prune == {"prune/round": {1: 1.0}, "prune/compression": {1: 5.0},
                     "prune/kept_weights": {1: 40.0}}  # fmt: skip
    rounds, _ = read_back(tmp_path / "trim")
    assert rounds["trim/params"] == {1: 999.0, 2: 998.0}
    assert rounds["trim/acc_drop"] == {1: 1.0, 2: 2.0}


def test_the_setting_is_auto_true_or_false(tmp_path: Path, monkeypatch) -> None:
    assert load_config(None, []).telemetry.tensorboard == "auto"
    for text, value in (("true", True), ("false", False), ("auto", "auto")):
        assert load_config(None, [f"--telemetry.tensorboard={text}"]).telemetry.tensorboard == value
    toml = tmp_path / "c.toml"
    toml.write_text("[telemetry]\ntensorboard = true\n")
    assert load_config(toml, []).telemetry.tensorboard is True
    for bad in ("maybe", "2"):
        with pytest.raises(ConfigError, match="telemetry.tensorboard.*auto, true or false"):
            load_config(None, [f"--telemetry.tensorboard={bad}"])
    toml.write_text("[telemetry]\ntensorboard = 1\n")
    with pytest.raises(ConfigError, match="telemetry.tensorboard"):
        load_config(toml, [])
    assert tensorboard_wanted("auto") == (True, None)
    assert tensorboard_wanted(False) == (False, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert tensorboard_wanted("auto") == (False, None)
    on, warning = tensorboard_wanted(True)
    assert not on and "pip install 'distgraft[tensorboard]'" in (warning or "")


# -- end to end: real torchrun on digits ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_true_without_tensorboard_warns_once_and_trains(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['tensorboard'] = None  # as if the package were not installed\n"
        "from distgraft.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [*common(tmp_path, "no_tb", 1), "--telemetry.tensorboard=true"]
    proc = run([sys.executable, "-c", code, "train", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "tensorboard" in line]
    assert len(warnings) == 1 and "pip install 'distgraft[tensorboard]'" in warnings[0]
    assert [e["event"] for e in events(tmp_path / "no_tb")][-1] == "summary"
    assert not (tmp_path / "no_tb" / "tb").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_run_writes_tensorboard_equal_to_metrics_and_is_watched(tmp_path: Path) -> None:
    """Two networks, 3 epochs; a monitor attached by address sees the run through its keys."""
    publish = f"tcp://127.0.0.1:{free_port()}"
    monitor = subprocess.Popen(
        [sys.executable, "-m", "distgraft", "monitor", publish, "--plain", "--timeout", "200"],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        proc = run(torchrun_cmd(2, *common(tmp_path, "tb", 3), f"--telemetry.publish={publish}"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out, _ = monitor.communicate(timeout=60)
    finally:
        monitor.kill()
    assert monitor.returncode == 0, out
    assert "   0  3/3" in out and "   1  3/3" in out and "final summary" in out
    assert "collector refused" not in out and "connections refused" not in proc.stderr
    run_dir = tmp_path / "tb"
    assert stat.S_IMODE((run_dir / "telemetry.key").stat().st_mode) == 0o600
    assert_tensorboard_equals_metrics(run_dir, 2)
    tb, _ = read_back(run_dir / "tb" / "net1")
    assert tb["train/loss"].keys() == {1, 2, 3} and tb["val/acc"].keys() == {1, 2, 3}


def _has_event(path: Path, kind: str, network: int, epoch: int) -> bool:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    needle = (f'"event":"{kind}"', f'"network":{network},', f'"epoch":{epoch},')
    return any(all(n in line for n in needle) for line in lines)


def _wait(pred, agent: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline or agent.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def _saved_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tensorboard_after_kill_9_and_resume_equals_metrics(tmp_path: Path) -> None:
    """Network 1 dies after network 0 wrote an epoch that network 1 never saved.

    Network 1 is frozen (SIGSTOP) right after its graft of epoch E, before it saves E; network
    0 goes on to write epoch E's points and waits at the barrier; then network 1 is killed.
    The restart resumes at E, so network 0 trains E again: its TensorBoard points of E must
    be replaced, as metrics.jsonl's lines are.
    """
    epochs = 5  # three chances (epochs 1 to 3) to freeze network 1 before it saves
    cmd = torchrun_cmd(2, *common(tmp_path, "killed", epochs), restarts=1)
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    run_dir = tmp_path / "killed"
    metrics, last = run_dir / "metrics.jsonl", run_dir / "net1" / "last.pt"
    try:
        victim, frozen_at = None, None
        for epoch in range(1, epochs - 1):
            assert _wait(lambda e=epoch: _has_event(metrics, "graft", 1, e), agent)
            victim = victim or worker_with_rank(agent.pid, 1)
            assert victim is not None, "worker of rank 1 not found"
            os.kill(victim, signal.SIGSTOP)
            if _saved_epoch(last) < epoch:  # frozen before it saved this epoch
                frozen_at = epoch
                break
            os.kill(victim, signal.SIGCONT)  # too late this time: try the next epoch
        assert frozen_at is not None, "network 1 always saved before it could be frozen"
        assert _wait(lambda: _has_event(metrics, "epoch", 0, frozen_at), agent)
        os.kill(victim, signal.SIGKILL)
        out, _ = agent.communicate(timeout=300)
    finally:
        agent.kill()
    assert agent.returncode == 0, out[-4000:]
    assert f"resuming after epoch {frozen_at}: dropped" in out  # network 0's lines of that epoch
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert [s["epoch"] for s in starts] == [0, frozen_at]
    assert len(list((run_dir / "tb" / "net0").glob("events.out.tfevents.*"))) == 2
    assert_tensorboard_equals_metrics(run_dir, 2)
    for net in (0, 1):
        tb, _ = read_back(run_dir / "tb" / f"net{net}")
        assert tb["train/loss"].keys() == set(range(1, epochs + 1))
