"""Tests of distgraft.train.data: splits, determinism, sharding, augmentation, file formats.

Everything runs on CPU with tiny datasets written into tmp_path (CIFAR in torchvision's
python format, Fashion-MNIST as gzipped IDX files, an ImageFolder of PNGs), so the suite
needs no download and stays fast; one test reads the real Fashion-MNIST files where
Debian's package is installed.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from distgraft.config import DataConfig
from distgraft.train.data import (
    DataError,
    DataInfo,
    DeviceLoader,
    build_data,
    check_available,
    epoch_seed,
    split_indices,
    val_count,
)

CPU = torch.device("cpu")
DIGITS = DataConfig(name="digits", batch_size=128, test_batch_size=100, val_size=0)


def _device_data(
    cfg: DataConfig, seed: int = 0, **kw: int | bool
) -> tuple[DeviceLoader, DeviceLoader, DataInfo]:
    """build_data, narrowed to the device-resident loaders these tests inspect."""
    data = build_data(cfg, CPU, seed, **kw)  # type: ignore[arg-type]
    assert isinstance(data.train, DeviceLoader) and isinstance(data.test, DeviceLoader)
    return data.train, data.test, data.info


def _epoch(loader: DeviceLoader, epoch: int | None = None) -> list[tuple[Tensor, Tensor]]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def _as_uint8(x: Tensor, loader: DeviceLoader) -> Tensor:
    """Undo the normalisation exactly (the float error is far below half a grey level)."""
    return torch.round((x * loader.std + loader.mean) * 255).to(torch.uint8)


def _same_batches(a: list[tuple[Tensor, Tensor]], b: list[tuple[Tensor, Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_stratification() -> None:
    """The fixed split must be 1437/360 and keep every class's share (within one image)."""
    from sklearn.datasets import load_digits

    train, test, info = _device_data(DIGITS)
    assert (info.train_size, info.test_size) == (1437, 360)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    assert len(train.labels) == 1437 and len(test.labels) == 360
    total = Counter(load_digits().target.tolist())
    tr, te = Counter(train.labels.tolist()), Counter(test.labels.tolist())
    for c, n in total.items():
        assert abs(tr[c] - n * 1437 / 1797) <= 1
        assert abs(te[c] - n * 360 / 1797) <= 1
    assert int(train.images.max()) == 255 and train.images.dtype == torch.uint8


def test_digits_batches_shape_dtype_and_epoch_coverage() -> None:
    """Every training image appears exactly once per epoch; the last partial batch is kept."""
    train, test, _ = _device_data(DIGITS)
    batches = _epoch(train, 0)
    assert len(train) == len(batches) == math.ceil(1437 / 128)
    assert [len(y) for _, y in batches][-1] == 1437 - 11 * 128
    for x, y in batches:
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10
    assert torch.equal(torch.sort(train.order()).values, torch.arange(1437))
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == sorted(train.labels.tolist())
    tb = list(test)
    assert len(test) == len(tb) == 4 and tb[0][0].shape == (100, 1, 8, 8)


def test_digits_order_is_a_pure_function_of_seed_and_epoch() -> None:
    """Resume-exactness: a fresh loader at epoch e replays the batches of epoch e."""
    a, _, _ = _device_data(DIGITS, seed=3)
    b, _, _ = _device_data(DIGITS, seed=3)
    _epoch(a, 0)  # a has already run an epoch, b is "resumed" straight at epoch 2
    assert _same_batches(_epoch(a, 2), _epoch(b, 2))
    assert _same_batches(_epoch(a, 2), _epoch(a, 2))  # iterating twice: same batches
    order2 = a.order()
    a.set_epoch(3)
    assert not torch.equal(order2, a.order())  # another epoch, another order
    c, _, _ = _device_data(DIGITS, seed=4)
    c.set_epoch(3)
    assert not torch.equal(a.order(), c.order())  # another seed, another order
    fresh, _, _ = _device_data(DIGITS, seed=3)  # no set_epoch: epoch 0
    assert _same_batches(list(fresh), _epoch(b, 0))


