"""Nothing lost, every failure named: diverged networks, unreadable checkpoints, ranks that
disagree, bad paths.

Unit tests of the decisions (which epoch to resume from, which layers are non-finite, what
the ranks disagree on), then the behaviours end to end with real torchrun runs on the digits
quickstart and real files: NaN injected into a checkpoint, files truncated, a stale temp
file, another model's checkpoint, two agents started with different settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_helpers import ROOT, common, env, events, run, torchrun_cmd
from dist_helpers import free_port
from torch import nn

from distgraft.config import (
    Config,
    ConfigError,
    agreement_view,
    check_run_dir,
    describe_disagreement,
    with_overrides,
)
from distgraft.files import load_reason, save_atomic
from distgraft.graft.step import Grafter
from distgraft.train.checkpoint import (
    Candidate,
    Found,
    ResumeError,
    choose_epoch,
    inspect,
    reconcile_best,
    remove_stale,
    save_epoch,
)
from distgraft.train.health import Health

# -- unit: which epoch a restarted run continues from ----------------------------------------


def _found(network: int, epochs: dict[int, bool], problems=(), refused=()) -> Found:
    cands = {e: Candidate(e, Path(f"net{network}/{e}.pt"), ok) for e, ok in epochs.items()}
    return Found(network, network, f"net{network}", cands, list(problems), list(refused))


def test_resume_takes_the_newest_epoch_every_network_can_load() -> None:
    assert choose_epoch([_found(0, {3: True, 4: True}), _found(1, {4: True, 5: True})]) == 4
    assert choose_epoch([_found(0, {}), _found(1, {})]) == -1  # a new run folder
    # A corrupt last.pt of network 1: both go back to the epoch of its prev.pt.
    assert choose_epoch([_found(0, {3: True, 4: True}), _found(1, {3: True})]) == 3
    # Killed while the first epoch was being saved: network 0 never wrote a file.
    assert choose_epoch([_found(0, {}), _found(1, {0: True})]) == -1
    assert choose_epoch([_found(0, {0: True}), _found(1, {0: True})]) == 0  # both saved it


def test_resume_prefers_an_epoch_at_which_some_network_is_finite() -> None:
    every = [_found(0, {2: True, 4: False}), _found(1, {2: True, 4: False})]
    assert choose_epoch(every) == 2
    # One network diverged: it recovers from its peer, so the newest epoch still wins.
    assert choose_epoch([_found(0, {3: True, 4: True}), _found(1, {3: True, 4: False})]) == 4


@pytest.mark.parametrize(
    ("every", "expect"),
    [
        ([_found(0, {3: True}), _found(1, {}, problems=["net1/last.pt cannot be read (x)"])],
         "network 1 (rank 1) has nothing to resume from (net1/last.pt cannot be read"),
        ([_found(0, {3: True}), _found(1, {})], "no last.pt or prev.pt in net1"),
        ([_found(0, {0: True}), _found(1, {}, problems=["net1/last.pt cannot be read (x)"])],
         "net1/last.pt cannot be read"),
        ([_found(0, {}, problems=["net0/last.pt cannot be read"]), _found(1, {})],
         "no checkpoint can be resumed from: net0/last.pt"),
        ([_found(0, {1: True}), _found(1, {4: True})], "no epoch in common"),
        ([_found(0, {3: True}, refused=["net0/last.pt holds a lenet5 network"]),
          _found(1, {3: True})], "holds a lenet5 network"),
    ],
)  # fmt: skip
def test_resume_refuses_what_would_lose_or_mix_checkpoints(every, expect) -> None:
    with pytest.raises(ResumeError, match="run.resume=false|run.name") as err:
        choose_epoch(every)
    assert expect in str(err.value)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))  # fmt: skip


def _state(model: nn.Module, epoch: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "arch": {"model": "tiny", "edits": []}}  # fmt: skip


def test_inspect_names_unreadable_foreign_and_non_finite_files(tmp_path: Path) -> None:
    model = _tiny()
    good = _state(model, 4)
    save_atomic(good, tmp_path / "last.pt")
    save_atomic(_state(model, 3), tmp_path / "prev.pt")
    found = inspect(tmp_path, model.state_dict(), "tiny")
    assert sorted(found.epochs) == [3, 4] and not found.problems and not found.refused
    assert found.epochs[4].finite and found.epochs[4].path == tmp_path / "last.pt"

    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:1000])
    good["optimizer"]["state"][0]["momentum_buffer"][0] = float("nan")  # momentum counts too
    save_atomic({**good, "epoch": 3}, tmp_path / "prev.pt")
    found = inspect(tmp_path, model.state_dict(), "tiny")
    assert sorted(found.epochs) == [3] and not found.epochs[3].finite
    assert len(found.problems) == 1
    assert found.problems[0].startswith(f"{tmp_path / 'last.pt'} cannot be read (the file is "
                                        "empty, cut short or not a torch file")  # fmt: skip

    other = nn.Sequential(nn.Conv2d(1, 8, 3))
    save_atomic({"epoch": 5, "model": other.state_dict(), "arch": {"model": "lenet5"}},
                tmp_path / "last.pt")  # fmt: skip
    found = inspect(tmp_path, model.state_dict(), "tiny")
    assert found.refused == [f"{tmp_path / 'last.pt'} holds a lenet5 network, this run trains tiny"]


def test_load_errors_never_advise_unsafe_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"obj": Path("x")}, path)  # a pickled object, not a plain container
    with pytest.raises(Exception) as err:  # noqa: PT011 - whatever torch raises
        torch.load(path, weights_only=True)
    assert "weights_only" in str(err.value)
    message = load_reason(err.value)
    assert "False" not in message and "Re-running" not in message
    assert "pickled pathlib" in message


def test_rotation_keeps_prev_when_asked(tmp_path: Path) -> None:
    save_epoch({"epoch": 1}, tmp_path)
    save_epoch({"epoch": 2}, tmp_path)
    save_epoch({"epoch": 3}, tmp_path, rotate=False)  # last.pt held a non-finite state
    assert torch.load(tmp_path / "prev.pt")["epoch"] == 1
    assert torch.load(tmp_path / "last.pt")["epoch"] == 3


def test_stale_temp_files_go_and_best_follows_the_record(tmp_path: Path) -> None:
    (tmp_path / ".last.pt.k2j3.tmp").write_bytes(b"half a save")
    (tmp_path / "keep.txt").write_text("mine")
    assert remove_stale(tmp_path) == [tmp_path / ".last.pt.k2j3.tmp"]
    assert (tmp_path / "keep.txt").exists()
    save_atomic({"epoch": 6}, tmp_path / "last.pt")
    save_atomic({"epoch": 4}, tmp_path / "best.pt")  # killed before best.pt was updated
    assert reconcile_best(tmp_path, tmp_path / "last.pt", epoch=6, best_epoch=6)
    assert torch.load(tmp_path / "best.pt")["epoch"] == 6
    assert not reconcile_best(tmp_path, tmp_path / "last.pt", epoch=6, best_epoch=6)
    assert not reconcile_best(tmp_path, tmp_path / "last.pt", epoch=7, best_epoch=6)


# -- unit: health and recovery ---------------------------------------------------------------


def test_health_finds_weights_buffers_and_momentum_and_resets_only_those() -> None:
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    health = Health(model, opt)
    assert health.names == ["0", "4"] and health.bad_layers() == [False, False]
    with torch.no_grad():
        model[1].running_var[0] = float("inf")  # a BN buffer: the conv's layer
    assert health.bad_layers() == [True, False]
    model[1].running_var.fill_(1.0)
    opt.state[model[4].weight]["momentum_buffer"][0, 0] = float("nan")
    assert health.bad_layers() == [False, True]
    assert health.layer_names([False, True]) == ["4"]
    health.reset_optimizer([False, True])
    assert model[4].weight not in opt.state and model[0].weight in opt.state
    assert health.bad_layers() == [False, False]


def test_a_layer_flagged_bad_takes_the_peer_and_an_all_kept_graft_does_not_crash() -> None:
    """One network, so the 'peer' is a copy of itself: flagged layers are copied whole."""
    from distgraft.comm.dist import close, init_distributed
    from distgraft.config import GraftConfig

    info = init_distributed(env={})
    try:
        model = _tiny()
        grafter = Grafter(model, info, GraftConfig(), timeout_s=30)
        record = grafter.step(0, own_bad=[True, True])  # every layer taken: nothing to lerp
        assert record.taken == [0, 1] and record.alpha == [0.0, 0.0]
        assert "took network 0's weights in 0, 4" in record.warnings[0]
        assert "taken" not in record.event_fields()
    finally:
        close()


# -- unit: settings that must agree ----------------------------------------------------------


def test_agreement_view_leaves_out_per_node_settings_and_names_differences() -> None:
    a = Config()
    b = with_overrides(a, telemetry={"console": False}, data={"root": "/n1", "workers": 2},
                       run={"dir": "/scratch"})  # fmt: skip
    assert agreement_view(a) == agreement_view(b)
    c = with_overrides(a, graft={"wire_dtype": "bfloat16", "every": 5})
    views = [agreement_view(a), agreement_view(c), agreement_view(a)]
    text = describe_disagreement(views)
    assert 'graft.wire_dtype = "float32" on ranks 0, 2; "bfloat16" on rank 1' in text
    assert "graft.every = 1 on ranks 0, 2; 5 on rank 1" in text
    assert "telemetry.*" in text  # what may differ is said


# -- bad paths: one line, exit 2, nothing written -------------------------------------------


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """A folder nobody can write into, root included (chattr +i; chmod for other users)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
        pytest.skip("root can write anywhere and chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _train(*args: str) -> subprocess.CompletedProcess:
    cmd = [os.sys.executable, "-m", "distgraft", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)


def _one_line_exit_2(res: subprocess.CompletedProcess, *expect: str) -> None:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgraft train: error: "), res.stderr
    for text in expect:
        assert text in lines[0]


def test_bad_config_values_and_run_folders_exit_2(tmp_path: Path) -> None:
    digits = str(ROOT / "configs" / "digits.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[run]\nname = "r\xe9sum\xe9"\n')
    _one_line_exit_2(_train("--config", str(bad)), "latin1.toml", "not UTF-8")
    _one_line_exit_2(_train("--config", digits, "--dist.timeout_s=inf"), "dist.timeout_s", "finite")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_exit_2(_train("--config", digits, f"--run.dir={afile}"), "run.dir", "is a file")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("x")
    _one_line_exit_2(_train("--config", digits, f"--run.dir={tmp_path / 'runs'}", "--run.name=r"),
                     "run.name", "is a file")  # fmt: skip
    with read_only(tmp_path / "ro"):
        res = _train("--config", digits, f"--run.dir={tmp_path / 'ro'}", "--run.name=r")
        _one_line_exit_2(res, "run.dir", "cannot write")
    assert not (tmp_path / "ro" / "r").exists()


def test_check_run_dir_makes_the_folder() -> None:
    with pytest.raises(ConfigError, match="run.dir"):
        check_run_dir(with_overrides(Config(), run={"dir": "/proc/distgraft"}))


# -- end to end: real torchrun runs on the digits quickstart ---------------------------------

BASE_EPOCHS = 3


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-epoch run of the quickstart (2 grafting networks): copied by each test."""
    root = tmp_path_factory.mktemp("base")
    res = run(torchrun_cmd(2, *common(root, "r", BASE_EPOCHS)))
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "r"


def _copy(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path / "r")
    return tmp_path / "r"


def _resume(
    run_dir: Path, epochs: int, *extra: str, restarts: int = 0
) -> subprocess.CompletedProcess:
    args = [*common(run_dir.parent, run_dir.name, epochs), *extra]
    return run(torchrun_cmd(2, *args, restarts=restarts))


def _poison(path: Path, key: str = "conv2.weight") -> None:
    state = torch.load(path, weights_only=True)
    state["model"][key][0, 0, 0, 0] = float("nan")
    torch.save(state, path)


def _finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)
    tensors = list(state["model"].values())
    tensors += [v for e in state["optimizer"]["state"].values() for v in e.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _summary(run_dir: Path) -> dict[int, dict]:
    last = [e for e in events(run_dir) if e["event"] == "summary"][-1]
    return {row["network"]: row for row in last["networks"]}


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [x for x in (res.stdout + res.stderr).splitlines() if "distgraft train: error:" in x]


@pytest.mark.slow
@pytest.mark.parametrize("level", ["layer", "filter"])
def test_a_diverged_network_recovers_from_its_peer(base_run: Path, tmp_path: Path, level) -> None:
    """NaN in network 1's last.pt: it pauses, takes network 0's finite layers at the next graft
    (momentum reset), and network 0 never receives a non-finite value."""
    run_dir = _copy(base_run, tmp_path)
    _poison(run_dir / "net1" / "last.pt")
    res = _resume(run_dir, BASE_EPOCHS + 3, f"--graft.level={level}")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("last.pt", "prev.pt", "best.pt"):
        assert _finite(run_dir / "net0" / name), f"net0/{name} holds a non-finite value"
    assert _finite(run_dir / "net1" / "last.pt") and _finite(run_dir / "net1" / "best.pt")
    rows = _summary(run_dir)
    assert rows[1]["diverged_epoch"] == BASE_EPOCHS and rows[1]["recovered_epoch"] == BASE_EPOCHS
    assert rows[0]["diverged_epoch"] is None
    assert abs(rows[1]["final_acc"] - rows[0]["final_acc"]) <= 2.0
    warnings = [e["message"] for e in events(run_dir) if e["event"] == "warning"]
    assert any("network 1 is non-finite after epoch 4 in 1 layer(s): conv2" in w for w in warnings)
    assert any("network 1 recovered" in w for w in warnings)
    assert "network 1 diverged (non-finite) after epoch 4, recovered" in res.stdout
    for k in (0, 1):  # best.pt holds what the summary calls best
        best = torch.load(run_dir / f"net{k}" / "best.pt", weights_only=True)
        assert best["epoch"] == rows[k]["best_epoch"]
        assert best["record"]["best_acc"] == rows[k]["best_acc"]


@pytest.mark.slow
def test_without_a_peer_a_diverged_network_stops_and_the_others_go_on(
    base_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(base_run, tmp_path)
    finite_prev = (run_dir / "net1" / "prev.pt").read_bytes()
    _poison(run_dir / "net1" / "last.pt")
    res = _resume(run_dir, BASE_EPOCHS + 2, "--graft.source=none")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _summary(run_dir)
    assert rows[1]["stopped"] and rows[1]["recovered_epoch"] is None
    assert not rows[0]["stopped"] and _finite(run_dir / "net0" / "last.pt")
    assert (run_dir / "net1" / "prev.pt").read_bytes() == finite_prev  # never rotated away
    trained = {(e["network"], e["epoch"]) for e in events(run_dir)
               if e["event"] == "epoch" and e["train_loss"] is not None}  # fmt: skip
    assert {(0, 3), (0, 4)} <= trained and not {(1, 3), (1, 4)} & trained


@pytest.mark.slow
def test_when_every_network_diverged_the_run_stops_and_resumes_from_finite_ones(
    base_run: Path, tmp_path: Path
) -> None:
    """An lr far too high makes both diverge in the same epoch: the run stops (exit 1, one
    line); run again with a sane lr, it continues from the last finite checkpoints."""
    run_dir = _copy(base_run, tmp_path)
    res = _resume(run_dir, BASE_EPOCHS + 2, "--optim.lr=1e12")
    assert res.returncode == 1, res.stderr[-3000:]
    errors = _error_lines(res)
    assert len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith("distgraft train: error: every network is non-finite after "
                                "epoch 4: nothing is left to recover from")  # fmt: skip
    for k in (0, 1):
        assert _finite(run_dir / f"net{k}" / "prev.pt")
        assert not _finite(run_dir / f"net{k}" / "last.pt")
    again = _resume(run_dir, BASE_EPOCHS + 2)
    assert again.returncode == 0, again.stderr[-3000:]
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert starts[-1]["epoch"] == BASE_EPOCHS  # from the end of epoch 3, the last finite one
    assert all(_finite(run_dir / f"net{k}" / "last.pt") for k in (0, 1))


def _digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_a_network_with_nothing_loadable_stops_the_run_before_anything_is_written(
    base_run: Path, tmp_path: Path
) -> None:
    """Every attempt under --max-restarts stops at once with the same one line, exit 2."""
    run_dir = _copy(base_run, tmp_path)
    for name in ("last.pt", "prev.pt"):
        path = run_dir / "net1" / name
        path.write_bytes(path.read_bytes()[:1000])
    before, lines = _digest(run_dir / "net0"), len(events(run_dir))
    res = _resume(run_dir, BASE_EPOCHS + 2, restarts=1)
    assert res.returncode != 0
    errors = _error_lines(res)
    assert len(errors) == 2 and errors[0] == errors[1]  # once per attempt
    for name in ("last.pt", "prev.pt"):
        bad = run_dir / "net1" / name
        assert f"{bad} cannot be read (the file is empty, cut short or not a torch" in errors[0]
    assert "network 1 (rank 1) has nothing to resume from" in errors[0]
    assert "exitcode  : 2" in res.stderr
    assert _digest(run_dir / "net0") == before
    assert [e["event"] for e in events(run_dir)[lines:]] == ["error"] * 4
    assert {e["epoch"] for e in events(run_dir)[lines:]} == {BASE_EPOCHS}  # the run's epoch
    assert "| ERROR:" not in res.stdout + res.stderr  # no console line per network besides


@pytest.mark.slow
def test_an_unreadable_last_is_never_rotated_over_a_good_prev(
    base_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(base_run, tmp_path)
    good_prev = (run_dir / "net1" / "prev.pt").read_bytes()
    last = run_dir / "net1" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    stale = run_dir / "net0" / ".last.pt.x8y2.tmp"
    stale.write_bytes(b"a save killed halfway")
    res = _resume(run_dir, BASE_EPOCHS)  # both go back to epoch 2 and train epoch 3 again
    assert res.returncode == 0, res.stderr[-3000:]
    assert not stale.exists()
    assert (run_dir / "net1" / "prev.pt").read_bytes() == good_prev
    assert torch.load(last, weights_only=True)["epoch"] == BASE_EPOCHS - 1
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert starts[-1]["epoch"] == BASE_EPOCHS - 1
    warned = [e["message"] for e in events(run_dir) if e["event"] == "warning"]
    assert any(f"{last} cannot be read" in w and "resuming from" in w for w in warned), warned


@pytest.mark.slow
def test_another_models_checkpoint_in_the_run_folder_exits_2(
    base_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(base_run, tmp_path)
    res = _resume(run_dir, BASE_EPOCHS + 1, "--model.name=lenet5")
    assert res.returncode != 0
    errors = _error_lines(res)
    assert len(errors) == 1, res.stderr[-3000:]
    assert "holds a digits_cnn network, this run trains lenet5" in errors[0]
    assert "--run.resume=false" in errors[0]


@pytest.mark.slow
def test_ranks_started_with_different_settings_exit_2_naming_them(tmp_path: Path) -> None:
    """Two agents of one job (a per-node override gone wrong): both stop before training."""
    port = free_port()

    def agent(*extra: str) -> subprocess.Popen:
        cmd = [os.sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "agree", "-m", "distgraft",
               "train", *common(tmp_path, "r", 2), *extra]  # fmt: skip
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    a = agent("--telemetry.console=false")  # a per-node setting: allowed to differ
    b = agent("--graft.wire_dtype=bfloat16")
    outs = [p.communicate(timeout=180)[0] for p in (a, b)]
    assert a.returncode != 0 and b.returncode != 0
    for out in outs:  # each node's log says it once, and its worker exits 2
        errors = [x for x in out.splitlines() if "distgraft train: error:" in x]
        assert len(errors) == 1, out[-4000:]
        assert "graft.wire_dtype" in errors[0] and "bfloat16" in errors[0]
        assert "telemetry.console" not in errors[0]
        assert re.search(r"exitcode\s*:\s*2\b", out), out[-4000:]
    assert not list((tmp_path / "r").glob("net*/last.pt"))


@pytest.mark.slow
def test_networks_pruned_differently_do_not_graft_unless_allowed(
    base_run: Path, tmp_path: Path
) -> None:
    outs = []
    # Pruned one by one, by two criteria: other kept channels, the same shapes.
    for k, criterion in ((0, "l1"), (1, "entropy")):
        out = tmp_path / f"p{k}.pt"
        res = subprocess.run([os.sys.executable, "-m", "distgraft", "compress", "prune",
                              str(base_run / f"net{k}" / "last.pt"), "--ratio", "0.5",
                              "--criterion", criterion, "--out", str(out)], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        outs.append(json.dumps(torch.load(out, weights_only=True)["arch"]["edits"]))
    assert outs[0] != outs[1]
    init = f"--model.init={tmp_path / 'p{network}.pt'}"
    res = run(torchrun_cmd(2, *common(tmp_path, "ft", 1), init))
    errors = _error_lines(res)
    assert len(errors) == 1 and "were pruned differently" in errors[0], res.stderr[-3000:]
    assert "graft.allow_mixed_pruning" in errors[0]
    allowed = run(torchrun_cmd(2, *common(tmp_path, "ft", 1), init,
                               "--graft.allow_mixed_pruning=true", "--print-config"))  # fmt: skip
    assert allowed.returncode == 0 and "allow_mixed_pruning = true" in allowed.stdout
