"""Model zoo: the paper's parameter and filter counts, shapes, and the conv -> BatchNorm
registration order that the grafting code relies on."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distgraft.models import MODEL_NAMES, build_model, is_known_model
from distgraft.models.mobilenetv2 import MobileNetV2

RESNETS = ("resnet20", "resnet32", "resnet56", "resnet110")
LEAKY = tuple(f"{n}_leaky" for n in RESNETS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: a second intra-op thread only adds contention on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_filters(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def test_model_names() -> None:
    assert set(MODEL_NAMES) == {*RESNETS, *LEAKY, "mobilenetv2", "vgg16_bn", "vgg16_li",
                                "digits_cnn", "lenet300_100", "lenet5"}  # fmt: skip
    assert all(is_known_model(n) for n in MODEL_NAMES)


@pytest.mark.parametrize(
    ("name", "millions"),
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_resnet_parameter_counts(name: str, millions: float) -> None:
    plain = build_model(name, 10)
    assert n_params(plain) == pytest.approx(millions * 1e6, rel=0.02)
    # Leaky variants differ only in the activation, which has no parameters.
    leaky = build_model(f"{name}_leaky", 10)
    plain_shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert plain_shapes == {k: v.shape for k, v in leaky.state_dict().items()}


def test_filter_counts() -> None:
    assert n_filters(build_model("resnet32", 10)) == 1136
    # 6n+2 layers: stem 16 + 2n convs in each of the 16/32/64 stages.
    for name, n in (("resnet20", 3), ("resnet56", 9), ("resnet110", 18)):
        assert n_filters(build_model(name, 10)) == 16 + 2 * n * (16 + 32 + 64)
    # The grafting paper's count; the variant with 1x1 shortcut convs has 17544.
    assert n_filters(build_model("mobilenetv2", 10)) == 17088
    assert n_filters(MobileNetV2(conv_shortcut=True)) == 17544


LAYERS = (nn.Conv2d, nn.Linear)

# The LeNets are sized for 8x8 digits, as Han et al. size theirs for 28x28 MNIST.
DIGITS_ONLY = {"lenet300_100", "lenet5"}


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in DIGITS_ONLY])
def test_cifar_forward_shape(name: str) -> None:
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


# ResNet-110 already ran once above; the VGGs pad 8x8 to 32x32 (five max pools).
SMALL_INPUT = [n for n in MODEL_NAMES if n != "resnet110"]


@pytest.mark.parametrize("name", SMALL_INPUT)
def test_digits_forward_shape(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_in_channels_sets_first_conv() -> None:
    for name in MODEL_NAMES:
        layers = (m for m in build_model(name, 10, 5).modules() if isinstance(m, LAYERS))
        first = next(layers)
        taken = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features // 64
        assert taken == 5, name


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_channels_last_train_step(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vgg_state_keys() -> None:
    keys = list(build_model("vgg16_bn", 10).state_dict())
    assert keys[0].startswith("features.0.")
    assert {"features.0.weight", "features.1.running_mean", "classifier.weight"} <= set(keys)
    assert n_filters(build_model("vgg16_bn", 10)) == 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512


# Han et al.'s Caffe LeNet-5 has no BatchNorm, and neither has ours.
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "lenet5"])
def test_each_conv_is_paired_with_the_next_batchnorm(name: str) -> None:
    model = build_model(name, 10)
    leaves = [m for _, m in model.named_modules() if not list(m.children())]
    convs = [i for i, m in enumerate(leaves) if isinstance(m, nn.Conv2d)]
    bns = [i for i, m in enumerate(leaves) if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns)
    for i in convs:
        assert isinstance(leaves[i + 1], nn.BatchNorm2d), f"{name}: conv not followed by BN"
    # What the grafting code does: pair each BN with the closest conv registered before it.
    last_conv = None
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last_conv = m
        elif isinstance(m, nn.BatchNorm2d):
            assert last_conv is not None and last_conv.out_channels == m.num_features


@pytest.mark.parametrize("name", RESNETS)
def test_leaky_variants_use_only_leaky_relu(name: str) -> None:
    leaky = list(build_model(f"{name}_leaky", 10).modules())
    assert not any(isinstance(m, nn.ReLU) for m in leaky)
    slopes = {m.negative_slope for m in leaky if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}
    assert not any(isinstance(m, nn.LeakyReLU) for m in build_model(name, 10).modules())


def test_torchvision_model() -> None:
    assert is_known_model("torchvision:resnet18")
    model = build_model("torchvision:resnet18", num_classes=10)
    assert model.fc.out_features == 10
    with pytest.raises(ValueError, match="3-channel"):
        build_model("torchvision:resnet18", 10, in_channels=1)


@pytest.mark.parametrize("name", ["resnet33", "torchvision:no_such_net", "ResNet32", ""])
def test_unknown_name(name: str) -> None:
    assert not is_known_model(name)
    with pytest.raises(ValueError) as err:
        build_model(name, 10)
    msg = str(err.value)
    assert repr(name) in msg
    assert all(n in msg for n in MODEL_NAMES)
    assert "torchvision:<arch>" in msg


def test_digits_cnn_learns_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1437], perm[1437:]
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1)
    assert n_params(model) < 30_000
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        model.train()
        for idx in train[torch.randperm(len(train), generator=g)].split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9


# --------------------------------------------------------------------------- VGG input size


@pytest.mark.parametrize("size", [28, 8, 31])
def test_vgg_zero_pads_small_inputs_to_32(size: int) -> None:
    """Below 32x32 the VGG computes exactly what it computes on the input zero-padded
    (centred) to 32x32; 32x32 and larger inputs are untouched."""
    torch.manual_seed(0)
    model = build_model("vgg16_li", 10, in_channels=1).eval()
    x = torch.randn(2, 1, size, size)
    lo, hi = (32 - size) // 2, 32 - size - (32 - size) // 2
    with torch.no_grad():
        assert torch.equal(model(x), model(F.pad(x, (lo, hi, lo, hi))))
        big = torch.randn(2, 1, 40, 40)
        ref = model.classifier(F.adaptive_avg_pool2d(model.features(big), 1).flatten(1))
        assert torch.equal(model(big), ref)


# --------------------------------------------------------------------------- width multiplier


def resnet_params(n: int, a: int, c: int, k: int) -> int:
    """Parameters of ResNet-(6n+2) with stage widths a, 2a, 4a, c input channels, k classes:
    3x3 convs, BatchNorm weight + bias per conv, the linear layer; option-A shortcuts have
    none."""
    b = 2 * a
    d = 4 * a
    convs = c * a + 2 * n * a * a + (a * b + (2 * n - 1) * b * b) + (b * d + (2 * n - 1) * d * d)
    return 9 * convs + 2 * (a + 2 * n * (a + b + d)) + d * k + k


@pytest.mark.parametrize(("name", "n"), [("resnet20", 3), ("resnet56", 9)])
@pytest.mark.parametrize(("width", "a"), [(1.0, 16), (0.5, 8), (0.25, 4), (2.0, 32)])
def test_resnet_width_multiplier_parameter_counts(name: str, n: int, width: float, a: int) -> None:
    model = build_model(name, 10, 1, width=width)
    assert n_params(model) == resnet_params(n, a, 1, 10)
    assert model.conv1.out_channels == a and model.linear.in_features == 4 * a
    assert n_filters(model) == a + 2 * n * 7 * a
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_width_rounds_to_the_nearest_count() -> None:
    from distgraft.models.cifar_resnet import stage_widths

    assert stage_widths(1.0) == (16, 32, 64)
    assert stage_widths(0.75) == (12, 24, 48)
    assert stage_widths(0.3) == (5, 10, 19)  # 4.8, 9.6, 19.2
    assert stage_widths(0.01) == (1, 1, 1)  # at least one filter
    model = build_model("resnet20", 10, 3, width=0.3)  # uneven widths: shortcuts still fit
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mobilenetv2_width_multiplier() -> None:
    """Channels x width rounded to multiples of 8; the last conv stays 1280 below width 1."""
    half = build_model("mobilenetv2", 10, 1, width=0.5)
    outs = [b.conv3.out_channels for b in half.layers]
    assert half.conv1.out_channels == 16
    assert sorted(set(outs)) == [8, 16, 32, 48, 80, 160]  # 16 24 32 64 96 160 320 halved
    assert half.conv2.out_channels == 1280 and half.linear.in_features == 1280
    assert all(b.conv1.out_channels == t * b.conv1.in_channels
               for b, (t, *_) in zip(half.layers, _expansions(), strict=True))  # fmt: skip
    wide = build_model("mobilenetv2", 10, 3, width=1.4)
    assert wide.conv1.out_channels == 48 and wide.conv2.out_channels == 1792
    assert n_params(half) < n_params(build_model("mobilenetv2", 10, 1)) / 2
    with torch.no_grad():
        assert half.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _expansions() -> list[tuple[int, ...]]:
    from distgraft.models.mobilenetv2 import CIFAR_CFG

    return [(t,) for t, _, n, _ in CIFAR_CFG for _ in range(n)]


@pytest.mark.parametrize("name", ["vgg16_bn", "digits_cnn", "lenet5", "torchvision:resnet18"])
def test_width_is_refused_where_it_does_not_apply(name: str) -> None:
    from distgraft.config import ConfigError, load_config

    with pytest.raises(ValueError, match="takes width 1 only"):
        build_model(name, 10, 3, width=0.5)
    with pytest.raises(ConfigError, match="model.width"):
        load_config(None, [f"--model.name={name}", "--model.width=0.5"])
    with pytest.raises(ConfigError, match="model.width"):
        load_config(None, ["--model.name=resnet20", "--model.width=0"])


def test_width_is_recorded_in_checkpoints_and_rebuilt(tmp_path: Path) -> None:
    """A narrow network trained by ``distgraft train`` comes back at its width from
    load_model, through pruning too; older records without a width mean 1; model.init
    refuses a checkpoint of another width."""
    from cli_helpers import common, run

    from distgraft.compress.archive import arch_of, base_arch, load_model, save_compressed
    from distgraft.compress.prune import PruneSpec, apply_pruning, layer_ratios, prune_edits
    from distgraft.compress.prune import select as select_filters
    from distgraft.compress.structure import groups_of
    from distgraft.config import Config, ConfigError, load_config, to_toml, with_overrides
    from distgraft.files import load, save_atomic
    from distgraft.train.warmstart import check_init

    cmd = [sys.executable, "-m", "distgraft", "train", *common(tmp_path, "narrow", 1),
           "--model.name=resnet20", "--model.width=0.5", "--graft.source=none"]  # fmt: skip
    proc = run(cmd, timeout=240)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "narrow" / "net0" / "last.pt"
    state = load(path)
    assert state["arch"]["width"] == 0.5 and state["arch"]["input_shape"] == [1, 8, 8]
    model = load_model(path)
    assert model.conv1.out_channels == 8 and model.linear.in_features == 32
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    # Pruned at width 0.5: the edits replay on the narrow base network.
    groups = groups_of(model, (1, 8, 8))
    keep = select_filters([model], groups, PruneSpec(layer_ratios(groups, 0.25)))
    apply_pruning(model, groups, keep)
    arch = {**arch_of(state), "edits": prune_edits(keep)}
    save_compressed(tmp_path / "pruned.pt", model, arch, kind="pruned")
    back = load_model(tmp_path / "pruned.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    assert back.layer3[0].conv1.out_channels == 24  # 32 less a quarter
    # Records written before the width existed: width 1 (arch) or the config's (no arch).
    old = {**base_arch("resnet20", 10, 1, (1, 8, 8))}
    del old["width"]
    save_atomic({"model": build_model("resnet20", 10, 1).state_dict(), "arch": old},
                tmp_path / "old.pt")  # fmt: skip
    assert load_model(tmp_path / "old.pt").conv1.out_channels == 16
    cfg = with_overrides(Config(), model={"name": "resnet20", "width": 0.5},
                         data={"name": "digits"})  # fmt: skip
    save_atomic({"model": state["model"], "config": to_toml(cfg)}, tmp_path / "noarch.pt")
    assert load_model(tmp_path / "noarch.pt").conv1.out_channels == 8
    init = load_config(None, ["--model.name=resnet20", f"--model.init={path}"])
    with pytest.raises(ConfigError, match="--model.width=0.5"):
        check_init(init, 1)
    check_init(with_overrides(init, model={"width": 0.5}), 1)
