"""``distgraft`` with a fault injected into one rank: the launcher of tests/test_faults.py.

torchrun runs this file in place of ``-m distgraft``; the arguments are distgraft's. The
fault comes from the environment, so every rank of the job gets the same command:

- ``FAULT_RANK``: the global rank that misbehaves (the others run distgraft unchanged);
- ``FAULT_AT``: ``train_epoch`` (at the start of an epoch's training) or ``agree_epoch``
  (when the resumed run agrees on its epoch, before the trainer is ready);
- ``FAULT_EPOCH``: the epoch of ``train_epoch`` (ignored for ``agree_epoch``);
- ``FAULT_ACTION``: ``stop`` (SIGSTOP itself, as ``kill -STOP`` would) or ``hang`` (sleep
  for ``FAULT_HANG_S`` seconds, default 300: a rank stuck in its own code);
- ``FAULT_MARK``: a file written with ``time.time()`` just before the fault.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's distgraft


def _fault() -> None:
    mark = os.environ.get("FAULT_MARK")
    if mark:
        Path(mark).write_text(repr(time.time()))
    if os.environ["FAULT_ACTION"] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        time.sleep(float(os.environ.get("FAULT_HANG_S", "300")))


def _install() -> None:
    if "FAULT_RANK" not in os.environ or os.environ.get("RANK") != os.environ["FAULT_RANK"]:
        return
    where = os.environ["FAULT_AT"]
    if where == "train_epoch":
        from distgraft.train.trainer import Trainer

        train_epoch, at = Trainer.train_epoch, int(os.environ["FAULT_EPOCH"])

        def faulty_train_epoch(self, epoch: int, max_steps: int | None = None) -> dict:
            if epoch == at:
                _fault()
            return train_epoch(self, epoch, max_steps)

        Trainer.train_epoch = faulty_train_epoch
    elif where == "agree_epoch":
        from distgraft.train import checkpoint

        gather_found = checkpoint.gather_found

        def faulty_gather_found(*args, **kwargs) -> list:
            _fault()
            return gather_found(*args, **kwargs)

        checkpoint.gather_found = faulty_gather_found
    else:
        raise SystemExit(f"fault_wrapper: unknown FAULT_AT {where!r}")


if __name__ == "__main__":
    _install()
    from distgraft.cli import main

    sys.exit(main())
