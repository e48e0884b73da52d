"""``distgraft analyze``: invalid filters, entropy and L1 of checkpoints, side by side."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distgraft.graft.entropy import layer_entropies, layer_l1
from distgraft.tools.analyze import AnalyzeError, analyze, render
from distgraft.tools.analyze import run as analyze_run

pytestmark = pytest.mark.timeout(40)

ROOT = Path(__file__).resolve().parents[1]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.Conv1d(4, 6, 3),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path, nn.Module]:
    """a.pt: a trainer-style checkpoint; b.pt: a bare state_dict with dead filters."""
    net = tiny_net()
    a = tmp_path / "a.pt"
    torch.save({"model": net.state_dict(), "epoch": 3, "best_acc": 50.0}, a)
    with torch.no_grad():
        net[0].weight[:3] = 0.0  # 3 filters with L1 0: invalid at both thresholds
        net[3].weight[:5] *= 1e-3  # L1 of ~0.07 * 1e-3 * 72: below both thresholds
        net[3].weight[5] = 0.1 / net[3].weight[5].numel() * 0.5  # L1 0.05: only < 0.1
    b = tmp_path / "b.pt"
    torch.save(net.state_dict(), b)
    return a, b, net


def test_invalid_counts_entropy_and_l1(checkpoints: tuple[Path, Path, nn.Module]) -> None:
    a, b, net = checkpoints
    result = analyze([a, b], thresholds=(0.1, 0.01), bins=10)
    names = [r["name"] for r in result["layers"]]
    assert names == ["0.weight", "3.weight", "4.weight"]  # 4-D and 3-D conv weights only
    assert [r["filters"] for r in result["layers"]] == [8, 16, 6]
    assert [r["stats"][0]["invalid"] for r in result["layers"]] == [[0, 0], [0, 0], [0, 0]]
    assert [r["stats"][1]["invalid"] for r in result["layers"]] == [[3, 3], [6, 5], [0, 0]]
    assert result["totals"] == [
        {"filters": 30, "invalid": [0, 0]},
        {"filters": 30, "invalid": [9, 8]},
    ]
    weights = [net[0].weight, net[3].weight, net[4].weight]
    h = layer_entropies(weights, bins=10).tolist()
    m = layer_l1(weights).tolist()
    assert [r["stats"][1]["entropy"] for r in result["layers"]] == pytest.approx(h)
    assert [r["stats"][1]["l1"] for r in result["layers"]] == pytest.approx(m)
    text = render(result)
    assert "9/30" in text and "8/30" in text and "0/30" in text
    assert "a.pt" in text and "b.pt" in text


def test_cli_json(checkpoints: tuple[Path, Path, nn.Module]) -> None:
    a, b, _ = checkpoints
    proc = subprocess.run(
        [sys.executable, "-m", "distgraft", "analyze", str(a), str(b), "--json"]
        + ["--thresholds", "0.1", "--bins", "5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["thresholds"] == [0.1] and doc["bins"] == 5
    assert doc["totals"][1] == {"filters": 30, "invalid": [9]}
    assert doc["checkpoints"] == [str(a), str(b)]


def test_text_output(checkpoints: tuple[Path, Path, nn.Module], capsys) -> None:
    a, b, _ = checkpoints
    args = _ns([a, b])
    assert analyze_run(args) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split("|")[1].split() == ["0/30", "0/30"]
    assert total.split("|")[2].split() == ["9/30", "8/30"]


def _ns(paths: list[Path], json_: bool = False) -> argparse.Namespace:
    return argparse.Namespace(
        checkpoints=[str(p) for p in paths], json=json_, thresholds=[0.1, 0.01], bins=10
    )


def test_errors_exit_2(tmp_path: Path, checkpoints: tuple[Path, Path, nn.Module], capsys) -> None:
    a, _, net = checkpoints
    assert analyze_run(_ns([a, tmp_path / "missing.pt"])) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert analyze_run(_ns([junk])) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err

    other = tiny_net()
    other[3] = nn.Conv2d(8, 12, 3)  # a different width
    torch.save(other.state_dict(), tmp_path / "wide.pt")
    assert analyze_run(_ns([a, tmp_path / "wide.pt"])) == 2
    err = capsys.readouterr().err
    assert "'3.weight'" in err and "[12, 8, 3, 3]" in err

    renamed = {k.replace("4.", "5."): v for k, v in net.state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(AnalyzeError, match="first differing layer is '4.weight'"):
        analyze([a, tmp_path / "renamed.pt"])

    shorter = {k: v for k, v in net.state_dict().items() if not k.startswith("4.")}
    torch.save(shorter, tmp_path / "short.pt")
    with pytest.raises(AnalyzeError, match="'4.weight' exists only in"):
        analyze([a, tmp_path / "short.pt"])

    torch.save({"model": {"fc.weight": torch.ones(2, 2)}}, tmp_path / "noconv.pt")
    with pytest.raises(AnalyzeError, match="no conv layers"):
        analyze([tmp_path / "noconv.pt"])


def test_wrapper_prefixes_are_ignored(checkpoints: tuple[Path, Path, nn.Module]) -> None:
    a, b, net = checkpoints
    ddp = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": ddp}, b.with_name("ddp.pt"))
    result = analyze([b, b.with_name("ddp.pt")])
    assert result["totals"][0] == result["totals"][1]
