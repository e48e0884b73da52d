"""Magnitude pruning (Han et al. 2015): the contracts users rely on.

* Thresholds: quality x std of the layer (Han's rule) or an exact sparsity; biases and the
  first conv are left alone; later rounds only add zeros.
* Pruned weights stay exactly +0.0 through SGD with momentum, weight decay and Nesterov,
  under real DDP (2 gloo processes, identical replicas), and after a graft under torchrun
  (each network keeps its own mask).
* Dropout during retraining is D_o sqrt(C_r / C_o).
* Dead units are removed for real and the outputs do not change (eval mode, float64,
  atol 1e-12: removal only drops terms that were exactly zero, or folds a constant).
* The sparse checkpoint restores the dense weights bit for bit and is smaller on disk.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import ROOT, events, run, torchrun_cmd
from compress_helpers import DIGITS, compress_here, plain, write_checkpoint
from dist_helpers import shared_pool, values
from torch import nn

import distgraft.compress
from distgraft.compress.archive import load_model, read_checkpoint, weights_of
from distgraft.compress.magnitude import (
    Masks,
    decode_sparse,
    encode_sparse,
    masks_of_sparse,
    prunable_weights,
    prune_masks,
    remove_dead,
    rescale_dropout,
)
from distgraft.compress.structure import groups_of
from distgraft.config import CompressConfig
from distgraft.models import build_model
from distgraft.train.sparsity import round_sparsity

LENET = ROOT / "configs" / "digits_lenet300.toml"


def lenet(seed: int = 0, name: str = "lenet300_100") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, 1)


# -- thresholds ------------------------------------------------------------------------------


def test_quality_threshold_is_quality_times_the_layers_std() -> None:
    model = lenet()
    masks = prune_masks(model, ["fc2.weight"], quality=0.7)
    w = model.fc2.weight.detach()
    expected = w.abs() >= 0.7 * w.std()
    assert torch.equal(masks.masks["fc2.weight"], expected)
    # PyTorch initialises linear layers uniformly on [-b, b] (std b / sqrt 3): 0.7 / sqrt 3 go
    assert masks.counts()[0].sparsity == pytest.approx(0.7 / math.sqrt(3), abs=0.02)


def test_sparsity_removes_exactly_the_smallest_weights() -> None:
    model = lenet()
    masks = prune_masks(model, ["fc1.weight", "fc2.weight"], sparsity=0.75)
    for key in ("fc1.weight", "fc2.weight"):
        w, m = model.get_parameter(key).detach().abs(), masks.masks[key]
        assert int((~m).sum()) == round(0.75 * w.numel())
        assert w[~m].max() <= w[m].min()


def test_a_sparsity_per_layer_prunes_each_layer_to_its_own_rate() -> None:
    model = lenet()
    masks = prune_masks(model, ["fc1.weight", "fc2.weight"],
                        sparsity={"fc1.weight": 0.5, "fc2.weight": 0.9})  # fmt: skip
    assert {c.name: c.kept for c in masks.counts()} == {"fc1.weight": 9600, "fc2.weight": 3000}
    with pytest.raises(ValueError, match="sparsity per layer"):
        prune_masks(model, ["fc1.weight", "fc2.weight"], sparsity={"fc1.weight": 0.5})
    with pytest.raises(ValueError, match="one sparsity, not one per layer"):
        prune_masks(model, ["fc1.weight"], sparsity={"fc1.weight": 0.5}, scope="global")


def test_layer_sparsity_scales_every_round_of_the_schedule() -> None:
    c = CompressConfig(method="magnitude", schedule=(0.3, 0.6), layer_sparsity=("fc2=0.9",))
    keys = prunable_weights(lenet())
    assert round_sparsity(c, 0, keys) == pytest.approx(
        {"fc1.weight": 0.3, "fc2.weight": 0.45, "fc3.weight": 0.3})
    assert round_sparsity(c, 1, keys)["fc2.weight"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="fc9.*pruned layers: fc1, fc2, fc3"):
        round_sparsity(replace(c, layer_sparsity=("fc9=0.5",)), 0, keys)


@pytest.mark.parametrize(
    ("override", "expect"),
    [('--compress.layer_sparsity=["fc1:0.5"]', "'fc1:0.5' is not LAYER=SPARSITY"),
     ('--compress.layer_sparsity=["fc1=1.0"]', "sparsity in [0, 1)"),
     ('--compress.layer_sparsity=["fc9=0.5"]', "fc9"),
     ("--compress.skip=[fc7]", "unknown layer 'fc7'"),
     ('--compress.layer_sparsity=["fc1=0.5"]', "ending above 0")],
)  # fmt: skip
def test_bad_layer_names_and_rates_exit_2_before_training(tmp_path: Path, override, expect):
    extra = ["--compress.schedule=[0.5,0]"] if "ending" in expect else []
    proc = run([sys.executable, "-m", "distgraft", "train", *lenet_args(
        tmp_path, "bad", 2, "--compress.method=magnitude", "--compress.schedule=[0.5]",
        *extra, override)], timeout=120)  # fmt: skip
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_later_rounds_only_add_zeros() -> None:
    model = lenet()
    first = prune_masks(model, ["fc1.weight"], sparsity=0.5)
    first.apply_(model)
    with torch.no_grad():  # retraining moved a pruned weight's value (it would not: held at 0)
        model.fc1.weight.add_(0.01 * torch.randn_like(model.fc1.weight))
    second = prune_masks(model, ["fc1.weight"], sparsity=0.8, previous=first)
    m1, m2 = first.masks["fc1.weight"], second.masks["fc1.weight"]
    assert not (m2 & ~m1).any() and int((~m2).sum()) == round(0.8 * m2.numel())


def test_prunable_weights_skip_biases_first_conv_and_named_layers() -> None:
    assert prunable_weights(lenet(name="lenet5")) == ["conv2.weight", "fc1.weight", "fc2.weight"]
    keys = prunable_weights(lenet(name="lenet5"), "conv", skip_first=False)
    assert keys == ["conv1.weight", "conv2.weight"]
    assert prunable_weights(lenet(), skip=["fc3"]) == ["fc1.weight", "fc2.weight"]
    with pytest.raises(ValueError, match="unknown layer 'fc9'.*fc1, fc2, fc3"):
        prunable_weights(lenet(), skip=["fc9"])
    with pytest.raises(ValueError, match="allowed conv, linear, conv\\+linear"):
        prunable_weights(lenet(), "bias")


# -- masks hold through training -------------------------------------------------------------


def masked_steps(
    model: nn.Module, masks: Masks, optimizer, steps: int, seed: int, net: nn.Module | None = None
) -> None:
    """Han's retraining: backward (through ``net``, e.g. DDP), mask the gradients, step,
    mask the weights."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy((net or model)(x), y).backward()
        masks.mask_grads_(model)
        optimizer.step()
        masks.apply_(model)


