"""Distillation and mutual learning: the losses against literal computations, frozen
teachers, the logits exchange across real processes, every method with and without
grafting for N in {2, 3} networks and R in {1, 2} replicas, resume, and bad input."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import DIGITS, ROOT, common, env, events, run, torchrun_cmd, worker_with_rank
from dist_helpers import shared_pool, values

from distgraft.comm.dist import DistInfo
from distgraft.compress.archive import base_arch, save_compressed
from distgraft.config import Config, ConfigError, DistillConfig, load_config, with_overrides
from distgraft.distill import kd_loss, mutual_loss
from distgraft.models import build_model
from distgraft.train.distill import Teachers, check_teachers, masked_mutual

# -- the losses against literal per-sample, per-class computations ---------------------------


def _softmax(row: list[float], tau: float = 1.0) -> list[float]:
    top = max(v / tau for v in row)
    e = [math.exp(v / tau - top) for v in row]
    return [x / sum(e) for x in e]


def _literal_kd(student: torch.Tensor, teachers: list[torch.Tensor], tau: float, combine: str):
    total = 0.0
    for b in range(student.shape[0]):
        if combine == "probs":
            probs = [_softmax(t[b].tolist(), tau) for t in teachers]
            pbar = [sum(p[c] for p in probs) / len(probs) for c in range(student.shape[1])]
        else:
            mean = [sum(float(t[b, c]) for t in teachers) / len(teachers)
                    for c in range(student.shape[1])]  # fmt: skip
            pbar = _softmax(mean, tau)
        q = _softmax(student[b].tolist(), tau)
        total += -sum(pbar[c] * math.log(q[c]) for c in range(student.shape[1]))
    return tau * tau * total / student.shape[0]


@pytest.mark.parametrize("combine", ["probs", "logits"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.5])
@pytest.mark.parametrize("n_teachers", [1, 3])
def test_kd_loss_is_the_papers_formula(combine: str, tau: float, n_teachers: int) -> None:
    g = torch.Generator().manual_seed(n_teachers * 10 + int(tau))
    student = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    teachers = [torch.randn(5, 7, generator=g, dtype=torch.float64) * 3 for _ in range(n_teachers)]
    got = float(kd_loss(student, teachers, tau, combine))
    assert got == pytest.approx(_literal_kd(student, teachers, tau, combine), rel=1e-9)


def test_kd_gradient_is_tau_times_the_gap_of_the_softened_outputs() -> None:
    """d/dz of tau^2 softCE(z / tau, pbar) = tau (softmax(z / tau) - pbar) / batch."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, generator=g, requires_grad=True)
    teachers = [torch.randn(4, 6, generator=g) for _ in range(2)]
    kd_loss(z, teachers, 3.0).backward()
    pbar = torch.stack([torch.softmax(t / 3.0, 1) for t in teachers]).mean(0)
    expect = 3.0 * (torch.softmax(z.detach() / 3.0, 1) - pbar) / 4
    torch.testing.assert_close(z.grad, expect)


def test_mutual_loss_is_the_mean_kl_from_the_peers_and_peers_get_no_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    own = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    peers = [torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
             for _ in range(2)]  # fmt: skip
    literal = 0.0
    for peer in peers:
        for b in range(3):
            p, q = _softmax(peer[b].tolist()), _softmax(own[b].tolist())
            literal += sum(p[c] * (math.log(p[c]) - math.log(q[c])) for c in range(5)) / 3
    loss = mutual_loss(own, peers)
    assert float(loss.detach()) == pytest.approx(literal / 2, rel=1e-9)
    loss.backward()
    assert own.grad is not None and all(p.grad is None for p in peers)
    assert float(mutual_loss(own, [own]).detach()) == pytest.approx(0.0, abs=1e-12)


def test_a_non_finite_peer_is_left_out_of_the_mutual_term() -> None:
    own, good = torch.randn(4, 3), torch.randn(4, 3)
    nan = torch.full((4, 3), float("nan"))
    assert torch.equal(masked_mutual(own, [good, nan]), mutual_loss(own, [good]))
    assert float(masked_mutual(own, [nan])) == 0.0


# -- teachers ---------------------------------------------------------------------------------


