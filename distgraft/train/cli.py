"""``distgraft train``: validate the config, start the process group, run the Trainer.

Everything that can be wrong with the user's input (config keys and values, the world
size, missing datasets) is checked before any process group starts and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from distgraft.config import (
    SECTIONS,
    Config,
    ConfigError,
    agreement_view,
    check_run_dir,
    describe_disagreement,
    field_docs,
    load_config,
    to_toml,
    validate,
)

EXAMPLES = """\
examples:
  distgraft train --config configs/digits.toml
  torchrun --nproc-per-node 2 -m distgraft train --config configs/digits.toml
  torchrun --nproc-per-node 4 -m distgraft train --config configs/cifar10_resnet32.toml \\
      --graft.networks=2 --run.name=r32_2x2 --optim.difflr=true

every config key can be overridden with --section.key=value:
"""


def register(sub: argparse._SubParsersAction) -> None:
    docs = field_docs()
    defaults = _defaults()
    keys = "\n".join(
        f"  --{k}  (default {defaults[k]!r})\n      {docs.get(k, '')}" for k in defaults
    )
    p = sub.add_parser(
        "train",
        help="train N networks that graft each other (run under torchrun for N > 1)",
        description="Train with filter grafting. Under torchrun every process is one "
        "network (or one replica of it: graft.networks < world size); alone it trains one.",
        epilog=EXAMPLES + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML config (see configs/)")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as TOML and exit"
    )
    p.set_defaults(func=run, accepts_extra=True)


def _defaults() -> dict[str, object]:
    cfg = Config()
    out = {}
    for section in SECTIONS:
        for key, value in vars(getattr(cfg, section)).items():
            out[f"{section}.{key}"] = value
    return out


def _overrides(extra: list[str]) -> list[str]:
    """Accept --a.b=value and --a.b value."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or "." not in item:
            raise ConfigError(
                f"unexpected argument {item!r}; overrides look like --section.key=value"
            )
        if "=" not in item and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            item, i = f"{item}={extra[i + 1]}", i + 1
        out.append(item)
        i += 1
    return out


def resolve(args: argparse.Namespace) -> Config:
    """The validated config, or ConfigError/DataError/LayoutError (exit code 2)."""
    from distgraft.comm.dist import env_ranks
    from distgraft.telemetry.preflight import check_telemetry
    from distgraft.train.data import check_available
    from distgraft.train.sparsity import check_layers
    from distgraft.train.warmstart import check_init

    cfg = load_config(args.config, _overrides(args.extra))
    rank, world, _, _ = env_ranks()
    validate(cfg, world_size=world)
    networks = cfg.graft.networks or world
    check_available(cfg.data)
    check_init(cfg, networks)
    check_layers(cfg)
    check_distill(cfg, networks)
    if rank == 0:  # where the collector will listen
        check_telemetry(cfg.telemetry)
    return cfg


def check_distill(cfg: Config, networks: int) -> None:
    """Pre-flight of [distill]: teachers fit the data, mutual learning has peers."""
    from distgraft.train.data import data_shape
    from distgraft.train.distill import check_teachers

    if cfg.distill.mutual and networks < 2:
        raise ConfigError(
            f"distill.mutual = true needs at least 2 networks to learn from each other; this "
            f"run has {networks} (start more processes, or set graft.networks)"
        )
    if cfg.distill.teachers:
        check_teachers(cfg, networks, *data_shape(cfg.data))


def run(args: argparse.Namespace) -> int:
    """Exit code 2 for bad input (config, data, layout, settings that differ between ranks,
    checkpoints that cannot be resumed), printed once as one line; 1 when every network
    diverged; 0 otherwise."""
    from distgraft.comm.dist import Disagreement, LayoutError, distributed
    from distgraft.train.data import DataError

    try:
        cfg = resolve(args)
        if args.print_config:
            print(to_toml(cfg))
            return 0
        check_run_dir(cfg)
    except (ConfigError, DataError, LayoutError) as e:
        return _fail(e, _local_rank() == 0, 2)
    try:
        with distributed(cfg.graft.networks, cfg.dist.backend, cfg.dist.timeout_s,
                         agree=agreement_view(cfg),
                         replica_groups=cfg.distill.mutual) as info:  # fmt: skip
            return _train(cfg, info)
    except Disagreement as e:  # once per node: each node's log says what differs
        return _fail(describe_disagreement(e.views), _local_rank() == 0, 2)


def _train(cfg: Config, info) -> int:
    from distgraft.train.checkpoint import ResumeError
    from distgraft.train.run import open_telemetry, start, train
    from distgraft.train.trainer import DivergedError

    telemetry, collector = open_telemetry(cfg, info)
    trainer = None
    try:
        trainer = start(cfg, info, telemetry)
        train(cfg, info, telemetry, trainer)
        return 0
    except BaseException as e:
        epoch = _epoch_at(cfg, info.network, trainer)
        code = 2 if isinstance(e, ResumeError) else 1 if isinstance(e, DivergedError) else None
        said = {} if code is None else {"exit": code}  # printed once below, not per network
        telemetry.emit("error", info.network, epoch, message=_message(e, info.rank), **said)
        if code is not None:
            return _fail(e, info.is_main, code)
        raise
    finally:
        telemetry.close()
        if collector is not None:
            collector.stop()
            if (note := collector.stats_line()) is not None:
                print(f"distgraft train: {note}", file=sys.stderr, flush=True)


def _fail(error: BaseException | str, speak: bool, code: int) -> int:
    """Print the error as one line from one process only (every rank knows it), return code."""
    if speak:
        print(f"distgraft train: error: {error}", file=sys.stderr, flush=True)
    return code


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def _epoch_at(cfg: Config, network: int, trainer) -> int:
    """The epoch an error came in: the trainer's, or before the trainer is ready (while it
    resumes) the epoch the run is at: after the newest checkpoint of any network (a network
    that lost its own files still reports the run's epoch)."""
    if trainer is not None:
        return trainer.epoch
    if not cfg.run.resume:
        return 0
    from distgraft.train.checkpoint import newest_epoch

    folders = {cfg.run_dir / f"net{network}", *cfg.run_dir.glob("net[0-9]*")}
    return max(newest_epoch(f) for f in folders) + 1


def _message(e: BaseException, rank: int) -> str:
    """The error's text with "rank N:" once (distgraft's own errors already begin so)."""
    text = str(e) or type(e).__name__
    return text if text.startswith(f"rank {rank}:") else f"rank {rank}: {text}"