def test_documented_permutation() -> None:
    """Without replicas the order is randperm(N) from a generator seeded epoch_seed(s, e)."""
    train, _, _ = _device_data(replace(DIGITS, augment=False), seed=7)
    train.set_epoch(5)
    g = torch.Generator().manual_seed(epoch_seed(7, 5))
    assert torch.equal(train.order(), torch.randperm(1437, generator=g))
    assert epoch_seed(7, 5) != epoch_seed(8, 4) and epoch_seed(-1, 0) >= 0


def test_replica_shards_are_disjoint_and_equal_length() -> None:
    r0, t0, _ = _device_data(DIGITS, seed=1, replica=0, replicas=2)
    r1, t1, _ = _device_data(DIGITS, seed=1, replica=1, replicas=2)
    for r in (r0, r1):
        r.set_epoch(4)
    o0, o1 = r0.order(), r1.order()
    assert len(o0) == len(o1) == 1437 // 2
    assert len(r0) == len(r1) == len(_epoch(r0)) == len(_epoch(r1)) == math.ceil(718 / 128)
    assert not set(o0.tolist()) & set(o1.tolist())
    assert len(set(o0.tolist()) | set(o1.tolist())) == 2 * (1437 // 2)
    assert len(t0.labels) == len(t1.labels) == 360  # every replica evaluates everything


# --------------------------------------------------------------------------- augmentation


def _crop_candidates(
    src: np.ndarray, pad: int, flips: tuple[bool, ...]
) -> dict[tuple[int, int, bool], np.ndarray]:
    """Reference: every (dy, dx, flip) crop of ``src`` [C, H, W], by plain slicing."""
    _, h, w = src.shape
    padded = np.pad(src, ((0, 0), (pad, pad), (pad, pad)))
    out: dict[tuple[int, int, bool], np.ndarray] = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for f in flips:
                out[(dy, dx, f)] = crop[:, :, ::-1] if f else crop
    return out


def test_augmented_samples_are_crops_and_flips_of_their_source() -> None:
    """Each augmented sample equals exactly one (offset, flip) transform of its image."""
    cfg = DataConfig(
        name="synthetic", synthetic_shape=(3, 16, 16), synthetic_train=96, batch_size=32,
        val_size=0,
    )
    train, _, _ = _device_data(cfg, seed=2)
    train.set_epoch(1)
    order = train.order()
    x = torch.cat([_as_uint8(xb, train) for xb, _ in train]).numpy()
    assert x.shape == (96, 3, 16, 16)
    used = []
    for i, src_index in enumerate(order.tolist()):
        cands = _crop_candidates(train.images[src_index].numpy(), 4, (False, True))
        hits = [k for k, v in cands.items() if np.array_equal(v, x[i])]
        assert len(hits) == 1, f"sample {i} is not a pad-4 crop/flip of image {src_index}"
        used.append(hits[0])
    assert {f for _, _, f in used} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in used}) > 10
    assert any(dy in (0, 8) or dx in (0, 8) for dy, dx, _ in used)  # zero border reached


def test_digits_augment_crops_by_one_and_never_flips() -> None:
    train, _, _ = _device_data(DIGITS, seed=0)
    x = torch.cat([_as_uint8(xb, train) for xb, _ in _epoch(train, 0)]).numpy()
    for i, src_index in enumerate(train.order().tolist()):
        cands = _crop_candidates(train.images[src_index].numpy(), 1, (False,))
        assert any(np.array_equal(v, x[i]) for v in cands.values())


def test_unaugmented_epoch_is_normalised_rows_in_permutation_order() -> None:
    train, _, _ = _device_data(replace(DIGITS, augment=False), seed=5)
    x = torch.cat([xb for xb, _ in _epoch(train, 0)])
    rows = train.images[train.order()].float() / 255
    expected = (rows - train.mean) / train.std
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