def exactly_zero(model: nn.Module, masks: Masks) -> bool:
    """Every pruned weight is +0.0 (bit pattern 0: no -0.0 either)."""
    for key, mask in masks.masks.items():
        w = model.get_parameter(key).detach()
        if (w[~mask].view(torch.int32) != 0).any():
            return False
    return True


@pytest.mark.parametrize("nesterov", [False, True])
def test_pruned_weights_stay_exactly_zero_with_momentum_and_weight_decay(nesterov) -> None:
    model = lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3,
                          nesterov=nesterov)  # fmt: skip
    masked_steps(model, Masks({}), opt, 3, seed=1)  # momentum buffers full of history
    masks = prune_masks(model, prunable_weights(model), sparsity=0.8)
    masks.apply_(model)
    masks.mask_optimizer_(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masked_steps(model, masks, opt, 20, seed=2)
    assert exactly_zero(model, masks)
    kept = masks.masks["fc2.weight"]
    assert not torch.equal(model.fc2.weight.detach()[kept], before["fc2.weight"][kept])


def test_without_the_optimizer_mask_momentum_would_revive_weights() -> None:
    """The reason mask_optimizer_ exists: old momentum moves a just-pruned weight."""
    model = lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masked_steps(model, Masks({}), opt, 3, seed=1)
    masks = prune_masks(model, ["fc2.weight"], sparsity=0.8)
    masks.apply_(model)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
    masks.mask_grads_(model)
    opt.step()  # mask_optimizer_ not called, no apply_ after the step
    assert not exactly_zero(model, masks)


def ddp_task(rank: int, world: int) -> dict:
    """2 replicas of one network under DDP, each on its own batches, pruned and retrained."""
    from distgraft.comm.dist import init_distributed

    info = init_distributed(networks=1, backend="gloo", timeout_s=60)
    model = lenet(seed=rank)  # different on purpose: DDP broadcasts replica 0's weights
    ddp = nn.parallel.DistributedDataParallel(model, process_group=info.network_group)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    masks = prune_masks(model, prunable_weights(model), quality=1.0)
    masks.apply_(model)
    masks.mask_optimizer_(model, opt)
    masked_steps(model, masks, opt, 10, seed=rank, net=ddp)
    masks_ok = exactly_zero(model, masks)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "masks": masks.state_dict(), "zero": masks_ok}  # fmt: skip


@pytest.mark.timeout(120)
def test_masks_hold_and_agree_on_ddp_replicas() -> None:
    got = values(shared_pool(2).run(ddp_task, 2))
    assert got[0]["zero"] and got[1]["zero"]
    for key, mask in got[0]["masks"].items():  # identical weights give identical masks
        assert torch.equal(mask, got[1]["masks"][key])
    for key, value in got[0]["state"].items():
        assert torch.equal(value, got[1]["state"][key]), key


