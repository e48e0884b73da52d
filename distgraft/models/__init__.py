"""Model zoo: the networks of the grafting paper's CIFAR experiments, a tiny CPU model,
and any torchvision classification architecture.

Built-ins (see each module for its paper and source):

* ``resnet20/32/56/110`` and their ``_leaky`` twins -- CIFAR ResNets, :mod:`.cifar_resnet`
* ``mobilenetv2`` -- CIFAR MobileNetV2, :mod:`.mobilenetv2`
  (both take a width multiplier, ``model.width``)
* ``vgg16_bn`` -- CIFAR VGG-16 with BatchNorm, :mod:`.vgg` (pads inputs below 32x32)
* ``vgg16_li`` -- the same with Li et al.'s 512-512 classifier (pruning presets), :mod:`.vgg`
* ``digits_cnn`` -- small CNN for 8x8 digits, :mod:`.small`
* ``lenet300_100``, ``lenet5`` -- Han et al.'s LeNets sized for 8x8 digits, :mod:`.lenet`

``torchvision:ARCH`` builds ``torchvision.models.get_model(ARCH, weights=None, ...)``:
random init, never a download.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distgraft.models.cifar_resnet import (
    resnet20,
    resnet20_leaky,
    resnet32,
    resnet32_leaky,
    resnet56,
    resnet56_leaky,
    resnet110,
    resnet110_leaky,
)
from distgraft.models.lenet import lenet5, lenet300_100
from distgraft.models.mobilenetv2 import mobilenetv2
from distgraft.models.small import digits_cnn
from distgraft.models.vgg import vgg16_bn, vgg16_li

__all__ = ["MODEL_NAMES", "WIDTH_MODELS", "TORCHVISION_PREFIX", "build_model", "is_known_model"]

TORCHVISION_PREFIX = "torchvision:"

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet20_leaky": resnet20_leaky,
    "resnet32_leaky": resnet32_leaky,
    "resnet56_leaky": resnet56_leaky,
    "resnet110_leaky": resnet110_leaky,
    "mobilenetv2": mobilenetv2,
    "vgg16_bn": vgg16_bn,
    "vgg16_li": vgg16_li,
    "digits_cnn": digits_cnn,
    "lenet300_100": lenet300_100,
    "lenet5": lenet5,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Names of the built-in models accepted by :func:`build_model`."""

WIDTH_MODELS: tuple[str, ...] = tuple(
    n for n in MODEL_NAMES if n.startswith(("resnet", "mobilenetv2"))
)
"""The models that take a width multiplier (``model.width``): the CIFAR ResNets, MobileNetV2."""


def _torchvision_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def is_known_model(name: str) -> bool:
    """True for a built-in name or ``torchvision:ARCH`` with a torchvision classifier ARCH."""
    if not isinstance(name, str):
        return False
    if name in _BUILDERS:
        return True
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX) :] in _torchvision_archs()
    return False


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}, or "
        f"{TORCHVISION_PREFIX}<arch> with <arch> a torchvision classification model "
        "(torchvision.models.list_models(module=torchvision.models))"
    )


def build_model(
    name: str, num_classes: int, in_channels: int = 3, width: float = 1.0
) -> nn.Module:
    """Build model ``name`` with randomly initialised weights.

    ``in_channels`` sets the input channels of the first conv of the built-ins; torchvision
    models take 3-channel images only. ``width`` multiplies the filter counts of the models
    in ``WIDTH_MODELS`` (see each for the rounding); the others take 1 only.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if width != 1 and name not in WIDTH_MODELS:
        raise ValueError(
            f"model {name!r} takes width 1 only, got {width}; a width multiplier applies "
            f"to {', '.join(WIDTH_MODELS)}"
        )
    if name in WIDTH_MODELS:
        return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, width=width)
    if name in _BUILDERS:
        return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels)
    if not is_known_model(name):
        raise _unknown(name)
    arch = name[len(TORCHVISION_PREFIX) :]
    if in_channels != 3:
        raise ValueError(
            f"model {name!r} takes 3-channel images, got in_channels={in_channels}; "
            "use a built-in model for other channel counts"
        )
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