def test_flip_on_a_known_image() -> None:
    """Flip-only augmentation returns the image or its exact mirror, both over an epoch."""
    ramp = torch.arange(2 * 4 * 6, dtype=torch.uint8).view(1, 2, 4, 6)
    images = ramp.repeat(16, 1, 1, 1)
    loader = DeviceLoader(
        images, torch.zeros(16, dtype=torch.int64), (0.0, 0.0), (1.0, 1.0), 8,
        train=True, flip=True, seed=0,
    )  # fmt: skip
    out = torch.cat([_as_uint8(x, loader) for x, _ in loader])
    flipped = [torch.equal(o, ramp[0].flip(-1)) for o in out]
    plain = [torch.equal(o, ramp[0]) for o in out]
    assert len(out) == 16 and all(f or p for f, p in zip(flipped, plain, strict=True))
    assert any(flipped) and any(plain)


def test_crop_flip_and_channels_last_keep_shape() -> None:
    cfg = DataConfig(name="synthetic", synthetic_train=40, batch_size=16, val_size=0)
    train, test, _ = _device_data(cfg, channels_last=True)
    for x, _ in [*train, *test]:
        assert x.shape[1:] == (3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- CIFAR


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f)


def _write_cifar10(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Five train batches of 20 images and a test batch of 10, in torchvision's format."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, 20).tolist()
        _pickle(folder / f"data_batch_{i}", {b"batch_label": b"b", b"data": x, b"labels": y})
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    yt = list(range(10))
    _pickle(folder / "test_batch", {b"data": xt, b"labels": yt})
    _pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return np.concatenate(xs), ys, xt, yt


def test_cifar10_reads_torchvision_python_format(tmp_path: Path) -> None:
    xtr, ytr, xte, yte = _write_cifar10(tmp_path)
    cfg = DataConfig(
        name="cifar10", root=str(tmp_path), batch_size=16, test_batch_size=4, val_size=0
    )
    check_available(cfg)
    train, test, info = _device_data(cfg)
    assert info == DataInfo(10, 3, 32, 100, 10)
    assert train.labels.tolist() == ytr and test.labels.tolist() == yte
    # Pixel order: the row stores the R plane, then G, then B, each row-major 32 x 32.
    img, c, r, col = 37, 1, 5, 7
    value = int(xtr[img, c * 1024 + r * 32 + col])
    assert int(train.images[img, c, r, col]) == value
    assert torch.equal(train.images.view(100, -1), torch.from_numpy(xtr))
    x, y = next(iter(test))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (xte[2, 2 * 1024 + 31 * 32 + 0] / 255 - test.mean[0, 2, 0, 0]) / test.std[0, 2, 0, 0]
    assert float(x[2, 2, 31, 0]) == pytest.approx(float(expected), abs=1e-5)
    xb, yb = next(iter(train))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.int64 and len(train) == 7


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    x = rng.integers(0, 256, (30, 3072), dtype=np.uint8)
    fine = [*range(0, 100, 4), 99, 98, 97, 96, 0]
    coarse = [f // 5 for f in fine]
    _pickle(folder / "train", {b"data": x, b"fine_labels": fine, b"coarse_labels": coarse})
    _pickle(folder / "test", {b"data": x[:10], b"fine_labels": fine[:10], b"coarse_labels": []})
    _pickle(folder / "meta", {b"fine_label_names": [b"f"] * 100})
    cfg = DataConfig(name="cifar100", root=str(tmp_path), batch_size=8, val_size=0)
    train, test, info = _device_data(cfg)
    assert info == DataInfo(100, 3, 32, 30, 10)
    assert train.labels.tolist() == fine and test.labels.tolist() == fine[:10]
    assert all(xb.shape[1:] == (3, 32, 32) for xb, _ in train)


def test_missing_cifar_names_path_and_flag(tmp_path: Path) -> None:
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "nowhere"))
    for call in (lambda: check_available(cfg), lambda: build_data(cfg, CPU, 0)):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
        assert "data.download" in msg
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        check_available(replace(cfg, root=str(tmp_path)))