# -- dropout, dead units ----------------------------------------------------------------------


def test_dropout_is_rescaled_by_the_square_root_of_the_kept_connections() -> None:
    model = lenet()
    masks = prune_masks(model, ["fc1.weight", "fc2.weight"], sparsity=0.84)
    edits = rescale_dropout(model, masks, {"drop1": 0.2, "drop2": 0.5})
    kept1 = masks.counts()[0].kept / masks.counts()[0].total
    assert model.drop1.p == pytest.approx(0.2 * math.sqrt(kept1))
    assert model.drop2.p == pytest.approx(0.5 * math.sqrt(0.16), rel=1e-3)
    assert edits == [{"op": "dropout", "module": "drop1", "p": model.drop1.p},
                     {"op": "dropout", "module": "drop2", "p": model.drop2.p}]  # fmt: skip


def kill_units(model: nn.Module, masks: Masks, key: str, rows=(), cols=()) -> None:
    """Prune every input (rows) or every output connection (cols of the consumer)."""
    m = masks.masks[key]
    for r in rows:
        m[r] = False
    for c in cols:
        m[:, c] = False
    masks.apply_(model)


@pytest.mark.parametrize("name", ["lenet300_100", "lenet5"])
def test_dead_units_are_removed_and_outputs_do_not_change(name) -> None:
    model = lenet(name=name).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.5, 0.5)  # folding act(bias) of input-less units matters
    masks = prune_masks(model, prunable_weights(model), sparsity=0.5)
    kill_units(model, masks, "fc1.weight", rows=(3, 7, 11))  # no inputs: act(bias) constant
    kill_units(model, masks, "fc2.weight", cols=(5, 7, 20))  # 5, 20: no outputs either
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    report, keep = remove_dead(model, masks, groups_of(model, DIGITS))
    dead = {d.layer: d for d in report}["fc1"]
    assert {3, 7, 11, 5, 20} <= set(dead.removed)
    assert model.fc1.out_features == len(keep["fc1"]) <= dead.units - 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    assert exactly_zero(model, masks)  # the masks shrank with the layers


# -- the sparse checkpoint --------------------------------------------------------------------


def test_sparse_checkpoint_restores_the_weights_bit_for_bit(tmp_path: Path) -> None:
    model = lenet()
    masks = prune_masks(model, prunable_weights(model), sparsity=0.92)
    masks.apply_(model)
    with torch.no_grad():
        model.fc2.weight[model.fc2.weight != 0] *= -1.0  # signs of kept weights survive
    state = model.state_dict()
    encoded = encode_sparse(state, masks)
    torch.save(encoded, tmp_path / "s.pt")
    torch.save(state, tmp_path / "d.pt")
    back = decode_sparse(torch.load(tmp_path / "s.pt", weights_only=True))
    assert list(back) == list(state)
    for key, value in state.items():
        assert value.dtype == back[key].dtype
        assert torch.equal(value.view(torch.int32), back[key].view(torch.int32)), key
    assert (tmp_path / "s.pt").stat().st_size < (tmp_path / "d.pt").stat().st_size / 5
    for key, mask in masks_of_sparse(encoded).masks.items():
        assert torch.equal(mask, masks.masks[key])


def saved_bytes(obj, folder: Path) -> int:
    """Size of ``obj`` saved as FOLDER/s.pt (torch.save names the archive after the file)."""
    folder.mkdir()
    torch.save(obj, folder / "s.pt")
    return (folder / "s.pt").stat().st_size


def test_the_encoding_of_views_saves_only_their_own_bytes(tmp_path: Path) -> None:
    """Training keeps the weights as views of one flat buffer (the graft's); the encoding
    must not drag that buffer to disk with the first unmasked tensor it keeps."""
    model = lenet()
    masks = prune_masks(model, prunable_weights(model), sparsity=0.9)
    masks.apply_(model)
    state = model.state_dict()
    flat = torch.cat([v.flatten() for v in state.values()])
    views, start = {}, 0
    for key, value in state.items():
        views[key] = flat[start : start + value.numel()].view_as(value)
        start += value.numel()
    as_views = saved_bytes(encode_sparse(views, masks), tmp_path / "views")
    as_copies = saved_bytes(encode_sparse(state, masks), tmp_path / "copies")
    assert as_views == as_copies < saved_bytes(state, tmp_path / "dense") / 5


def test_cli_prints_the_size_of_the_file_it_writes(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "l.pt", "lenet300_100", DIGITS)
    out = tmp_path / "s.pt"
    proc = compress_here("magnitude", str(tmp_path / "l.pt"), "--sparsity", "0.9", "--json",
                         "--out", str(out))  # fmt: skip
    assert json.loads(proc.stdout)["sparse_bytes"] == out.stat().st_size
    proc = compress_here("magnitude", str(tmp_path / "l.pt"), "--sparsity", "0.9",
                         "--out", str(out))  # fmt: skip
    assert f"{out.stat().st_size:,} B sparse" in proc.stdout, proc.stdout


