"""Structured pruning (Li et al. 2017) and APoZ (Hu et al. 2016): the contracts users rely on.

* Removing channels and zeroing them (filters + BatchNorm weight and bias) give the same
  outputs, on every supported model family (float64, eval mode, atol 1e-10: the two differ
  only in the order of additions).
* The presets reproduce Li et al.'s Table 1 and agree with hand-computed counts.
* APoZ equals a literal loop and is counted after the ReLU that follows BatchNorm.
* Pruned checkpoints round-trip through torch.load(weights_only=True).
* The command line: bad input exits 2 and writes nothing; distributed sensitivity equals
  the single-process result; pruned networks fine-tune and graft under torchrun.
"""

from __future__ import annotations

import copy
import csv
import json
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import ROOT, common, env, events, read_only_folder, run, torchrun_cmd
from compress_helpers import (
    CIFAR,
    DIGITS,
    compress,
    compress_here,
    plain,
    splits,
    write_checkpoint,
)
from torch import nn

from distgraft.compress.archive import base_arch, load_model
from distgraft.compress.counting import count
from distgraft.compress.criteria import apoz
from distgraft.compress.names import PRESETS
from distgraft.compress.presets import preset_ratios
from distgraft.compress.prune import (
    PruneError,
    PruneSpec,
    apply_pruning,
    layer_ratios,
    prune_edits,
    select,
)
from distgraft.compress.structure import (
    UnsupportedModel,
    by_name,
    groups_of,
    mask_,
    remove,
)
from distgraft.config import config_from_toml
from distgraft.files import load, load_error
from distgraft.models import build_model
from distgraft.tools.compress.info import printed
from distgraft.train.data import build_data
from distgraft.train.evaluate import accuracy


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_like(name: str, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """A float64 model whose BatchNorm statistics have moved off 0 / 1 (eval mode)."""
    torch.manual_seed(seed)
    model = build_model(name, 10, shape[0]).double()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape, dtype=torch.double))
        for m in model.modules():  # BN affine parameters away from 1 / 0 too
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


# -- removal equals masking --------------------------------------------------------------

FAMILIES = [
    ("resnet20", CIFAR),
    ("resnet20_leaky", CIFAR),
    ("vgg16_bn", CIFAR),
    ("vgg16_li", CIFAR),
    ("mobilenetv2", CIFAR),
    ("digits_cnn", DIGITS),
    ("torchvision:resnet18", (3, 64, 64)),
    ("torchvision:resnet50", (3, 64, 64)),
]


