"""Teachers and peers for the training loss: knowledge distillation and mutual learning.

``Teachers`` are frozen networks loaded once per process from any checkpoint distgraft
writes (``distgraft.compress.load_model``), on the training device, in eval mode, without
gradients; their parameters are verified unchanged at the end of every epoch, and each
checkpoint of the run records their paths and content digests, so that resuming with a
changed teacher stops with exit code 2 (a teacher is part of the run's definition).
Building them does not move the global RNG (``fork_rng``): a student starts from the same
weights with and without teachers.

``Peers`` exchange every step's logits between the networks of a run (Deep Mutual
Learning): one all_gather of [batch, classes] among replica j of every network, in
``comm``. A network that is paused (diverged) still takes part, sending NaN, and a peer's
non-finite logits are left out of the loss, so no finite network learns from a diverged one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distgraft.comm.dist import DistInfo
from distgraft.comm.mutual import exchange_logits
from distgraft.compress.archive import CheckpointError, arch_of, read_checkpoint
from distgraft.config import Config, ConfigError, DistillConfig
from distgraft.distill import mutual_loss

__all__ = [
    "Teachers",
    "Peers",
    "masked_mutual",
    "teacher_paths",
    "check_teachers",
    "file_digest",
]


def teacher_paths(cfg: DistillConfig, network: int) -> list[Path]:
    """The teachers of network ``network`` ('{network}' in a path becomes its index)."""
    return [Path(t.replace("{network}", str(network))) for t in cfg.teachers]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: what a checkpoint records of each teacher."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_teachers(cfg: Config, networks: int, num_classes: int,
                   input_shape: tuple[int, ...]) -> None:  # fmt: skip
    """Pre-flight: every teacher is a readable checkpoint of a network for this data."""
    for k in range(networks if "{network}" in "".join(cfg.distill.teachers) else 1):
        for path in teacher_paths(cfg.distill, k):
            try:
                arch = arch_of(read_checkpoint(path))
            except CheckpointError as e:
                raise ConfigError(f"distill.teachers: {e}") from None
            theirs = (arch["num_classes"], tuple(arch["input_shape"]))
            if theirs != (num_classes, tuple(input_shape)):
                raise ConfigError(
                    f"distill.teachers: {str(path)!r} is a {arch['model']} for "
                    f"{theirs[0]} classes of {list(theirs[1])} inputs, but data.name = "
                    f"{cfg.data.name!r} has {num_classes} classes of {list(input_shape)}"
                )


class Teachers:
    """Frozen teacher networks: ``teachers(x)`` is the list of their logits for batch x."""

    def __init__(self, cfg: DistillConfig, network: int, device: torch.device,
                 channels_last: bool) -> None:  # fmt: skip
        from distgraft.compress import load_model

        self.paths = teacher_paths(cfg, network)
        self.digests = [file_digest(p) for p in self.paths]
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the student's RNG stays untouched
            self.models = [self._frozen(load_model(p), device, channels_last)
                           for p in self.paths]  # fmt: skip
        self._sums = self._fingerprint()

    @staticmethod
    def _frozen(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def __bool__(self) -> bool:
        return bool(self.models)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> list[Tensor]:
        return [m(x) for m in self.models]

    def _fingerprint(self) -> Tensor:
        """Per-tensor sums and sums of squares in float64: any change of a weight shows."""
        ts = [t.detach().double() for m in self.models for t in m.state_dict().values()
              if t.is_floating_point()]  # fmt: skip
        if not ts:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack([torch.stack([t.sum(), (t * t).sum()]) for t in ts]).cpu()

    def verify(self) -> None:
        """Raise if any teacher's parameters or buffers changed (they must stay frozen)."""
        if not torch.equal(self._fingerprint(), self._sums):
            raise RuntimeError(
                "a teacher's weights changed during training; teachers must stay frozen "
                f"({', '.join(map(str, self.paths))})"
            )

    def record(self) -> list[dict[str, str]]:
        """What a checkpoint records of the teachers: paths and sha256 of their files."""
        pairs = zip(self.paths, self.digests, strict=True)
        return [{"path": str(p), "sha256": d} for p, d in pairs]

    def changed(self, recorded: Any) -> list[str]:
        """Why ``recorded`` (a checkpoint's teachers) differs from these, one line each."""
        if not isinstance(recorded, list):
            recorded = []
        if [r.get("path") for r in recorded] != [str(p) for p in self.paths]:
            was = ", ".join(str(r.get("path")) for r in recorded) or "none"
            now = ", ".join(map(str, self.paths)) or "none"
            return [f"distill.teachers were {was}, now {now}"]
        pairs = zip(recorded, self.digests, strict=True)
        return [f"teacher {r['path']} changed since the checkpoint was written (sha256 "
                f"{r['sha256'][:12]}..., now {d[:12]}...)"
                for r, d in pairs if r["sha256"] != d]  # fmt: skip


class Peers:
    """Every step's logits of the other networks on the same batch (mutual learning)."""

    def __init__(self, info: DistInfo, timeout_s: float) -> None:
        self.info, self.timeout_s = info, timeout_s
        self.epoch = 0

    def __call__(self, logits: Tensor) -> list[Tensor]:
        """The other networks' logits for this batch (sends ours; NaN when ``logits`` is)."""
        every = exchange_logits(logits.detach().float(), self.info, self.timeout_s, self.epoch)
        return [t for k, t in enumerate(every) if k != self.info.network]


def masked_mutual(logits: Tensor, peers: list[Tensor]) -> Tensor:
    """mutual_loss over the peers whose logits are all finite (no host sync: masked)."""
    terms, ok = [], []
    for peer in peers:
        finite = torch.isfinite(peer).all()
        terms.append(mutual_loss(logits, [torch.nan_to_num(peer, 0.0, 0.0, 0.0)]))
        ok.append(finite.to(logits.dtype if logits.is_floating_point() else torch.float32))
    weights = torch.stack(ok).float()
    return (torch.stack(terms) * weights).sum() / weights.sum().clamp_min(1.0)
