"""Training throughput: distgraft's loop vs a reference-style loop, same model, same device.

Cases: ResNet-32 and MobileNetV2 on CIFAR-shaped synthetic data (50000 uint8 images,
3x32x32, 10 classes), and ResNet-20 at width 0.5 on the real Fashion-MNIST (60000 images,
1x28x28, from Debian's dataset-fashion-mnist; ``make data``). For each, in one process and
one run, images/s of:

a. ``distgraft``: a ``Trainer`` on the synthetic dataset (uint8 images held on the device,
   random crop pad 4 + flip as batched tensor ops, loss/accuracy accumulated on the device),
   timed over windows of ``train_epoch(epoch, max_steps=STEPS)``;
b. ``reference``: the authors' style (kuangliu pytorch-cifar): a Dataset over the same uint8
   images as HWC numpy arrays -> PIL -> torchvision RandomCrop(32, padding=4),
   RandomHorizontalFlip, ToTensor, Normalize; DataLoader(batch_size=128, shuffle=True,
   num_workers=2); fp32; the same architecture; SGD(lr 0.1, momentum 0.9, wd 5e-4);
   ``loss.item()`` and ``correct.item()`` every step. For Fashion-MNIST the Dataset is
   torchvision's ``FashionMNIST`` over the very files distgraft decompressed into its cache
   (a temporary ``data.cache``), with RandomCrop(28, padding=2) and the training set's
   mean/std, as distgraft augments and normalises it; both sides train on all 60000 images
   (``data.val_size = 0``).

Both sides get the same ``torch.set_num_threads`` (reported as ``torch_threads``); the
reference's 2 DataLoader workers (1 thread each, torch's default inside workers) compete
with them for the same cores, which is the point of the comparison. Warm-up steps are run
first and not timed (they include worker start-up and, with ``--compile``, compilation).
Timed windows alternate a/b/b/a/... so that drift in machine load hits both sides alike;
each side's number is the median over its windows, and ``ratio`` = median a / median b.

The machine may be shared: for every window the CPU time that other processes took (from
/proc/stat minus this process and its DataLoader workers, steal included) is recorded in
cores (``other_processes_cores``, the busier window of each a/b pair). Pairs where others
took at most ``--quiet-limit`` cores are "quiet"; ``quiet_ratio`` is computed over them and
the target is judged on it when there is at least one (else on ``ratio``).

For ResNet-32 the graft step is also timed: a world-size-1 ``Grafter`` (layer entropy,
all_gather, ring exchange with itself, which is a copy, the fused mix, invalid-filter
counts), i.e. everything but the wire transfer (``bench/scaling.py`` times real grafts
between processes); its share of an epoch is ``graft_s / (graft_s + 50000 / images_per_s)``.

Targets: CPU ratio >= 1.3; CUDA (H100) ResNet-32 ratio >= 5. One JSON line per
(case, device) on stdout; a requested device that is missing, or Fashion-MNIST's files,
gets a "measured": false line. Default CPU run: about 4 minutes on 2 cores (when the
machine is otherwise idle).

    .venv/bin/python bench/train_throughput.py
    .venv/bin/python bench/train_throughput.py --cases fashion-resnet20
    .venv/bin/python bench/train_throughput.py --device cuda --amp --compile --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from common import NullTelemetry, cpu_name, cpu_ticks  # bench/common.py
from torch import nn


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: a model at a width on a dataset."""

    model: str
    width: float
    dataset: str
    """synthetic (CIFAR-shaped) | fashion-mnist."""
    train_images: int
    cpu_steps: int
    """Window length (steps) on CPU when --steps is 0."""


# Window lengths: a step of ResNet-32 at batch 128 takes ~0.5 s on 2 idle CPU cores (eager
# fp32), MobileNetV2 ~2.2 s, ResNet-20 at width 0.5 on 28x28 ~0.06 s; a GPU needs long
# windows.
CASES = {
    "resnet32": Case("resnet32", 1.0, "synthetic", 50000, 8),
    "mobilenetv2": Case("mobilenetv2", 1.0, "synthetic", 50000, 4),
    "fashion-resnet20": Case("resnet20", 0.5, "fashion-mnist", 60000, 40),
}
BATCH = 128
REF_WORKERS = 2
CPU_TARGET = 1.3
CUDA_TARGETS = {"resnet32": 5.0}
DEFAULT_STEPS_CUDA = 100


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- reference side


