"""The loaders: device-resident batches built with tensor ops, and a DataLoader wrapper.

See the package docstring for the reproducibility contract: the order and augmentation of
epoch ``e`` are a pure function of ``(seed, e)``, and replicas get disjoint equal shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from distgraft.config import DataConfig

__all__ = [
    "Data",
    "DataError",
    "DataInfo",
    "Loader",
    "DeviceLoader",
    "TorchLoader",
    "epoch_seed",
    "channel_stats",
    "val_count",
    "split_indices",
]

_MASK64 = (1 << 64) - 1


class DataError(RuntimeError):
    """A dataset is missing or unreadable; the message names the path and the flag to fix it."""


@dataclass(frozen=True)
class DataInfo:
    """What the model builder needs to know about the dataset."""

    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int
    input_shape: tuple[int, ...] = field(default=(), compare=False)
    """(C, H, W) of one model input: what FLOPs are counted for."""
    val_size: int = 0
    """Training images held out for validation (not in ``train_size``)."""


class Loader(Protocol):
    """What the trainer relies on: both loader kinds below satisfy it."""

    def __len__(self) -> int:
        """Steps per epoch (on this replica)."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order/augmentation the next iteration produces."""
        ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches (x float32 normalised, y int64), both on the loader's device."""
        ...


# Held-out validation images by default: a tenth of the training set, capped for the large
# datasets at the usual fixed counts (CIFAR: 5,000 of 50,000; Fashion-MNIST: 5,000 of
# 60,000; ImageNet: 10,000).
VAL_CAP = {"cifar10": 5000, "cifar100": 5000, "fashion-mnist": 5000, "imagenet": 10000}


@dataclass(frozen=True)
class Data:
    """The loaders of one replica of one network, and what the model builder needs."""

    train: Loader
    val: Loader | None
    """Held-out training images (``data.val_size``); None when it is 0."""
    test: Loader
    info: DataInfo


