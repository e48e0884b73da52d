"""Trainer: one network (or one replica of it) per process; grafts at epoch boundaries.

fit() = resume, then per epoch: prune -> train_epoch -> health check -> graft -> evaluate
-> checkpoint -> end of epoch (every network's health gathered: also the barrier that keeps
networks within one epoch of each other, which is what lets a restart agree on a common
epoch, see ``checkpoint``) -> best.pt. Loss and accuracy are accumulated on the device and
read once per epoch (and at most once a second for progress), so the GPU is never stalled
by a per-step host sync.

The methods a run composes are parts with a fixed, short list of plain calls: the loss
(``objective``: cross-entropy and what joins it), the gradient edits (``force``: Force
Regularization), training-time compression (``compression``: masks, dropout rescaling,
the arch record) and the health check (``health``). The trainer knows no method's details.

A network whose state turns non-finite pauses (its lr schedule advances) and warns every
epoch; at its next external graft it takes its peer's finite layers with their optimizer
state reset. Without a peer (graft.source none, noise, internal) it stops training while
the others go on. Its non-finite checkpoints never rotate the last finite one away.
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
from torch import Tensor, nn

from distgraft.comm.dist import DistInfo, all_reduce_, gather_ints, replica_guard
from distgraft.config import Config, to_toml
from distgraft.graft.entropy import filter_tail, invalid_filters
from distgraft.graft.step import Grafter, GraftRecord
from distgraft.train import checkpoint
from distgraft.train.data import build_data
from distgraft.train.distill import Peers, Teachers
from distgraft.train.evaluate import evaluate
from distgraft.train.health import Health
from distgraft.train.objective import Objective
from distgraft.train.regularize import ForceRegularization
from distgraft.train.sparsity import TrainingCompression, weight_counts
from distgraft.train.warmstart import build_network

__all__ = ["Trainer", "Summary", "Record", "DivergedError", "network_lr", "lr_factor", "evaluate"]

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
    diverged_epoch: int | None = None
    """The epoch at whose end the network's state was last found non-finite (None: never)."""
    recovered_epoch: int | None = None
    """The epoch whose graft gave it finite weights again (None: not recovered)."""
    stopped: bool = False
    """Diverged with no peer to recover from: it stopped training."""