@pytest.mark.parametrize(("name", "shape"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_removed_channels_give_the_outputs_of_zeroed_ones(name, shape) -> None:
    """Every group (torchvision residual streams included) loses a random half."""
    model = trained_like(name, shape)
    groups = groups_of(model, shape)
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    for group in groups:
        perm = torch.randperm(group.channels, generator=g)
        k = max(1, group.channels // 2)
        mask_(masked, group, perm[k:])
        remove(removed, group, perm[:k].sort().values)
    x = torch.randn(4, *shape, dtype=torch.double, generator=g)
    with torch.no_grad():
        want, got = masked(x), removed(x)
        assert not torch.allclose(model(x), want)  # the pruning did change the function
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert count(removed, shape).params < count(model, shape).params
    for group in groups:  # physically smaller: every producer lost its channels
        module = dict(removed.named_modules())[group.name]
        assert module.weight.shape[0] == max(1, group.channels // 2)


def test_depthwise_conv_follows_its_expand_conv() -> None:
    model = trained_like("mobilenetv2", CIFAR)
    group = by_name(groups_of(model, CIFAR))["layers.3.conv1"]
    assert group.depthwise == ("layers.3.conv2",) and group.consumers == ("layers.3.conv3",)
    remove(model, group, torch.arange(10))
    block = model.layers[3]
    assert block.conv1.out_channels == block.conv2.groups == block.conv2.out_channels == 10
    assert block.bn2.num_features == 10 and block.conv3.in_channels == 10


def test_cifar_resnet_prunes_only_the_first_conv_of_each_block() -> None:
    """Option-A shortcuts fix the residual channels: conv2 outputs are never pruned."""
    groups = groups_of(build_model("resnet56", 10), CIFAR)
    assert len(groups) == 27
    assert all(g.producers == (g.name,) and g.name.endswith("conv1") for g in groups)
    assert [g.stage for g in groups] == [1] * 9 + [2] * 9 + [3] * 9


def test_torchvision_streams_follow_the_projection_shortcut() -> None:
    groups = by_name(groups_of(build_model("torchvision:resnet18", 10), (3, 64, 64)))
    stream = groups["layer2.0.downsample.0"]
    assert not stream.default  # only pruned when named
    assert stream.producers == ("layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2")
    assert stream.consumers == ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0")
    assert groups["conv1"].producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")


# -- Li's presets --------------------------------------------------------------------------

def pruned(preset: str) -> tuple[nn.Module, nn.Module]:
    model = build_model(PRESETS[preset].model, 10)
    groups = groups_of(model, CIFAR)
    small = copy.deepcopy(model)
    apply_pruning(small, groups, select([model], groups, PruneSpec(preset_ratios(preset, model,
                                                                                groups))))
    return model, small


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_reproduce_li_table_1(preset: str) -> None:
    flops0, flops1, flops_pct, params0, params1, params_pct = PRESETS[preset].table
    model, small = pruned(preset)
    before, after = count(model, CIFAR), count(small, CIFAR)
    assert printed(before.flops, flops0) == flops0 and printed(after.flops, flops1) == flops1
    assert printed(before.paper_params, params0) == params0
    assert printed(after.paper_params, params1) == params1
    cut = before.reduction(after)
    # Percentages to the table's precision (0.1 point): with Li's rules they land within 0.07.
    assert abs(cut["flops"] - flops_pct) <= 0.1, cut
    assert abs(cut["paper_params"] - params_pct) <= 0.1, cut


def cifar_resnet_counts(n: int, ratios: tuple, skip: tuple) -> tuple[int, int]:
    """Hand count (MACs, conv + linear params) of a pruned ResNet-(6n+2) for 32x32 inputs."""
    macs = params = 16 * 3 * 9 * 32 * 32 + 0
    params = 16 * 3 * 9
    width_in, k = 16, 0
    for s, (width, size) in enumerate(((16, 32), (32, 16), (64, 8))):
        for _ in range(n):
            k += 1
            ratio = ratios[min(s, len(ratios) - 1)]
            inner = width if 2 * k in skip else int(round(width * (1 - ratio), 9))
            macs += (inner * width_in + width * inner) * 9 * size * size
            params += (inner * width_in + width * inner) * 9
            width_in = width
    return macs + 64 * 10, params + 64 * 10 + 10


@pytest.mark.parametrize(
    ("preset", "n", "ratios", "skip"),
    [("resnet56-a", 9, (0.1,), (16, 20, 38, 54)),
     ("resnet56-b", 9, (0.6, 0.3, 0.1), (16, 18, 20, 34, 38, 54)),
     ("resnet110-a", 18, (0.5, 0.0, 0.0), (36,)),
     ("resnet110-b", 18, (0.5, 0.4, 0.3), (36, 38, 74))],
)  # fmt: skip
def test_preset_counts_equal_hand_computed_ones(preset, n, ratios, skip) -> None:
    _, small = pruned(preset)
    c = count(small, CIFAR)
    assert (c.flops, c.paper_params) == cifar_resnet_counts(n, ratios, skip)
    assert (c.flops, c.paper_params) != cifar_resnet_counts(n, (0.0,), ())


def test_vgg16_a_counts_equal_hand_computed_ones() -> None:
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    sizes = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    kept = [w // 2 if i + 1 in (1, 8, 9, 10, 11, 12, 13) else w for i, w in enumerate(widths)]
    ins = [3, *kept[:-1]]
    macs = sum(o * i * 9 * s * s for o, i, s in zip(kept, ins, sizes, strict=True))
    params = sum(o * i * 9 for o, i in zip(kept, ins, strict=True))
    macs += kept[-1] * 512 + 512 * 10
    params += kept[-1] * 512 + 512 + 512 * 10 + 10
    _, small = pruned("vgg16-a")
    c = count(small, CIFAR)
    assert (c.flops, c.paper_params) == (macs, params)


def test_cli_presets_table_matches_li() -> None:
    proc = compress_here("presets", "--json")
    rows = {r["preset"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 0 and set(rows) == set(PRESETS)
    for name, row in rows.items():
        assert row["flops_printed"] == PRESETS[name].table[1], row
        assert row["params_printed"] == PRESETS[name].table[4], row


def test_preset_on_the_wrong_network_is_refused() -> None:
    model = build_model("resnet20", 10)
    with pytest.raises(PruneError, match="resnet56"):
        preset_ratios("resnet56-b", model, groups_of(model, CIFAR))


# -- criteria and strategies ---------------------------------------------------------------


def literal_apoz(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """APoZ of digits_cnn's three conv layers, spelled out: conv -> BN -> ReLU, count zeros."""
    out: dict[str, torch.Tensor] = {}
    h = x
    for i in (1, 2, 3):
        conv, bn = getattr(model, f"conv{i}"), getattr(model, f"bn{i}")
        a = F.relu(bn(conv(h)))
        zeros = torch.zeros(a.shape[1], dtype=torch.float64)
        for c in range(a.shape[1]):
            for n in range(a.shape[0]):
                zeros[c] += float((a[n, c] == 0).sum())
        out[f"conv{i}"] = zeros / (a.shape[0] * a[0, 0].numel())
        h = F.max_pool2d(a, 2) if i == 2 else a
    return out


def test_apoz_equals_a_literal_loop_after_the_relu() -> None:
    model = trained_like("digits_cnn", DIGITS)
    x = torch.randn(20, *DIGITS, dtype=torch.double)
    batches = [(x[:7], None), (x[7:], None)]  # two batches: counts accumulate
    with torch.no_grad():
        got = apoz(model, groups_of(model, DIGITS), batches)
        want = literal_apoz(model, x)
        raw = (model.conv1(x) == 0).double().mean((0, 2, 3))  # zeros of the raw conv output
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12)
    assert float(got["conv1"].mean()) > 0.05 and float(raw.mean()) == 0.0


def test_apoz_ratio_prunes_the_channels_most_often_zero() -> None:
    model = trained_like("digits_cnn", DIGITS)
    groups = groups_of(model, DIGITS)
    values = apoz(model, groups, [(torch.randn(32, *DIGITS, dtype=torch.double), None)])
    keep = select([model], groups, PruneSpec({"conv2": 0.25}, "apoz"), [values])["conv2"]
    dropped = sorted(set(range(32)) - set(keep.tolist()))
    assert len(keep) == 24
    assert max(values["conv2"][keep]) <= min(values["conv2"][dropped])


def test_greedy_ignores_kernels_of_removed_input_maps() -> None:
    """conv1 loses filters 0-7; conv2's filters 0-7 draw all their weight from those maps,
    so independent scoring keeps them and greedy scoring (Li section 3.2) removes them."""
    model = build_model("digits_cnn", 10, 1)
    with torch.no_grad():
        model.conv1.weight.fill_(1.0)
        model.conv1.weight[:8] = 0.01  # the weakest half of conv1
        model.conv2.weight.fill_(0.1)
        model.conv2.weight[:8, :8] = 10.0  # strong, but only on maps conv1 loses
        model.conv2.weight[:8, 8:] = 0.0
    groups = groups_of(model, DIGITS)
    ratios = {"conv1": 0.5, "conv2": 0.25}
    independent = select([model], groups, PruneSpec(ratios, "l1", "independent"))
    greedy = select([model], groups, PruneSpec(ratios, "l1", "greedy"))
    assert independent["conv1"].tolist() == greedy["conv1"].tolist() == list(range(8, 16))
    assert set(range(8)) <= set(independent["conv2"].tolist())
    assert not set(range(8)) & set(greedy["conv2"].tolist())


def test_shared_choice_sums_the_networks_scores() -> None:
    a, b = build_model("digits_cnn", 10, 1), build_model("digits_cnn", 10, 1)
    with torch.no_grad():
        a.conv1.weight.copy_(torch.arange(16.0).view(16, 1, 1, 1).expand(16, 1, 3, 3))
        b.conv1.weight.copy_(torch.arange(16.0).flip(0).view(16, 1, 1, 1).expand(16, 1, 3, 3))
        b.conv1.weight[0] += 100  # filter 0: weak in a, strongest in b
    groups = groups_of(a, DIGITS)
    alone = select([a], groups, PruneSpec({"conv1": 0.5}))["conv1"]
    shared = select([a, b], groups, PruneSpec({"conv1": 0.5}))["conv1"]
    assert 0 not in alone.tolist() and 0 in shared.tolist()


def test_invalid_criterion_removes_filters_below_the_threshold() -> None:
    model = build_model("digits_cnn", 10, 1)
    with torch.no_grad():
        model.conv2.weight[[3, 5, 7]] = 1e-6  # L1 = 288 * 1e-6, below 0.01
    groups = groups_of(model, DIGITS)
    keep = select([model], groups, PruneSpec({"conv2": 0.0}, "invalid", threshold=0.01))
    assert sorted(set(range(32)) - set(keep["conv2"].tolist())) == [3, 5, 7]


def test_bad_ratios_and_names_are_refused() -> None:
    groups = groups_of(build_model("digits_cnn", 10, 1), DIGITS)
    with pytest.raises(PruneError, match=r"outside \[0, 1\)"):
        layer_ratios(groups, 1.0)
    with pytest.raises(PruneError, match="unknown layer 'conv9'.*conv1, conv2, conv3"):
        layer_ratios(groups, 0.5, ["conv9"])
    with pytest.raises(PruneError, match="removes every filter of conv1"):
        select([build_model("digits_cnn", 10, 1)], groups, PruneSpec({"conv1": 0.95}))
    assert layer_ratios(groups, None, (), (0.5, 0.25)) == {"conv1": 0.5, "conv2": 0.5,
                                                            "conv3": 0.25}  # fmt: skip


def test_unsupported_family_is_named() -> None:
    with pytest.raises(UnsupportedModel, match="MobileNetV2.*supported families"):
        groups_of(build_model("torchvision:mobilenet_v2", 10), (3, 32, 32))


# -- checkpoints -----------------------------------------------------------------------------


def test_pruned_checkpoint_round_trip(tmp_path: Path) -> None:
    model = trained_like("resnet20", CIFAR).float()
    groups = groups_of(model, CIFAR)
    keep = select([model], groups, PruneSpec(layer_ratios(groups, None, (), (0.6, 0.3, 0.1))))
    apply_pruning(model, groups, keep)
    from distgraft.compress.archive import save_compressed

    arch = {**base_arch("resnet20", 10, 3, CIFAR), "edits": prune_edits(keep)}
    save_compressed(tmp_path / "p.pt", model, arch, kind="pruned")
    state = torch.load(tmp_path / "p.pt", weights_only=True)
    assert plain(state) and state["kind"] == "pruned"
    back = load_model(tmp_path / "p.pt")
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=0)
    assert count(back, CIFAR) == count(model, CIFAR)


# -- the command line ------------------------------------------------------------------------


def test_cli_prune_json_and_fine_tune_shapes(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "r20.pt", "resnet20", CIFAR)
    out = tmp_path / "r20p.pt"
    proc = compress("prune", str(tmp_path / "r20.pt"), "--stage-ratios", "0.5,0.25",
                    "--out", str(out), "--json", "--latency-batch", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    for key in ("params_before", "params_after", "flops_before", "flops_after"):
        assert isinstance(row[key], int)
    assert row["flops_after"] < row["flops_before"] and row["latency_ms_after"] > 0
    model = load_model(out)
    assert count(model, CIFAR).flops == row["flops_after"]
    assert model.layer1[0].conv1.out_channels == 8 and model.layer3[0].conv1.out_channels == 64
    info = json.loads(compress_here("info", str(out), "--json").stdout)
    assert info["edits"] == {"prune": 6} and info["params"] == row["params_after"]


@pytest.mark.parametrize(
    ("args", "expect"),
    [(["--ratio", "1.2"], "outside [0, 1)"),
     (["--ratio", "0.5", "--layers", "conv7"], "unknown layer 'conv7'"),
     (["--ratio", "0.99"], "removes every filter of conv1"),
     (["--preset", "resnet56-b"], "preset resnet56-b is defined for ResNet-56"),
     ([], "nothing to prune")],
)  # fmt: skip
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path, args, expect) -> None:
    write_checkpoint(tmp_path / "d.pt", "digits_cnn", DIGITS)
    out = tmp_path / "out.pt"
    proc = compress_here("prune", str(tmp_path / "d.pt"), *args, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("distgraft compress prune: error:") and expect in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d.pt"]  # not even a temp file


def test_cli_refuses_unsupported_family_and_foreign_files(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m.pt", "torchvision:mobilenet_v2", CIFAR)
    proc = compress_here("prune", str(tmp_path / "m.pt"), "--ratio", "0.3", "--out", "x.pt")
    assert proc.returncode == 2 and "supported families" in proc.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    proc = compress_here("prune", str(tmp_path / "junk.pt"), "--ratio", "0.3", "--out", "x.pt")
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr


def with_weak_filters(seed: int = 0) -> nn.Module:
    """digits_cnn whose filters 0 and 3 of every conv have an L1 norm far below 0.01."""
    torch.manual_seed(seed)
    model = build_model("digits_cnn", 10, 1)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.conv3):
            conv.weight[[0, 3]] = 1e-7
    return model


def dropped(row: dict) -> dict[str, int]:
    return {r["layer"]: r["filters"] - r["kept"] for r in row["layers"]}


def test_threshold_rules_consider_every_prunable_layer(tmp_path: Path) -> None:
    """--criterion invalid --threshold T (as the README shows it) without --layers."""
    write_checkpoint(tmp_path / "d.pt", "digits_cnn", DIGITS, model=with_weak_filters())
    proc = compress_here("prune", str(tmp_path / "d.pt"), "--criterion", "invalid",
                         "--threshold", "0.01", "--json", "--out", str(tmp_path / "p.pt"))
    assert proc.returncode == 0, proc.stderr
    assert dropped(json.loads(proc.stdout)) == {"conv1": 2, "conv2": 2, "conv3": 2}
    proc = compress_here("prune", str(tmp_path / "d.pt"), "--criterion", "invalid",
                         "--skip", "conv2", "--json", "--out", str(tmp_path / "q.pt"))
    assert dropped(json.loads(proc.stdout)) == {"conv1": 2, "conv2": 0, "conv3": 2}
    proc = compress_here("prune", str(tmp_path / "d.pt"), "--criterion", "invalid",
                         "--ratio", "0.5", "--out", str(tmp_path / "r.pt"))
    assert proc.returncode == 2 and "--ratio" in proc.stderr and "threshold" in proc.stderr


def hu_rule(model: nn.Module, loader) -> dict[str, int]:
    """Channels above the layer's mean + 1 std of APoZ over ``loader`` (Hu et al.)."""
    values = apoz(model, groups_of(model, DIGITS), loader)
    return {k: int((v > v.mean() + v.std(unbiased=False)).sum()) for k, v in values.items()}


def test_apoz_std_rule_prunes_by_the_validation_split(tmp_path: Path) -> None:
    """`--criterion apoz --apoz-rule std`, an example of the --help, runs; it decides on the
    validation images of the checkpoint's run, not on the test split."""
    model = write_checkpoint(tmp_path / "d.pt", "digits_cnn", DIGITS, seed=3)
    val, test = splits("digits_cnn", DIGITS)
    assert hu_rule(model, val) != hu_rule(model, test)  # the test can tell the splits apart
    proc = compress_here("prune", str(tmp_path / "d.pt"), "--criterion", "apoz",
                         "--apoz-rule", "std", "--eval", "--json", "--out", str(tmp_path / "p.pt"))
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert dropped(row) == hu_rule(model, val)
    assert row["acc_split"] == "test"  # --eval reports, it decides nothing
    assert row["acc_before"] == pytest.approx(accuracy(model, test), abs=1e-9)
    text = compress_here("prune", str(tmp_path / "d.pt"), "--criterion", "apoz", "--apoz-rule",
                         "std", "--eval", "--out", str(tmp_path / "q.pt"))  # fmt: skip
    assert "acc (test)" in text.stdout and "APoZ on the validation split" in text.stderr


def test_a_run_without_validation_split_decides_on_training_images_and_says_so(
    tmp_path: Path,
) -> None:
    model = write_checkpoint(tmp_path / "d.pt", "digits_cnn", DIGITS, seed=3, val_size=0)
    default_val, _ = splits("digits_cnn", DIGITS)  # the default size, from the training images
    proc = compress_here("prune", str(tmp_path / "d.pt"), "--criterion", "apoz",
                         "--apoz-rule", "std", "--json", "--out", str(tmp_path / "p.pt"))
    assert proc.returncode == 0, proc.stderr
    assert dropped(json.loads(proc.stdout)) == hu_rule(model, default_val)
    notes = [line for line in proc.stderr.splitlines() if "trained on" in line]
    assert len(notes) == 1 and "data.val_size = 0" in notes[0], proc.stderr


BAD_OUT = {
    "folder": (lambda tmp: tmp / "folder", "is a folder"),
    "under a file": (lambda tmp: tmp / "good.pt" / "x.pt", "is a file, not a folder"),
    "read-only": (lambda tmp: read_only_folder(tmp) / "x.pt", "cannot write into"),
}
COMMANDS = {
    "prune": ["--ratio", "0.5"],
    "magnitude": ["--sparsity", "0.5"],
    "lowrank": ["--energy", "0.9"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("bad", list(BAD_OUT))
def test_a_bad_out_path_exits_2_before_any_work(tmp_path: Path, command: str, bad: str) -> None:
    write_checkpoint(tmp_path / "d.pt", "lenet5" if command != "lowrank" else "digits_cnn",
                     DIGITS)  # fmt: skip
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.pt").write_bytes(b"good")
    (tmp_path / "good.pt").write_bytes(b"good")
    where, expect = BAD_OUT[bad]
    out = where(tmp_path)
    proc = compress_here(command, str(tmp_path / "d.pt"), *COMMANDS[command], "--eval",
                         "--out", str(out))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"distgraft compress {command}: error: --out ")
    assert expect in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stdout == ""  # nothing measured, nothing written
    assert (tmp_path / "good.pt").read_bytes() == (tmp_path / "folder" / "keep.pt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["keep.pt"]


def test_an_unreadable_checkpoint_is_one_line_without_torch_advice(tmp_path: Path) -> None:
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a module, not weights
    proc = compress_here("prune", str(tmp_path / "pickled.pt"), "--ratio", "0.5",
                         "--out", str(tmp_path / "p.pt"))  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "torch.nn.modules.linear.Linear" in proc.stderr
    for advice in ("weights_only` set to `False", "Re-running", "safe_globals", "\x1b"):
        assert advice not in proc.stderr


BROKEN = {
    "empty": (lambda good: b"", "empty, cut short"),
    "cut short": (lambda good: good[: len(good) // 2], "empty, cut short"),
    "a plain pickle": (lambda good: pickle.dumps({"model": 1}), "not a file torch.save wrote"),
    "pickled numpy": (None, "numpy"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, for the plain pickle
@pytest.mark.parametrize("kind", list(BROKEN))
def test_load_error_says_what_is_wrong_in_one_line(tmp_path: Path, kind: str) -> None:
    """distgraft.files.load_error: torch's several lines and its advice to load unsafely
    become one line that says what is wrong with the file."""
    write_checkpoint(tmp_path / "good.pt", "lenet5", DIGITS)
    make, expect = BROKEN[kind]
    path = tmp_path / "bad.pt"
    if make is None:
        torch.save({"model": {}, "x": np.arange(3)}, path)
    else:
        path.write_bytes(make((tmp_path / "good.pt").read_bytes()))
    with pytest.raises(Exception) as info:
        load(path)
    message = load_error(path, info.value)
    assert message.startswith(f"cannot read {str(path)!r}: ") and expect in message
    assert "\n" not in message and "False" not in message and "trust" not in message


def sensitivity_args(tmp_path: Path, out: str) -> list[str]:
    return [str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--labels", "a", "b",
            "--ratios", "0.25,0.5,0.75", "--out", str(tmp_path / out)]  # fmt: skip


def test_sensitivity_evaluates_on_the_validation_split(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "a.pt", "digits_cnn", DIGITS, seed=1)
    val, test = splits("digits_cnn", DIGITS)
    proc = compress_here("sensitivity", str(tmp_path / "a.pt"), "--layers", "conv3",
                         "--ratios", "0.5", "--out", str(tmp_path / "s"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "s" / "sensitivity.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["split"] == "val" and float(row["baseline"]) == accuracy(model, val)
    assert accuracy(model, val) != accuracy(model, test)
    pruned = copy.deepcopy(model).eval()
    group = by_name(groups_of(pruned, DIGITS))["conv3"]
    weakest = torch.argsort(pruned.conv3.weight.detach().abs().sum((1, 2, 3)), stable=True)
    mask_(pruned, group, weakest[:16])
    assert float(row["accuracy"]) == accuracy(pruned, val)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sensitivity_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "a.pt", "digits_cnn", DIGITS, seed=1)
    write_checkpoint(tmp_path / "b.pt", "digits_cnn", DIGITS, seed=2)
    one = compress("sensitivity", *sensitivity_args(tmp_path, "one"))
    assert one.returncode == 0, one.stderr
    two = run(torchrun_cmd(2, *sensitivity_args(tmp_path, "two"),
                           command=("compress", "sensitivity")))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    csv1 = (tmp_path / "one" / "sensitivity.csv").read_text()
    assert csv1 == (tmp_path / "two" / "sensitivity.csv").read_text()
    assert "2 rank(s)" in two.stdout and "1 rank(s)" in one.stdout
    lines = csv1.splitlines()
    assert len(lines) == 1 + 2 * 3 * 3  # header + 2 checkpoints x 3 layers x 3 ratios
    assert (tmp_path / "two" / "sensitivity.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pruned_networks_fine_tune_and_graft_under_torchrun(tmp_path: Path) -> None:
    """Train 2 grafting networks, prune both with one shared choice, fine-tune them grafting."""
    first = run(torchrun_cmd(2, *common(tmp_path, "dense", 2)))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = [str(tmp_path / "dense" / f"net{k}" / "last.pt") for k in (0, 1)]
    proc = compress("prune", *ckpts, "--ratio", "0.5", "--eval", "--json",
                    "--out", str(tmp_path / "pruned{i}.pt"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["layers"] == rows[1]["layers"]
    tune = run(torchrun_cmd(2, *common(tmp_path, "tuned", 2),
                            f"--model.init={tmp_path}/pruned{{network}}.pt", "--optim.lr=0.01",
                            "--optim.schedule=constant", "--optim.difflr=false"))  # fmt: skip
    assert tune.returncode == 0, tune.stderr[-3000:]
    evs = events(tmp_path / "tuned")
    for k in (0, 1):
        grafts = [e for e in evs if e["event"] == "graft" and e["network"] == k]
        assert len(grafts) == 2 and all(0.3 < a < 0.7 for g in grafts for a in g["alpha"])
        state = torch.load(tmp_path / "tuned" / f"net{k}" / "last.pt", weights_only=True)
        assert state["model"]["conv2.weight"].shape == (16, 8, 3, 3)
        assert [e["op"] for e in state["arch"]["edits"]] == ["prune"] * 3
    assert [e for e in evs if e["event"] == "summary"][0]["networks"][0]["final_acc"] > 20


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trim_rounds_write_events_and_a_smaller_network(tmp_path: Path) -> None:
    first = run([sys.executable, "-m", "distgraft", "train", *common(tmp_path, "dense", 3)])
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "trim"
    proc = compress("trim", str(tmp_path / "dense" / "net0" / "last.pt"), "--rounds", "2",
                    "--epochs", "1", "--max-drop", "100", "--layers-per-round", "2",
                    "--quiet", "--out", str(out), timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trims = [e for e in events(out) if e["event"] == "trim"]
    assert [t["round"] for t in trims] == [1, 2]
    assert trims[0]["params"] > trims[1]["params"] and len(trims[0]["layers"]) == 2
    small = load_model(out / "trimmed.pt")
    assert count(small, DIGITS).params == trims[-1]["params"]
    # the drop is measured on the validation split; test accuracy is reported beside it
    cfg = config_from_toml(torch.load(out / "trimmed.pt", weights_only=True)["config"])
    data = build_data(cfg.data, torch.device("cpu"), seed=0, split_seed=cfg.run.seed)
    start = load_model(tmp_path / "dense" / "net0" / "last.pt")
    assert trims[-1]["val_acc"] == pytest.approx(accuracy(small, data.val), abs=1e-9)
    assert trims[-1]["test_acc"] == pytest.approx(accuracy(small, data.test), abs=1e-9)
    drop = accuracy(start, data.val) - accuracy(small, data.val)
    assert trims[-1]["acc_drop"] == pytest.approx(drop, abs=1e-9)
    assert "round" in proc.stdout and "trimmed.pt" in proc.stdout


def test_prune_help_documents_the_interface() -> None:
    proc = subprocess.run([sys.executable, "-m", "distgraft", "compress", "prune", "--help"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--preset", "--ratio", "--layers", "--criterion", "--out", "--json",
                 "resnet56-b", "vgg16-a", "greedy", "apoz"):  # fmt: skip
        assert flag in proc.stdout, flag
