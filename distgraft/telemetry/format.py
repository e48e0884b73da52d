"""Human-readable lines of events, shared by the console sink, the monitor and the report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tomllib

__all__ = [
    "display_epoch",
    "mean",
    "format_event",
    "summary_lines",
    "start_config",
    "config_value",
]


def display_epoch(epoch: int) -> int:
    """Events count epochs from 0; people count from 1."""
    return epoch + 1


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _val(ev: dict[str, Any]) -> str:
    """"val 97.2% " when the epoch was evaluated on a validation split, else nothing."""
    acc = ev.get("val_acc")
    return "" if acc is None else f"val {acc:.1f}% "


def format_event(ev: dict[str, Any], epochs: int | None = None) -> str | None:
    """One human line for an event, or None for events not worth a line (progress)."""
    kind, net = ev["event"], ev["network"]
    ep = display_epoch(ev["epoch"])
    ep_txt = f"{ep}/{epochs}" if epochs else str(ep)
    if kind == "epoch":
        return (
            f"net {net} | epoch {ep_txt} | loss {ev['train_loss']:.3f} "
            f"acc {ev['train_acc']:.1f}% | {_val(ev)}test {_num(ev['test_acc'], '.1f', '%')} | "
            f"lr {ev['lr']:.4g} | {ev['epoch_s']:.1f} s | {ev['images_per_s']:.0f} img/s"
        )
    if kind == "graft":
        alpha = ev["alpha"]
        lo_hi = f" ({min(alpha):.3f}..{max(alpha):.3f})" if alpha else ""
        line = (
            f"net {net} | graft {ep_txt} <- net {ev['peer']} | "
            f"alpha {_num(mean(alpha), '.3f')}{lo_hi} | {ev['graft_s'] * 1000:.0f} ms"
        )
        if ev.get("invalid_01") is not None:
            line += f" | invalid <0.1: {ev['invalid_01']} <0.01: {_num(ev['invalid_001'], 'd')}"
        return "\n".join([line] + [f"net {net} | warning: {w}" for w in ev["warnings"]])
    if kind == "prune":
        kept, total = sum(ev["kept"]), sum(ev["total"])
        drop = f" | dropout {', '.join(f'{p:.3f}' for p in ev['dropout'])}" if ev["dropout"] else ""
        return (
            f"net {net} | prune {ev['round']}/{ev['rounds']} at epoch {ep} | kept {kept:,} of "
            f"{total:,} weights ({ev['compression']:.1f}x fewer){drop}"
        )
    if kind == "trim":
        head = (f"trim round {ev['round']} | {', '.join(ev['layers']) or '-'} | "
                f"{ev['params']:,} params {ev['flops']:,} FLOPs")  # fmt: skip
        if ev.get("val_acc") is None:  # written before the validation split
            return f"{head} | test {ev['test_acc']:.2f}% (-{ev['acc_drop']:.2f})"
        return (f"{head} | val {ev['val_acc']:.2f}% (-{ev['acc_drop']:.2f}) | "
                f"test {ev['test_acc']:.2f}%")  # fmt: skip
    if kind in ("warning", "error"):
        return f"net {net} | {kind.upper()}: {ev['message']}"
    if kind == "start":
        return (
            f"run {ev['run_dir']}: {ev['networks']} networks x {ev['replicas']} replicas "
            f"(world size {ev['world_size']})"
        )
    if kind == "summary":
        return "\n".join(summary_lines(ev))
    return None


def summary_lines(ev: dict[str, Any]) -> list[str]:
    """The final table of a ``summary`` event."""
    lines = ["network   best acc  (epoch)  max test  final acc  invalid<0.1  invalid<0.01"]
    for row in sorted(ev["networks"], key=lambda r: r["network"]):
        epoch = row.get("best_epoch")
        epoch_txt = f"({display_epoch(epoch)})" if isinstance(epoch, int) and epoch >= 0 else ""
        lines.append(
            f"{row['network']:>7}   {row['best_acc']:7.2f}%  {epoch_txt:>7}  "
            f"{_num(row.get('max_test_acc'), '7.2f', '%'):>8}  {row['final_acc']:8.2f}%  "
            f"{row['invalid_01']:>11}  {row['invalid_001']:>12}"
        )
    lines.append(f"ensemble acc: {_num(ev['ensemble_acc'], '.2f', '%')}")
    for row in sorted(ev["networks"], key=lambda r: r["network"]):
        weights, nonzero = row.get("weights"), row.get("nonzero_weights")
        if weights and nonzero is not None and nonzero < weights:
            lines.append(f"network {row['network']}: {nonzero:,} of {weights:,} conv/linear "
                         f"weights nonzero ({weights / max(nonzero, 1):.1f}x fewer)")  # fmt: skip
    return lines


def start_config(ev: dict[str, Any] | None) -> dict[str, Any]:
    """The run's config parsed from a ``start`` event's TOML ({} when absent or unreadable).

    Displays use it for what the other events do not repeat: total epochs, graft.a.
    """
    if not ev or not isinstance(ev.get("config"), str):
        return {}
    try:
        return tomllib.loads(ev["config"])
    except (tomllib.TOMLDecodeError, ValueError):
        return {}


def config_value(config: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``config["section"]["name"]`` for key "section.name" if it has type ``kind``."""
    section, _, name = key.partition(".")
    value = config.get(section, {}).get(name) if isinstance(config.get(section), dict) else None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    return value if ok else None