class DivergedError(RuntimeError):
    """Every network's state is non-finite: nothing is left to recover from."""


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
    diverged_epoch: int | None = None
    recovered_epoch: int | None = None
    stopped: bool = False

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
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in state["record"].items() if k in known})
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
        # Mutual learning compares the networks' outputs on the same images: one data order.
        data_seed = cfg.run.seed if cfg.distill.mutual else self.seed
        data = build_data(cfg.data, self.device, data_seed, info.replica, info.replicas,
                          cfg.model.channels_last, split_seed=cfg.run.seed)  # fmt: skip
        self.train_loader, self.val_loader, self.test_loader = data.train, data.val, data.test
        self.data_info = d = data.info
        model, arch, masks = build_network(cfg, info.network, d.num_classes, d.in_channels,
                                           d.input_shape)  # fmt: skip
        self.model = self._place(model)
        self.grafter = self._make_grafter()
        self.net = self._wrap(self.model)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.teachers = self._make_teachers()
        self.objective = Objective(cfg.distill, self.teachers, self._make_peers())
        self.force = ForceRegularization(cfg.regularize, self.model)
        self.compression = TrainingCompression(cfg.compress, self.model, arch, masks)
        self.health = Health(self.model, self.optimizer)
        self.bad = [False] * len(self.health.names)  # non-finite layers, as last checked
        # Progress, saved in checkpoints and restored by resume().
        self.start_epoch = 0
        self.epoch = 0  # the epoch in progress: what an error event reports
        self.record = Record()
        self._rotate = False  # may the next save move last.pt to prev.pt (finite, ours)?
        self._resumed = False
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # -- construction -------------------------------------------------------------------
    def _place(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.cfg.model.channels_last:
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

    def _make_teachers(self) -> Teachers | None:
        if not self.cfg.distill.teachers:
            return None
        return Teachers(self.cfg.distill, self.info.network, self.device,
                        self.cfg.model.channels_last)  # fmt: skip

    def _make_peers(self) -> Peers | None:
        if not self.cfg.distill.mutual or self.info.networks == 1:
            return None
        return Peers(self.info, self.cfg.dist.timeout_s)

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

    @property
    def arch(self) -> dict:
        """How to rebuild this network (base model and edits): what checkpoints record."""
        return self.compression.arch

    @property
    def can_recover(self) -> bool:
        """Only an external graft brings finite weights from a peer."""
        return self.grafter is not None and self.cfg.graft.source == "external"

    @property
    def diverged(self) -> bool:
        return any(self.bad)

    def _emit(self, event: str, epoch: int, **fields) -> None:
        if self.lead:
            self.telemetry.emit(event, self.info.network, epoch, **fields)

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> Summary:
        if not self._resumed:
            self.resume()
        self.bad = self.health.bad_layers()  # a resumed state may be non-finite already
        for epoch in range(self.start_epoch, self.cfg.run.epochs):
            self.epoch = epoch
            self.prune(epoch)
            paused = self.diverged or self.record.stopped
            stats = self.pause_epoch(epoch) if paused else self.train_epoch(epoch)
            self.check_health(epoch)
            record = self.graft(epoch)
            if record is not None:
                self._emit("graft", epoch, **record.event_fields())
            best = False
            if self._evaluate_now(epoch) and not self.diverged:
                stats.update(self.evaluate_splits(), filters=self.filter_tail())
                best = self.record.update(epoch, stats["val_acc"], stats["test_acc"])
            self._emit("epoch", epoch, **stats)
            self.save(epoch)
            self.end_epoch(epoch)
            if best:  # after every network saved the epoch: best.pt never holds a lost one
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
        self.objective.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        start = last_report = time.perf_counter()
        terms: dict[str, Tensor] = {}
        for step, (x, y) in enumerate(itertools.islice(self.train_loader, max_steps)):
            with replica_guard(self.info, epoch):  # a lost DDP replica: PeerError naming it
                loss, logits = self._train_step(x, y)
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            for name, value in self.objective.terms.items():
                terms[name] = terms.get(name, 0.0) + value * y.shape[0]
            seen += y.shape[0]
            if time.perf_counter() - last_report >= PROGRESS_EVERY_S:
                last_report = self._progress(epoch, step + 1, float(loss_sum) / seen, seen, start)
        elapsed = time.perf_counter() - start
        stats = self._stats(float(loss_sum) / max(seen, 1), 100.0 * float(correct) / max(seen, 1),
                            elapsed, seen * self.info.replicas / elapsed)  # fmt: skip
        if len(terms) > 1:  # the loss has several parts: say what each contributed
            stats["train_terms"] = {k: float(v) / max(seen, 1) for k, v in terms.items()}
        return stats

    def pause_epoch(self, epoch: int) -> dict:
        """A diverged network does not train; its lr schedule moves on with the others', and
        with mutual learning it still answers every step's exchange (with NaN: ignored)."""
        if self.objective.peers is None:
            for _ in range(len(self.train_loader)):
                self.scheduler.step()
            return self._stats(None, None, 0.0, 0.0)
        self.train_loader.set_epoch(epoch)
        self.objective.set_epoch(epoch)
        for _, y in self.train_loader:
            self.objective.skip(y.shape[0], self.data_info.num_classes, self.device)
            self.scheduler.step()
        return self._stats(None, None, 0.0, 0.0)

    def _stats(self, loss: float | None, acc: float | None, seconds: float, speed: float) -> dict:
        return {
            "train_loss": loss,
            "train_acc": acc,
            "val_loss": None,
            "val_acc": None,
            "test_loss": None,
            "test_acc": None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_s": seconds,
            "images_per_s": speed,
        }

    def _progress(self, epoch: int, step: int, loss: float, seen: int, start: float) -> float:
        """Emit a progress event (at most once a second: it reads the loss from the device)."""
        now = time.perf_counter()
        steps = len(self.train_loader)
        self._emit("progress", epoch, step=step, steps=steps, loss=loss,
                   images_per_s=seen / (now - start))  # fmt: skip
        return now

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step: the objective's loss, the gradient edits, the masks."""
        with self._autocast():
            logits = self.net(x)
            loss = self.objective(x, y, logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.force.after_backward()
        self.compression.after_backward(self.model)
        self.optimizer.step()
        self.compression.after_update(self.model)
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

    def _conv_weights(self) -> list[Tensor]:
        state = self.model.state_dict()
        return [state[layer.weight] for layer in self.health.plan.layers if layer.conv]

    def filter_tail(self) -> dict:
        """The low end of the conv filters' L1 norms (the paper's invalid filters and below)."""
        return filter_tail(self._conv_weights())

    # -- divergence ---------------------------------------------------------------------
    def check_health(self, epoch: int) -> None:
        """Find non-finite layers after the epoch's training; warn while there are any."""
        self.bad = self.health.bad_layers()
        if not self.diverged:
            return
        r = self.record
        if r.diverged_epoch is None or r.recovered_epoch is not None:
            r.diverged_epoch, r.recovered_epoch = epoch, None
        if not self.can_recover:
            r.stopped = True
        self._emit("warning", epoch, message=self._divergence_message(epoch))

    def _divergence_message(self, epoch: int) -> str:
        names = self.health.layer_names(self.bad)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        where = f"{len(names)} layer(s): {', '.join(names[:5])}{more}"
        head = f"network {self.info.network} is non-finite after epoch {epoch + 1} in {where}"
        if not self.can_recover:
            return (f"{head}; without a peer to recover from (graft.source = "
                    f"{self.cfg.graft.source!r}) it stops training, the others go on")  # fmt: skip
        every = self.cfg.graft.every
        graft_epoch = epoch + (-(epoch + 1)) % every  # the next epoch whose end grafts
        return (f"{head}; it pauses until the graft after epoch {graft_epoch + 1} takes "
                f"network {self.info.predecessor}'s finite layers")  # fmt: skip

    def graft(self, epoch: int) -> GraftRecord | None:
        """Graft after this epoch's training when the schedule says so; a diverged network
        takes its peer's finite layers, with their optimizer state reset."""
        if self.grafter is None or self.record.stopped or (epoch + 1) % self.cfg.graft.every:
            return None
        record = self.grafter.step(epoch, own_bad=self.bad if self.diverged else None)
        if record.taken:
            taken = set(record.taken)
            self.health.reset_optimizer([i in taken for i in range(len(self.bad))])
        self.compression.after_update(self.model)  # each network keeps its own mask
        if self.diverged:
            self.bad = self.health.bad_layers()
            if not self.diverged:
                self.record.recovered_epoch = epoch
                self._emit("warning", epoch, message=(
                    f"network {self.info.network} recovered at the graft after epoch "
                    f"{epoch + 1}: took network {self.info.predecessor}'s weights in "
                    f"{len(taken)} layer(s), their momentum reset"))  # fmt: skip
        return record

    def end_epoch(self, epoch: int) -> None:
        """Every network's health, gathered: also the barrier that ends the epoch."""
        if self.teachers is not None:
            self.teachers.verify()
        flags = gather_ints([int(self.diverged)], self.info, self.cfg.dist.timeout_s,
                            "the end-of-epoch barrier", epoch)  # fmt: skip
        self.diverged_networks = sorted({r // self.info.replicas for r, (f,) in enumerate(flags)
                                         if f})  # fmt: skip
        if len(self.diverged_networks) == self.info.networks:
            raise DivergedError(
                f"every network is non-finite after epoch {epoch + 1}: nothing is left to "
                "recover from. No finite checkpoint was overwritten (prev.pt keeps the last "
                "one), and the same command resumes from the newest epoch at which some "
                "network is finite: add a lower --optim.lr, or start afresh with "
                "--run.resume=false"
            )

    def prune(self, epoch: int) -> None:
        """A magnitude pruning round, when one starts at this epoch."""
        fields = self.compression.prune(epoch, self.model, self.optimizer)
        if fields is not None:
            self._emit("prune", epoch, **fields)

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
            "teachers": self.teachers.record() if self.teachers is not None else [],
            **self.compression.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # in place: the graft views survive
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._optim_from_config()
        self.record = Record.from_state(state)
        checkpoint.set_rng_state(state["rng"])
        self.start_epoch = self.epoch = state["epoch"] + 1
        self.compression.load_state_dict(state, self.model)

    def _optim_from_config(self) -> None:
        """The config's optimizer settings win over the checkpoint's (the same unless the
        user changed them on resume, e.g. a lower optim.lr after the networks diverged)."""
        o = self.cfg.optim
        lr = network_lr(self.cfg, self.info.network, self.info.networks)
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        factor = lr_factor(self.cfg, self.scheduler.last_epoch, len(self.train_loader))
        for group in self.optimizer.param_groups:
            group.update(initial_lr=lr, lr=lr * factor, momentum=o.momentum,
                         weight_decay=o.weight_decay, nesterov=o.nesterov)  # fmt: skip

    def save(self, epoch: int) -> None:
        """last.pt; the previous last.pt becomes prev.pt only if it was finite."""
        if self.lead:
            checkpoint.save_epoch(self.state_dict(epoch), self.net_dir, rotate=self._rotate)
        self._rotate = not self.diverged

    def save_best(self) -> None:
        """best.pt becomes a copy of last.pt (the epoch of best validation accuracy)."""
        if self.lead:
            checkpoint.copy_atomic(self.net_dir / "last.pt", self.net_dir / "best.pt")

    def save_sparse(self) -> None:
        """With masks: the final network as a sparse checkpoint (net{k}/sparse.pt)."""
        if self.lead:
            self.compression.save_sparse(self.net_dir / "sparse.pt", self.model,
                                         to_toml(self.cfg), self.record.final_acc)  # fmt: skip

    def resume(self) -> None:
        """Continue from the newest epoch every network can load, if any (see checkpoint)."""
        self._resumed = True
        if self.lead:
            checkpoint.remove_stale(self.net_dir)
        if not self.cfg.run.resume:
            return
        teachers = self.teachers.changed if self.teachers is not None else _no_teachers
        found = checkpoint.inspect(self.net_dir, self.model.state_dict(), self.arch["model"],
                                   teachers=teachers)  # fmt: skip
        every = checkpoint.gather_found(found, self.info, self.cfg.dist.timeout_s)
        common = checkpoint.choose_epoch(every)
        if common < 0:
            return
        path = found.epochs[common].path
        if found.problems:  # say what was passed over, and what the run goes on from
            self._emit("warning", common + 1, message=(
                f"{'; '.join(found.problems)}: resuming from {path} (epoch {common + 1})"))
        self.load_state_dict(checkpoint.load(path, self.device))
        self._rotate = path.name == "last.pt" and not any(self.health.bad_layers())
        if self.lead:
            checkpoint.reconcile_best(self.net_dir, path, common, self.record.best_epoch)

    # -- the end ------------------------------------------------------------------------
    def summary(self) -> Summary:
        try:
            inv01, inv001 = invalid_filters(self._conv_weights(), (0.1, 0.01))
        except ValueError:  # non-finite filters: not counted
            inv01 = inv001 = -1
        total, nonzero = weight_counts(self.model)
        r = self.record
        return Summary(self.info.network, r.best_acc, r.final_acc, inv01, inv001, total,
                       nonzero, r.max_test_acc, r.best_epoch, r.best_val_acc,
                       r.diverged_epoch, r.recovered_epoch, r.stopped)  # fmt: skip

    def ensemble_accuracy(self) -> float | None:
        """Accuracy of the mean of the finite networks' test logits (every rank calls this).

        A diverged network's logits are left out (they would poison the mean); None when
        no network is finite.
        """
        _, _, logits = self.evaluate()
        healthy = not self.diverged
        logits = torch.nan_to_num(logits) * float(healthy)
        count = torch.tensor([float(healthy)], device=logits.device)
        both = torch.cat([logits.flatten(), count])
        total = all_reduce_(both, self.cfg.dist.timeout_s, "the ensemble evaluation",
                            epoch=self.epoch)  # fmt: skip
        if float(total[-1]) == 0:
            return None
        y = torch.cat([y for _, y in self.test_loader])
        mean = total[:-1].view_as(logits)
        return float((mean.argmax(1) == y).float().mean() * 100)


def _no_teachers(recorded: object) -> list[str]:
    """Why a checkpoint's teachers differ from none (a run resumed without its teachers)."""
    if not recorded:
        return []
    paths = ", ".join(str(r.get("path")) for r in recorded if isinstance(r, dict))
    return [f"distill.teachers were {paths}, now none"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def write_run_files(cfg: Config, run_dir: Path) -> None:
    """The resolved config, so that a run folder says how it was made."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
