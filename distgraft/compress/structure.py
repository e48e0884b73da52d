"""Which channels must be removed together, and removing (or zeroing) them.

Removing filter j of a conv takes more than its row of weights: the feature map it writes
disappears, so the BatchNorm channel that normalises it, any depthwise conv that carries it
through, and the input kernels of every layer that reads it must go too. A ``Group`` lists
those places for one set of channels (Torch-Pruning's dependency group); ``remove`` slices
them all with one list of kept indices, ``mask_`` zeroes the same channels in place. For
every supported family the two give the same outputs (eval mode), which is the contract
tests/test_prune.py checks.

The groups are derived per model family, by module names, because the rules are the
papers' and not a graph search (Li et al. 2017, section 3.3):

* CIFAR ResNets (option-A, zero-padding shortcuts): only the first conv of each block; the
  second conv writes into the residual stream, whose channel positions the parameter-free
  shortcut fixes.
* torchvision ResNets (projection shortcuts): the inner convs of each block freely; the
  residual stream of a stage as one group led by its projection shortcut (or the stem), so
  the blocks' last convs follow the shortcut's choice. Stream groups are pruned only when
  named (``default=False``).
* VGG: every conv (and Li's hidden classifier layer).
* MobileNetV2: the stem, each block's expand conv (its depthwise conv follows), the last
  1x1 conv. Projection convs feed residual additions and are left alone.
* The digits nets: every conv and hidden linear layer.

Pure tensor code: nothing here imports torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgraft.compress.counting import hooked_forward

__all__ = [
    "Group",
    "UnsupportedModel",
    "FAMILIES",
    "family_of",
    "groups_of",
    "remove",
    "mask_",
    "activation",
]


class UnsupportedModel(ValueError):
    """Channel removal does not know this model family."""


@dataclass(frozen=True, kw_only=True)
class Group:
    """Channels that are removed together; named after the layer whose filters are scored.

    Written with keywords (``producers=``, ``norms=``, ``consumers=``, ...), so that each
    family's rules below read like the papers' rules.
    """

    name: str
    """The scored module (the leader): the first of ``producers``."""
    producers: tuple[str, ...]
    """Convs/linears whose output channels these are (their filters and biases go)."""
    norms: tuple[str, ...] = ()
    """BatchNorm layers over these channels."""
    depthwise: tuple[str, ...] = ()
    """Depthwise convs that carry these channels through (one filter per channel)."""
    consumers: tuple[str, ...] = ()
    """Convs/linears that read these channels (their input kernels go)."""
    act: str | None = None
    """Module whose output, through the activation, is the channel's activation (APoZ)."""
    negative_slope: float = 0.0
    """Slope of the activation below zero: 0 for ReLU, > 0 for LeakyReLU."""
    default: bool = True
    """Pruned when no layer list is given (stream groups of torchvision ResNets are not)."""
    channels: int = 0
    """Number of channels (filled in by ``groups_of``)."""
    stage: int = 0
    """1-based stage: groups whose outputs have the same feature-map size (Li et al.)."""
    spatial: dict[str, int] | None = None
    """Linear consumers after a flatten: input features per channel."""


# -- families ------------------------------------------------------------------------------


def _cifar_resnet(model: nn.Module) -> list[Group]:
    slope = _slope(model.act)
    groups = []
    for s in (1, 2, 3):
        for i, _ in enumerate(getattr(model, f"layer{s}")):
            p = f"layer{s}.{i}"
            groups.append(
                Group(name=f"{p}.conv1", producers=(f"{p}.conv1",), norms=(f"{p}.bn1",),
                      consumers=(f"{p}.conv2",), act=f"{p}.bn1", negative_slope=slope)
            )  # fmt: skip
    return groups


