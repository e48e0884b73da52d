"""End-to-end tests of `distgraft train`: real torchrun, real processes, gloo on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import ROOT, common, events, run, torchrun_cmd

from distgraft.config import Config, with_overrides
from distgraft.train.trainer import lr_factor, network_lr


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# -- unit: the lr schedule ----------------------------------------------------------------


def test_difflr_matches_the_paper_for_two_networks():
    cfg = with_overrides(Config(), optim={"difflr": True, "lr": 0.1})
    assert network_lr(cfg, 0, 2) == pytest.approx(0.05)
    assert network_lr(cfg, 1, 2) == pytest.approx(0.1)
    assert network_lr(with_overrides(cfg, optim={"difflr": False}), 0, 2) == 0.1


def test_step_schedule_defaults_to_every_60_epochs_and_cosine_reaches_zero():
    cfg = with_overrides(Config(), run={"epochs": 200})
    assert cfg.milestones() == (60, 120, 180)
    assert lr_factor(cfg, 59 * 10, 10) == 1.0
    assert lr_factor(cfg, 60 * 10, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 185 * 10, 10) == pytest.approx(1e-3)
    cos = with_overrides(cfg, optim={"schedule": "cosine"})
    assert lr_factor(cos, 0, 10) == 1.0
    assert lr_factor(cos, 100 * 10, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 200 * 10, 10) == pytest.approx(0.0, abs=1e-12)


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_networks_graft_and_summarise(tmp_path):
    proc = run(torchrun_cmd(2, *common(tmp_path, "e2e", 2)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "e2e"
    evs = events(run_dir)
    for net in (0, 1):
        epochs = [e for e in evs if e["event"] == "epoch" and e["network"] == net]
        grafts = [e for e in evs if e["event"] == "graft" and e["network"] == net]
        assert [e["epoch"] for e in epochs] == [0, 1]
        assert len(grafts) == 2 and all(g["peer"] == 1 - net for g in grafts)
        for g in grafts:  # a = 0.4: alpha strictly inside (0.3, 0.7)
            assert g["alpha"] and all(0.3 < a < 0.7 for a in g["alpha"])
            assert len(g["alpha"]) == len(g["h_self"]) == len(g["h_peer"]) == len(g["layers"])
            assert g["bytes"] > 0
        assert (run_dir / f"net{net}" / "last.pt").exists()
        assert (run_dir / f"net{net}" / "best.pt").exists()
    # two networks graft symmetrically: alpha_0 + alpha_1 = 1 layer by layer
    g0 = next(e for e in evs if e["event"] == "graft" and e["network"] == 0 and e["epoch"] == 0)
    g1 = next(e for e in evs if e["event"] == "graft" and e["network"] == 1 and e["epoch"] == 0)
    assert all(abs(a + b - 1) < 1e-5 for a, b in zip(g0["alpha"], g1["alpha"], strict=True))
    summary = [e for e in evs if e["event"] == "summary"]
    assert len(summary) == 1 and len(summary[0]["networks"]) == 2
    assert summary[0]["ensemble_acc"] is not None
    assert (run_dir / "config.toml").read_text().count("[graft]") == 1
    assert "run folder:" in proc.stdout and "ensemble" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_world_size_one_without_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "distgraft", "train", *common(tmp_path, "single", 1)]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evs = events(tmp_path / "single")
    assert [e["event"] for e in evs if e["event"] in ("epoch", "summary")] == ["epoch", "summary"]
    assert not [e for e in evs if e["event"] == "graft"]  # one network: nothing to graft
    assert evs[-1]["networks"][0]["final_acc"] > 50  # digits learns within one epoch


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_source_none_trains_networks_independently(tmp_path):
    args = [*common(tmp_path, "base", 2), "--graft.source=none"]
    proc = run(torchrun_cmd(2, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    evs = events(tmp_path / "base")
    assert not [e for e in evs if e["event"] == "graft"]
    nets = tmp_path / "base"
    w0, w1 = model_state(nets / "net0" / "last.pt"), model_state(nets / "net1" / "last.pt")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # different seeds, no mixing


# -- input errors exit 2 before any process group starts ------------------------------------


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("--graft.a=0", "graft.a"),
        ("--graft.a=-1", "graft.a"),
        ("--graft.bins=1", "graft.bins"),
        ("--model.name=resnet33", "resnet33"),
        ("--data.name=mnist", "data.name"),
        ("--graft.colour=red", "graft.colour"),
        ("--run.epochs=ten", "run.epochs"),
        ("--graft.networks=3", "graft.networks"),
        ("--graft.source=files", "external"),
        ("--nosuch.key=1", "nosuch"),
    ],
)
def test_config_errors_exit_2_with_the_key_named(tmp_path, override, expect):
    cmd = [sys.executable, "-m", "distgraft", "train", *common(tmp_path, "bad", 1), override]
    proc = run(cmd, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()  # nothing started, nothing written


def test_missing_cifar_names_the_path_and_the_flag(tmp_path):
    cmd = [
        sys.executable, "-m", "distgraft", "train", "--config",
        str(ROOT / "configs" / "cifar10_resnet32.toml"), f"--data.root={tmp_path / 'nothing'}",
    ]  # fmt: skip
    proc = run(cmd, timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path / "nothing") in proc.stderr and "data.download" in proc.stderr


def test_help_lists_config_keys():
    proc = run([sys.executable, "-m", "distgraft", "train", "--help"], timeout=120)
    assert proc.returncode == 0
    for key in ("--graft.a", "--graft.wire_dtype", "--optim.difflr", "--run.resume"):
        assert key in proc.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    from distgraft.config import load_config, validate
    from distgraft.train.sparsity import check_layers

    cfg = load_config(path, [])
    validate(cfg)
    check_layers(cfg)  # layer names of compress.skip / layer_sparsity exist in the model