def test_unreadable_cifar_file_names_it(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)), CPU, 0)


def test_download_calls_torchvision_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With data.download the torchvision class fetches the files, then we read them."""
    import torchvision

    calls: list[tuple[str, bool]] = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            _write_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "dl"), download=True)
    check_available(cfg)  # missing but downloadable: fine
    info = build_data(cfg, CPU, 0).info
    assert calls == [(str(tmp_path / "dl"), True)] and info.train_size + info.val_size == 100
    build_data(cfg, CPU, 0)
    assert len(calls) == 1  # present now: no second download


# --------------------------------------------------------------------------- ImageNet


def _write_image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagenet_image_folder_batches(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    cfg = DataConfig(
        name="imagenet", root=str(tmp_path), workers=0, image_size=32, batch_size=4,
        test_batch_size=4, val_size=0,
    )  # fmt: skip
    check_available(cfg)
    data = build_data(cfg, CPU, seed=0, channels_last=True)
    train, test, info = data.train, data.test, data.info
    assert info == DataInfo(2, 3, 32, 6, 6)
    assert len(train) == 2 and len(test) == 2
    train.set_epoch(1)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    xt, yt = next(iter(test))
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == [0, 0, 0, 1]


def test_imagenet_missing_folder_is_named(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    for f in (tmp_path / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "val").iterdir()):
        d.rmdir()
    (tmp_path / "val").rmdir()
    cfg = DataConfig(name="imagenet", root=str(tmp_path), workers=0, download=True)
    for call in (lambda: check_available(cfg), lambda: build_data(cfg, CPU, 0)):
        with pytest.raises(DataError, match="not supported") as err:
            call()
        assert str(tmp_path / "val") in str(err.value)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_follows_config_and_ignores_network_seed() -> None:
    cfg = DataConfig(
        name="synthetic", synthetic_shape=(2, 12, 10), synthetic_train=50, synthetic_test=20,
        synthetic_classes=3, batch_size=16, test_batch_size=8, val_size=0,
    )  # fmt: skip
    train, test, info = _device_data(cfg, seed=0)
    other, _, _ = _device_data(cfg, seed=9)
    assert info == DataInfo(3, 2, 12, 50, 20)
    assert torch.equal(train.images, other.images) and torch.equal(train.labels, other.labels)
    assert set(train.labels.tolist()) == {0, 1, 2}
    batches = _epoch(train, 0)
    assert len(batches) == len(train) == 4
    assert all(x.shape[1:] == (2, 12, 10) for x, _ in batches)
    assert all(x.shape[1:] == (2, 12, 10) for x, _ in test)
    # Images under 16 px are not augmented: the batches are the rows in shuffled order.
    x = torch.cat([_as_uint8(xb, train) for xb, _ in batches])
    assert torch.equal(x, train.images[train.order()])


# --------------------------------------------------------------------------- validation split


def test_validation_split_is_held_out_seeded_and_default_a_tenth() -> None:
    """data.val_size images leave the training set; the choice depends on the run seed only,
    so every network of a run (whatever its own seed) holds out the same images."""
    cfg = replace(DIGITS, val_size=-1, augment=False)
    a = build_data(cfg, CPU, seed=0, split_seed=5)
    b = build_data(cfg, CPU, seed=1000, split_seed=5)  # network 1 of the same run
    c = build_data(cfg, CPU, seed=0, split_seed=6)  # another run
    assert a.info.val_size == 143 and a.info.train_size == 1437 - 143
    assert isinstance(a.val, DeviceLoader) and len(a.val.labels) == 143
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.val.images, c.val.images)
    # Disjoint and complete: the held-out and the training images are the full training split.
    full = build_data(DIGITS, CPU, seed=0).train.images
    train_idx, val_idx = split_indices(1437, 143, 5)
    assert torch.equal(a.val.images, full[val_idx]) and torch.equal(a.train.images, full[train_idx])
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    # Sequential and unaugmented, like the test loader: every pass gives the same batches.
    assert _same_batches(list(a.val), list(a.val))
    none = build_data(DIGITS, CPU, seed=0)
    assert none.val is None and none.info.val_size == 0


def test_validation_size_defaults_and_limits() -> None:
    assert val_count(DataConfig(name="cifar10"), 50_000) == 5000
    assert val_count(DataConfig(name="cifar10"), 100) == 10  # tiny files: a tenth
    assert val_count(DataConfig(name="imagenet"), 1_281_167) == 10_000
    assert val_count(DataConfig(name="fashion-mnist"), 60_000) == 5000
    assert val_count(DataConfig(name="digits", val_size=7), 1437) == 7
    with pytest.raises(DataError, match="data.val_size"):
        val_count(DataConfig(name="digits", val_size=1437), 1437)


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _idx(array: np.ndarray) -> bytes:
    """``array`` (uint8) as an IDX file: magic 0x0000 08 NDIM, big-endian dims, the data."""
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return bytes([0, 0, 0x08, array.ndim]) + dims + np.ascontiguousarray(array).tobytes()


def _idx_gz(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(_idx(array.astype(np.uint8)))


def _write_fashion(root: Path, n_train: int = 50, n_test: int = 12, seed: int = 0) -> dict:
    """The four Fashion-MNIST files in the real format, with small random contents."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        _idx_gz(root / f"{name}.gz", array)
    return arrays