def _vgg(model: nn.Module) -> list[Group]:
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    classifier = model.classifier
    head = "classifier.0" if isinstance(classifier, nn.Sequential) else "classifier"
    groups = []
    for k, i in enumerate(convs):
        nxt = f"features.{convs[k + 1]}" if k + 1 < len(convs) else head
        groups.append(
            Group(name=f"features.{i}", producers=(f"features.{i}",),
                  norms=(f"features.{i + 1}",), consumers=(nxt,), act=f"features.{i + 1}")
        )  # fmt: skip
    if isinstance(classifier, nn.Sequential):  # Li's Linear-BN-ReLU-Linear head
        groups.append(
            Group(name="classifier.0", producers=("classifier.0",), norms=("classifier.1",),
                  consumers=("classifier.3",), act="classifier.1")
        )  # fmt: skip
    return groups


def _mobilenetv2(model: nn.Module) -> list[Group]:
    groups = []
    first = model.layers[0]
    if not (first.residual and isinstance(first.shortcut, nn.Identity)):
        readers = ("layers.0.conv1",)
        if first.residual:
            readers += ("layers.0.shortcut.0",)
        groups.append(Group(name="conv1", producers=("conv1",), norms=("bn1",),
                            consumers=readers, act="bn1"))  # fmt: skip
    for i, _ in enumerate(model.layers):
        p = f"layers.{i}"
        groups.append(
            Group(name=f"{p}.conv1", producers=(f"{p}.conv1",), norms=(f"{p}.bn1", f"{p}.bn2"),
                  depthwise=(f"{p}.conv2",), consumers=(f"{p}.conv3",), act=f"{p}.bn1")
        )  # fmt: skip
    groups.append(Group(name="conv2", producers=("conv2",), norms=("bn2",),
                        consumers=("linear",), act="bn2"))  # fmt: skip
    return groups


def _digits_cnn(model: nn.Module) -> list[Group]:
    return [
        Group(name="conv1", producers=("conv1",), norms=("bn1",), consumers=("conv2",),
              act="bn1"),
        Group(name="conv2", producers=("conv2",), norms=("bn2",), consumers=("conv3",),
              act="bn2"),
        Group(name="conv3", producers=("conv3",), norms=("bn3",), consumers=("linear",),
              act="bn3"),
    ]  # fmt: skip


def _torchvision_resnet(model: nn.Module) -> list[Group]:
    """Inner convs of every block, plus one residual-stream group per stream.

    A stream starts at the stem, or at a block with a projection shortcut (whose conv leads
    the group: "the second layer follows the shortcut", Li et al. section 3.3); every block
    of the stream writes into it with its last conv and reads it with its first conv.
    """
    groups: list[Group] = []
    stream: dict = {"producers": ["conv1"], "norms": ["bn1"], "consumers": []}
    streams = [stream]
    for s in (1, 2, 3, 4):
        for i, block in enumerate(getattr(model, f"layer{s}")):
            p = f"layer{s}.{i}"
            inner = ("conv1", "conv2", "conv3") if hasattr(block, "conv3") else ("conv1", "conv2")
            for a, b in zip(inner, inner[1:], strict=False):
                bn = f"{p}.bn{a[-1]}"
                groups.append(Group(name=f"{p}.{a}", producers=(f"{p}.{a}",), norms=(bn,),
                                    consumers=(f"{p}.{b}",), act=bn))  # fmt: skip
            last, last_bn = f"{p}.{inner[-1]}", f"{p}.bn{inner[-1][-1]}"
            stream["consumers"].append(f"{p}.conv1")
            if block.downsample is not None:
                stream["consumers"].append(f"{p}.downsample.0")
                stream = {"producers": [f"{p}.downsample.0"], "norms": [f"{p}.downsample.1"],
                          "consumers": []}  # fmt: skip
                streams.append(stream)
            stream["producers"].append(last)
            stream["norms"].append(last_bn)
    stream["consumers"].append("fc")
    for st in streams:  # the stream's activation is a sum, not a module output: no APoZ
        groups.append(
            Group(name=st["producers"][0], producers=tuple(st["producers"]),
                  norms=tuple(st["norms"]), consumers=tuple(st["consumers"]), act=None,
                  default=False)
        )  # fmt: skip
    return groups


