"""ImageNet from ImageFolder train/ and val/ folders, streamed by DataLoader workers.

Its random crops come from the workers' RNGs, so unlike the device-resident datasets they
are not bit-identical across a resume; the order (DistributedSampler) is.
"""

from __future__ import annotations

import copy

import torch

from distgraft.config import DataConfig
from distgraft.train.data.loaders import (
    Data,
    DataError,
    DataInfo,
    TorchLoader,
    split_indices,
    val_count,
)
from distgraft.train.data.storage import root_of, root_setting

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "check_imagenet", "build_imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_imagenet(cfg: DataConfig) -> None:
    root = root_of(cfg)
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"ImageNet folder {str(folder)!r} not found ({root_setting(cfg)}); put "
                "the class folders of the training images under root/train and of the "
                "validation images under root/val (data.download is not supported for "
                "imagenet)"
            )


def build_imagenet(
    cfg: DataConfig,
    device: torch.device,
    seed: int,
    replica: int,
    replicas: int,
    channels_last: bool,
    split_seed: int = 0,
) -> Data:
    """The ``Data`` of ImageNet: train/ minus the held-out images, those, and val/ as test."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from torchvision import datasets, transforms

    check_imagenet(cfg)
    size = cfg.image_size
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    evaluate = transforms.Compose(
        [
            transforms.Resize(int(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalise,
        ]
    )
    train_tf = (
        transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalise,
            ]
        )
        if cfg.augment
        else evaluate
    )
    sets = {}
    for split, tf in (("train", train_tf), ("val", evaluate)):
        folder = root_of(cfg) / split
        try:
            sets[split] = datasets.ImageFolder(str(folder), transform=tf)
        except (FileNotFoundError, OSError) as e:
            raise DataError(
                f"cannot read ImageNet folder {str(folder)!r} ({root_setting(cfg)}): {e}"
            ) from e
    train_set, val_set = sets["train"], sets["val"]
    if train_set.classes != val_set.classes:
        raise DataError(
            f"ImageNet class folders differ between {str(root_of(cfg) / 'train')!r} "
            f"({len(train_set.classes)}) and {str(root_of(cfg) / 'val')!r} "
            f"({len(val_set.classes)}); labels would not match ({root_setting(cfg)})"
        )
    common = {
        "num_workers": cfg.workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.workers > 0,
    }
    n_val = val_count(cfg, len(train_set))
    train_idx, val_idx = split_indices(len(train_set), n_val, split_seed)
    held_out = copy.copy(train_set)  # the same file list, evaluated without augmentation
    held_out.transform = evaluate
    train_part = Subset(train_set, train_idx.tolist())
    sampler = DistributedSampler(
        train_part, num_replicas=replicas, rank=replica, shuffle=True, seed=seed
    )
    train = DataLoader(train_part, batch_size=cfg.batch_size, sampler=sampler, **common)
    test = DataLoader(val_set, batch_size=cfg.test_batch_size, shuffle=False, **common)
    val = None
    if n_val:
        val = DataLoader(Subset(held_out, val_idx.tolist()), batch_size=cfg.test_batch_size,
                         shuffle=False, **common)  # fmt: skip
    info = DataInfo(len(train_set.classes), 3, size, len(train_part), len(val_set),
                    (3, size, size), n_val)  # fmt: skip
    return Data(
        TorchLoader(train, device, channels_last, sampler),
        None if val is None else TorchLoader(val, device, channels_last),
        TorchLoader(test, device, channels_last),
        info,
    )