class UInt8Images(torch.utils.data.Dataset):
    """HWC uint8 images -> PIL -> transform, as torchvision's CIFAR10 dataset does."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_dataset(case: Case, trainer, cache: str) -> torch.utils.data.Dataset:
    """The authors' Dataset over the images the trainer holds (the same files for
    Fashion-MNIST: torchvision's class reading distgraft's cache)."""
    from torchvision import datasets, transforms

    from distgraft.train.data import CIFAR10_MEAN, CIFAR10_STD

    if case.dataset == "fashion-mnist":
        loader = trainer.train_loader
        mean, std = loader.mean.flatten().tolist(), loader.std.flatten().tolist()
        transform = transforms.Compose(
            [
                transforms.RandomCrop(28, padding=2),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )
        return datasets.FashionMNIST(cache, train=True, transform=transform)
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    images = trainer.train_loader.images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    labels = trainer.train_loader.labels.cpu().numpy()
    return UInt8Images(images, labels, transform)


class ReferenceLoop:
    """The authors' training loop over a worker DataLoader; ``run(steps)`` trains ``steps``."""

    def __init__(
        self, case: Case, dataset: torch.utils.data.Dataset, in_channels: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        from distgraft.models import build_model

        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=BATCH, shuffle=True, num_workers=REF_WORKERS
        )
        self.device = device
        self.net = build_model(case.model, 10, in_channels, case.width).to(device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(
            self.net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
        )
        self.batches = iter(self.loader)
        self.train_loss, self.correct, self.total = 0.0, 0, 0

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch, as the authors' outer loop would start
            self.batches = iter(self.loader)
            return next(self.batches)

    def run(self, steps: int) -> int:
        self.net.train()
        seen = 0
        for _ in range(steps):
            inputs, targets = self._next()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            self.optimizer.zero_grad()
            outputs = self.net(inputs)
            loss = self.criterion(outputs, targets)
            loss.backward()
            self.optimizer.step()
            self.train_loss += loss.item()
            _, predicted = outputs.max(1)
            self.total += targets.size(0)
            self.correct += predicted.eq(targets).sum().item()
            seen += targets.size(0)
        return seen

    def close(self) -> None:
        del self.batches  # shuts the workers down


# --------------------------------------------------------------------------- distgraft side


def data_settings(case: Case, cache: str) -> dict:
    if case.dataset == "fashion-mnist":
        return {"name": "fashion-mnist", "cache": cache, "val_size": 0, "batch_size": BATCH}
    return {
        "name": "synthetic",
        "synthetic_train": case.train_images,
        "synthetic_test": BATCH,
        "synthetic_shape": (3, 32, 32),
        "synthetic_classes": 10,
        "batch_size": BATCH,
    }


def make_trainer(
    name: str, case: Case, device: torch.device, args: argparse.Namespace, run_dir: str
):
    from distgraft.comm.dist import init_distributed
    from distgraft.config import Config, with_overrides
    from distgraft.train.trainer import Trainer

    # World size 1 (no launcher env). One process group serves every device of the run, so
    # give it a backend for both (a plain "nccl" group could not graft CPU tensors).
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    info = dataclasses.replace(init_distributed(backend=backend), device=device)
    cfg = with_overrides(
        Config(),
        run={"dir": run_dir, "name": f"throughput-{name}", "resume": False},
        data=data_settings(case, os.path.join(run_dir, "cache")),
        model={"name": case.model, "width": case.width, "channels_last": args.channels_last,
               "compile": args.compile},  # fmt: skip
        optim={"amp": args.amp},
    )
    trainer = Trainer(cfg, info, NullTelemetry())
    return trainer, info


def graft_seconds(trainer, info, repeats: int) -> float:
    """Median seconds of a world-size-1 external graft of the trainer's model."""
    from distgraft.config import GraftConfig
    from distgraft.graft.step import Grafter

    grafter = Grafter(trainer.model, info, GraftConfig(), 60.0, trainer.seed)
    times = []
    for i in range(repeats + 1):
        sync(info.device)
        record = grafter.step(i)
        sync(info.device)
        if i:  # the first graft also checks signatures
            times.append(record.graft_s)
    return statistics.median(times)


# --------------------------------------------------------------------------- measurement


def input_ms(trainer, reference: ReferenceLoop, device: torch.device) -> tuple[float, float]:
    """Milliseconds to make one training batch: distgraft's device loader (index_select,
    crop + flip gather, normalise) vs one reference worker's work (128 x PIL transforms and
    collate, on 1 thread as inside a DataLoader worker). Measured outside the windows."""
    batches = 5
    loader = trainer.train_loader
    loader.set_epoch(10**6)
    it = iter(loader)
    next(it)  # the epoch plan (randperm, crop offsets, flips)
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    sync(device)
    ours = (time.perf_counter() - start) / batches
    dataset = reference.loader.dataset
    collate = torch.utils.data.default_collate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for b in range(batches):
            collate([dataset[i] for i in range(b * BATCH, (b + 1) * BATCH)])
        theirs = (time.perf_counter() - start) / batches
    finally:
        torch.set_num_threads(threads)
    return 1e3 * ours, 1e3 * theirs


def timed(fn: Callable[[], int], device: torch.device) -> tuple[float, float | None]:
    """(images/s, cores' worth of CPU used by other processes) of one window."""
    sync(device)
    before = cpu_ticks()
    start = time.perf_counter()
    images = fn()
    sync(device)
    wall = time.perf_counter() - start
    after = cpu_ticks()
    others = None
    if before is not None and after is not None:
        ticks = (after[0] - before[0]) - (after[1] - before[1])
        others = max(0.0, ticks / os.sysconf("SC_CLK_TCK") / wall)
    return images / wall, others


def summary(a: list[float], b: list[float], others: list[float | None], limit: float) -> dict:
    """Medians over all window pairs, and over the pairs that other processes left alone."""
    clean = [i for i, o in enumerate(others) if o is not None and o <= limit]
    med = statistics.median
    out = {
        "distgraft_images_per_s": round(med(a), 2),
        "reference_images_per_s": round(med(b), 2),
        "ratio": round(med(a) / med(b), 3),
        "ratio_paired_median": round(med(x / y for x, y in zip(a, b, strict=True)), 3),
        "quiet_pairs": len(clean),
        "quiet_limit_cores": limit,
    }
    if clean:
        qa, qb = med(a[i] for i in clean), med(b[i] for i in clean)
        out.update(
            quiet_distgraft_images_per_s=round(qa, 2),
            quiet_reference_images_per_s=round(qb, 2),
            quiet_ratio=round(qa / qb, 3),
        )
    return out


def measure(name: str, device: torch.device, args: argparse.Namespace) -> dict:
    case = CASES[name]
    model_name = case.model
    steps = args.steps or (DEFAULT_STEPS_CUDA if device.type == "cuda" else case.cpu_steps)
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="distgraft-throughput-") as run_dir:
        trainer, info = make_trainer(name, case, device, args, run_dir)
        dataset = reference_dataset(case, trainer, os.path.join(run_dir, "cache"))
        in_channels = trainer.data_info.in_channels
        reference = ReferenceLoop(case, dataset, in_channels, device)
        epoch = 0

        def ours() -> int:
            nonlocal epoch
            trainer.train_epoch(epoch, max_steps=steps)
            epoch += 1
            return steps * BATCH

        def theirs() -> int:
            return reference.run(steps)

        trainer.train_epoch(epoch, max_steps=args.warmup)
        epoch += 1
        reference.run(args.warmup)
        a_windows: list[float] = []
        b_windows: list[float] = []
        others: list[float | None] = []  # per pair: the busier of its two windows
        for w in range(args.windows):
            order = ((ours, a_windows), (theirs, b_windows))
            pair = []
            for fn, out in order if w % 2 == 0 else order[::-1]:
                ips, other = timed(fn, device)
                out.append(ips)
                pair.append(other)
            others.append(None if None in pair else max(p for p in pair if p is not None))
        reference.close()
        ours_ms, theirs_ms = input_ms(trainer, reference, device)
        graft_s = None
        if name == "resnet32":
            graft_s = graft_seconds(trainer, info, args.graft_repeats)
    stats = summary(a_windows, b_windows, others, args.quiet_limit)
    a = stats.get("quiet_distgraft_images_per_s", stats["distgraft_images_per_s"])
    ratio = stats.get("quiet_ratio", stats["ratio"])
    target = CPU_TARGET if device.type == "cpu" else CUDA_TARGETS.get(model_name)
    row = {
        "bench": "train_throughput",
        "case": name,
        "model": model_name,
        "width": case.width,
        "dataset": "fashion-mnist (Debian files)" if case.dataset == "fashion-mnist"
        else "synthetic 3x32x32 uint8",
        "device": device.type,
        "device_name": device_name(device),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_note": "same torch.set_num_threads for both loops; the reference's "
        f"{REF_WORKERS} DataLoader workers (1 thread each) share the same cores",
        "batch_size": BATCH,
        "train_images": case.train_images,
        "warmup_steps": args.warmup,
        "steps_per_window": steps,
        "windows": args.windows,
        "compile": args.compile,
        "amp": args.amp and device.type == "cuda",
        "channels_last": args.channels_last,
        **stats,
        "ratio_best_windows": round(max(a_windows) / max(b_windows), 3),
        "distgraft_input_ms_per_batch": round(ours_ms, 2),
        "reference_input_ms_per_batch_1_thread": round(theirs_ms, 2),
        "step_ms_distgraft": round(1e3 * BATCH / a, 1),
        "distgraft_windows": [round(x, 2) for x in a_windows],
        "reference_windows": [round(x, 2) for x in b_windows],
        "other_processes_cores": [None if o is None else round(o, 2) for o in others],
        "target_judged_on": "quiet_ratio" if "quiet_ratio" in stats else "ratio",
        "target_ratio": target,
        "target_met": None if target is None else ratio >= target,
        "loadavg_1min": [load_before, loadavg()],
    }
    if graft_s is not None:
        epoch_s = case.train_images / a
        row.update(
            graft_s=round(graft_s, 4),
            graft_kind="world size 1 (self exchange: no wire transfer)",
            epoch_s=round(epoch_s, 1),
            graft_share_of_epoch=round(graft_s / (graft_s + epoch_s), 6),
        )
    return row