def _fashion(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(name="fashion-mnist", root=str(tmp_path / "src"),
                      cache=str(tmp_path / "cache"), batch_size=16, **kw)  # fmt: skip


def test_fashion_mnist_whole_path(tmp_path: Path) -> None:
    """Gzipped IDX files -> cache in torchvision's layout -> device loaders: the held-out
    split, labels, normalisation by the training images' statistics, pad-2 crops + flips."""
    import torchvision

    src = _write_fashion(tmp_path / "src")
    cfg = _fashion(tmp_path)
    check_available(cfg)
    data = build_data(cfg, CPU, seed=3, split_seed=7)
    train, val, test, info = data.train, data.val, data.test, data.info
    assert isinstance(train, DeviceLoader) and isinstance(val, DeviceLoader)
    assert isinstance(test, DeviceLoader)
    assert info == DataInfo(10, 1, 28, 45, 12, (1, 28, 28), 5)  # a tenth held out
    images = torch.from_numpy(src["train-images-idx3-ubyte"]).unsqueeze(1)
    labels = torch.from_numpy(src["train-labels-idx1-ubyte"]).long()
    train_idx, val_idx = split_indices(50, 5, 7)
    assert torch.equal(train.images, images[train_idx]) and torch.equal(val.images, images[val_idx])
    assert torch.equal(train.labels, labels[train_idx]) and torch.equal(val.labels, labels[val_idx])
    assert test.labels.tolist() == src["t10k-labels-idx1-ubyte"].tolist()
    assert test.images.squeeze(1).numpy().tobytes() == src["t10k-images-idx3-ubyte"].tobytes()
    # Normalised by the mean / population std of the 45 images trained on, nothing else.
    part = src["train-images-idx3-ubyte"][train_idx.numpy()] / 255.0
    assert float(train.mean) == pytest.approx(part.mean(), abs=1e-7)  # float32
    assert float(train.std) == pytest.approx(part.std(), abs=1e-7)
    assert float(test.mean) == float(train.mean) and float(val.std) == float(train.std)
    x, y = next(iter(test))
    assert x.shape == (12, 1, 28, 28) and y.dtype == torch.int64
    torch.testing.assert_close(x, (test.images.float() / 255 - part.mean()) / part.std())
    # Every augmented sample is one pad-2 crop (+ flip) of its own image; the border is reached.
    train.set_epoch(1)
    order = train.order()
    out = torch.cat([_as_uint8(xb, train) for xb, _ in train]).numpy()
    assert out.shape == (45, 1, 28, 28)
    used = []
    for i, src_index in enumerate(order.tolist()):
        cands = _crop_candidates(train.images[src_index].numpy(), 2, (False, True))
        hits = [k for k, v in cands.items() if np.array_equal(v, out[i])]
        assert len(hits) == 1, f"sample {i} is not a pad-2 crop/flip of image {src_index}"
        used.append(hits[0])
    assert {f for _, _, f in used} == {False, True}
    assert {dy for dy, _, _ in used} <= set(range(5)) and any(4 in (dy, dx) for dy, dx, _ in used)
    # The cache is torchvision's FashionMNIST layout: its class reads the very same files.
    tv = torchvision.datasets.FashionMNIST(str(tmp_path / "cache"), train=False)
    assert torch.equal(tv.data.unsqueeze(1), test.images) and tv.targets.tolist() == y.tolist()


def _cache_task(rank: int, world: int, cfg: DataConfig, ready: str) -> tuple[list, str]:
    """Wait until every process is here, then use the empty cache at the same moment."""
    import hashlib
    import time

    from distgraft.train.data.fashion import FILES, cache_folder, prepare_cache

    Path(ready, str(rank)).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(ready).iterdir())) < world:
        assert time.monotonic() < deadline, "the other processes never arrived"
        time.sleep(0.001)
    written = prepare_cache(cfg)
    content = b"".join((cache_folder(cfg) / name).read_bytes() for name in FILES)
    return written, hashlib.sha256(content).hexdigest()