def _lenet300_100(model: nn.Module) -> list[Group]:
    return [
        Group(name="fc1", producers=("fc1",), consumers=("fc2",), act="fc1"),
        Group(name="fc2", producers=("fc2",), consumers=("fc3",), act="fc2"),
    ]


def _lenet5(model: nn.Module) -> list[Group]:
    return [
        Group(name="conv1", producers=("conv1",), consumers=("conv2",), act="conv1"),
        Group(name="conv2", producers=("conv2",), consumers=("fc1",), act="conv2"),
        Group(name="fc1", producers=("fc1",), consumers=("fc2",), act="fc1"),
    ]


FAMILIES: dict[str, str] = {
    "CifarResNet": "CIFAR ResNets (resnet20/32/56/110 and _leaky)",
    "VGG": "vgg16_bn, vgg16_li",
    "MobileNetV2": "mobilenetv2 (distgraft's CIFAR variant)",
    "DigitsCNN": "digits_cnn",
    "LeNet300100": "lenet300_100",
    "LeNet5": "lenet5",
    "ResNet": "torchvision:resnet18/34/50/101/152 (and wide/resnext variants)",
}
"""Family name -> the models it covers (for error messages)."""


def _classes() -> dict[type, str]:
    """Model class -> family. By class, not by name: torchvision has its own MobileNetV2."""
    from torchvision.models.resnet import ResNet

    from distgraft.models.cifar_resnet import CifarResNet
    from distgraft.models.lenet import LeNet5, LeNet300100
    from distgraft.models.mobilenetv2 import MobileNetV2
    from distgraft.models.small import DigitsCNN
    from distgraft.models.vgg import VGG

    return {CifarResNet: "CifarResNet", VGG: "VGG", MobileNetV2: "MobileNetV2",
            DigitsCNN: "DigitsCNN", LeNet300100: "LeNet300100", LeNet5: "LeNet5",
            ResNet: "ResNet"}  # fmt: skip


_BUILDERS = {
    "CifarResNet": _cifar_resnet,
    "VGG": _vgg,
    "MobileNetV2": _mobilenetv2,
    "DigitsCNN": _digits_cnn,
    "LeNet300100": _lenet300_100,
    "LeNet5": _lenet5,
    "ResNet": _torchvision_resnet,
}


def family_of(model: nn.Module) -> str:
    """The family name of ``model``, or UnsupportedModel listing what is supported."""
    family = _classes().get(type(model))
    if family is None:
        known = "; ".join(FAMILIES.values())
        raise UnsupportedModel(
            f"channel removal does not support {type(model).__module__}."
            f"{type(model).__name__} models; supported families: {known}"
        )
    return family


def _slope(act: nn.Module) -> float:
    return float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0


# -- shapes, stages -------------------------------------------------------------------------


def groups_of(model: nn.Module, input_shape: Sequence[int]) -> list[Group]:
    """The prunable groups of ``model`` in forward order, with channels, stages, spatial.

    Stages are numbered by feature-map size (largest first), as Li et al. set one pruning
    ratio per stage of layers with the same feature-map size; groups of linear layers form
    the last stage.
    """
    groups = _BUILDERS[family_of(model)](model)
    modules = dict(model.named_modules())
    names = {g.name for g in groups}
    area: dict[str, int] = {}
    hooked_forward(model, input_shape, lambda name, _: name in names,
                   lambda name, _, out: area.setdefault(name, _area(out)))  # fmt: skip
    sizes = sorted(set(area.values()), reverse=True)
    out = []
    for g in groups:
        channels = _out_channels(modules[g.name])
        spatial = {}
        for c in g.consumers:
            if isinstance(modules[c], nn.Linear):
                spatial[c] = modules[c].in_features // channels
        stage = sizes.index(area[g.name]) + 1
        out.append(replace(g, channels=channels, stage=stage, spatial=spatial or None))
    return out


