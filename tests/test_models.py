"""Model zoo: the paper's parameter and filter counts, shapes, and the conv -> BatchNorm
registration order that the grafting code relies on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
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


# The VGGs need 32x32 inputs (five max pools); ResNet-110 already ran once above.
SMALL_INPUT = [n for n in MODEL_NAMES if not n.startswith(("vgg16", "resnet110"))]


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