def test_fashion_cache_first_use_by_several_processes(tmp_path: Path) -> None:
    """Processes that start at once share one cache: each file is decompressed exactly
    once, every process finds complete files, and no temporary file is left behind."""
    import hashlib

    from dist_helpers import shared_pool, values

    from distgraft.train.data.fashion import FILES, cache_folder

    src = _write_fashion(tmp_path / "src", n_train=3000)  # a 2.4 MB file: a real race window
    cfg = _fashion(tmp_path)
    (tmp_path / "ready").mkdir()
    got = values(shared_pool(4).run(_cache_task, 3, cfg, str(tmp_path / "ready")))
    written = sorted(name for w, _ in got for name in w)
    assert written == sorted(FILES)  # one decompression per file among the three
    expected = hashlib.sha256(b"".join(_idx(src[name]) for name in FILES)).hexdigest()
    assert {d for _, d in got} == {expected}
    left = sorted(p.name for p in cache_folder(cfg).iterdir())
    assert left == sorted([*FILES, *(f"{n}.source" for n in FILES)])


def test_fashion_cache_follows_its_source(tmp_path: Path) -> None:
    """A fresh cache is used as it is; a changed or another original is decompressed again."""
    from distgraft.train.data.fashion import FILES, load_fashion, prepare_cache

    _write_fashion(tmp_path / "src", seed=0)
    cfg = _fashion(tmp_path)
    assert prepare_cache(cfg) == list(FILES)
    assert prepare_cache(cfg) == []
    new = _write_fashion(tmp_path / "src", seed=1)  # same sizes, other pixels
    for name in FILES:  # a distinct modification time even on a coarse-grained clock
        os.utime(tmp_path / "src" / f"{name}.gz", ns=(10**18, 10**18 + 1))
    xtr, _, xte, _ = load_fashion(cfg)
    assert xtr.squeeze(1).numpy().tobytes() == new["train-images-idx3-ubyte"].tobytes()
    assert xte.squeeze(1).numpy().tobytes() == new["t10k-images-idx3-ubyte"].tobytes()
    other = _write_fashion(tmp_path / "other", n_train=20, seed=2)
    xtr, ytr, _, _ = load_fashion(replace(cfg, root=str(tmp_path / "other")))
    assert len(xtr) == 20 and ytr.tolist() == other["train-labels-idx1-ubyte"].tolist()


