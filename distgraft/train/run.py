"""A run's lifecycle: its telemetry, the trainer resumed, the epochs, the gathered summary.

Used by ``distgraft train`` and by the commands that train as one of their steps
(``distgraft compress trim``), so that they need neither the ``train`` command module nor
the Trainer's internals.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING

from distgraft.config import Config, to_toml

if TYPE_CHECKING:  # torch is imported when a run starts, not for `distgraft --help`
    from distgraft.comm.dist import DistInfo
    from distgraft.telemetry import Collector, Telemetry
    from distgraft.train.trainer import Summary, Trainer

__all__ = ["start", "train", "open_telemetry"]


def start(cfg: Config, info: DistInfo, telemetry: Telemetry) -> Trainer:
    """The run folder, the trainer resumed from the last common epoch, the start event."""
    from distgraft.train.trainer import Trainer, write_run_files

    if info.is_main:
        write_run_files(cfg, cfg.run_dir)
    trainer = Trainer(cfg, info, telemetry)
    trainer.resume()
    if cfg.run.resume:
        _forget_retrained_epochs(cfg, info, trainer.start_epoch)
        telemetry.forget_epochs(trainer.start_epoch)  # TensorBoard drops the same points
    if info.is_main:
        telemetry.emit(
            "start",
            0,
            trainer.start_epoch,
            world_size=info.world_size,
            networks=info.networks,
            replicas=info.replicas,
            run_dir=str(cfg.run_dir),
            config=to_toml(cfg),
        )
    return trainer


def _forget_retrained_epochs(cfg: Config, info: DistInfo, start_epoch: int) -> None:
    """metrics.jsonl loses the lines of the epochs this run trains again, so that every
    epoch appears once however the last attempt died; the others wait meanwhile."""
    from distgraft.comm.dist import barrier
    from distgraft.telemetry import forget_epochs

    if info.is_main:
        dropped = forget_epochs(cfg.run_dir / "metrics.jsonl", start_epoch)
        if dropped:
            print(f"distgraft train: resuming after epoch {start_epoch}: dropped {dropped} "
                  f"metrics.jsonl lines of epochs trained again", flush=True)  # fmt: skip
    barrier(info, cfg.dist.timeout_s, "metrics.jsonl before the resume", start_epoch)


def train(
    cfg: Config, info: DistInfo, telemetry: Telemetry, trainer: Trainer | None = None
) -> list[Summary]:
    """Train every epoch left, then gather the summaries (and print the table on rank 0)."""
    if trainer is None:
        trainer = start(cfg, info, telemetry)
    trainer.fit()
    ensemble = trainer.ensemble_accuracy() if info.networks > 1 else None
    summaries = _gather(trainer.summary(), info, cfg.dist.timeout_s)
    if info.is_main:
        telemetry.emit(
            "summary",
            0,
            cfg.run.epochs - 1,
            networks=[dataclasses.asdict(s) for s in summaries],
            ensemble_acc=ensemble,
            run_dir=str(cfg.run_dir),
        )
        if cfg.telemetry.console:  # the console sink printed the table
            print(
                f"(invalid = conv filters with L1 norm below 0.1 / 0.01)\n"
                f"run folder: {cfg.run_dir}",
                flush=True,
            )
    return summaries


def _gather(summary: Summary, info: DistInfo, timeout_s: float) -> list[Summary]:
    from distgraft.comm.dist import gather_objects

    every = gather_objects(summary, info, timeout_s, "the end of training")
    return every[:: info.replicas]


def open_telemetry(cfg: Config, info: DistInfo) -> tuple[Telemetry, Collector | None]:
    """Sinks for this rank: console, JSONL and TensorBoard on network leads, zmq to rank
    0's collector.

    Every network lead appends its own lines to metrics.jsonl (one write per line, so
    lines never interleave) and writes its TensorBoard files from the same events; zmq is
    the live view and may drop, the file never does.
    With ``telemetry.auth = "curve"`` rank 0 makes the run's keys, keeps them in
    RUN_DIR/telemetry.key (mode 0600) and hands the client keys to the network leads
    through the process group, since nodes may not share the run folder.
    """
    from distgraft.telemetry import (
        Collector,
        ConsoleSink,
        JsonlSink,
        Telemetry,
        ZmqSink,
        new_keys,
        write_endpoints,
        write_keys,
    )
    from distgraft.telemetry.tensorboard import TensorBoardSink, tensorboard_wanted

    sinks: list = []
    collector = None
    t = cfg.telemetry
    tensorboard, warning = tensorboard_wanted(t.tensorboard)
    if warning and info.is_main:
        print(f"distgraft train: warning: {warning}", file=sys.stderr, flush=True)
    if info.is_network_lead:
        if t.console:
            sinks.append(ConsoleSink(sys.stdout, epochs=cfg.run.epochs))
        sinks.append(JsonlSink(cfg.run_dir / "metrics.jsonl"))
        if tensorboard:
            tb_dir = cfg.run_dir / "tb" / f"net{info.network}"
            sinks.append(TensorBoardSink(tb_dir, config=to_toml(cfg)))
    if t.zmq:
        shared = None
        if info.is_main:
            _warn_if_unreachable(t.address)
            keys = new_keys() if t.auth == "curve" else None
            collector = Collector(t.address, t.publish, t.max_message_bytes, keys=keys).start()
            if keys is not None:
                write_keys(cfg.run_dir, keys)
            write_endpoints(cfg.run_dir, collector.address, collector.publish_address)
            shared = (collector.address, keys.client() if keys is not None else None)
        address, client_keys = _share(shared, info)
        if info.is_network_lead:
            sinks.append(ZmqSink(address, keys=client_keys))
    return Telemetry(sinks), collector


def _nodes() -> int:
    """Number of nodes in this job, as torchrun or SLURM tell it (1 when unknown)."""
    for var in ("GROUP_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def _warn_if_unreachable(address: str) -> None:
    if _nodes() > 1 and ("//127.0.0.1:" in address or "//localhost:" in address):
        print(
            f"distgraft train: warning: telemetry.address = {address!r} is loopback but the job "
            "spans several nodes: the live view will miss the other nodes' networks "
            "(metrics.jsonl is complete). Use --telemetry.address='tcp://*:0' to fix.",
            file=sys.stderr,
        )


def _share(shared: tuple | None, info: DistInfo) -> tuple:
    """Rank 0's collector address and client keys for everyone; a wildcard host becomes
    rank 0's name."""
    from distgraft.comm.dist import broadcast_object

    address, keys = broadcast_object(shared, info)
    addr = str(address)
    for wildcard in ("0.0.0.0", "*"):
        if f"//{wildcard}:" in addr:
            addr = addr.replace(wildcard, os.environ.get("MASTER_ADDR", "127.0.0.1"), 1)
    return addr, keys
