"""Low-rank approximation (Wen et al. 2017): at full rank nothing changes, the error falls as
the energy rises, the decomposed checkpoint rebuilds exactly, the CLI reports what Wen et
al. report.

Full-rank equality is checked in float64 (atol 1e-10: an SVD and a re-multiplication);
the float32 models in eval mode within atol 1e-4 (measured max error about 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from compress_helpers import CIFAR, DIGITS, compress_here, plain, write_checkpoint
from torch import nn

from distgraft.compress.archive import base_arch, load_model, save_compressed
from distgraft.compress.counting import count
from distgraft.compress.lowrank import (
    LayerPlan,
    apply_lowrank,
    beneficial,
    choose_rank,
    decompose,
    plan_lowrank,
    rank_ratio,
)
from distgraft.models import build_model


def trained_like(name: str, shape, seed: int = 0) -> nn.Module:
    """A model with non-trivial BatchNorm statistics and biases (eval mode)."""
    torch.manual_seed(seed)
    model = build_model(name, 10, shape[0])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(5, 7, 3, padding=1), nn.Conv2d(4, 9, 3, stride=2, padding=1, bias=False),
     nn.Conv2d(3, 6, 3, padding=2, dilation=2, padding_mode="circular"), nn.Conv2d(8, 4, 1)],
)  # fmt: skip
def test_full_rank_gives_the_same_outputs(conv: nn.Conv2d) -> None:
    conv = conv.double()
    full = min(conv.out_channels, conv.weight[0].numel())
    x = torch.randn(2, conv.in_channels, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(decompose(conv, full)(x), conv(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("name", "shape"), [("digits_cnn", DIGITS), ("resnet20", CIFAR)])
def test_full_rank_models_equal_the_originals(name, shape) -> None:
    model = trained_like(name, shape)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x)
    # at full rank no layer gets smaller, so the plan refuses them all: force every conv
    plans = [LayerPlan(p.name, p.n, p.full_rank, p.full_rank, True)
             for p in plan_lowrank(model, energy=1.0)]  # fmt: skip
    assert all(p.rank == p.full_rank for p in plan_lowrank(model, energy=1.0))
    edits = apply_lowrank(model, plans)
    assert len(edits) == len(plans) == sum(isinstance(m, nn.Sequential) and
                                           isinstance(m[0], nn.Conv2d)
                                           for m in model.modules())  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_error_falls_as_the_energy_rises() -> None:
    torch.manual_seed(0)
    # a layer with a decaying spectrum, like a trained one
    weight = (torch.randn(32, 8) * torch.logspace(0, -2, 8)) @ torch.randn(8, 72)
    weight = weight + 0.01 * torch.randn(32, 72)
    conv = nn.Conv2d(8, 32, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(32, 8, 3, 3))
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
        errors, ranks = [], []
        for energy in (0.5, 0.7, 0.9, 0.99, 0.999, 1.0):
            k = choose_rank(conv.weight, energy=energy)
            ranks.append(k)
            errors.append(float((decompose(conv, k)(x) - ref).norm() / ref.norm()))
    assert ranks == sorted(ranks) and ranks[-1] == 32
    assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-10


def test_choose_rank_by_ratio_and_bad_values() -> None:
    w = torch.randn(16, 4, 3, 3)
    assert choose_rank(w, rank_ratio=0.5) == 8
    assert choose_rank(w, rank_ratio=0.01) == 1 and choose_rank(w, rank_ratio=1.0) == 16
    assert choose_rank(torch.randn(64, 2, 1, 1), rank_ratio=1.0) == 2  # full rank min(N, Ckk)
    with pytest.raises(ValueError, match="exactly one of energy"):
        choose_rank(w)
    with pytest.raises(ValueError, match="energy 1.5 is outside \\(0, 1\\]"):
        choose_rank(w, energy=1.5)
    with pytest.raises(ValueError, match="rank ratio 0 is outside"):
        choose_rank(w, rank_ratio=0.0)


def test_grouped_and_unprofitable_convs_are_left_alone() -> None:
    model = build_model("mobilenetv2", 10)
    plans = {p.name: p for p in plan_lowrank(model, rank_ratio=0.5)}
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(plans[n].reason == "grouped" for n in depthwise)
    one = nn.Conv2d(16, 16, 1)
    assert not beneficial(one, 8) and beneficial(one, 7)  # 8 (16 + 16) = 256 = 16 x 16
    plans = plan_lowrank(nn.Sequential(one), rank_ratio=0.5)
    assert plans == [LayerPlan("0", 16, 8, 16, False, "not smaller")]
    model = build_model("resnet20", 10)
    plans = plan_lowrank(model, rank_ratio=0.5, skip=["conv1"], layers=["conv1", "layer1.0.conv1"])
    assert [p.name for p in plans if p.decomposed] == ["layer1.0.conv1"]
    with pytest.raises(ValueError, match="'conv9' is not a conv of this model \\(convs: conv1"):
        plan_lowrank(model, energy=0.9, skip=["conv9"])


def test_rank_ratio_counts_kept_layers_at_full_width() -> None:
    plans = [LayerPlan("a", 16, 4, 16, True), LayerPlan("b", 32, 8, 32, True),
             LayerPlan("c", 16, 16, 16, False, "not smaller")]  # fmt: skip
    assert rank_ratio(plans) == pytest.approx((4 + 8 + 16) / (16 + 32 + 16))


def test_decomposed_checkpoint_round_trip(tmp_path: Path) -> None:
    model = trained_like("resnet20", CIFAR)
    before = count(model, CIFAR)
    edits = apply_lowrank(model, plan_lowrank(model, energy=0.9))
    arch = {**base_arch("resnet20", 10, 3, CIFAR), "edits": edits}
    save_compressed(tmp_path / "l.pt", model, arch, kind="lowrank")
    state = torch.load(tmp_path / "l.pt", weights_only=True)
    assert plain(state) and state["kind"] == "lowrank"
    back = load_model(tmp_path / "l.pt")
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    after = count(back, CIFAR)
    assert after.params < before.params and after.flops < before.flops


def test_cli_reports_rank_ratio_and_counts(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "d.pt", "digits_cnn", DIGITS)
    out = tmp_path / "l.pt"
    proc = compress_here("lowrank", str(tmp_path / "d.pt"), "--rank-ratio", "0.5",
                         "--out", str(out), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    for key in ("rank_ratio", "params_before", "params_after", "flops_before", "flops_after"):
        assert key in row
    assert row["params_before"] == count(model, DIGITS).params
    small = load_model(out)
    assert row["params_after"] == count(small, DIGITS).params < row["params_before"]
    decomposed = [r for r in row["layers"] if r["decomposed"]]
    assert decomposed and all(r["rank"] == -(-r["full_rank"] // 2) for r in decomposed)
    x = torch.randn(3, *DIGITS)
    with torch.no_grad():  # the decomposed model is a usable network of the same outputs
        assert F.softmax(small(x), 1).shape == (3, 10)


def test_cli_reports_the_rank_the_energy_asked_for_of_layers_it_keeps(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "d.pt", "digits_cnn", DIGITS)
    proc = compress_here("lowrank", str(tmp_path / "d.pt"), "--energy", "0.9", "--json",
                         "--out", str(tmp_path / "l.pt"))  # fmt: skip
    rows = {r["layer"]: r for r in json.loads(proc.stdout)["layers"]}
    conv1 = rows["conv1"]  # 16 filters of 1 x 3 x 3: a basis conv + 1x1 would not be smaller
    assert conv1["decomposed"] is False and conv1["reason"] == "not smaller"
    assert conv1["rank"] == choose_rank(model.conv1.weight, energy=0.9) < conv1["filters"]
    for name, r in rows.items():
        assert r["rank"] == choose_rank(model.get_submodule(name).weight, energy=0.9), name
    text = compress_here("lowrank", str(tmp_path / "d.pt"), "--energy", "0.9",
                         "--out", str(tmp_path / "l.pt")).stdout  # fmt: skip
    line = next(line for line in text.splitlines() if line.startswith("conv1 "))
    assert line.split()[1:3] == ["16", str(conv1["rank"])] and "kept" in line


@pytest.mark.parametrize(
    ("args", "expect"),
    [([], "give exactly one of --energy"), (["--energy", "0"], "energy 0 is outside (0, 1]"),
     (["--energy", "0.9", "--skip", "conv9"], "'conv9' is not a conv")],
)  # fmt: skip
def test_cli_bad_input_exits_2(tmp_path: Path, args, expect) -> None:
    write_checkpoint(tmp_path / "d.pt", "digits_cnn", DIGITS)
    proc = compress_here("lowrank", str(tmp_path / "d.pt"), *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["d.pt"]
