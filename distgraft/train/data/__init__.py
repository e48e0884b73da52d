"""Datasets and loaders: small datasets live on the device, ImageNet streams from disk.

One module per dataset (``digits``, ``cifar``, ``fashion``, ``synthetic``, ``imagenet``),
the loaders they feed (``loaders``) and where their files live on this machine
(``storage``: ``data.root`` defaults per dataset, the ``data.cache`` folder, a lock);
``build_data`` picks one from the ``[data]`` config.

Digits, CIFAR-10/100, Fashion-MNIST and the synthetic dataset are small enough to keep on
the accelerator as uint8 (CIFAR-10 is 150 MB, Fashion-MNIST 55 MB), so they are moved there
once and every epoch is built with
batched tensor ops (the airbench idea): one ``randperm`` for the order, per-sample crop
offsets and flip bits drawn up front, and per batch one gather for the crop + flip and one
fused normalisation. There is no host synchronisation per step and no worker process, which
matters here because every process of a grafting run trains its own network and CPU
DataLoader workers would be multiplied by the world size.

Reproducibility contract of the device-resident loaders: the order and the augmentation of
epoch ``e`` are a pure function of ``(seed, e)`` (the generator is re-seeded with
:func:`epoch_seed` at the start of every iteration, from ``loader.set_epoch(e)``; a loader
that is iterated without ``set_epoch`` uses epoch 0). A run resumed at epoch ``e`` therefore
sees exactly the batches an uninterrupted run would have seen, and iterating the same epoch
twice yields the same batches twice. Random numbers come from a generator on the device, so
the batches of a given ``(seed, e)`` are identical for every run on the same kind of device,
but differ between CPU and CUDA.

With ``replicas`` R > 1 (data parallelism inside one grafted network) every replica computes
the same permutation and keeps ``perm[replica::R]`` truncated to ``N // R`` samples, so the
shards are disjoint and every replica takes the same number of steps (DDP needs that). The
augmentation of an image depends on ``(seed, epoch, image position in the permutation)``
only, not on R. The test loader is sequential, unaugmented and holds the full test set on
every replica.

Inputs are ``(uint8 / 255 - mean) / std`` per channel: the reference code's values for
CIFAR-10, the usual training-set statistics for CIFAR-100 and ImageNet, and for digits,
Fashion-MNIST and the synthetic set the mean and population std of the images trained on
(the training split less the validation images, computed once at load; digits and
Fashion-MNIST are mostly black background, so 0.5/0.5 would leave their inputs far from
zero mean).

Augmentation: random crop with zero padding 4 and horizontal flip for CIFAR, padding 2 and
flip for Fashion-MNIST (its garments fill the 28x28 frame, the longest side scaled to 28
pixels, so a 4-pixel shift, a seventh of the image, would cut into the object; left- and
right-facing shoes are the same class, so flipping is safe), padding 1 without flip for
digits (a mirrored digit is another symbol or none).

ImageNet uses ``torchvision.datasets.ImageFolder`` with a ``DistributedSampler`` (order is a
pure function of ``(seed, epoch)`` too); its random crops come from the DataLoader workers'
RNGs, so they are not bit-identical across a resume.

Validation split: ``data.val_size`` training images are held out (a random choice seeded
by the run's seed, so every network of a run, and every tool that rebuilds the data from a
checkpoint's config, holds out the same images). Every decision is taken on them, never on
the test split: which epoch is ``best.pt``, APoZ, trimming's accuracy check, sensitivity.
The validation loader is sequential and unaugmented, like the test loader.

CIFAR files are pickles, read with ``pickle.load`` exactly as torchvision does: only point
``data.root`` at files you trust.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from distgraft.config import ConfigError, DataConfig
from distgraft.train.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_SPECS,
    check_cifar,
    load_cifar,
)
from distgraft.train.data.digits import load_digits
from distgraft.train.data.fashion import check_fashion, load_fashion
from distgraft.train.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_imagenet,
    check_imagenet,
)
from distgraft.train.data.loaders import (
    Data,
    DataError,
    DataInfo,
    DeviceLoader,
    Loader,
    TorchLoader,
    channel_stats,
    epoch_seed,
    split_indices,
    val_count,
)
from distgraft.train.data.storage import root_of
from distgraft.train.data.synthetic import load_synthetic

__all__ = [
    "Data",
    "DataError",
    "DataInfo",
    "Loader",
    "DeviceLoader",
    "TorchLoader",
    "check_available",
    "build_data",
    "data_shape",
    "val_count",
    "split_indices",
    "epoch_seed",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


def check_available(cfg: DataConfig) -> None:
    """Cheap pre-flight check, run before any process group starts.

    Raises :class:`DataError` when the CIFAR batches are missing and ``data.download`` is
    false, when a Fashion-MNIST file is missing or its cache folder is not writable, when
    ImageNet's train/ or val/ folder is missing, or when scikit-learn is missing for
    digits. Reads no data.
    """
    if cfg.name in CIFAR_SPECS:
        check_cifar(CIFAR_SPECS[cfg.name], cfg)
    elif cfg.name == "fashion-mnist":
        check_fashion(cfg)
    elif cfg.name == "imagenet":
        check_imagenet(cfg)
    elif cfg.name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise DataError(
                "data.name = 'digits' needs scikit-learn: pip install 'distgraft[digits]'"
            )
    elif cfg.name != "synthetic":
        raise ConfigError(
            f"data.name = {cfg.name!r} is invalid: allowed values are digits, cifar10, "
            "cifar100, fashion-mnist, imagenet, synthetic"
        )


def data_shape(cfg: DataConfig) -> tuple[int, tuple[int, ...]]:
    """(number of classes, input shape C x H x W) of the model inputs, without loading data.

    What a checkpoint made for this data records (teachers, model.init are checked on it).
    """
    if cfg.name == "digits":
        return 10, (1, 8, 8)
    if cfg.name in CIFAR_SPECS:
        return CIFAR_SPECS[cfg.name].num_classes, (3, 32, 32)
    if cfg.name == "fashion-mnist":
        return 10, (1, 28, 28)
    if cfg.name == "imagenet":
        classes = [d for d in (root_of(cfg) / "train").iterdir() if d.is_dir()]
        return len(classes), (3, cfg.image_size, cfg.image_size)
    return cfg.synthetic_classes, tuple(cfg.synthetic_shape)


def build_data(
    cfg: DataConfig,
    device: torch.device,
    seed: int,
    replica: int = 0,
    replicas: int = 1,
    channels_last: bool = False,
    split_seed: int = 0,
) -> Data:
    """The loaders (train, validation, test) and ``DataInfo`` for one replica of one network.

    ``seed`` fixes the training order and augmentation (see the module docstring);
    ``replica``/``replicas`` select this process's shard of the training set;
    ``split_seed`` (the run's seed) chooses the held-out validation images.
    """
    device = torch.device(device)
    if replicas < 1 or not 0 <= replica < replicas:
        raise ValueError(f"replica {replica} of {replicas} is invalid")
    check_available(cfg)
    if cfg.name == "imagenet":
        return build_imagenet(cfg, device, seed, replica, replicas, channels_last, split_seed)

    if cfg.name == "digits":
        xtr, ytr, xte, yte = load_digits()
        num_classes, pad, flip = 10, 1, False
    elif cfg.name in CIFAR_SPECS:
        spec = CIFAR_SPECS[cfg.name]
        xtr, ytr, xte, yte = load_cifar(spec, cfg)
        num_classes, pad, flip = spec.num_classes, 4, True
    elif cfg.name == "fashion-mnist":
        xtr, ytr, xte, yte = load_fashion(cfg)
        num_classes, pad, flip = 10, 2, True
    else:  # synthetic (check_available rejected anything else)
        xtr, ytr, xte, yte = load_synthetic(cfg)
        big = min(xtr.shape[2:]) >= 16
        num_classes, pad, flip = cfg.synthetic_classes, 4 if big else 0, big
    n_val = val_count(cfg, xtr.shape[0])
    train_idx, val_idx = split_indices(xtr.shape[0], n_val, split_seed)
    xva, yva = xtr[val_idx], ytr[val_idx]
    xtr, ytr = xtr[train_idx], ytr[train_idx]
    if cfg.name in CIFAR_SPECS:
        mean, std = CIFAR_SPECS[cfg.name].mean, CIFAR_SPECS[cfg.name].std
    else:
        mean, std = channel_stats(xtr)  # of the images trained on
    if not cfg.augment:
        pad, flip = 0, False
    if xtr.shape[0] < replicas:
        raise DataError(
            f"{cfg.name} has {xtr.shape[0]} training images, fewer than the {replicas} "
            "replicas that would share them"
        )

    def loader(x: Tensor, y: Tensor, batch_size: int, train: bool) -> DeviceLoader:
        return DeviceLoader(
            x.to(device),
            y.to(device, torch.int64),
            mean,
            std,
            batch_size,
            train=train,
            pad=pad,
            flip=flip,
            seed=seed,
            replica=replica,
            replicas=replicas,
            channels_last=channels_last,
        )

    train = loader(xtr, ytr, cfg.batch_size, train=True)
    val = loader(xva, yva, cfg.test_batch_size, train=False) if n_val else None
    test = loader(xte, yte, cfg.test_batch_size, train=False)
    # image_size is the height (all built-in datasets are square).
    info = DataInfo(num_classes, xtr.shape[1], xtr.shape[2], xtr.shape[0], xte.shape[0],
                    tuple(xtr.shape[1:]), n_val)  # fmt: skip
    return Data(train, val, test, info)
