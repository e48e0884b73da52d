"""Human-readable lines of events, shared by the console sink, the monitor and the report."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import tomllib

__all__ = [
    "clean_text",
    "clean_event",
    "display_epoch",
    "mean",
    "format_event",
    "summary_lines",
    "start_config",
    "config_value",
]


# C0 and C1 controls (ESC, BEL, CR, the 8-bit CSI 0x9b, ...), DEL, Unicode line separators
# and the bidirectional overrides that can make a terminal show text other than it is.
_CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f"  # C0, DEL, C1
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidirectional marks and overrides
    "\u2028\u2029]"  # line and paragraph separators
)
_AS_SPACE = frozenset("\t\n\r\x0b\x0c\u2028\u2029")


def clean_text(text: str) -> str:
    """``text`` safe to print on a terminal: control characters removed, line breaks and
    tabs turned into spaces (so a message stays on its line and cannot forge others)."""
    return _CONTROLS.sub(lambda m: " " if m.group() in _AS_SPACE else "", text)


def clean_event(value: Any) -> Any:
    """A copy of an event with ``clean_text`` applied to every string in it."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_event(v) for v in value]
    if isinstance(value, dict):
        return {k: clean_event(v) for k, v in value.items()}
    return value


def display_epoch(epoch: int) -> int:
    """Events count epochs from 0; people count from 1."""
    return epoch + 1


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _count(n: int) -> str:
    """A filter count; negative means not counted (non-finite weights)."""
    return "-" if n < 0 else str(n)


def _terms(ev: dict[str, Any]) -> str:
    """" (ce 0.412 kd 1.107)" when the loss has several parts (distillation, mutual)."""
    terms = ev.get("train_terms")
    if not isinstance(terms, dict) or not terms:
        return ""
    parts = [f"{k} {v:.3f}" for k, v in terms.items() if isinstance(v, int | float)]
    return f" ({' '.join(parts)})" if parts else ""


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
            f"net {net} | epoch {ep_txt} | loss {_num(ev['train_loss'], '.3f')}{_terms(ev)} "
            f"acc {_num(ev['train_acc'], '.1f', '%')} | {_val(ev)}"
            f"test {_num(ev['test_acc'], '.1f', '%')} | "
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
            f"{_count(row['invalid_01']):>11}  {_count(row['invalid_001']):>12}"
        )
    lines.append(f"ensemble acc: {_num(ev['ensemble_acc'], '.2f', '%')}")
    lines += [line for row in sorted(ev["networks"], key=lambda r: r["network"])
              if (line := _divergence_line(row))]  # fmt: skip
    for row in sorted(ev["networks"], key=lambda r: r["network"]):
        weights, nonzero = row.get("weights"), row.get("nonzero_weights")
        if weights and nonzero is not None and nonzero < weights:
            lines.append(f"network {row['network']}: {nonzero:,} of {weights:,} conv/linear "
                         f"weights nonzero ({weights / max(nonzero, 1):.1f}x fewer)")  # fmt: skip
    return lines


def _divergence_line(row: dict[str, Any]) -> str | None:
    """What became of a network that diverged (None for one that never did)."""
    epoch = row.get("diverged_epoch")
    if not isinstance(epoch, int):
        return None
    text = f"network {row['network']} diverged (non-finite) after epoch {display_epoch(epoch)}"
    recovered = row.get("recovered_epoch")
    if isinstance(recovered, int):
        return f"{text}, recovered at the graft after epoch {display_epoch(recovered)}"
    if row.get("stopped"):
        return f"{text} and stopped training (no peer to recover from)"
    return f"{text} and did not recover"


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