def _area(out: Tensor) -> int:
    """Feature-map size of an output: H*W for conv maps, 0 for linear outputs (last stage)."""
    return int(out[0, 0].numel()) if out.dim() > 2 else 0


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


# -- removal and masking --------------------------------------------------------------------


def _param(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _slice_out(module: nn.Module, keep: Tensor) -> None:
    _param(module, "weight", module.weight.detach()[keep])
    if module.bias is not None:
        _param(module, "bias", module.bias.detach()[keep])
    if isinstance(module, nn.Linear):
        module.out_features = len(keep)
    else:
        module.out_channels = len(keep)


def _slice_norm(module: nn.Module, keep: Tensor) -> None:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModel(f"cannot slice a {type(module).__name__}; only BatchNorm")
    if module.weight is not None:
        _param(module, "weight", module.weight.detach()[keep])
        _param(module, "bias", module.bias.detach()[keep])
    if module.running_mean is not None:
        module.running_mean = module.running_mean[keep].contiguous()
        module.running_var = module.running_var[keep].contiguous()
    module.num_features = len(keep)


def _slice_depthwise(module: nn.Conv2d, keep: Tensor) -> None:
    _slice_out(module, keep)
    module.in_channels = module.groups = len(keep)


def _slice_in(module: nn.Module, keep: Tensor, spatial: int) -> None:
    if isinstance(module, nn.Linear):
        cols = (keep[:, None] * spatial + torch.arange(spatial, device=keep.device)).reshape(-1)
        _param(module, "weight", module.weight.detach()[:, cols])
        module.in_features = len(cols)
        return
    if module.groups != 1:
        raise UnsupportedModel(f"cannot slice the inputs of a grouped conv ({module.groups})")
    _param(module, "weight", module.weight.detach()[:, keep])
    module.in_channels = len(keep)


def remove(model: nn.Module, group: Group, keep: Tensor | Sequence[int]) -> None:
    """Shrink ``model`` in place to the channels ``keep`` (sorted indices) of ``group``."""
    modules = dict(model.named_modules())
    device = modules[group.name].weight.device
    keep = torch.as_tensor(keep, dtype=torch.long).to(device)
    if keep.numel() == 0:
        raise ValueError(f"removing every channel of {group.name} would cut the network")
    for name in group.producers:
        _slice_out(modules[name], keep)
    for name in group.norms:
        _slice_norm(modules[name], keep)
    for name in group.depthwise:
        _slice_depthwise(modules[name], keep)
    for name in group.consumers:
        _slice_in(modules[name], keep, (group.spatial or {}).get(name, 1))


@torch.no_grad()
def mask_(model: nn.Module, group: Group, drop: Tensor | Sequence[int]) -> None:
    """Zero channels ``drop`` of ``group`` in place: filters, biases, norm weight AND bias.

    Zeroing the norm's bias too makes the channel output exactly 0 (a zero filter alone
    would still output act(bias)), so the masked model computes what the removed one does.
    """
    modules = dict(model.named_modules())
    drop = torch.as_tensor(drop, dtype=torch.long).to(modules[group.name].weight.device)
    for name in (*group.producers, *group.depthwise, *group.norms):
        m = modules[name]
        for t in (m.weight, m.bias):
            if t is not None:
                t[drop] = 0


def activation(group: Group, x: Tensor) -> Tensor:
    """The activation that really follows ``group.act`` (ReLU or LeakyReLU)."""
    if group.negative_slope:
        return F.leaky_relu(x, group.negative_slope)
    return F.relu(x)


def by_name(groups: Iterable[Group]) -> dict[str, Group]:
    return {g.name: g for g in groups}