def val_count(cfg: DataConfig, train_size: int) -> int:
    """How many training images ``cfg`` holds out for validation (``data.val_size``)."""
    if cfg.val_size >= 0:
        n = cfg.val_size
    else:
        n = min(VAL_CAP.get(cfg.name, train_size), train_size // 10)
    if n >= train_size:
        raise DataError(
            f"data.val_size = {cfg.val_size} holds out {n} of the {train_size} training "
            f"images of {cfg.name}; leave some to train on (-1: the default, 0: none)"
        )
    return n


def split_indices(train_size: int, val_size: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """(training indices, validation indices), both sorted: a seeded random choice.

    A pure function of its arguments, so every network of a run and every tool that
    rebuilds the data from a checkpoint's config holds out the same images.
    """
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(train_size, generator=g)
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# --------------------------------------------------------------------------- seeding


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap bijective mixer of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed of ``epoch`` for a run seeded ``seed`` (a pure function of both).

    Mixed rather than ``seed + epoch`` so that network k's epoch e + 1 does not replay
    network k + 1's epoch e when seeds are consecutive. 63 bits, always non-negative.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) >> 1


# --------------------------------------------------------------------------- device loader


def _crop_flip(batch: Tensor, dy: Tensor, dx: Tensor, flip: Tensor | None, pad: int) -> Tensor:
    """Per-sample random crop (zero padding ``pad``) and optional horizontal flip, batched.

    The batch is zero-padded once, then every output pixel (i, j) of sample b is gathered
    from padded position (dy[b] + i, dx[b] + j), or (dy[b] + i, dx[b] + W - 1 - j) when
    flip[b]: crop-then-flip as torchvision's RandomCrop + RandomHorizontalFlip do, in one
    ``gather`` over flat indices with no Python loop over samples. Works on any dtype; it is
    applied to uint8 so that the gather moves a quarter of the bytes.
    """
    b, c, h, w = batch.shape
    wp = w + 2 * pad
    padded = F.pad(batch, (pad, pad, pad, pad))
    rows = dy.view(b, 1) + torch.arange(h, device=batch.device)
    j = torch.arange(w, device=batch.device).expand(b, w)
    if flip is not None:
        j = torch.where(flip.view(b, 1), (w - 1) - j, j)
    cols = dx.view(b, 1) + j
    flat = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w)
    out = padded.view(b, c, -1).gather(2, flat.expand(b, c, h * w))
    return out.view(b, c, h, w)


class DeviceLoader:
    """Whole uint8 dataset on ``images.device``; batches built with tensor ops (see module).

    ``train=True``: shuffled per epoch, sharded over replicas, augmented with random crop
    (``pad`` > 0) and horizontal flip (``flip``); the last partial batch is kept.
    ``train=False``: sequential, unaugmented, the full set (every replica evaluates all of it).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        *,
        train: bool,
        pad: int = 0,
        flip: bool = False,
        seed: int = 0,
        replica: int = 0,
        replicas: int = 1,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}"
            )
        if labels.shape != images.shape[:1] or labels.device != images.device:
            raise ValueError("labels must be [N] on the images' device")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if replicas < 1 or not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} of {replicas} is invalid")
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values, got {len(mean)} and {len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.device = images.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.batch_size = batch_size
        self.train = train
        self.pad = pad if train else 0
        self.flip = flip and train
        self.seed = seed
        self.replica = replica
        self.replicas = replicas if train else 1
        self.channels_last = channels_last
        self.epoch = 0
        total = images.shape[0]
        self.num_samples = total // self.replicas if train else total
        self._generator = torch.Generator(device=self.device) if train else None

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next iteration (no effect on the test loader)."""
        self.epoch = int(epoch)

    def _plan(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """This replica's (order, dy, dx, flip) for the current epoch, all on the device.

        Everything is drawn for the full dataset before sharding, in a fixed sequence from
        a generator seeded only by (seed, epoch), so each replica's shard and each image's
        augmentation are the same whatever the batch size and however often it is called.
        """
        n_all = self.images.shape[0]
        if not self.train:
            return torch.arange(n_all, device=self.device), None, None, None
        g = self._generator
        assert g is not None
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        dev = self.device
        perm = torch.randperm(n_all, generator=g, device=dev)
        dy = dx = flip = None
        if self.pad > 0:
            dy = torch.randint(0, 2 * self.pad + 1, (n_all,), generator=g, device=dev)
            dx = torch.randint(0, 2 * self.pad + 1, (n_all,), generator=g, device=dev)
        if self.flip:
            flip = torch.randint(0, 2, (n_all,), generator=g, device=dev) == 1

        def shard(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t[self.replica :: self.replicas][: self.num_samples]

        order = shard(perm)
        assert order is not None
        return order, shard(dy), shard(dx), shard(flip)

    def order(self) -> Tensor:
        """Dataset indices this replica visits in the current epoch, in batch order."""
        return self._plan()[0]

    def _normalise(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        bs = self.batch_size
        if not self.train:
            for s in range(0, self.num_samples, bs):
                yield self._normalise(self.images[s : s + bs]), self.labels[s : s + bs]
            return
        order, dy, dx, flip = self._plan()
        for s in range(0, self.num_samples, bs):
            idx = order[s : s + bs]
            x = self.images.index_select(0, idx)
            f = None if flip is None else flip[s : s + bs]
            if dy is not None and dx is not None:
                x = _crop_flip(x, dy[s : s + bs], dx[s : s + bs], f, self.pad)
            elif f is not None:
                x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
            yield self._normalise(x), self.labels.index_select(0, idx)


# --------------------------------------------------------------------------- torch loader


class TorchLoader:
    """A ``torch.utils.data.DataLoader`` whose batches are moved to the device (ImageNet)."""

    def __init__(
        self,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        channels_last: bool = False,
        sampler: torch.utils.data.DistributedSampler | None = None,
    ) -> None:
        self.loader = loader
        self.device = device
        self.channels_last = channels_last
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the distributed sampler as a function of (seed, epoch)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, dtype=torch.int64, non_blocking=True)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images scaled to [0, 1].

    From a 256-bin histogram per channel: exact integer sums without an int64 or float copy
    of the dataset (Fashion-MNIST's 55,000 training images would need 350 MB for one).
    """
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * levels).sum() / n
        var = ((counts * levels * levels).sum() / n - mean * mean).clamp_min(0.0)
        means.append(float(mean) / 255.0)
        stds.append(max(float(var.sqrt()), 1e-6 * 255.0) / 255.0)
    return tuple(means), tuple(stds)
