"""TensorBoard files of a network, written from the events that go to metrics.jsonl.

Each network's lead rank writes ``RUN_DIR/tb/net{k}/``, so ``tensorboard --logdir runs``
overlays the networks (and runs) as TensorBoard runs. The sink sees exactly the events the
lead appends to metrics.jsonl (not the live zmq stream, which may drop), so the curves are
the file's numbers.

The step of every point is the epoch as the console counts it: 1 for the first epoch
(``display_epoch``). A graft after epoch 3 and that epoch's losses share step 3; a pruning
round at the start of an epoch has that epoch's step. Trimming rounds (``distgraft
compress trim``) use the round number. Times are the events' own times.

A resumed run trains the epochs from E (0-based) again; ``forget_epochs(E)`` makes the
writer start with TensorBoard's purge marker at step E + 1, so readers drop the earlier
points of those epochs as metrics.jsonl drops their lines, and the curves carry on
without duplicates.

TensorBoard is optional (``pip install distgraft[tensorboard]``) and imported only when
the first point is written, so ``distgraft --help`` and runs without it stay fast.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from distgraft.telemetry.format import display_epoch, mean

__all__ = ["TensorBoardSink", "tensorboard_available", "tensorboard_wanted", "TAGS"]

# What each event kind becomes: tag -> field of the event (None values are skipped).
TAGS: dict[str, dict[str, str]] = {
    "epoch": {
        "train/loss": "train_loss",
        "train/acc": "train_acc",
        "test/loss": "test_loss",
        "test/acc": "test_acc",
        "val/loss": "val_loss",
        "val/acc": "val_acc",
        "lr": "lr",
        "images_per_s": "images_per_s",
    },
    "graft": {"graft/invalid_01": "invalid_01", "graft/invalid_001": "invalid_001"},
    "prune": {"prune/round": "round", "prune/compression": "compression"},
    "trim": {
        "trim/params": "params",
        "trim/flops": "flops",
        "trim/test_acc": "test_acc",
        "trim/acc_drop": "acc_drop",
    },
}


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (found without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_wanted(setting: str | bool) -> tuple[bool, str | None]:
    """(write TensorBoard files?, a warning for people) for ``telemetry.tensorboard``."""
    if setting is False:
        return False, None
    if tensorboard_available():
        return True, None
    if setting is True:
        return False, (
            "telemetry.tensorboard = true but the tensorboard package is not installed "
            "(pip install 'distgraft[tensorboard]'): no TensorBoard files are written, "
            "training goes on"
        )
    return False, None


class TensorBoardSink:
    """Scalars, alpha histograms and the config text of one network, for TensorBoard.

    ``config`` (the resolved TOML) is written as text at the first step this writer
    writes. Each point is flushed when written, so a crash loses nothing that
    metrics.jsonl has.
    """

    def __init__(self, log_dir: str | os.PathLike[str], config: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.config = config
        self._writer: Any = None
        self._purge_step: int | None = None

    def forget_epochs(self, start_epoch: int) -> None:
        """The run trains again from ``start_epoch`` (0-based): hide the old points there."""
        self._purge_step = display_epoch(start_epoch)
        if self._writer is not None:  # already writing: a new file carries the marker
            self._writer.close()
            self._writer = None

    def emit(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind not in TAGS:
            return
        step = event["round"] if kind == "trim" else display_epoch(event["epoch"])
        writer = self._open(step)
        when = event["time"]
        for tag, key in TAGS[kind].items():
            value = event.get(key)
            if value is not None:
                writer.add_scalar(tag, value, step, walltime=when)
        if kind == "graft":
            self._graft(writer, event, step, when)
        elif kind == "prune":
            writer.add_scalar("prune/kept_weights", sum(event["kept"]), step, walltime=when)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _graft(self, writer: Any, event: dict[str, Any], step: int, when: float) -> None:
        alpha = event["alpha"]
        if alpha:
            import numpy as np

            writer.add_scalar("graft/alpha_mean", mean(alpha), step, walltime=when)
            writer.add_histogram("graft/alpha", np.asarray(alpha, dtype=np.float64), step,
                                 walltime=when)  # fmt: skip
        writer.add_scalar("graft/exchange_ms", event["exchange_s"] * 1000, step, walltime=when)

    def _open(self, step: int) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
            self._purge_step = None
            if self.config:
                text = "\n".join("    " + line for line in self.config.splitlines())
                self._writer.add_text("config", text, step)  # indented: shown as code
        return self._writer
