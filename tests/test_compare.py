"""``distgraft compare``: statistics against scipy, the --json shape, the filter table against
hand-built checkpoints, the error cases, and one end-to-end check on folders `train` wrote."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import DIGITS, run
from scipy import stats

from distgraft.cli import main
from distgraft.comm.dist import DistInfo
from distgraft.compress.archive import base_arch
from distgraft.config import load_config, with_overrides
from distgraft.files import save_atomic
from distgraft.models import build_model
from distgraft.telemetry import JsonlSink, make_event

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
GROUP_KEYS = {"label", "runs", "networks", "final_mean", "final_std", "best_mean", "best_std",
              "maxtest_mean", "maxtest_std"}  # fmt: skip
CI_KEYS = {"mean", "ci_low", "ci_high"}
METRICS = {"final": "final_acc", "best": "best_acc", "maxtest": "max_test_acc"}


# -- run folders made by the test -----------------------------------------------------------


def config_text(seed: int, epochs: int, source: str = "external", lr: float = 0.1) -> str:
    return (
        f'[run]\nseed = {seed}\nepochs = {epochs}\neval_every = 1\n'
        f'[model]\nname = "digits_cnn"\n'
        f'[optim]\nlr = {lr}\nschedule = "step"\nmilestones = [2]\ngamma = 0.1\n'
        f'[graft]\nsource = "{source}"\n'
    )


def write_run(
    path: Path,
    seed: int,
    rows: list[dict],
    ensemble: float | None,
    curves: list[list[float]] | None = None,
    source: str = "external",
    epochs: int = 3,
    summary: bool = True,
    lr: float = 0.1,
) -> Path:
    """A finished run folder: config.toml, start, epoch events per network, summary."""
    path.mkdir(parents=True)
    cfg = config_text(seed, epochs, source, lr)
    (path / "config.toml").write_text(cfg)
    sink = JsonlSink(path / "metrics.jsonl")
    n = len(rows)
    sink.emit(make_event("start", 0, 0, world_size=n, networks=n, replicas=1,
                         run_dir=str(path), config=cfg))  # fmt: skip
    curves = curves or [[50.0 + 10 * e + k for e in range(epochs)] for k in range(n)]
    for epoch in range(epochs):
        for k in range(n):
            sink.emit(epoch_event(k, epoch, curves[k][epoch]))
    if summary:
        full = [{"network": k, "invalid_01": 0, "invalid_001": 0, "best_epoch": epochs - 1,
                 "best_val_acc": None, **row} for k, row in enumerate(rows)]  # fmt: skip
        sink.emit(make_event("summary", 0, epochs - 1, networks=full, ensemble_acc=ensemble,
                             run_dir=str(path)))  # fmt: skip
    sink.close()
    return path


def epoch_event(network: int, epoch: int, test_acc: float | None) -> dict:
    return make_event("epoch", network, epoch, train_loss=1.0, train_acc=80.0, test_loss=1.0,
                      test_acc=test_acc, lr=0.1, epoch_s=1.0, images_per_s=1e3,
                      val_loss=None, val_acc=None)  # fmt: skip


def random_rows(rng: random.Random, networks: int, shift: float) -> list[dict]:
    rows = []
    for _ in range(networks):
        final = 90.0 + shift + rng.gauss(0, 0.5)
        rows.append({"final_acc": final, "best_acc": final + rng.uniform(0, 0.3),
                     "max_test_acc": final + rng.uniform(0.3, 0.8)})  # fmt: skip
    return rows


def run_means(path: Path) -> dict[str, float]:
    """What the statistics should see of a run, read back from its metrics.jsonl."""
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    summary = [e for e in lines if e["event"] == "summary"][-1]
    out = {m: float(np.mean([r[key] for r in summary["networks"]])) for m, key in METRICS.items()}
    out["ensemble"] = summary["ensemble_acc"]
    return out


def compare(*args: str, capsys) -> tuple[int, str, str]:
    """``distgraft compare ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(["compare", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def group_args(groups: dict[str, list[Path]]) -> list[str]:
    return [a for label, runs in groups.items() for a in ("--group", label, *map(str, runs))]


@pytest.fixture
def three_groups(tmp_path: Path) -> dict[str, list[Path]]:
    """base (3 runs), graft (4 runs, +1 point), noise (2 runs, +0); 2 networks per run."""
    rng = random.Random(7)
    groups: dict[str, list[Path]] = {}
    for label, n, shift in (("base", 3, 0.0), ("graft", 4, 1.0), ("noise", 2, 0.0)):
        groups[label] = [
            write_run(tmp_path / f"{label}{s}", s, random_rows(rng, 2, shift), 90 + rng.random())
            for s in range(n)
        ]
    return groups


# -- statistics -----------------------------------------------------------------------------


def test_statistics_match_scipy_welch(three_groups, tmp_path, capsys):
    code, out, err = compare(*group_args(three_groups), "--json", "--out", str(tmp_path / "o"),
                             capsys=capsys)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    values = {label: [run_means(p) for p in runs] for label, runs in three_groups.items()}
    for g in doc["groups"]:
        runs = values[g["label"]]
        assert g["runs"] == len(runs) and g["networks"] == 2 * len(runs)
        for m in METRICS:
            xs = [r[m] for r in runs]
            assert g[f"{m}_mean"] == pytest.approx(np.mean(xs), abs=1e-9)
            assert g[f"{m}_std"] == pytest.approx(np.std(xs, ddof=1), abs=1e-9)
    assert [d["label"] for d in doc["diffs"]] == ["graft", "noise"]
    for d in doc["diffs"]:
        for m in METRICS:
            a = [r[m] for r in values["base"]]
            b = [r[m] for r in values[d["label"]]]
            ci = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
            assert d[m]["mean"] == pytest.approx(np.mean(b) - np.mean(a), abs=1e-9)
            assert d[m]["ci_low"] == pytest.approx(ci.low, abs=1e-9)
            assert d[m]["ci_high"] == pytest.approx(ci.high, abs=1e-9)
    saved = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert {k: saved[k] for k in ("groups", "diffs")} == doc
    ensemble = [r["ensemble"] for r in values["graft"]]
    graft = next(g for g in saved["details"]["groups"] if g["label"] == "graft")
    assert graft["ensemble_mean"] == pytest.approx(np.mean(ensemble), abs=1e-9)
    assert graft["ensemble_std"] == pytest.approx(np.std(ensemble, ddof=1), abs=1e-9)


def test_json_shape_is_exactly_the_interface(three_groups, tmp_path, capsys):
    one = write_run(tmp_path / "single", 0, [{"final_acc": 91.0, "best_acc": 91.0,
                                             "max_test_acc": 92.0}], None)  # fmt: skip
    groups = {**three_groups, "single": [one]}
    code, out, _ = compare(*group_args(groups), "--json", "--out", str(tmp_path), capsys=capsys)
    assert code == 0
    doc = json.loads(out)  # stdout is one JSON object and nothing else
    assert set(doc) == {"groups", "diffs"}
    assert all(set(g) == GROUP_KEYS for g in doc["groups"])
    assert [g["label"] for g in doc["groups"]] == ["base", "graft", "noise", "single"]
    for d in doc["diffs"]:
        assert set(d) == {"label", *METRICS}
        assert all(set(d[m]) == CI_KEYS for m in METRICS)
    single = doc["groups"][-1]
    assert single["runs"] == 1 and single["networks"] == 1
    assert single["final_mean"] == 91.0 and single["final_std"] is None  # std needs two runs
    last = doc["diffs"][-1]["final"]
    assert last["mean"] == pytest.approx(91.0 - doc["groups"][0]["final_mean"])
    assert last["ci_low"] is None and last["ci_high"] is None


def test_verdicts_say_whether_the_interval_excludes_zero(tmp_path, capsys):
    def rows(final: float) -> list[dict]:
        return [{"final_acc": final, "best_acc": final, "max_test_acc": final + 0.5}] * 2

    base = [write_run(tmp_path / f"b{i}", i, rows(90 + d), 90.0) for i, d in enumerate((0, .2, .4))]
    better = [write_run(tmp_path / f"g{i}", i, rows(92 + d), 91.0)
              for i, d in enumerate((0, .2, .4))]  # fmt: skip
    noisy = [write_run(tmp_path / f"n{i}", i, rows(90 + d), 90.0)
             for i, d in enumerate((-3, 0.9, 3))]  # fmt: skip
    same = [write_run(tmp_path / f"s{i}", i, rows(97.22), 90.0) for i in range(3)]
    args = group_args({"base": base, "better": better, "noisy": noisy})
    code, out, err = compare(*args, "--out", str(tmp_path), capsys=capsys)
    assert code == 0, err
    section = out.split("better - base")[1].split("noisy - base")[0]
    assert "final     +2.00 [+" in section and "excludes 0" in section
    assert "no difference beyond noise" not in section
    section = out.split("noisy - base")[1]
    final = next(line for line in section.splitlines() if "final" in line)
    assert final.strip().startswith("final     +0.10 [-") and "no difference beyond noise" in final
    assert "ensemble" in section  # runs of two networks have one
    # No spread at all in either group: Welch's interval is undefined (scipy says NaN), also
    # where the float mean of three equal values is an ulp off them.
    assert sum([97.22] * 3) / 3 != 97.22
    same2 = [write_run(tmp_path / f"t{i}", i, rows(97.52), 90.0) for i in range(2)]
    code, out, _ = compare(*group_args({"same": same, "same2": same2}), "--out", str(tmp_path),
                           capsys=capsys)  # fmt: skip
    assert code == 0 and "+0.30: no CI (no spread within either group)" in out
    assert "97.22 ± 0.00" in out


def test_curves_take_each_epoch_once_and_max_test_falls_back_to_the_events(tmp_path, capsys):
    """A resumed run repeats epochs (the last line wins); summaries of earlier versions have
    no max_test_acc (the events' maximum stands in); the plot is written."""
    path = write_run(tmp_path / "r0", 0, [{"final_acc": 70.0, "best_acc": 70.0}] * 2, 71.0,
                     curves=[[50.0, 80.0, 70.0], [60.0, 90.0, 70.0]])  # fmt: skip
    lines = (path / "metrics.jsonl").read_text().splitlines()
    retrained = [json.dumps(epoch_event(k, 1, acc)) for k, acc in ((0, 10.0), (1, 20.0))]
    # The stale epoch-1 lines come first, the retrained ones last (before the summary).
    (path / "metrics.jsonl").write_text("\n".join(lines[:-1] + retrained + lines[-1:]) + "\n")
    other = write_run(tmp_path / "r1", 1, [{"final_acc": 72.0, "best_acc": 72.0}] * 2, 71.0,
                      curves=[[52.0, 30.0, 72.0], [62.0, 40.0, 72.0]])  # fmt: skip
    out_dir = tmp_path / "out"
    code, _, err = compare("--group", "g", str(path), str(other), "--out", str(out_dir),
                           capsys=capsys)  # fmt: skip
    assert code == 0, err
    details = json.loads((out_dir / "compare.json").read_text())["details"]
    curve = details["groups"][0]["curve"]
    assert curve["epochs"] == [1, 2, 3]
    run0, run1 = [55.0, 15.0, 70.0], [57.0, 35.0, 72.0]  # means over networks, epoch 1 retrained
    assert curve["mean"] == pytest.approx([(a + b) / 2 for a, b in zip(run0, run1, strict=True)])
    assert curve["std"] == pytest.approx([np.std([a, b], ddof=1)
                                          for a, b in zip(run0, run1, strict=True)])  # fmt: skip
    # Max test per network from the events, then the mean over networks: r0's epoch-1 lines
    # (80, 90) were retrained (10, 20), so its maximum is 70; r1's is 72.
    assert details["groups"][0]["maxtest_values"] == pytest.approx([70.0, 72.0])
    png = (out_dir / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_without_matplotlib_the_json_is_written_and_the_png_skipped(three_groups, tmp_path):
    blocker = tmp_path / "no_matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env_path = f"{blocker.parent}:{ROOT}"
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "distgraft", "compare", *group_args(three_groups), "--out",
         str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "compare.json").is_file() and not (out / "compare.png").exists()
    assert "compare.png skipped: plots need matplotlib" in proc.stderr


# -- errors ---------------------------------------------------------------------------------


def _rows(n: int = 2) -> list[dict]:
    return [{"final_acc": 90.0, "best_acc": 90.0, "max_test_acc": 91.0}] * n


ERRORS = {
    "unfinished": "r_unfinished has no summary in metrics.jsonl: the run did not finish",
    "resumed_after_summary": "r_resumed has no summary in metrics.jsonl",
    "missing": "nowhere: no such run folder",
    "not_a_run": "empty has no metrics.jsonl",
    "label_is_run": "the first value is the group's label",
    "no_runs": "--group lonely: no run folder after the label",
    "twice": "is listed twice",
    "same_label": "--group 'a' is given twice",
    "epochs_differ": "runs differ in run.epochs (3, 4)",
    "schedule_differs": "runs differ in optim.lr (0.1, 0.2)",
    "networks_differ": "has 1 network,",
    "threshold": "--threshold 0 is invalid",
    "no_group": "no --group given",
    "seed_unmatched": "run.seed = 9, which no run of the reference group 'a' has",
    "seed_twice": "both have run.seed = 0",
    "out_is_file": "is a file; it must be a folder",
}


def error_case(case: str, tmp_path: Path) -> list[str]:
    a0 = write_run(tmp_path / "a0", 0, _rows(), 90.0)
    a1 = write_run(tmp_path / "a1", 1, _rows(), 90.0)
    if case == "unfinished":
        bad = write_run(tmp_path / "r_unfinished", 2, _rows(), 90.0, summary=False)
        return ["--group", "a", str(a0), str(bad)]
    if case == "resumed_after_summary":
        bad = write_run(tmp_path / "r_resumed", 2, _rows(), 90.0)
        with (bad / "metrics.jsonl").open("a") as f:  # resumed to more epochs, then died
            f.write(json.dumps(make_event("start", 0, 3, world_size=2, networks=2, replicas=1,
                                          run_dir=str(bad), config="")) + "\n")  # fmt: skip
        return ["--group", "a", str(a0), str(bad)]
    if case == "missing":
        return ["--group", "a", str(a0), str(tmp_path / "nowhere")]
    if case == "not_a_run":
        (tmp_path / "empty").mkdir()
        return ["--group", "a", str(a0), str(tmp_path / "empty")]
    if case == "label_is_run":
        return ["--group", str(a0), str(a1)]
    if case == "no_runs":
        return ["--group", "a", str(a0), "--group", "lonely"]
    if case == "twice":
        return ["--group", "a", str(a0), str(a1), "--group", "b", str(a1)]
    if case == "same_label":
        return ["--group", "a", str(a0), "--group", "a", str(a1)]
    if case == "epochs_differ":
        b = write_run(tmp_path / "b", 2, _rows(), 90.0, epochs=4)
        return ["--group", "a", str(a0), str(b)]
    if case == "schedule_differs":
        b = write_run(tmp_path / "b", 2, _rows(), 90.0, lr=0.2)
        return ["--group", "a", str(a0), str(b)]
    if case == "networks_differ":
        b = write_run(tmp_path / "b", 2, _rows(1), None)
        return ["--group", "a", str(a0), str(b)]
    if case == "threshold":
        return ["--group", "a", str(a0), "--filters", "--threshold", "0.1", "0"]
    if case == "no_group":
        return []
    if case == "seed_unmatched":
        b = write_run(tmp_path / "b", 9, _rows(), 90.0)
        return ["--group", "a", str(a0), str(a1), "--group", "b", str(b), "--filters"]
    if case == "out_is_file":
        (tmp_path / "taken").write_text("someone's notes\n")
        return ["--group", "a", str(a0), "--out", str(tmp_path / "taken")]
    if case == "seed_twice":
        b = write_run(tmp_path / "b", 0, _rows(), 90.0)
        return ["--group", "a", str(a0), str(b), "--filters"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    args = error_case(case, tmp_path)
    out_dir = tmp_path / "out"
    code, out, err = compare("--out", str(out_dir), *args, capsys=capsys)  # args may override
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgraft compare: "), err
    assert ERRORS[case] in lines[0]
    assert not out_dir.exists()
    if case == "out_is_file":
        assert (tmp_path / "taken").read_text() == "someone's notes\n"


# -- the filter table -----------------------------------------------------------------------

# digits_cnn's conv layers as graft_plan counts them: 16 + 32 + 32 filters.
CONV_FILTERS = {"conv1.weight": 16, "conv2.weight": 32, "conv3.weight": 32}


def write_checkpoint(path: Path, l1: np.ndarray) -> None:
    """A digits_cnn checkpoint whose conv filter f has L1 norm exactly l1[f] (every weight of
    it l1[f] / size, signs alternating); the classifier gets large weights the table must
    not count."""
    model = build_model("digits_cnn", 10, 1)
    state = model.state_dict()
    start = 0
    for key, n in CONV_FILTERS.items():
        w = state[key]
        size = w[0].numel()
        sign = torch.tensor([(-1) ** i for i in range(size)], dtype=torch.float64)
        values = torch.tensor(l1[start : start + n], dtype=torch.float64)
        state[key] = (values[:, None] / size * sign[None, :]).float().reshape(w.shape)
        start += n
    state["linear.weight"] = torch.full_like(state["linear.weight"], 0.001)  # L1 0.032 < 0.1
    arch = base_arch("digits_cnn", 10, 1, (1, 8, 8))
    save_atomic({"model": state, "arch": arch, "epoch": 2}, path)


def test_filter_table_matches_the_hand_computed_values(tmp_path, capsys):
    n = sum(CONV_FILTERS.values())
    rng = np.random.default_rng(3)
    # Exactly representable L1 values (multiples of 1/64), so float32 storage keeps them.
    def l1s(low: float, high: float) -> np.ndarray:
        return np.round(rng.uniform(low, high, n) * 64) / 64

    ref = {}
    groups: dict[str, list[Path]] = {"base": [], "graft": []}
    for seed in (0, 1):
        for label in groups:
            groups[label].append(write_run(tmp_path / f"{label}{seed}", seed, _rows(), 90.0))
        for k in range(2):
            base, order, m = l1s(2.0, 8.0), rng.permutation(n), 6 + seed + k
            base[order[:m]] = 1 / 64  # below 0.1 (and 1)
            base[order[m : m + 4]] = 0.5  # below 1 only
            graft = l1s(1.5, 7.0)
            graft[0] = 0.25  # one of graft's own below 1 (and not below 0.1)
            ref[(seed, k)] = (base, graft)
            write_checkpoint(groups["base"][seed] / f"net{k}" / "last.pt", base)
            write_checkpoint(groups["graft"][seed] / f"net{k}" / "last.pt", graft)
    code, out, err = compare(*group_args(groups), "--json", "--filters", "--threshold", "0.1", "1",
                             "--out", str(tmp_path / "o"), capsys=capsys)  # fmt: skip
    assert code == 0, err
    table = json.loads(out)["filters"]
    assert table["reference"] == "base" and table["thresholds"] == [0.1, 1.0]
    for g, row in zip(("base", "graft"), table["groups"], strict=True):
        mine = np.concatenate([ref[(s, k)][g == "graft"] for s in (0, 1) for k in (0, 1)])
        masks = {t: np.concatenate([ref[(s, k)][0] < t for s in (0, 1) for k in (0, 1)])
                 for t in (0.1, 1.0)}  # fmt: skip
        assert row["label"] == g and row["filters"] == 4 * n
        for t, cell in zip((0.1, 1.0), row["thresholds"], strict=True):
            invalid = masks[t]
            assert cell["threshold"] == t
            assert cell["invalid"] == int(invalid.sum())
            assert cell["l1_valid"] == pytest.approx(mine[~invalid].mean(), rel=1e-6)
            assert cell["l1_invalid"] == pytest.approx(mine[invalid].mean(), rel=1e-6)
            assert cell["below"] == int((mine < t).sum())
        assert row["tail"]["min"] == pytest.approx(mine.min(), rel=1e-6)
        assert row["tail"]["p1"] == pytest.approx(np.percentile(mine, 1), rel=1e-6)
        assert row["tail"]["p5"] == pytest.approx(np.percentile(mine, 5), rel=1e-6)
    base_row = table["groups"][0]["thresholds"]
    assert base_row[0]["invalid"] == 6 + 7 + 7 + 8 and base_row[0]["l1_invalid"] == 1 / 64
    assert base_row[1]["invalid"] == base_row[0]["invalid"] + 16
    assert table["groups"][1]["thresholds"][1]["below"] == 4  # graft's own: filter 0 of each
    # The text table shows the same numbers.
    code, out, _ = compare(*group_args(groups), "--filters", "--out", str(tmp_path / "o"),
                           capsys=capsys)  # fmt: skip
    assert code == 0
    assert f"28/{4 * n}" in out and "low tail of L1" in out


def test_filter_table_refuses_networks_of_another_shape(tmp_path, capsys):
    a = write_run(tmp_path / "a", 0, _rows(1), None)
    b = write_run(tmp_path / "b", 0, _rows(1), None)
    write_checkpoint(a / "net0" / "last.pt", np.ones(sum(CONV_FILTERS.values())))
    # Three input channels: as many filters per layer, but conv1 has another shape.
    model = build_model("digits_cnn", 10, 3)
    save_atomic({"model": model.state_dict(), "arch": base_arch("digits_cnn", 10, 3, (3, 8, 8))},
                b / "net0" / "last.pt")  # fmt: skip
    code, _, err = compare("--group", "a", str(a), "--group", "b", str(b), "--filters",
                           "--out", str(tmp_path / "o"), capsys=capsys)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not match its reference" in err and "'conv1' of shape [16, 3, 3, 3]" in err


# -- the pairing assumption: same seed, same start ----------------------------------------


class _Silent:
    def emit(self, *args, **kwargs) -> None: ...


def test_same_seed_networks_start_from_identical_weights_with_or_without_grafting(tmp_path):
    """--filters compares filter i of network k across groups: that is the same filter at the
    start only if grafting and the baseline build network k from the same weights. A Trainer
    for network 1 of 2 needs no process group to be built (nothing communicates before fit)."""
    import torch.distributed as dist

    from distgraft.train.trainer import Trainer

    def start(config: Path, network: int, seed: int) -> dict[str, torch.Tensor]:
        cfg = with_overrides(load_config(config), run={"dir": str(tmp_path), "seed": seed})
        info = DistInfo(network, 2, network, network, 0, 2, 1, torch.device("cpu"))
        trainer = Trainer(cfg, info, _Silent())
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    baseline = DIGITS.with_name("digits_baseline.toml")
    grafted = start(DIGITS, 1, 5)
    assert not dist.is_initialized()
    same = start(baseline, 1, 5)
    assert all(torch.equal(grafted[k], same[k]) for k in grafted)
    other_net, other_seed = start(baseline, 0, 5), start(baseline, 1, 6)
    assert any(not torch.equal(grafted[k], other_net[k]) for k in grafted)
    assert any(not torch.equal(grafted[k], other_seed[k]) for k in grafted)


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_reads_the_folders_train_writes(tmp_path):
    """Two groups of two digits runs each (one network per run, 2 epochs), trained by
    ``distgraft train``: the lr of the second group differs."""
    groups: dict[str, list[Path]] = {"base": [], "lr": []}
    for seed in (0, 1):
        for label, lr in (("base", "0.1"), ("lr", "0.05")):
            name = f"{label}{seed}"
            args = ["-m", "distgraft", "train", "--config", str(DIGITS), f"--run.dir={tmp_path}",
                    f"--run.name={name}", "--run.epochs=2", f"--run.seed={seed}",
                    f"--optim.lr={lr}", "--telemetry.console=false",
                    "--telemetry.publish=tcp://127.0.0.1:0"]  # fmt: skip
            proc = run([sys.executable, *args])
            assert proc.returncode == 0, proc.stderr[-3000:]
            groups[label].append(tmp_path / name)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "distgraft", "compare", *group_args(groups), "--json",
           "--filters", "--out", str(out)]  # fmt: skip
    proc = run(cmd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for g in doc["groups"]:
        runs = [run_means(p) for p in groups[g["label"]]]
        assert g["runs"] == 2 and g["networks"] == 2
        assert g["final_mean"] == pytest.approx(np.mean([r["final"] for r in runs]))
        assert g["maxtest_std"] == pytest.approx(np.std([r["maxtest"] for r in runs], ddof=1))
    diff = doc["diffs"][0]
    assert diff["label"] == "lr" and set(diff) == {"label", *METRICS}
    filters = doc["filters"]["groups"]
    assert [r["filters"] for r in filters] == [2 * 80, 2 * 80]  # digits_cnn: 80 conv filters
    assert (out / "compare.png").is_file()
