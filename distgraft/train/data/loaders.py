"""Datasets and loaders: small datasets live on the device, ImageNet streams from disk.

Digits, CIFAR-10/100 and the synthetic dataset are small enough to keep on the accelerator
as uint8 (CIFAR-10 is 150 MB), so they are moved there once and every epoch is built with
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
CIFAR-10, the usual training-set statistics for CIFAR-100 and ImageNet, and for digits and
the synthetic set the mean and population std of their own training split (computed once
at load; digits is mostly background, so 0.5/0.5 would leave its inputs far from zero mean).

ImageNet uses ``torchvision.datasets.ImageFolder`` with a ``DistributedSampler`` (order is a
pure function of ``(seed, epoch)`` too); its random crops come from the DataLoader workers'
RNGs, so they are not bit-identical across a resume.

CIFAR files are pickles, read with ``pickle.load`` exactly as torchvision does: only point
``data.root`` at files you trust.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distgraft.config import ConfigError, DataConfig

__all__ = [
    "DataError",
    "DataInfo",
    "Loader",
    "DeviceLoader",
    "TorchLoader",
    "check_available",
    "build_data",
    "epoch_seed",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

# The reference grafting code normalises with these (kuangliu's pytorch-cifar values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
# Per-channel statistics of the CIFAR-100 training set.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str


_CIFAR = {
    "cifar10": _CifarSpec(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
        "CIFAR10",
    ),
    "cifar100": _CifarSpec(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        CIFAR100_MEAN,
        CIFAR100_STD,
        "CIFAR100",
    ),
}


def _cifar_missing(spec: _CifarSpec, root: Path) -> list[str]:
    folder = root / spec.folder
    return [f for f in spec.train_files + spec.test_files if not (folder / f).is_file()]


def _cifar_missing_message(spec: _CifarSpec, cfg: DataConfig, missing: list[str]) -> str:
    folder = Path(cfg.root) / spec.folder
    return (
        f"{spec.title} not found under {str(folder)!r} (data.root = {cfg.root!r}); put the "
        f"torchvision python-format batches there or set data.download = true "
        f"(missing: {', '.join(missing)})"
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise downloads between the processes of one machine (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_cifar(spec: _CifarSpec, cfg: DataConfig) -> None:
    """Fetch the archive with torchvision, once per machine even if every rank asks."""
    import torchvision

    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{spec.folder}.download.lock"):
        if _cifar_missing(spec, root):
            cls = getattr(torchvision.datasets, spec.torchvision_class)
            try:
                cls(str(root), train=True, download=True)
            except (OSError, RuntimeError) as e:
                raise DataError(
                    f"downloading {spec.title} into {str(root)!r} failed: {e}; download it "
                    f"by hand into {str(root / spec.folder)!r} (data.root = {cfg.root!r}) "
                    "or check the network (data.download = true)"
                ) from e
    missing = _cifar_missing(spec, root)
    if missing:
        raise DataError(
            f"{spec.title} download into {str(root)!r} did not produce "
            f"{', '.join(missing)} under {str(root / spec.folder)!r} (data.download = true)"
        )


def _read_cifar_file(spec: _CifarSpec, path: Path, root: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [N, 3, 32, 32], int64 [N]); planes R, G, B, row-major."""
    hint = f"(data.root = {root!r}); replace it with the torchvision python-format file"
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[spec.label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"cannot read {spec.title} file {str(path)!r}: {e!r} {hint}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{spec.title} file {str(path)!r} holds data {data.dtype} {data.shape}, expected "
            f"uint8 [N, 3072] {hint}"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{spec.title} file {str(path)!r}: {len(labels)} labels for "
            f"{data.shape[0]} images {hint}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{spec.title} file {str(path)!r} has labels outside [0, {spec.num_classes}) {hint}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(spec: _CifarSpec, cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    missing = _cifar_missing(spec, Path(cfg.root))
    if missing:
        if not cfg.download:
            raise DataError(_cifar_missing_message(spec, cfg, missing))
        _download_cifar(spec, cfg)
    folder = Path(cfg.root) / spec.folder

    def read(files: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        parts = [_read_cifar_file(spec, folder / f, cfg.root) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    return (*read(spec.train_files), *read(spec.test_files))


# --------------------------------------------------------------------------- digits, synthetic


def _load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's bundled 8x8 digits, values 0..16 scaled to uint8, fixed stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError(
            "data.name = 'digits' needs scikit-learn: pip install 'distgraft[digits]'"
        ) from e
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return as_t(xtr), as_t(ytr), as_t(xte), as_t(yte)


def _load_synthetic(cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random images and labels from a generator seeded 0: the same for every network."""
    if cfg.synthetic_train < 1 or cfg.synthetic_test < 1:
        raise ConfigError(
            f"data.synthetic_train = {cfg.synthetic_train} and data.synthetic_test = "
            f"{cfg.synthetic_test} must both be >= 1"
        )
    g = torch.Generator().manual_seed(0)
    shape = tuple(cfg.synthetic_shape)
    k = cfg.synthetic_classes
    xtr = torch.randint(0, 256, (cfg.synthetic_train, *shape), generator=g, dtype=torch.uint8)
    ytr = torch.randint(0, k, (cfg.synthetic_train,), generator=g)
    xte = torch.randint(0, 256, (cfg.synthetic_test, *shape), generator=g, dtype=torch.uint8)
    yte = torch.randint(0, k, (cfg.synthetic_test,), generator=g)
    return xtr, ytr, xte, yte


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images scaled to [0, 1].

    From integer sums per channel (exact in int64), so no float copy of the dataset.
    """
    c = images.shape[1]
    x = images.transpose(0, 1).reshape(c, -1).to(torch.int64)
    n = x.shape[1]
    total, squares = x.sum(1).double(), (x * x).sum(1).double()
    mean = total / n
    var = (squares / n - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6 * 255.0)
    return tuple((mean / 255.0).tolist()), tuple((std / 255.0).tolist())


# --------------------------------------------------------------------------- ImageNet


def _check_imagenet(cfg: DataConfig) -> None:
    root = Path(cfg.root)
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"ImageNet folder {str(folder)!r} not found (data.root = {cfg.root!r}); put "
                "the class folders of the training images under root/train and of the "
                "validation images under root/val (data.download is not supported for "
                "imagenet)"
            )


def _build_imagenet(
    cfg: DataConfig,
    device: torch.device,
    seed: int,
    replica: int,
    replicas: int,
    channels_last: bool,
) -> tuple[Loader, Loader, DataInfo]:
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import datasets, transforms

    _check_imagenet(cfg)
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
        folder = Path(cfg.root) / split
        try:
            sets[split] = datasets.ImageFolder(str(folder), transform=tf)
        except (FileNotFoundError, OSError) as e:
            raise DataError(
                f"cannot read ImageNet folder {str(folder)!r} (data.root = {cfg.root!r}): {e}"
            ) from e
    train_set, val_set = sets["train"], sets["val"]
    if train_set.classes != val_set.classes:
        raise DataError(
            f"ImageNet class folders differ between {str(Path(cfg.root) / 'train')!r} "
            f"({len(train_set.classes)}) and {str(Path(cfg.root) / 'val')!r} "
            f"({len(val_set.classes)}); labels would not match (data.root = {cfg.root!r})"
        )
    common = {
        "num_workers": cfg.workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": cfg.workers > 0,
    }
    sampler = DistributedSampler(
        train_set, num_replicas=replicas, rank=replica, shuffle=True, seed=seed
    )
    train = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, **common)
    test = DataLoader(val_set, batch_size=cfg.test_batch_size, shuffle=False, **common)
    info = DataInfo(len(train_set.classes), 3, size, len(train_set), len(val_set))
    return (
        TorchLoader(train, device, channels_last, sampler),
        TorchLoader(test, device, channels_last),
        info,
    )


# --------------------------------------------------------------------------- public entry points


def check_available(cfg: DataConfig) -> None:
    """Cheap pre-flight check, run before any process group starts.

    Raises :class:`DataError` when the CIFAR batches are missing and ``data.download`` is
    false, when ImageNet's train/ or val/ folder is missing, or when scikit-learn is
    missing for digits. Reads no data.
    """
    if cfg.name in _CIFAR:
        spec = _CIFAR[cfg.name]
        missing = _cifar_missing(spec, Path(cfg.root))
        if missing and not cfg.download:
            raise DataError(_cifar_missing_message(spec, cfg, missing))
    elif cfg.name == "imagenet":
        _check_imagenet(cfg)
    elif cfg.name == "digits":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise DataError(
                "data.name = 'digits' needs scikit-learn: pip install 'distgraft[digits]'"
            )
    elif cfg.name != "synthetic":
        raise ConfigError(
            f"data.name = {cfg.name!r} is invalid: allowed values are digits, cifar10, "
            "cifar100, imagenet, synthetic"
        )


def build_data(
    cfg: DataConfig,
    device: torch.device,
    seed: int,
    replica: int = 0,
    replicas: int = 1,
    channels_last: bool = False,
) -> tuple[Loader, Loader, DataInfo]:
    """(train_loader, test_loader, info) for this replica of one network.

    ``seed`` fixes the training order and augmentation (see the module docstring);
    ``replica``/``replicas`` select this process's shard of the training set.
    """
    device = torch.device(device)
    if replicas < 1 or not 0 <= replica < replicas:
        raise ValueError(f"replica {replica} of {replicas} is invalid")
    check_available(cfg)
    if cfg.name == "imagenet":
        return _build_imagenet(cfg, device, seed, replica, replicas, channels_last)

    if cfg.name == "digits":
        xtr, ytr, xte, yte = _load_digits()
        num_classes, pad, flip = 10, 1, False
        mean, std = _channel_stats(xtr)
    elif cfg.name in _CIFAR:
        spec = _CIFAR[cfg.name]
        xtr, ytr, xte, yte = _load_cifar(spec, cfg)
        num_classes, pad, flip = spec.num_classes, 4, True
        mean, std = spec.mean, spec.std
    else:  # synthetic (check_available rejected anything else)
        xtr, ytr, xte, yte = _load_synthetic(cfg)
        big = min(xtr.shape[2:]) >= 16
        num_classes, pad, flip = cfg.synthetic_classes, 4 if big else 0, big
        mean, std = _channel_stats(xtr)
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
    test = loader(xte, yte, cfg.test_batch_size, train=False)
    # image_size is the height (all built-in datasets are square).
    info = DataInfo(num_classes, xtr.shape[1], xtr.shape[2], xtr.shape[0], xte.shape[0])
    return train, test, info