def _teacher(path: Path, model: str = "digits_cnn", classes: int = 10, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_model(model, classes, 1)
    save_compressed(path, net, base_arch(model, classes, 1, (1, 8, 8)), kind="teacher")
    return path


def test_teachers_are_frozen_verified_recorded_and_leave_the_rng_alone(tmp_path: Path) -> None:
    cfg = DistillConfig(teachers=(str(_teacher(tmp_path / "t0.pt")),
                                  str(_teacher(tmp_path / "t1.pt", seed=1))))  # fmt: skip
    torch.manual_seed(7)
    before = torch.get_rng_state()
    teachers = Teachers(cfg, 0, torch.device("cpu"), channels_last=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(not m.training for m in teachers.models)
    assert all(not p.requires_grad for m in teachers.models for p in m.parameters())
    out = teachers(torch.randn(2, 1, 8, 8))
    assert len(out) == 2 and out[0].shape == (2, 10) and not out[0].requires_grad
    teachers.verify()
    record = teachers.record()
    assert [r["path"] for r in record] == list(cfg.teachers) and len(record[0]["sha256"]) == 64
    assert teachers.changed(record) == []
    with torch.no_grad():
        next(teachers.models[1].parameters()).add_(1e-3)
    with pytest.raises(RuntimeError, match="teacher's weights changed"):
        teachers.verify()
    _teacher(tmp_path / "t1.pt", seed=2)  # the file changes under the run
    again = Teachers(cfg, 0, torch.device("cpu"), channels_last=False)
    assert len(again.changed(record)) == 1 and "t1.pt changed" in again.changed(record)[0]


def test_a_teacher_that_does_not_fit_the_data_is_refused(tmp_path: Path) -> None:
    wrong = _teacher(tmp_path / "c100.pt", classes=100)
    cfg = with_overrides(Config(), data={"name": "digits"},
                         distill={"teachers": (str(wrong),)})  # fmt: skip
    with pytest.raises(ConfigError, match="c100.pt.*100 classes.*has 10 classes"):
        check_teachers(cfg, 2, 10, (1, 8, 8))
    missing = with_overrides(cfg, distill={"teachers": (str(tmp_path / "none.pt"),)})
    with pytest.raises(ConfigError, match="none.pt.*does not exist"):
        check_teachers(missing, 2, 10, (1, 8, 8))


class _Silent:
    def emit(self, *args, **kwargs) -> None: ...


def test_students_start_from_the_same_weights_with_teachers_and_peers(tmp_path: Path) -> None:
    """Baseline, KD and mutual runs of one seed build network 1 from identical weights."""
    from distgraft.train.trainer import Trainer

    teacher = str(_teacher(tmp_path / "t.pt", seed=3))

    def start(**distill) -> dict[str, torch.Tensor]:
        cfg = with_overrides(load_config(DIGITS), run={"dir": str(tmp_path), "seed": 4},
                             distill=distill)  # fmt: skip
        info = DistInfo(1, 2, 1, 1, 0, 2, 1, torch.device("cpu"))
        trainer = Trainer(cfg, info, _Silent())
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    base = start()
    for variant in (start(teachers=(teacher,)), start(mutual=True),
                    start(teachers=(teacher,), mutual=True)):  # fmt: skip
        assert all(torch.equal(base[k], variant[k]) for k in base)


# -- across real processes --------------------------------------------------------------------


def _exchange_task(rank: int, world: int, networks: int, die: int | None) -> list:
    from distgraft.comm.dist import init_distributed
    from distgraft.comm.mutual import exchange_logits

    info = init_distributed(networks, "gloo", 20.0, replica_groups=True)
    mine = torch.full((3, 4), float(10 * info.network + info.replica))
    if rank == die:
        os._exit(1)  # a peer lost in the middle of an epoch
    got = exchange_logits(mine, info, 20.0, epoch=2)
    return [float(t[0, 0]) for t in got]


@pytest.mark.parametrize(("world", "networks"), [(4, 2), (3, 3)])
def test_each_replica_gets_the_logits_of_the_same_replica_of_every_network(world, networks):
    replicas = world // networks
    got = values(shared_pool(6).run(_exchange_task, world, networks, None, deadline_s=120))
    for rank, row in enumerate(got):
        j = rank % replicas
        assert row == [10.0 * k + j for k in range(networks)]


def test_a_lost_peer_is_named_by_the_mutual_exchange() -> None:
    outcomes = shared_pool(6).run(_exchange_task, 3, 3, 1, deadline_s=120)
    for o in (outcomes[0], outcomes[2]):
        assert o.exc_type == "PeerError", o.error
        assert "network 1 (rank 1) did not answer the mutual-learning exchange" in o.error
        assert "at epoch 3" in o.error and "network 0 (" not in o.error.split("did not")[0][-40:]


def _trainer_task(rank: int, world: int, networks: int, overrides: dict, teacher: str) -> dict:
    from distgraft.comm.dist import init_distributed
    from distgraft.train.trainer import Trainer

    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    if teacher:
        cfg = with_overrides(cfg, distill={"teachers": (teacher,)})
    info = init_distributed(networks, "gloo", 60.0, replica_groups=cfg.distill.mutual)
    trainer = Trainer(cfg, info, _Silent())
    trainer.train_loader.set_epoch(0)
    x, _ = next(iter(trainer.train_loader))
    summary = trainer.fit()
    finite = all(bool(torch.isfinite(t).all()) for t in trainer.model.state_dict().values()
                 if t.is_floating_point())  # fmt: skip
    return {"network": info.network, "replica": info.replica, "first": float(x.sum()),
            "terms": sorted(trainer.objective.terms), "finite": finite,
            "grafted": trainer.grafter is not None, "acc": summary.final_acc}  # fmt: skip


LAYOUTS = [(2, 1), (3, 1), (2, 2), (3, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("graft", ["external", "none"])
@pytest.mark.parametrize("method", ["kd", "mutual", "both"])
@pytest.mark.parametrize(("networks", "replicas"), LAYOUTS)
def test_every_method_trains_with_and_without_grafting_in_every_layout(
    tmp_path: Path, networks: int, replicas: int, method: str, graft: str
) -> None:
    world = networks * replicas
    teacher = str(_teacher(tmp_path / "t.pt")) if method in ("kd", "both") else ""
    overrides = {"run.dir": str(tmp_path), "run.name": "r", "run.epochs": 1,
                 "model.name": "digits_cnn", "model.channels_last": "false",
                 "data.name": "synthetic", "data.synthetic_shape": "[1, 8, 8]",
                 "data.synthetic_train": 96, "data.synthetic_test": 32, "data.batch_size": 16,
                 "graft.source": graft, "graft.networks": networks,
                 "distill.mutual": str(method in ("mutual", "both")).lower(),
                 "telemetry.zmq": "false", "telemetry.console": "false"}  # fmt: skip
    got = values(shared_pool(6).run(_trainer_task, world, networks, overrides, teacher,
                                    deadline_s=240))  # fmt: skip
    expect = ["ce"] + (["kd"] if teacher else []) + (["mutual"] if method != "kd" else [])
    for row in got:
        assert row["terms"] == expect and row["finite"] and row["grafted"] == (graft != "none")
    if method != "kd":  # one data order for all networks: replica j sees the same batches
        for j in range(replicas):
            firsts = {row["first"] for row in got if row["replica"] == j}
            assert len(firsts) == 1, got
    else:  # each network its own order
        assert len({row["first"] for row in got if row["replica"] == 0}) == networks


# -- end to end under torchrun ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_cultivation_with_mutual_learning_resumes_after_kill_9_bit_identically(tmp_path) -> None:
    """Grafting + teachers + mutual learning, 2 networks: kill -9 of a worker mid-run, the
    restarted run ends with the weights of an uninterrupted one (CPU, fixed seeds). The
    resume guarantee of every run: grafting alone takes the same path with fewer parts."""
    teacher = _teacher(tmp_path / "t.pt")
    extra = [f"--distill.teachers=['{teacher}']", "--distill.mutual=true"]
    epochs = 4
    reference = run(torchrun_cmd(2, *common(tmp_path, "ref", epochs), *extra), timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    cmd = torchrun_cmd(2, *common(tmp_path, "killed", epochs), *extra, restarts=1)
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    saved = [tmp_path / "killed" / f"net{k}" / "last.pt" for k in (0, 1)]  # epoch 1, both
    deadline = time.time() + 200
    while not all(p.exists() for p in saved) and time.time() < deadline and agent.poll() is None:
        time.sleep(0.02)
    victim = worker_with_rank(agent.pid, 1)
    assert victim is not None, "worker of rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, out[-4000:]
    starts = [e for e in events(tmp_path / "killed") if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["epoch"] >= 1
    for k in (0, 1):
        a = torch.load(tmp_path / "ref" / f"net{k}" / "last.pt", weights_only=True)
        b = torch.load(tmp_path / "killed" / f"net{k}" / "last.pt", weights_only=True)
        assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
        assert b["teachers"][0]["path"] == str(teacher)


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [x for x in (res.stdout + res.stderr).splitlines() if "distgraft train: error:" in x]


@pytest.mark.slow
def test_a_changed_or_missing_teacher_stops_a_resume_with_exit_2(tmp_path) -> None:
    teacher = _teacher(tmp_path / "t.pt")
    extra = [f"--distill.teachers=['{teacher}']"]
    first = run(torchrun_cmd(2, *common(tmp_path, "r", 1), *extra))
    assert first.returncode == 0, first.stderr[-3000:]
    _teacher(teacher, seed=9)  # retrained in place
    res = run(torchrun_cmd(2, *common(tmp_path, "r", 2), *extra))
    errors = _error_lines(res)
    assert res.returncode != 0 and len(errors) == 1, res.stderr[-3000:]
    assert f"teacher {teacher} changed since the checkpoint was written" in errors[0]
    teacher.unlink()
    res = run(torchrun_cmd(2, *common(tmp_path, "r", 2), *extra))
    errors = _error_lines(res)
    assert len(errors) == 1 and "distill.teachers" in errors[0] and "does not exist" in errors[0]
    assert "exitcode  : 2" in res.stderr


def test_mutual_learning_needs_two_networks(tmp_path) -> None:
    cmd = [os.sys.executable, "-m", "distgraft", "train", *common(tmp_path, "r", 1),
           "--distill.mutual=true"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "distill.mutual = true needs at least 2 networks" in res.stderr


def test_a_student_with_an_unfit_teacher_exits_2_before_training(tmp_path) -> None:
    wrong = _teacher(tmp_path / "c100.pt", classes=100)
    cmd = [os.sys.executable, "-m", "distgraft", "train", *common(tmp_path, "r", 1),
           f"--distill.teachers=['{wrong}']"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "c100.pt" in res.stderr and "100 classes" in res.stderr
    assert not (tmp_path / "r" / "net0").exists()

