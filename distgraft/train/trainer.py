"""Trainer: one network (or one replica of it) per process; grafts at epoch boundaries.

fit() = resume, then per epoch: train_epoch -> graft -> evaluate -> checkpoint -> barrier.
The barrier keeps networks within one epoch of each other, which is what lets a restart
agree on a common epoch (see ``checkpoint``). Loss and accuracy are accumulated on the
device and read once per epoch (and at most once a second for progress), so the GPU is
never stalled by a per-step host sync.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgraft.comm.dist import DistInfo, all_reduce_, barrier
from distgraft.compress.archive import base_arch, save_compressed
from distgraft.compress.counting import WEIGHTED
from distgraft.compress.force import add_force_to_grads_, force_layers
from distgraft.compress.magnitude import apply_dropout_edit, encode_sparse
from distgraft.config import Config, to_toml
from distgraft.graft.entropy import invalid_filters
from distgraft.graft.math import graft_plan
from distgraft.graft.step import Grafter, GraftRecord
from distgraft.models import build_model
from distgraft.train import checkpoint
from distgraft.train.data import build_data
from distgraft.train.evaluate import evaluate
from distgraft.train.sparsity import SparseTraining
from distgraft.train.warmstart import load_init

__all__ = ["Trainer", "Summary", "Record", "network_lr", "lr_factor", "evaluate"]

PROGRESS_EVERY_S = 1.0


class Emitter:
    """What the trainer needs of telemetry: ``emit(event, network, epoch, **fields)``."""

    def emit(self, event: str, network: int, epoch: int, **fields) -> None: ...


def network_lr(cfg: Config, network: int, networks: int) -> float:
    """Starting lr of a network; difflr spreads them: lr * (1 + cos(pi * (N - i) / N)) / 2."""
    if not cfg.optim.difflr:
        return cfg.optim.lr
    i = network + 1  # the paper counts networks from 1
    return cfg.optim.lr * (1 + math.cos(math.pi * (networks - i) / networks)) / 2


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the starting lr after ``step`` optimizer steps."""
    if cfg.optim.schedule == "constant":
        return 1.0
    if cfg.optim.schedule == "cosine":
        total = cfg.run.epochs * steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    epoch = step // steps_per_epoch
    return cfg.optim.gamma ** sum(epoch >= m for m in cfg.milestones())


@dataclass
class Summary:
    """Per-network result, gathered on every rank at the end."""

    network: int
    best_acc: float
    """Test accuracy at the epoch of best validation accuracy (of best test accuracy
    without a validation split): the epoch best.pt holds."""
    final_acc: float
    invalid_01: int
    invalid_001: int
    weights: int = 0
    """Conv and linear weights (the connections magnitude pruning counts)."""
    nonzero_weights: int = 0
    max_test_acc: float = 0.0
    """The highest test accuracy of any epoch (the grafting paper's convention: optimistic)."""
    best_epoch: int = -1
    best_val_acc: float | None = None


@dataclass
class Record:
    """A network's accuracies so far: what "best" and "final" mean, kept in checkpoints.

    "best" is chosen on the validation split (never the test split); the maximum test
    accuracy over epochs is kept beside it under its own name.
    """

    best_acc: float = 0.0
    best_epoch: int = -1
    best_val_acc: float | None = None
    max_test_acc: float = 0.0
    final_acc: float = 0.0

    def update(self, epoch: int, val_acc: float | None, test_acc: float) -> bool:
        """Take an evaluated epoch into account; True when it is the new best."""
        self.final_acc = test_acc
        self.max_test_acc = max(self.max_test_acc, test_acc)
        score = test_acc if val_acc is None else val_acc
        previous = self.best_acc if val_acc is None else self.best_val_acc
        best = self.best_epoch < 0 or previous is None or score >= previous
        if best:
            self.best_acc, self.best_epoch, self.best_val_acc = test_acc, epoch, val_acc
        return best

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Record:
        """From a checkpoint; those of earlier versions kept only best_acc and last_acc."""
        if "record" in state:
            return cls(**state["record"])
        acc = float(state.get("best_acc", 0.0))
        return cls(best_acc=acc, max_test_acc=acc, final_acc=float(state.get("last_acc", 0.0)))


