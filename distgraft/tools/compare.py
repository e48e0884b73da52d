"""``distgraft compare --group LABEL RUN... --group LABEL RUN...``: did a method help, beyond noise?

Reads finished run folders (several seeds per group) and compares each group with the first
one, the reference. The statistical unit is the run: a run's accuracy is the mean over its
networks, because grafted networks of one run are strongly correlated (after the first graft
they are nearly the same network), and counting them separately would shrink the error bars
for nothing. Per group: final test accuracy, "best" (test accuracy at the epoch of best
validation accuracy), the maximum test accuracy over epochs (the grafting paper's convention,
optimistic) and the ensemble accuracy, as mean +- std over runs (ddof=1); per other group the
difference of means with a 95% confidence interval from Welch's t (unequal variances).

``--filters`` adds the valid/invalid filter table of the extended grafting paper (Meng et
al., arXiv 2004.12311, sec. 3.5): the invalid set (conv filters with L1 norm below a
threshold) is fixed in each reference network and looked at, at the same positions, in the
network of the same seed and index of every group. That pairing is sound because network k
of a run with ``run.seed = S`` is initialised from seed ``S + 1000 k`` whatever the method
(grafting is set up after the model is built; tests/test_compare.py checks it).

Only metrics.jsonl, config.toml and (with ``--filters``) ``net{k}/last.pt`` are read; torch,
scipy and matplotlib are imported when needed, so ``distgraft --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from distgraft.telemetry.events import read_jsonl
from distgraft.telemetry.format import display_epoch

__all__ = [
    "CompareError",
    "RunResult",
    "Group",
    "load_run",
    "mean_std",
    "welch_ci",
    "compare",
    "interface",
    "filter_table",
    "render",
    "plot",
    "register",
    "run",
]

METRICS = ("final", "best", "maxtest")
"""The metrics of the ``--json`` interface, in order."""
LABELS = {"final": "final", "best": "best", "maxtest": "max test", "ensemble": "ensemble"}
CONFIDENCE = 0.95
DEFAULT_THRESHOLDS = (0.1, 1.0)
TAIL_PERCENTILES = (1.0, 5.0)
# Settings that say where or how a run was executed, not what was trained: runs of one
# group may differ in them without a note.
INCIDENTAL = ("run.seed", "run.name", "run.dir", "run.resume", "data.root", "data.download",
              "telemetry.", "dist.")  # fmt: skip
# Settings that make runs of one group incomparable: refused.
MUST_MATCH = ("run.epochs", "run.eval_every", "optim.schedule", "optim.lr", "optim.milestones",
              "optim.gamma")  # fmt: skip


class CompareError(Exception):
    """Bad arguments or an unusable run folder: exit code 2, one line."""


@dataclass
class RunResult:
    """What one finished run contributes: one number per metric (the mean over its networks)."""

    path: Path
    seed: int
    networks: int
    final: float
    best: float
    maxtest: float
    ensemble: float | None
    has_val: bool
    """Whether "best" was chosen on a validation split (else it is the max test accuracy)."""
    curve: dict[int, float]
    """Epoch (0-based) -> test accuracy, mean over networks, for epochs every network tested."""
    config: dict[str, Any]
    """The resolved config, flattened to "section.key" -> value."""


@dataclass
class Group:
    label: str
    runs: list[RunResult] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        return [getattr(r, metric) for r in self.runs if getattr(r, metric) is not None]

    @property
    def networks(self) -> int:
        return sum(r.networks for r in self.runs)


# -- reading run folders --------------------------------------------------------------------


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{section}.{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def _read_config(path: Path, start: dict[str, Any] | None) -> dict[str, Any]:
    """config.toml, else the config TOML of the latest start event; {} when neither reads."""
    texts = []
    if (path / "config.toml").is_file():
        texts.append((path / "config.toml").read_text(encoding="utf-8", errors="replace"))
    if start is not None and isinstance(start.get("config"), str):
        texts.append(start["config"])
    for text in texts:
        try:
            return _flatten(tomllib.loads(text))
        except (tomllib.TOMLDecodeError, ValueError):
            continue
    return {}


def load_run(path: str | Path) -> RunResult:
    """A finished run's numbers; CompareError naming the folder when it is not usable.

    A resumed run may repeat epochs in metrics.jsonl: each (network, epoch) is taken once,
    the last line winning. The run must end with a summary written after its latest start
    (a run that was resumed and then died has a stale summary from before).
    """
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise CompareError(f"{path}: no such run folder")
    if not metrics.is_file():
        raise CompareError(f"{path} has no metrics.jsonl: not a run folder")
    try:
        events, _ = read_jsonl(metrics)
    except OSError as e:
        raise CompareError(f"cannot read {metrics}: {e}") from e
    start = summary = None
    tests: dict[int, dict[int, float]] = {}
    for ev in events:
        if ev["event"] == "start":
            start, summary = ev, None  # a later start: the run went on after that summary
        elif ev["event"] == "summary":
            summary = ev
        elif ev["event"] == "epoch" and ev["test_acc"] is not None:
            tests.setdefault(ev["network"], {})[ev["epoch"]] = float(ev["test_acc"])
        elif ev["event"] == "epoch":
            tests.setdefault(ev["network"], {}).pop(ev["epoch"], None)
    if summary is None or not summary["networks"]:
        raise CompareError(
            f"{path} has no summary in metrics.jsonl: the run did not finish (resume it with "
            "the same command, or leave it out)"
        )
    rows = sorted(summary["networks"], key=lambda r: r["network"])
    config = _read_config(path, start)
    return RunResult(
        path=path,
        seed=int(config.get("run.seed", 0)),
        networks=len(rows),
        final=_mean([r["final_acc"] for r in rows]),
        best=_mean([r["best_acc"] for r in rows]),
        maxtest=_mean([_max_test(r, tests.get(r["network"], {})) for r in rows]),
        ensemble=summary["ensemble_acc"] if len(rows) > 1 else None,
        has_val=any(r.get("best_val_acc") is not None for r in rows),
        curve=_curve(tests, [r["network"] for r in rows]),
        config=config,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _max_test(row: dict[str, Any], tests: dict[int, float]) -> float:
    """The summary's max test accuracy; summaries of earlier versions lack it: the events'."""
    value = row.get("max_test_acc")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return max(tests.values()) if tests else float(row["best_acc"])


def _curve(tests: dict[int, dict[int, float]], networks: list[int]) -> dict[int, float]:
    common = set.intersection(*(set(tests.get(n, {})) for n in networks))
    return {e: _mean([tests[n][e] for n in networks]) for e in sorted(common)}


def _differences(runs: list[RunResult], keys: tuple[str, ...] | None = None) -> dict[str, list]:
    """Settings whose values differ between runs: key -> the distinct values, in run order."""
    all_keys = sorted(set().union(*(r.config for r in runs)))
    out: dict[str, list] = {}
    for key in all_keys if keys is None else keys:
        values = []
        for r in runs:
            v = r.config.get(key)
            if v not in values:
                values.append(v)
        if len(values) > 1:
            out[key] = values
    return out


def _check_group(group: Group) -> list[str]:
    """Refuse runs of one group that cannot be pooled; notes on other differences."""
    first = group.runs[0]
    for r in group.runs[1:]:
        if r.networks != first.networks:
            raise CompareError(
                f"group {group.label!r}: {r.path} has {_networks(r.networks)}, {first.path} "
                f"{_networks(first.networks)}; the runs of a group must be seeds of one setup"
            )
    bad = _differences(group.runs, MUST_MATCH)
    if bad:
        key, values = next(iter(bad.items()))
        raise CompareError(
            f"group {group.label!r}: runs differ in {key} ({', '.join(map(repr, values))}); "
            "the runs of a group must share length and lr schedule (only the seed should vary)"
        )
    return [f"group {group.label!r}: runs differ in {k} ({', '.join(map(repr, v))})"
            for k, v in _differences(group.runs).items() if not _incidental(k)]  # fmt: skip


def _incidental(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in INCIDENTAL)


def _networks(n: int) -> str:
    return f"{n} network{'s' * (n != 1)}"


def _common_config(group: Group) -> dict[str, Any]:
    """Settings every run of the group shares."""
    first = group.runs[0].config
    return {k: v for k, v in first.items() if all(r.config.get(k) == v for r in group.runs)}


def _setup_differences(ref: Group, other: Group) -> list[str]:
    """What the group changed with respect to the reference ("graft.source: 'none' -> ...")."""
    a, b = _common_config(ref), _common_config(other)
    out = []
    for key in sorted(set(a) | set(b)):
        if _incidental(key):
            continue
        if key in a and key in b and a[key] != b[key]:
            out.append(f"{key} {a[key]!r} -> {b[key]!r}")
    return out


# -- statistics -----------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for fewer than two values.

    Equal values give exactly 0 (their float mean can be off by an ulp, and a std of 1e-15
    would make an interval claim certainty).
    """
    if not values:
        return None, None
    if min(values) == max(values):
        return values[0], (0.0 if len(values) > 1 else None)
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def welch_ci(
    reference: list[float], other: list[float], confidence: float = CONFIDENCE
) -> tuple[float, float | None, float | None]:
    """(mean(other) - mean(reference), CI low, CI high) by Welch's t.

    Welch: the two groups may have different variances; standard error
    sqrt(s_a^2/n_a + s_b^2/n_b), degrees of freedom by the Welch-Satterthwaite equation. The
    interval is None when it is undefined: a group of one run (no variance estimate), or no
    spread at all in either group (zero standard error, as scipy's NaN says).
    """
    from scipy import stats

    diff = _mean(other) - _mean(reference)
    if len(reference) < 2 or len(other) < 2:
        return diff, None, None
    va = mean_std(reference)[1] ** 2 / len(reference)
    vb = mean_std(other)[1] ** 2 / len(other)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, None, None
    df = (va + vb) ** 2 / (va**2 / (len(reference) - 1) + vb**2 / (len(other) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return diff, diff - half, diff + half


def _stats(group: Group, metric: str) -> dict[str, Any]:
    values = group.values(metric)
    m, s = mean_std(values)
    return {"mean": m, "std": s, "values": values}


def _diff(ref: Group, other: Group, metric: str) -> dict[str, Any] | None:
    a, b = ref.values(metric), other.values(metric)
    if not a or not b:
        return None
    d, lo, hi = welch_ci(a, b)
    return {"mean": d, "ci_low": lo, "ci_high": hi}


def verdict(diff: dict[str, Any], ref: Group, other: Group) -> str:
    """"+0.31 [-0.12, +0.74]: no difference beyond noise" or "... excludes 0"."""
    text = f"{diff['mean']:+.2f}"
    if diff["ci_low"] is None:
        single = [g.label for g in (ref, other) if len(g.runs) < 2]
        if single:
            who = " and ".join(map(repr, single)) + (" have" if len(single) > 1 else " has")
            return f"{text}: no CI ({who} one run; a std needs two)"
        return f"{text}: no CI (no spread within either group)"
    text += f" [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]"
    if diff["ci_low"] > 0 or diff["ci_high"] < 0:
        return f"{text}: excludes 0"
    return f"{text}: no difference beyond noise"


# -- the comparison -------------------------------------------------------------------------


def load_groups(spec: list[tuple[str, list[str]]]) -> list[Group]:
    """Read every run folder; refuse duplicate labels or runs before reading anything."""
    seen_labels: set[str] = set()
    seen_runs: dict[Path, str] = {}
    for label, runs in spec:
        if label in seen_labels:
            raise CompareError(f"--group {label!r} is given twice; labels must differ")
        seen_labels.add(label)
        for r in runs:
            key = Path(r).resolve()
            if key in seen_runs:
                raise CompareError(
                    f"{r} is listed twice (in group {seen_runs[key]!r} and {label!r}); "
                    "each run counts once"
                )
            seen_runs[key] = label
    return [Group(label, [load_run(r) for r in runs]) for label, runs in spec]


def compare(groups: list[Group]) -> dict[str, Any]:
    """The whole comparison as a JSON-ready document (``interface`` picks the stable part)."""
    notes = [n for g in groups for n in _check_group(g)]
    ref = groups[0]
    doc_groups, diffs = [], []
    for g in groups:
        entry = {"label": g.label, "runs": len(g.runs), "networks": g.networks}
        for metric in (*METRICS, "ensemble"):
            s = _stats(g, metric)
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = s["mean"], s["std"]
            entry[f"{metric}_values"] = s["values"]
        entry["paths"] = [str(r.path) for r in g.runs]
        entry["seeds"] = [r.seed for r in g.runs]
        entry["networks_per_run"] = g.runs[0].networks
        entry["validation"] = all(r.has_val for r in g.runs)
        entry["curve"] = _group_curve(g)
        doc_groups.append(entry)
    for g in groups[1:]:
        diff = {"label": g.label, "changes": _setup_differences(ref, g)}
        for metric in (*METRICS, "ensemble"):
            diff[metric] = _diff(ref, g, metric)
        diffs.append(diff)
    return {
        "reference": ref.label,
        "confidence": CONFIDENCE,
        "groups": doc_groups,
        "diffs": diffs,
        "notes": notes,
        "milestones": _milestones(ref),
    }


def _group_curve(group: Group) -> dict[str, list]:
    """Per epoch tested in every run: mean and std (ddof=1) over runs of the run curves."""
    epochs = sorted(set.intersection(*(set(r.curve) for r in group.runs)))
    means, stds = [], []
    for e in epochs:
        m, s = mean_std([r.curve[e] for r in group.runs])
        means.append(m)
        stds.append(s)
    return {"epochs": [display_epoch(e) for e in epochs], "mean": means, "std": stds}


def _milestones(group: Group) -> list[int]:
    """Epochs (1-based, after which the lr drops) of the group's step schedule, for the plot."""
    cfg = _common_config(group)
    if cfg.get("optim.schedule", "step") != "step":
        return []
    epochs = cfg.get("run.epochs")
    if not isinstance(epochs, int):
        return []
    milestones = cfg.get("optim.milestones") or tuple(range(60, epochs, 60))
    return [int(m) for m in milestones if 0 < int(m) < epochs]


def interface(doc: dict[str, Any], filters: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stable ``--json`` object: exactly the keys scripts outside the package rely on."""
    keys = ("label", "runs", "networks", "final_mean", "final_std", "best_mean", "best_std",
            "maxtest_mean", "maxtest_std")  # fmt: skip
    out: dict[str, Any] = {
        "groups": [{k: g[k] for k in keys} for g in doc["groups"]],
        "diffs": [
            {"label": d["label"], **{m: {k: d[m][k] for k in ("mean", "ci_low", "ci_high")}
                                     for m in METRICS}}  # fmt: skip
            for d in doc["diffs"]
        ],
    }
    if filters is not None:
        out["filters"] = filters
    return out


# -- the valid/invalid filter table ---------------------------------------------------------


def _network_l1(path: Path) -> tuple[list[tuple[str, list[int]]], Any]:
    """(conv layers as (name, weight shape), L1 of every conv filter) of a checkpoint, in
    the order ``graft_plan`` counts them for the trainer's invalid_01."""
    import torch

    from distgraft.compress.archive import CheckpointError, load_model
    from distgraft.graft.entropy import filter_l1
    from distgraft.graft.math import graft_plan

    try:
        model = load_model(path)
    except CheckpointError as e:
        raise CompareError(str(e)) from e
    state = model.state_dict()
    convs = [layer for layer in graft_plan(model).layers if layer.conv]
    if not convs:
        raise CompareError(f"{path}: the network has no conv layers")
    try:
        l1 = torch.cat([filter_l1(state[layer.weight]) for layer in convs]).double()
    except ValueError as e:  # NaN / Inf weights
        raise CompareError(f"{path}: {e}") from e
    return [(layer.name, list(state[layer.weight].shape)) for layer in convs], l1


def _pairing(groups: list[Group]) -> dict[int, RunResult]:
    """Reference run by seed; refuse what cannot be paired before reading any checkpoint."""
    ref = groups[0]
    by_seed: dict[int, RunResult] = {}
    for r in ref.runs:
        if r.seed in by_seed:
            raise CompareError(
                f"--filters pairs networks by seed, but {by_seed[r.seed].path} and {r.path} of "
                f"the reference group {ref.label!r} both have run.seed = {r.seed}"
            )
        by_seed[r.seed] = r
    for g in groups[1:]:
        for r in g.runs:
            partner = by_seed.get(r.seed)
            if partner is None:
                raise CompareError(
                    f"--filters pairs networks by seed: {r.path} (group {g.label!r}) has "
                    f"run.seed = {r.seed}, which no run of the reference group {ref.label!r} "
                    f"has (it has {sorted(by_seed)})"
                )
            if r.networks > partner.networks:
                raise CompareError(
                    f"--filters pairs networks by seed and index: {r.path} has "
                    f"{_networks(r.networks)}, its reference {partner.path} only "
                    f"{_networks(partner.networks)}"
                )
    return by_seed


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{text}\033[K", end="", file=sys.stderr, flush=True)


def filter_table(
    groups: list[Group], thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
) -> dict[str, Any]:
    """The extended grafting paper's valid/invalid table, per group and threshold.

    For every network of a group, the invalid set is that of the reference network of the
    same seed and index (its ``last.pt`` filters with L1 below the threshold); counts are
    summed and the average L1 of the valid and of the invalid filters is over all the
    group's networks' filters (each filter once). ``below`` counts the group's own filters
    under the threshold. ``tail``: minimum and low percentiles of all the group's filter L1s.
    """
    import numpy as np
    import torch

    by_seed = _pairing(groups)
    total = sum(r.networks for g in groups for r in g.runs)
    done = 0
    ref_cache: dict[tuple[int, int], tuple[list, Any]] = {}

    def network(run: RunResult, k: int) -> tuple[list, Any]:
        nonlocal done
        done += 1
        _progress(f"distgraft compare: filters of network {done}/{total} ({run.path})")
        return _network_l1(run.path / f"net{k}" / "last.pt")

    for r in groups[0].runs:
        for k in range(r.networks):
            ref_cache[(r.seed, k)] = network(r, k)
    rows: list[dict[str, Any]] = []
    for g in groups:
        l1s, masks = [], {t: [] for t in thresholds}
        for r in g.runs:
            for k in range(r.networks):
                ref_layers, ref_l1 = ref_cache[(r.seed, k)]
                layers, l1 = ref_cache[(r.seed, k)] if g is groups[0] else network(r, k)
                _check_layers(by_seed[r.seed].path / f"net{k}", ref_layers, r.path / f"net{k}",
                              layers)  # fmt: skip
                l1s.append(l1)
                for t in thresholds:
                    masks[t].append(ref_l1 < t)
        all_l1 = torch.cat(l1s)
        row: dict[str, Any] = {"label": g.label, "filters": int(all_l1.numel()), "thresholds": []}
        for t in thresholds:
            invalid = torch.cat(masks[t])
            row["thresholds"].append({
                "threshold": t,
                "invalid": int(invalid.sum()),
                "l1_valid": _masked_mean(all_l1, ~invalid),
                "l1_invalid": _masked_mean(all_l1, invalid),
                "below": int((all_l1 < t).sum()),
            })  # fmt: skip
        low = np.percentile(all_l1.numpy(), TAIL_PERCENTILES)
        row["tail"] = {"min": float(all_l1.min())}
        for p, v in zip(TAIL_PERCENTILES, low, strict=True):
            row["tail"][f"p{p:g}"] = float(v)
        rows.append(row)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return {"reference": groups[0].label, "checkpoint": "last.pt", "thresholds": list(thresholds),
            "groups": rows}  # fmt: skip


def _masked_mean(values: Any, mask: Any) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


def _check_layers(ref_path: Path, ref: list, path: Path, layers: list) -> None:
    if layers == ref:
        return
    for (na, sa), (nb, sb) in zip(ref, layers, strict=False):
        if (na, sa) != (nb, sb):
            raise CompareError(
                f"--filters: {path} does not match its reference {ref_path}: conv layer "
                f"{nb!r} of shape {sb} against {na!r} of shape {sa} (same model needed)"
            )
    raise CompareError(
        f"--filters: {path} has {len(layers)} conv layers, its reference {ref_path} "
        f"{len(ref)} (same model needed)"
    )


# -- output ---------------------------------------------------------------------------------


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {'n/a' if std is None else f'{std:.2f}'}"


def render(doc: dict[str, Any], groups: list[Group], filters: dict[str, Any] | None) -> str:
    """The text report: group table, differences with verdicts, the filter table."""
    metrics = [*METRICS] + (["ensemble"] if any(g["ensemble_mean"] is not None
                                                for g in doc["groups"]) else [])  # fmt: skip
    label_w = max(len("group"), *(len(g["label"]) + 6 for g in doc["groups"]))
    head = f"{'group':<{label_w}} {'runs':>4} {'nets':>5}  " + "".join(
        f"{LABELS[m]:<16}" for m in metrics
    )
    lines = [
        "test accuracy (%), mean ± std over runs (a run counts once: the mean of its networks)",
        "",
        head.rstrip(),
        "-" * len(head.rstrip()),
    ]
    for g in doc["groups"]:
        label = g["label"] + (" (ref)" if g["label"] == doc["reference"] else "")
        cells = "".join(f"{_pm(g[f'{m}_mean'], g[f'{m}_std']):<16}" for m in metrics)
        lines.append(f"{label:<{label_w}} {g['runs']:>4} {g['networks']:>5}  {cells}".rstrip())
    by_label = {g.label: g for g in groups}
    ref = by_label[doc["reference"]]
    for d in doc["diffs"]:
        lines += ["", f"{d['label']} - {doc['reference']}: difference of means, "
                  f"{doc['confidence']:.0%} CI (Welch's t over runs)"]  # fmt: skip
        if d["changes"]:
            lines += _wrap(f"  setup: {'; '.join(d['changes'])}", "    ")
        for m in metrics:
            if d[m] is not None:
                lines.append(f"  {LABELS[m]:<9} {verdict(d[m], ref, by_label[d['label']])}")
    lines += ["", *_wrap(_best_note(doc), "  "), *_wrap(
        "max test: the highest test accuracy of any epoch (the grafting paper's convention; "
        "optimistic: chosen on the test set, often right after an lr drop)", "  ")]  # fmt: skip
    if "ensemble" in metrics:
        lines += _wrap("ensemble: accuracy of the mean logits of a run's networks", "  ")
    if filters is not None:
        lines += ["", *_render_filters(filters)]
    if doc["notes"]:
        lines += ["", *[line for n in doc["notes"] for line in _wrap(f"note: {n}", "  ")]]
    return "\n".join(lines)


def _best_note(doc: dict[str, Any]) -> str:
    note = ("best: test accuracy at the epoch of best validation accuracy (ties: the later "
            "epoch)")  # fmt: skip
    without = [g["label"] for g in doc["groups"] if not g["validation"]]
    if without:
        note += (f"; {', '.join(map(repr, without))} had no validation split, so there best "
                 "is the max test accuracy")  # fmt: skip
    return note


def _num(value: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def _render_filters(filters: dict[str, Any]) -> list[str]:
    """One block per threshold (the paper's table) and one for the low tail of the L1s."""
    heads = [f"below {t:g}" for t in filters["thresholds"]] + ["low tail of L1"]
    first_w = max(len(h) for h in heads + [r["label"] for r in filters["groups"]])
    lines = _wrap(
        f"conv filters at the end ({filters['checkpoint']}). Invalid: L1 below the threshold "
        f"in the {filters['reference']!r} network of the same seed and index; every group is "
        "looked at in those positions. 'own below': the group's own filters under it."
    )
    for i, head in enumerate(heads[:-1]):
        cols = f"{'invalid':>13} {'L1 valid':>10} {'L1 invalid':>11} {'own below':>10}"
        lines += ["", f"  {head:<{first_w}} {cols}", "  " + "-" * (first_w + 1 + len(cols))]
        for r in filters["groups"]:
            c = r["thresholds"][i]
            frac = f"{c['invalid']}/{r['filters']}"
            lines.append(f"  {r['label']:<{first_w}} {frac:>13} {_num(c['l1_valid'], 10)} "
                         f"{_num(c['l1_invalid'], 11)} {c['below']:>10}")  # fmt: skip
    keys = list(filters["groups"][0]["tail"])
    cols = " ".join(f"{k:>9}" for k in keys)
    lines += ["", f"  {heads[-1]:<{first_w}} {cols}", "  " + "-" * (first_w + 1 + len(cols))]
    for r in filters["groups"]:
        values = " ".join(_num(r["tail"][k]) for k in keys)
        lines.append(f"  {r['label']:<{first_w}} {values}")
    return lines


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, width=92, subsequent_indent=indent)


ZOOM_FROM_EPOCHS = 6
"""Runs this long get a second panel with their last third, where the groups part."""


def plot(doc: dict[str, Any], out: Path) -> bool:
    """compare.png: test accuracy per epoch, mean and ±1 std band over runs per group (all
    epochs, and the last third zoomed for longer runs). False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    last = max((c for g in doc["groups"] for c in g["curve"]["epochs"]), default=1)
    starts = [0]
    if last >= ZOOM_FROM_EPOCHS:
        starts.append(last - last // 3)  # the zoomed panel shows the epochs after this one
    fig = Figure(figsize=(6 * len(starts), 4.5), layout="constrained")
    axes = fig.subplots(1, len(starts), squeeze=False)[0]
    for ax, start in zip(axes, starts, strict=True):
        _plot_curves(ax, doc, start)
    axes[0].set_title("test accuracy: mean over runs, band ±1 std over runs")
    if len(starts) > 1:
        axes[1].set_title(f"the last epochs (from {starts[1] + 1})")
    handles, labels = axes[0].get_legend_handles_labels()
    if doc["milestones"]:
        handles.append(axes[0].plot([], [], color="gray", lw=0.8, ls=":")[0])
        labels.append("lr drop (reference's schedule)")
    axes[0].legend(handles, labels, fontsize=8, loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return True


def _plot_curves(ax: Any, doc: dict[str, Any], start: int) -> None:
    """Every group's curve over the epochs after ``start``, y limits fitted to them."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = math.inf, -math.inf
    for i, g in enumerate(doc["groups"]):
        c = g["curve"]
        pts = [p for p in zip(c["epochs"], c["mean"], c["std"], strict=True) if p[0] > start]
        if not pts:
            continue
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        low = [m - (s or 0.0) for _, m, s in pts]
        high = [m + (s or 0.0) for _, m, s in pts]
        runs = f"{g['runs']} run{'s' * (g['runs'] != 1)}"
        ref = ", ref" if i == 0 else ""
        ax.plot(x, y, color=f"C{i % 10}", lw=1.5, label=f"{g['label']} ({runs}{ref})",
                marker="o" if len(x) <= 30 else None, ms=3)  # fmt: skip
        if g["runs"] > 1:
            ax.fill_between(x, low, high, color=f"C{i % 10}", alpha=0.2, lw=0)
        lo, hi = min(lo, *low), max(hi, *high)
    for m in doc["milestones"]:
        if m > start:  # lr drops between display epochs m and m + 1
            ax.axvline(m + 0.5, color="gray", lw=0.8, ls=":")
    if math.isfinite(lo):
        pad = max(0.1, 0.05 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _write_json(obj: dict[str, Any], path: Path) -> None:
    """Written to a temp file and renamed: a reader never sees half a document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the command ----------------------------------------------------------------------------


def _parse_groups(raw: list[list[str]] | None) -> list[tuple[str, list[str]]]:
    if not raw:
        raise CompareError("no --group given: use --group LABEL RUN [RUN ...], once per group")
    spec = []
    for values in raw:
        label, runs = values[0], values[1:]
        if (Path(label) / "metrics.jsonl").is_file():
            raise CompareError(
                f"--group {' '.join(values)}: the first value is the group's label, but "
                f"{label!r} is a run folder (e.g. --group baseline runs/b0 runs/b1)"
            )
        if not runs:
            raise CompareError(f"--group {label}: no run folder after the label")
        spec.append((label, runs))
    return spec


def _check_args(args: argparse.Namespace) -> None:
    for t in args.threshold:
        if not (math.isfinite(t) and t > 0):
            raise CompareError(f"--threshold {t:g} is invalid: thresholds must be > 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; it must be a folder (created if missing)")


def run(args: argparse.Namespace) -> int:
    try:
        spec = _parse_groups(args.group)
        _check_args(args)
        groups = load_groups(spec)
        doc = compare(groups)
        filters = filter_table(groups, tuple(args.threshold)) if args.filters else None
    except CompareError as e:
        print(f"distgraft compare: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    stable = interface(doc, filters)
    _write_json({**stable, "details": doc}, out / "compare.json")
    plotted = plot(doc, out / "compare.png")
    written = [str(out / "compare.png")] if plotted else []
    written.append(str(out / "compare.json"))
    if args.json:
        print(json.dumps(stable, indent=1, allow_nan=False))
    else:
        print(render(doc, groups, filters))
        print(f"\nwrote {' and '.join(written)}")
    if not plotted:
        print("distgraft compare: compare.png skipped: plots need matplotlib "
              "(pip install distgraft[plot])", file=sys.stderr)  # fmt: skip
    return 0


EPILOG = """\
examples:
  # 3 seeds of the baseline against 3 seeds of grafting (the first group is the reference)
  for s in 0 1 2; do
    torchrun --nproc-per-node 2 -m distgraft train --config configs/digits_baseline.toml \\
        --run.seed=$s --run.name=base$s
    torchrun --nproc-per-node 2 -m distgraft train --config configs/digits.toml \\
        --run.seed=$s --run.name=graft$s
  done
  distgraft compare --group baseline runs/base0 runs/base1 runs/base2 \\
                    --group graft runs/graft0 runs/graft1 runs/graft2 --out runs/cmp
  distgraft compare ... --filters --threshold 0.1 1   # add the valid/invalid filter table
  distgraft compare ... --json                        # one JSON object on stdout

how the numbers are made:
  The unit is the run: each metric of a run is the mean over its networks (grafted
  networks of one run are strongly correlated; counting them apart would shrink the error
  bars). Groups show mean ± std over runs (ddof=1; "n/a" for a group of one run). Each
  other group gets mean(group) - mean(reference) with a 95% confidence interval from
  Welch's t (unequal variances), and whether it excludes 0; there is no interval when a
  group has one run or neither group varies at all.
  final: test accuracy after the last epoch. best: test accuracy at the epoch of best
  validation accuracy (data.val_size; without a validation split it is max test). max
  test: the highest test accuracy of any epoch, the grafting paper's convention: it picks
  the luckiest epoch on the test set, which is often the one right after an lr drop
  (dotted lines in the plot), so it is optimistic. ensemble: accuracy of the mean logits
  of a run's networks (runs with more than one network).

runs and groups:
  A run folder must hold metrics.jsonl with a summary written after its last start (a
  finished run); an unfinished run is refused by name. The runs of one group are seeds
  of one setup: they must have the same number of networks, epochs, eval_every and lr
  schedule (lr, schedule, milestones, gamma): refused otherwise; other differences are
  noted. Groups may differ in anything, length included (final is each run's own last
  epoch); a "setup:" line lists what a group changed against the reference.

outputs (in --out, default: the current folder):
  compare.png   test accuracy per epoch, from the epoch events (after a resume, the
                last line of each epoch): mean over a run's networks, then mean over
                runs with a band of ±1 std over runs (their spread, not a confidence
                interval); runs of 6+ epochs also get their last third zoomed; dotted
                lines at the reference's lr drops. Skipped (with a note) without
                matplotlib: pip install distgraft[plot].
  compare.json  the --json object plus "details": per-run values, seeds, ensemble,
                curves, the setup differences between groups, notes.
  --json prints {"groups": [{label, runs, networks, final_mean, final_std, best_mean,
  best_std, maxtest_mean, maxtest_std}], "diffs": [{label, final: {mean, ci_low,
  ci_high}, best: {...}, maxtest: {...}}]} (percent; null where undefined), plus
  "filters" with --filters.

--filters (Meng et al., arXiv 2004.12311, the valid/invalid filter table):
  For each threshold, the invalid filters (L1 norm below it) are fixed in each reference
  network's last.pt and looked at, at the same positions, in the network of the same
  run.seed and index of every group: same-seed networks start from the same weights in
  distgraft (network k is initialised from seed run.seed + 1000 k; grafting is set up after
  the model is built), so position i is "the same filter" at the start. Per group: how
  many filters that is, the average L1 of the valid and of the invalid ones at the end,
  and how many of the group's own filters are below the threshold; and the low tail of
  the filter-L1 distribution (minimum, 1st and 5th percentile), which shows a shift even
  where no filter crosses a threshold. Paper, ResNet-56 on CIFAR-10 at 0.1: baseline
  6.982 / 0.003 (valid / invalid), grafting 6.427 / 1.633. Every seed of another group
  must be among the reference's seeds.
"""


def register(sub: Any) -> None:
    """Add the ``compare`` command to the ``distgraft`` CLI."""
    p = sub.add_parser(
        "compare",
        help="compare groups of finished runs (seeds): mean ± std, Welch 95%% CIs, a plot",
        description="Compare groups of finished runs (several seeds each) with the first group,\n"
        "the reference: final, best and max test accuracy and the ensemble as mean ± std over\n"
        "runs, and each group's difference to the reference with a 95% confidence interval\n"
        "(Welch's t). Writes compare.png and compare.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--group",
        action="append",
        nargs="+",
        metavar=("LABEL", "RUN"),
        help="a group: its label, then its run folders (repeat for each group; the first "
        "is the reference)",
    )
    p.add_argument("--out", metavar="DIR", default=".",
                   help="folder for compare.png and compare.json (default: .)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object, not the table")
    p.add_argument("--filters", action="store_true",
                   help="add the valid/invalid filter table (reads net{k}/last.pt)")  # fmt: skip
    p.add_argument(
        "--threshold",
        nargs="+",
        type=float,
        default=list(DEFAULT_THRESHOLDS),
        metavar="T",
        help="L1 thresholds of invalid filters for --filters (default: 0.1 1)",
    )
    p.set_defaults(func=run)