def test_fashion_bad_files_are_named(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "src")
    cfg = _fashion(tmp_path)
    labels = tmp_path / "src" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot decompress") as err:
        build_data(cfg, CPU, 0)
    assert str(labels) in str(err.value)
    with gzip.open(labels, "wb") as f:
        f.write(b"neither an IDX file")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as err:
        build_data(cfg, CPU, 0)
    assert "IDX" in str(err.value)
    _idx_gz(labels, np.full(12, 10, dtype=np.uint8))  # class 10 does not exist
    with pytest.raises(DataError, match=r"outside \[0, 10\)"):
        build_data(cfg, CPU, 0)
    _idx_gz(labels, np.zeros(11, dtype=np.uint8))
    with pytest.raises(DataError, match="11 labels for 12 images"):
        build_data(cfg, CPU, 0)


def test_fashion_missing_files_and_unusable_cache(tmp_path: Path) -> None:
    cfg = _fashion(tmp_path)
    for call in (lambda: check_available(cfg), lambda: build_data(cfg, CPU, 0)):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert "apt-get install dataset-fashion-mnist" in msg and "make data" in msg
        assert str(tmp_path / "src") in msg and "data.root" in msg
    _write_fashion(tmp_path / "src")
    (tmp_path / "src" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing: train-labels-idx1-ubyte.gz"):
        check_available(cfg)
    _write_fashion(tmp_path / "src")
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="data.cache") as err:
        check_available(cfg)
    assert str(tmp_path / "cache") in str(err.value)
    assert not (tmp_path / "cache").is_dir()  # the check created nothing


def test_fashion_default_root_and_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from distgraft.train.data.fashion import cache_folder
    from distgraft.train.data.storage import root_of

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = DataConfig(name="fashion-mnist")
    assert root_of(cfg) == FASHION_DEBIAN
    assert cache_folder(cfg) == tmp_path / "xdg" / "distgraft" / "FashionMNIST" / "raw"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_folder(cfg) == Path.home() / ".cache" / "distgraft" / "FashionMNIST" / "raw"
    assert root_of(DataConfig(name="cifar10")) == Path("data")  # as before
    assert root_of(DataConfig(name="imagenet", root="/x")) == Path("/x")


def test_fashion_missing_files_exit_2_via_the_cli(tmp_path: Path) -> None:
    from cli_helpers import common, run

    cmd = [sys.executable, "-m", "distgraft", "train", *common(tmp_path, "fm", 1),
           "--data.name=fashion-mnist", f"--data.root={tmp_path / 'nothing'}",
           "--model.name=resnet20", f"--data.cache={tmp_path / 'cache'}"]  # fmt: skip
    proc = run(cmd, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert str(tmp_path / "nothing") in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "fm").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(
    not all((FASHION_DEBIAN / f"{n}.gz").is_file() for n in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    reason=f"Fashion-MNIST is not installed in {FASHION_DEBIAN} (make data, as root)",
)  # fmt: skip
def test_fashion_mnist_real_debian_files(tmp_path: Path) -> None:
    """The real files: 60,000 + 10,000 images of 28x28, 6,000 / 1,000 of each class."""
    from distgraft.train.data.fashion import load_fashion

    cfg = DataConfig(name="fashion-mnist", cache=str(tmp_path))
    xtr, ytr, xte, yte = load_fashion(cfg)
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert torch.bincount(ytr).tolist() == [6000] * 10
    assert torch.bincount(yte).tolist() == [1000] * 10
    assert int(xtr.max()) == 255 and int(xtr.min()) == 0
    assert val_count(cfg, 60000) == 5000
    # The published training-set statistics (mean 0.2860, std 0.3530).
    from distgraft.train.data.loaders import channel_stats

    (mean,), (std,) = channel_stats(xtr)
    assert mean == pytest.approx(0.2860, abs=1e-4) and std == pytest.approx(0.3530, abs=1e-4)