class Trainer:
    """Trains this process's network; ``fit()`` runs the whole schedule."""

    def __init__(self, cfg: Config, info: DistInfo, telemetry: Emitter) -> None:
        self.cfg, self.info, self.telemetry = cfg, info, telemetry
        self.device = info.device
        self.seed = cfg.run.seed + 1000 * info.network
        self.net_dir = cfg.run_dir / f"net{info.network}"
        _seed_everything(self.seed)
        data = build_data(cfg.data, self.device, self.seed, info.replica, info.replicas,
                          cfg.model.channels_last, split_seed=cfg.run.seed)  # fmt: skip
        self.train_loader, self.val_loader, self.test_loader = data.train, data.val, data.test
        self.data_info = data.info
        self.model = self._build_model()
        self.grafter = self._make_grafter()
        self.net = self._wrap(self.model)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.sparse = SparseTraining(cfg.compress, self.model, self._init_masks)
        self.force_weights = self._force_weights()
        # Progress, saved in checkpoints and restored by resume().
        self.start_epoch = 0
        self.epoch = 0  # the epoch in progress: what an error event reports
        self.record = Record()
        self._resumed = False
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # -- construction -------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        """The network, from model.init when given; ``self.arch`` records how to rebuild it."""
        cfg, d = self.cfg, self.data_info
        self._init_masks = None
        if cfg.model.init:
            model, self.arch, self._init_masks = load_init(
                cfg, self.info.network, d.num_classes, d.in_channels
            )
        else:
            m = cfg.model
            model = build_model(m.name, d.num_classes, d.in_channels, m.width)
            self.arch = base_arch(m.name, d.num_classes, d.in_channels, d.input_shape, m.width)
        model = model.to(self.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.SGD(
            self.model.parameters(),
            lr=network_lr(self.cfg, self.info.network, self.info.networks),
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
        )

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        cfg, steps = self.cfg, len(self.train_loader)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s, steps))

    def _make_grafter(self) -> Grafter | None:
        g = self.cfg.graft
        if g.source == "none" or (g.source == "external" and self.info.networks == 1):
            return None
        return Grafter(self.model, self.info, g, self.cfg.dist.timeout_s, self.seed)

    def _wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.info.replicas > 1:
            net = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                process_group=self.info.network_group,
            )
        if self.cfg.model.compile:
            net = torch.compile(net)
        return net

    @property
    def lead(self) -> bool:
        return self.info.is_network_lead

    def _emit(self, event: str, epoch: int, **fields) -> None:
        if self.lead:
            self.telemetry.emit(event, self.info.network, epoch, **fields)

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> Summary:
        if not self._resumed:
            self.resume()
        for epoch in range(self.start_epoch, self.cfg.run.epochs):
            self.epoch = epoch
            self.prune(epoch)
            stats = self.train_epoch(epoch)
            record = self.graft(epoch)
            if record is not None:
                self._emit("graft", epoch, **record.event_fields())
            best = False
            if self._evaluate_now(epoch):
                stats.update(self.evaluate_splits())
                best = self.record.update(epoch, stats["val_acc"], stats["test_acc"])
            self._emit("epoch", epoch, **stats)
            self.save(epoch)
            barrier(self.info, self.cfg.dist.timeout_s, f"the end of epoch {epoch}")
            if best:  # after the barrier: best.pt only ever holds an epoch every network saved
                self.save_best()
        self.save_sparse()
        return self.summary()

    def _evaluate_now(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.run.eval_every == 0 or epoch + 1 == self.cfg.run.epochs

    def train_epoch(self, epoch: int, max_steps: int | None = None) -> dict:
        """One pass over this replica's shard; statistics stay on the device until the end.

        ``max_steps`` stops early (benchmarks time step windows, not whole epochs).
        """
        self.net.train()
        self.train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        start = last_report = time.perf_counter()
        for step, (x, y) in enumerate(itertools.islice(self.train_loader, max_steps)):
            loss, logits = self._train_step(x, y)
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if time.perf_counter() - last_report >= PROGRESS_EVERY_S:
                last_report = self._progress(epoch, step + 1, float(loss_sum) / seen, seen, start)
        elapsed = time.perf_counter() - start
        return {
            "train_loss": float(loss_sum) / max(seen, 1),
            "train_acc": 100.0 * float(correct) / max(seen, 1),
            "val_loss": None,
            "val_acc": None,
            "test_loss": None,
            "test_acc": None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_s": elapsed,
            "images_per_s": seen * self.info.replicas / elapsed,
        }

    def _progress(self, epoch: int, step: int, loss: float, seen: int, start: float) -> float:
        """Emit a progress event (at most once a second: it reads the loss from the device)."""
        now = time.perf_counter()
        steps = len(self.train_loader)
        self._emit("progress", epoch, step=step, steps=steps, loss=loss,
                   images_per_s=seen / (now - start))  # fmt: skip
        return now

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._force()
        self.sparse.after_backward(self.model)
        self.optimizer.step()
        self.sparse.after_update(self.model)
        self.scheduler.step()
        return loss, logits

    def _autocast(self):
        enabled = self.cfg.optim.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def evaluate(self) -> tuple[float, float, Tensor]:
        """(loss, accuracy %, logits of the whole test set) of this network."""
        return evaluate(self.net, self.test_loader, self._autocast)

    def evaluate_splits(self) -> dict:
        """Loss and accuracy on the validation split (None without one) and the test split."""
        out = {"val_loss": None, "val_acc": None}
        if self.val_loader is not None:
            loss, acc, _ = evaluate(self.net, self.val_loader, self._autocast)
            out = {"val_loss": loss, "val_acc": acc}
        test_loss, test_acc, _ = self.evaluate()
        return {**out, "test_loss": test_loss, "test_acc": test_acc}

    def _force_weights(self) -> list[nn.Parameter]:
        r = self.cfg.regularize
        if r.force == "none":
            return []
        return [p for _, p in force_layers(self.model, r.force_layers)]

    def _force(self) -> None:
        """Force Regularization (Wen et al. 2017): the filters of each layer attract each
        other. Added after DDP averaged the gradients: every replica adds the same force."""
        if self.force_weights:
            r = self.cfg.regularize
            add_force_to_grads_(self.force_weights, r.force_decay, r.force)

    def graft(self, epoch: int) -> GraftRecord | None:
        """Graft after this epoch's training when the schedule says so."""
        if self.grafter is None or (epoch + 1) % self.cfg.graft.every:
            return None
        record = self.grafter.step(epoch)
        self.sparse.after_update(self.model)  # each network keeps its own mask
        return record

    def prune(self, epoch: int) -> None:
        """A magnitude pruning round, when one starts at this epoch."""
        fields = self.sparse.prune(epoch, self.model, self.optimizer)
        if fields is not None:
            self._set_dropout_edits(self.sparse.dropout_edits)
            self._emit("prune", epoch, **fields)

    def _set_dropout_edits(self, edits: list[dict]) -> None:
        """Record rescaled dropout rates in the arch (the latest per module)."""
        changed = {e["module"] for e in edits}
        kept = [e for e in self.arch["edits"]
                if not (e["op"] == "dropout" and e["module"] in changed)]  # fmt: skip
        self.arch = {**self.arch, "edits": kept + edits}

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict:
        return {
            "format": checkpoint.FORMAT_VERSION,
            "epoch": epoch,
            "network": self.info.network,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "record": self.record.state_dict(),
            "rng": checkpoint.rng_state(),
            "config": to_toml(self.cfg),
            "arch": self.arch,
            "masks": self.sparse.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # in place: the graft views survive
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.record = Record.from_state(state)
        checkpoint.set_rng_state(state["rng"])
        self.start_epoch = self.epoch = state["epoch"] + 1
        self.arch = state.get("arch", self.arch)
        for edit in self.arch["edits"]:
            if edit["op"] == "dropout":
                apply_dropout_edit(self.model, edit)
        self.sparse.load_state_dict(state.get("masks"), self.model)

    def save(self, epoch: int) -> None:
        if self.lead:
            checkpoint.save_epoch(self.state_dict(epoch), self.net_dir)

    def save_best(self) -> None:
        """best.pt becomes a copy of last.pt (the epoch of best validation accuracy)."""
        if self.lead:
            checkpoint.copy_atomic(self.net_dir / "last.pt", self.net_dir / "best.pt")

    def save_sparse(self) -> None:
        """With masks: the final network as a sparse checkpoint (net{k}/sparse.pt)."""
        if not self.lead or not self.sparse.active:
            return
        masks = self.sparse.masks
        report = {"compression": masks.compression(), "final_acc": self.record.final_acc,
                  "layers": {c.name: [c.kept, c.total] for c in masks.counts()}}  # fmt: skip
        save_compressed(self.net_dir / "sparse.pt", None, self.arch, kind="sparse",
                        config=to_toml(self.cfg), report=report, source=str(self.net_dir),
                        sparse=encode_sparse(self.model.state_dict(), masks))  # fmt: skip

    def resume(self) -> None:
        """Continue from the latest epoch that every network completed, if any."""
        self._resumed = True
        if not self.cfg.run.resume:
            return
        epochs = checkpoint.available_epochs(self.net_dir)
        local = max(epochs) if epochs else -1
        common = checkpoint.agree_epoch(local, self.device, self.cfg.dist.timeout_s)
        if common < 0:
            return
        self.load_state_dict(checkpoint.load_epoch(self.net_dir, common, self.device))

    # -- the end ------------------------------------------------------------------------
    def summary(self) -> Summary:
        plan = graft_plan(self.model)
        state = self.model.state_dict()
        convs = [state[layer.weight] for layer in plan.layers if layer.conv]
        inv01, inv001 = invalid_filters(convs, (0.1, 0.01))
        weights = [m.weight for m in self.model.modules() if isinstance(m, WEIGHTED)]
        total = sum(w.numel() for w in weights)
        nonzero = int(sum(int(w.count_nonzero()) for w in weights))
        r = self.record
        return Summary(self.info.network, r.best_acc, r.final_acc, inv01, inv001, total,
                       nonzero, r.max_test_acc, r.best_epoch, r.best_val_acc)  # fmt: skip

    def ensemble_accuracy(self) -> float | None:
        """Accuracy of the mean of all networks' test logits (every rank must call this)."""
        _, _, logits = self.evaluate()
        total = all_reduce_(logits.clone(), self.cfg.dist.timeout_s, "the ensemble evaluation")
        y = torch.cat([y for _, y in self.test_loader])
        return float((total.argmax(1) == y).float().mean() * 100)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_run_files(cfg: Config, run_dir: Path) -> None:
    """The resolved config, so that a run folder says how it was made."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