def missing_data(case: Case) -> str | None:
    """Why the case cannot run here (Fashion-MNIST's files absent), or None."""
    if case.dataset != "fashion-mnist":
        return None
    from distgraft.config import DataConfig
    from distgraft.train.data import DataError, check_available

    try:
        check_available(DataConfig(name="fashion-mnist", cache=tempfile.gettempdir()))
    except DataError as e:
        return str(e)
    return None


def devices(requested: list[str]) -> list[tuple[str, torch.device | None]]:
    cuda = torch.cuda.is_available()
    out: list[tuple[str, torch.device | None]] = []
    for name in requested:
        if name == "auto":  # without CUDA, also say that the GPU row was not measured
            name = "cuda" if cuda else "cpu"
            if not cuda:
                out.append(("cpu", torch.device("cpu")))
                name = "cuda"
        if name == "cuda" and not cuda:
            out.append((name, None))
        elif all(n != name for n, _ in out):
            out.append((name, torch.device(name)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", "--models", nargs="+", default=list(CASES),
                        choices=list(CASES), help="rows to measure (default: all)")  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=0,
        help="steps per timed window (0: 8/4/40 on CPU, 100 CUDA)",
    )  # fmt: skip
    parser.add_argument("--windows", type=int, default=5, help="timed windows per loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument("--device", nargs="+", default=["auto"], choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="distgraft: torch.compile")
    parser.add_argument("--amp", action="store_true", help="distgraft: bf16 autocast (CUDA)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distgraft: channels_last model and batches (the config default)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: keep)")
    parser.add_argument("--graft-repeats", type=int, default=5)
    parser.add_argument(
        "--quiet-limit",
        type=float,
        default=0.2,
        help="a window pair is quiet when other processes used at most this many cores",
    )
    args = parser.parse_args(argv)
    if min(args.windows, args.warmup) < 1 or args.steps < 0:
        parser.error("--windows and --warmup must be >= 1, --steps >= 0")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    from distgraft.comm.dist import close

    try:
        for name, device in devices(args.device):
            if device is None:
                row = {
                    "bench": "train_throughput",
                    "device": name,
                    "measured": False,
                    "reason": "no CUDA device available",
                }
                print(json.dumps(row), flush=True)
                continue
            for case in args.cases:
                missing = missing_data(CASES[case])
                if missing:
                    row = {"bench": "train_throughput", "case": case, "device": name,
                           "measured": False, "reason": missing}  # fmt: skip
                    print(json.dumps(row), flush=True)
                    continue
                print(json.dumps(measure(case, device, args)), flush=True)
    finally:
        close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
