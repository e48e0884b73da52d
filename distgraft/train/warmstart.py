"""Training from an existing checkpoint: ``--model.init=PATH``.

The usual reason is fine-tuning a compressed network (Li et al. retrain a pruned network at
a constant lr of 0.001 for 40 epochs; Hu et al. retrain from the surviving weights, not from
scratch). The checkpoint's recorded architecture (base model, width, edits) is rebuilt
(``compress.archive``), so a pruned network stays pruned, and everything ``train`` has
still applies: N networks and their grafting, replicas, resume, telemetry. ``{network}``
in the path gives every network its own start (e.g. the networks of a grafting run, pruned
with one shared choice so that their filters stay aligned).

Resume wins over init: a run folder with checkpoints continues from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distgraft.compress.archive import (
    CheckpointError,
    arch_of,
    base_arch,
    build,
    read_checkpoint,
    weights_of,
    width_of,
)
from distgraft.compress.magnitude import Masks, masks_of_sparse
from distgraft.config import Config, ConfigError
from distgraft.models import build_model

__all__ = ["init_path", "check_init", "load_init", "build_network"]


def init_path(cfg: Config, network: int) -> Path:
    """The checkpoint network ``network`` starts from."""
    return Path(cfg.model.init.replace("{network}", str(network)))


def _arch(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        state = read_checkpoint(path)
        return state, arch_of(state)
    except CheckpointError as e:
        raise ConfigError(f"model.init: {e}") from e


def check_init(cfg: Config, networks: int) -> None:
    """Pre-flight: every network's start checkpoint is readable, of model.name and of
    model.width, and networks that graft each other were pruned alike
    (see ``_check_aligned``)."""
    if not cfg.model.init:
        return
    archs = []
    for k in range(networks):
        path = init_path(cfg, k)
        _, arch = _arch(path)
        if arch["model"] != cfg.model.name:
            raise ConfigError(
                f"model.init = {str(path)!r} holds a {arch['model']} network but model.name = "
                f"{cfg.model.name!r}; set --model.name={arch['model']}"
            )
        if width_of(arch) != cfg.model.width:
            raise ConfigError(
                f"model.init = {str(path)!r} holds a network of width {width_of(arch):g} but "
                f"model.width = {cfg.model.width:g}; set --model.width={width_of(arch):g}"
            )
        archs.append((path, arch))
    if cfg.graft.source == "external" and networks > 1 and not cfg.graft.allow_mixed_pruning:
        _check_aligned(archs)


def _structure(arch: dict[str, Any]) -> list:
    """The edits that decide which weights sit where (dropout rates do not)."""
    return [e for e in arch.get("edits", []) if e.get("op") != "dropout"]


def _check_aligned(archs: list[tuple[Path, dict[str, Any]]]) -> None:
    """Networks pruned with different kept channels can have the same shapes, and the ring
    would then mix filters that do not correspond: refuse (graft.allow_mixed_pruning)."""
    first_path, first = archs[0]
    for path, arch in archs[1:]:
        if _structure(arch) != _structure(first):
            raise ConfigError(
                f"model.init: {str(path)!r} and {str(first_path)!r} were pruned differently "
                "(other kept channels or layers), so grafting would mix filters that do not "
                "correspond; prune them together (distgraft compress prune A B --out "
                "'p{i}.pt') or set graft.allow_mixed_pruning = true"
            )


def load_init(cfg: Config, network: int, num_classes: int, in_channels: int) -> tuple[
    nn.Module, dict[str, Any], Masks | None
]:
    """(model with the checkpoint's weights, its arch record, its pruning masks or None).

    A magnitude-pruned checkpoint (sparse, or a training checkpoint with masks) passes its
    masks on: retraining holds the pruned weights at zero, as Han et al. retrain.
    """
    path = init_path(cfg, network)
    state, arch = _arch(path)
    if (arch["num_classes"], arch["in_channels"]) != (num_classes, in_channels):
        raise ConfigError(
            f"model.init = {str(path)!r} was trained for {arch['num_classes']} classes of "
            f"{arch['in_channels']}-channel images, but data.name = {cfg.data.name!r} has "
            f"{num_classes} classes of {in_channels}-channel images"
        )
    model = build(arch)
    model.load_state_dict(weights_of(state), strict=True)
    return model, arch, _masks(state)


def _masks(state: dict[str, Any]) -> Masks | None:
    if state.get("masks"):
        return Masks(state["masks"])
    if "sparse" in state:
        return masks_of_sparse(state["sparse"])
    return None


def build_network(
    cfg: Config, network: int, num_classes: int, in_channels: int, input_shape: tuple[int, ...]
) -> tuple[nn.Module, dict[str, Any], Masks | None]:
    """(model, its arch record, its pruning masks or None): from model.init when given,
    else a freshly initialised model.name (from the global RNG, seeded by the caller)."""
    if cfg.model.init:
        return load_init(cfg, network, num_classes, in_channels)
    m = cfg.model
    model = build_model(m.name, num_classes, in_channels, m.width)
    return model, base_arch(m.name, num_classes, in_channels, input_shape, m.width), None
