"""``distgraft report RUN_DIR``: one PNG that tells how a run went.

Everything is read back from ``RUN_DIR/metrics.jsonl`` (the events the trainer wrote),
so a report can be made for a finished, crashed or still running run, on any machine,
without torch. Panels: (a) accuracy per network, (b) the grafting coefficients alpha as a
layers x epochs heatmap per network, (c) the layers' entropy over time, (d) invalid
filters over time. A baseline run (no graft events) gets panel (a) only.

matplotlib is an optional dependency (``pip install distgraft[plot]``); it is used through
``matplotlib.figure.Figure`` with the Agg canvas, so no display and no global pyplot state.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distgraft.telemetry.events import read_jsonl
from distgraft.telemetry.format import config_value, display_epoch, mean, start_config

__all__ = ["ReportError", "RunData", "load_run", "report", "register", "run"]

MAX_PANELS_PER_ROW = 6


class ReportError(Exception):
    """No usable metrics, or no matplotlib: exit code 2."""


@dataclass
class RunData:
    """The events of a run, keyed for plotting; a repeated epoch (resume) keeps the last."""

    epochs: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    grafts: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    start: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    skipped: int = 0

    @property
    def networks(self) -> list[int]:
        return sorted(set(self.epochs) | set(self.grafts))


def load_run(run_dir: str | Path) -> RunData:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found (is {run_dir} a run folder?)")
    try:
        events, skipped = read_jsonl(path)
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e}") from e
    data = RunData(skipped=skipped)
    for ev in events:
        kind = ev["event"]
        if kind == "epoch":
            data.epochs.setdefault(ev["network"], {})[ev["epoch"]] = ev
        elif kind == "graft":
            data.grafts.setdefault(ev["network"], {})[ev["epoch"]] = ev
        elif kind == "start":
            data.start = ev
        elif kind == "summary":
            data.summary = ev
    if not data.epochs:
        raise ReportError(f"{path} has no epoch events to plot")
    return data


def _color(net: int) -> str:
    return f"C{net % 10}"


def _plot_accuracy(ax: Any, data: RunData) -> None:
    for net in sorted(data.epochs):
        evs = [data.epochs[net][e] for e in sorted(data.epochs[net])]
        x = [display_epoch(ev["epoch"]) for ev in evs]
        train = [math.nan if ev["train_acc"] is None else ev["train_acc"] for ev in evs]
        ax.plot(x, train, "--", color=_color(net), alpha=0.6, lw=1)  # nan: a paused epoch
        tested = [ev for ev in evs if ev["test_acc"] is not None]
        ax.plot(
            [display_epoch(ev["epoch"]) for ev in tested],
            [ev["test_acc"] for ev in tested],
            "-",
            marker="o" if len(tested) <= 30 else None,
            ms=3,
            color=_color(net),
            label=f"net {net} test",
        )
    if data.summary is not None and data.summary["ensemble_acc"] is not None:
        acc = data.summary["ensemble_acc"]
        ax.axhline(acc, color="k", lw=0.8, ls=":", label=f"ensemble {acc:.2f}%")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, max(hi, acc + 1.0))  # axhline does not widen the limits itself
    ax.plot([], [], "--", color="gray", label="train (dashed)")
    ax.set_title("(a) accuracy per network")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    _integer_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(data.epochs) + 2), loc="lower right")


def _alpha_matrix(grafts: dict[int, dict[str, Any]]) -> tuple[list[str], list[int], list[list]]:
    """Layers (of the latest graft) x epochs, NaN where a layer was not grafted."""
    epochs = sorted(grafts)
    layers = grafts[epochs[-1]]["layers"]
    rows: list[list[float]] = [[math.nan] * len(epochs) for _ in layers]
    index = {name: i for i, name in enumerate(layers)}
    for j, e in enumerate(epochs):
        for name, a in zip(grafts[e]["layers"], grafts[e]["alpha"], strict=True):
            if name in index:
                rows[index[name]][j] = a
    return layers, epochs, rows


def _alpha_range(data: RunData) -> tuple[float, float]:
    """0.5 +- a/2 (the coefficient's possible range) if the config is known, else the data's."""
    a = config_value(start_config(data.start), "graft.a", (int, float))
    if a:
        return 0.5 - a / 2, 0.5 + a / 2
    values = [v for g in data.grafts.values() for ev in g.values() for v in ev["alpha"]]
    values = [v for v in values if math.isfinite(v)] or [0.5]
    lo, hi = min(values), max(values)
    return (lo - 0.01, hi + 0.01) if hi - lo < 1e-6 else (lo, hi)


def _plot_alpha(fig: Any, spec: Any, data: RunData) -> None:
    nets = sorted(data.grafts)
    cols = min(len(nets), MAX_PANELS_PER_ROW)
    grid = spec.subgridspec(math.ceil(len(nets) / cols), cols)
    vmin, vmax = _alpha_range(data)
    axes, image = [], None
    for i, net in enumerate(nets):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        layers, epochs, rows = _alpha_matrix(data.grafts[net])
        x0, x1 = display_epoch(epochs[0]) - 0.5, display_epoch(epochs[-1]) + 0.5
        image = ax.imshow(
            rows,
            aspect="auto",
            interpolation="nearest",
            cmap="coolwarm",
            vmin=vmin,
            vmax=vmax,
            extent=(x0, x1, len(layers) - 0.5, -0.5),
        )
        ax.set_title(f"(b) alpha, net {net}" if i == 0 else f"net {net}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        step = max(1, math.ceil(len(layers) / 12))  # at most ~12 labelled layers
        ticks = list(range(0, len(layers), step))
        ax.set_yticks(ticks)
        if i % cols == 0 and len(layers) <= 24:
            ax.set_yticklabels([layers[t] for t in ticks], fontsize=6)
        _integer_epochs(ax)
        axes.append(ax)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.9, pad=0.01)
        bar.set_label("alpha (own weight)", fontsize=8)


def _plot_entropy(ax: Any, data: RunData) -> None:
    nets = sorted(data.grafts)
    if len(nets) == 1:  # one network: the layers themselves are worth seeing
        grafts = data.grafts[nets[0]]
        layers, epochs, _ = _alpha_matrix(grafts)
        x = [display_epoch(e) for e in epochs]
        for i, name in enumerate(layers):
            ys = [_layer_value(grafts[e], name, "h_self") for e in epochs]
            color = _depth_color(i, len(layers))
            label = name if len(layers) <= 8 else ("first layer" if i == 0 else None)
            if len(layers) > 8 and i == len(layers) - 1:
                label = "last layer"
            ax.plot(x, ys, lw=0.8, color=color, label=label)
        ax.set_title(f"(c) layer entropy (before graft), net {nets[0]}")
        ax.legend(fontsize=7)
    else:
        for net in nets:
            epochs = sorted(data.grafts[net])
            x = [display_epoch(e) for e in epochs]
            ys = [mean(data.grafts[net][e]["h_self"]) for e in epochs]
            ax.plot(x, [math.nan if y is None else y for y in ys], color=_color(net))
            ax.plot([], [], color=_color(net), label=f"net {net}")
        ax.set_title("(c) mean layer entropy (before graft)")
        ax.legend(fontsize=7)
    criterion = next(iter(next(iter(data.grafts.values())).values()))["criterion"]
    ax.set_ylabel("entropy (nats)" if criterion == "entropy" else f"criterion ({criterion})")
    ax.set_xlabel("epoch")
    _integer_epochs(ax)
    ax.grid(alpha=0.3)


def _depth_color(i: int, n: int) -> Any:
    """Layers coloured from first (dark) to last (yellow), so depth trends stand out."""
    from matplotlib import colormaps

    return colormaps["viridis"](i / max(n - 1, 1))


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _layer_value(ev: dict[str, Any], name: str, key: str) -> float:
    try:
        return ev[key][ev["layers"].index(name)]
    except ValueError:
        return math.nan


def _has_invalid(data: RunData) -> bool:
    return any(
        ev["invalid_01"] is not None or ev["invalid_001"] is not None
        for g in data.grafts.values()
        for ev in g.values()
    )


def _plot_invalid(ax: Any, data: RunData) -> None:
    for net in sorted(data.grafts):
        epochs = sorted(data.grafts[net])
        x = [display_epoch(e) for e in epochs]
        for key, style in (("invalid_01", "-"), ("invalid_001", ":")):
            ys = [data.grafts[net][e][key] for e in epochs]
            ax.plot(x, [math.nan if y is None else y for y in ys], style, color=_color(net))
        ax.plot([], [], color=_color(net), label=f"net {net}")
    ax.plot([], [], "-", color="gray", label="L1 < 0.1")
    ax.plot([], [], ":", color="gray", label="L1 < 0.01")
    ax.set_title("(d) invalid filters after graft")
    ax.set_xlabel("epoch")
    ax.set_ylabel("filters")
    _integer_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def report(run_dir: str | Path, out: str | Path | None = None, data: RunData | None = None) -> Path:
    """Write the report PNG (default ``RUN_DIR/report.png``) and return its path.

    ``data`` is the already loaded run, if the caller has it.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError("plots need matplotlib: pip install distgraft[plot]") from e
    out_path = Path(out) if out is not None else Path(run_dir) / "report.png"
    check_out(out_path, "--out" if out is not None else "the report file")
    data = data if data is not None else load_run(run_dir)
    grafted = bool(data.grafts)
    heat_rows = math.ceil(len(data.grafts) / MAX_PANELS_PER_ROW) if grafted else 0
    heights = [3.2] + ([2.4 * heat_rows, 3.0] if grafted else [])
    fig = Figure(figsize=(12, sum(heights) + 1.0), layout="constrained")
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    _plot_accuracy(fig.add_subplot(grid[0]), data)
    if grafted:
        _plot_alpha(fig, grid[1], data)
        bottom = grid[2].subgridspec(1, 2 if _has_invalid(data) else 1)
        _plot_entropy(fig.add_subplot(bottom[0, 0]), data)
        if _has_invalid(data):
            _plot_invalid(fig.add_subplot(bottom[0, 1]), data)
    title = f"{Path(run_dir).resolve().name}: {len(data.networks)} network(s)"
    if not grafted:
        title += ", no graft events (baseline)"
    fig.suptitle(title)
    _save_atomic(fig, out_path)
    return out_path


def check_out(path: Path, name: str) -> None:
    """ReportError naming ``name`` unless a PNG can be written at ``path`` (nothing is made).

    Checked before the plot is drawn, so a bad --out costs nothing and writes nothing.
    """
    if path.is_dir():
        example = path / "report.png"
        raise ReportError(f"{name} {path} is a folder: give a file name, e.g. {example}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders that do not exist yet will be made there
    if not folder.is_dir():
        raise ReportError(f"{name} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReportError(f"{name} {path}: cannot write in {folder} (read-only or not yours)")


def _save_atomic(fig: Any, path: Path) -> None:
    """Write the PNG to a temp file beside ``path``, then rename it over ``path``.

    An existing report is replaced only by a complete new one, never by half of one.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=100, format="png")
        os.chmod(tmp, 0o644)  # mkstemp made it private; a report is meant to be read
        os.replace(tmp, path)
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    try:
        if args.out is not None:  # before reading the metrics: a bad --out costs nothing
            check_out(Path(args.out), "--out")
        data = load_run(args.run_dir)
        if data.skipped:
            n = data.skipped
            print(
                f"distgraft report: skipped {n} malformed line{'s' * (n != 1)} of metrics.jsonl",
                file=sys.stderr,
            )
        path = report(args.run_dir, args.out, data)
    except ReportError as e:
        print(f"distgraft report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def register(sub: Any) -> None:
    """Add the ``report`` command to the ``distgraft`` CLI."""
    p = sub.add_parser(
        "report",
        help="plot a run's metrics.jsonl into one PNG",
        description="Plot accuracy, grafting coefficients (alpha heatmaps), entropy and "
        "invalid filters of a run from RUN_DIR/metrics.jsonl into one PNG.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    p.add_argument(
        "--out", metavar="FILE.png", default=None, help="output file (default RUN_DIR/report.png)"
    )
    p.set_defaults(func=run)