def test_cli_prunes_one_shot_and_writes_a_sparse_checkpoint(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "l.pt", "lenet300_100", DIGITS)
    out = tmp_path / "s.pt"
    proc = compress_here("magnitude", str(tmp_path / "l.pt"), "--sparsity", "0.9",
                         "--remove-dead", "--json", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["weights"] == 64 * 300 + 300 * 100 + 100 * 10
    assert row["compression"] == pytest.approx(row["weights"] / row["weights_kept"], rel=1e-3)
    assert row["compression"] >= 10.0 and row["sparse_bytes"] < row["dense_bytes"] / 5
    assert [r["layer"] for r in row["layers"]] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    state = torch.load(out, weights_only=True)
    assert plain(state) and state["kind"] == "sparse" and "sparse" in state
    model = load_model(out)
    nonzero = sum(int((model.get_parameter(r["layer"]) != 0).sum()) for r in row["layers"])
    assert nonzero == row["weights_kept"]


@pytest.mark.parametrize(
    ("args", "expect"),
    [([], "holds no pruning masks; give --quality or --sparsity"),
     (["--sparsity", "1.0"], "--sparsity 1 is outside [0, 1)"),
     (["--quality", "1", "--skip", "fc9"], "unknown layer 'fc9'")],
)  # fmt: skip
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path, args, expect) -> None:
    write_checkpoint(tmp_path / "l.pt", "lenet300_100", DIGITS)
    proc = compress_here("magnitude", str(tmp_path / "l.pt"), *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["l.pt"]


# -- under torchrun ---------------------------------------------------------------------------


def lenet_args(tmp_path: Path, name: str, epochs: int, *extra: str) -> list[str]:
    return ["--config", str(LENET), f"--run.dir={tmp_path}", f"--run.name={name}",
            f"--run.epochs={epochs}", "--telemetry.publish=tcp://127.0.0.1:0", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_grafting_networks_prune_in_rounds_and_keep_their_own_masks(tmp_path: Path) -> None:
    # 3 networks: with 2, the entropy alphas sum to 1 and a graft makes both networks equal
    proc = run(torchrun_cmd(3, *lenet_args(
        tmp_path, "han", 3, "--compress.method=magnitude", "--compress.schedule=[0.5,0.8]",
        "--compress.start_epoch=1", "--compress.round_epochs=1")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    evs = events(tmp_path / "han")
    masks = []
    for k in (0, 1, 2):
        prunes = [e for e in evs if e["event"] == "prune" and e["network"] == k]
        assert [(p["round"], p["epoch"]) for p in prunes] == [(1, 1), (2, 2)]
        assert prunes[-1]["compression"] == pytest.approx(5.0, rel=0.01)
        assert len([e for e in evs if e["event"] == "graft" and e["network"] == k]) == 3
        state = read_checkpoint(tmp_path / "han" / f"net{k}" / "last.pt")
        m = Masks(state["masks"])
        model = build_model("lenet300_100", 10, 1)
        model.load_state_dict(state["model"])
        assert exactly_zero(model, m)  # the last graft mixed in the peer; own zeros remain
        assert [e["op"] for e in state["arch"]["edits"]] == ["dropout", "dropout"]
        sparse = read_checkpoint(tmp_path / "han" / f"net{k}" / "sparse.pt")
        for key, value in weights_of(sparse).items():
            assert torch.equal(value, state["model"][key]), key
        # 80% of the weights pruned: the file holds a fifth of them and a bit per weight
        dense = saved_bytes(state["model"], tmp_path / f"dense{k}")
        assert (tmp_path / "han" / f"net{k}" / "sparse.pt").stat().st_size < dense / 2.5
        masks.append(m)
    assert not torch.equal(masks[0].masks["fc1.weight"], masks[1].masks["fc1.weight"])
    summary = [e for e in evs if e["event"] == "summary"][0]["networks"][0]
    assert summary["weights"] == 50_200 and summary["nonzero_weights"] <= 50_200 / 5 + 1

    # retraining from the sparse checkpoint holds its zeros (one process, one network)
    sparse_path = tmp_path / "han" / "net0" / "sparse.pt"
    proc = run([*torchrun_cmd(1, *lenet_args(tmp_path, "again", 1,
                                             f"--model.init={sparse_path}"))])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = distgraft.compress.load_model(tmp_path / "again" / "net0" / "last.pt")
    assert model.drop1.p < 0.2  # the rescaled dropout travels in the arch
    assert exactly_zero(model, masks[0])
