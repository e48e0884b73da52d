"""``distgraft report``: a PNG from a synthetic metrics.jsonl, grafted and baseline."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from distgraft.telemetry import JsonlSink, make_event
from distgraft.tools.report import ReportError, load_run, report

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [f"layer{i}.conv.weight" for i in range(12)]
CONFIG = "[run]\nepochs = 5\n[graft]\na = 0.4\nc = 500.0\n"


def write_metrics(run_dir: Path, networks: int = 2, epochs: int = 5, graft: bool = True) -> Path:
    """A plausible run: accuracies rising, alpha varying per layer, invalid filters falling."""
    sink = JsonlSink(run_dir / "metrics.jsonl")
    sink.emit(
        make_event(
            "start",
            0,
            0,
            world_size=networks,
            networks=networks,
            replicas=1,
            run_dir=str(run_dir),
            config=CONFIG,
        )
    )
    for epoch in range(epochs):
        for net in range(networks):
            sink.emit(
                make_event("progress", net, epoch, step=5, steps=10, loss=1.0, images_per_s=1e3)
            )
            if graft:
                alpha = [0.5 + 0.2 * math.sin(i + epoch + 3 * net) for i in range(len(LAYERS))]
                sink.emit(
                    make_event(
                        "graft",
                        net,
                        epoch,
                        peer=(net - 1) % networks,
                        source="external",
                        criterion="entropy",
                        level="layer",
                        layers=LAYERS,
                        alpha=alpha,
                        h_self=[1.5 + 0.1 * epoch + 0.02 * i + 0.05 * net for i in range(12)],
                        h_peer=[1.5] * len(LAYERS),
                        bytes=123456,
                        exchange_s=0.02,
                        graft_s=0.004,
                        warnings=[],
                        invalid_01=20 - 3 * epoch - net,
                        invalid_001=None if epoch == 2 else 8 - epoch,
                    )
                )
            sink.emit(
                make_event(
                    "epoch",
                    net,
                    epoch,
                    train_loss=2.0 / (epoch + 1),
                    train_acc=50 + 8 * epoch + net,
                    test_loss=None if epoch == 1 else 1.0,
                    test_acc=None if epoch == 1 else 45 + 7 * epoch + 2 * net,
                    lr=0.1,
                    epoch_s=3.0,
                    images_per_s=2500.0,
                )
            )
    rows = [
        {"network": n, "best_acc": 73.0, "final_acc": 73.0, "invalid_01": 5, "invalid_001": 2}
        for n in range(networks)
    ]
    sink.emit(
        make_event("summary", 0, epochs - 1, networks=rows, ensemble_acc=76.5, run_dir=str(run_dir))
    )
    sink.close()
    return run_dir / "metrics.jsonl"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header, checking the signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_report_with_grafts(tmp_path: Path) -> None:
    metrics = write_metrics(tmp_path)
    with open(metrics, "a") as f:
        f.write("garbage\n")
    data = load_run(tmp_path)
    assert data.skipped == 1 and data.networks == [0, 1]
    assert len(data.grafts[1]) == 5 and len(data.epochs[0]) == 5
    out = report(tmp_path)
    assert out == tmp_path / "report.png"
    width, height = png_size(out)
    assert width >= 800 and height >= 600
    assert out.stat().st_size > 20_000


def test_report_baseline_and_cli(tmp_path: Path) -> None:
    write_metrics(tmp_path, networks=3, epochs=4, graft=False)
    target = tmp_path / "plots" / "base.png"
    proc = subprocess.run(
        [sys.executable, "-m", "distgraft", "report", str(tmp_path), "--out", str(target)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=40,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(target)
    width, height = png_size(target)
    assert width >= 800 and height >= 300


def test_report_one_network_per_layer_entropy(tmp_path: Path) -> None:
    write_metrics(tmp_path, networks=1, epochs=3)
    width, _ = png_size(report(tmp_path, tmp_path / "one.png"))
    assert width >= 800


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not found"):
        report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(ReportError, match="no epoch events"):
        report(tmp_path)


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: a chmod for users, a read-only mount for root."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/proc/sys"), Path("/sys/fs")):  # read-only in most containers
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    pytest.skip("running as root without a read-only folder to try")


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distgraft", "report", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip


@pytest.mark.parametrize("where", ["under a file", "a folder", "read-only"])
def test_a_bad_out_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, where: str) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, networks=1, epochs=2)
    good = report(run_dir)  # a report made earlier must survive
    before = good.read_bytes()
    if where == "under a file":
        (tmp_path / "notes.txt").write_text("keep me\n")  # its bytes are in the listing
        out, expect = tmp_path / "notes.txt" / "plots" / "r.png", "is a file, not a folder"
    elif where == "a folder":
        out, expect = run_dir, "is a folder: give a file name"
    else:
        out, expect = read_only_folder(tmp_path) / "r.png", "cannot write in"
    listing = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    proc = report_cli(str(run_dir), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgraft report: --out "), proc.stderr
    assert expect in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    after = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    assert after == listing  # nothing made, nothing changed
    assert good.read_bytes() == before
    assert out.is_dir() if where == "a folder" else not out.exists()


def test_a_new_report_replaces_the_old_one_whole(tmp_path: Path) -> None:
    write_metrics(tmp_path, networks=1, epochs=2)
    target = tmp_path / "new" / "folders" / "r.png"
    assert report(tmp_path, target) == target  # missing folders are made
    target.write_bytes(b"old")
    report(tmp_path, target)
    assert png_size(target)[0] >= 800
    assert [p.name for p in target.parent.iterdir()] == ["r.png"]  # no temp file left
