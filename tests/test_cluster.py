"""Launch everywhere: the real launch scripts training the real trainer on digits (CPU, gloo).

* ``launch/multinode.sh`` twice on this machine plays two nodes meeting at a c10d endpoint.
* ``launch/slurm/{multi_node,srun_plain}.sbatch`` run for real under stub ``sbatch``,
  ``srun`` and ``scontrol`` executables (first on ``PATH``) that do what Slurm does on one
  machine: sbatch sets the job variables from the ``#SBATCH`` lines and its own options and
  runs a spool copy of the script; srun starts one process per task with SLURM_PROCID,
  SLURM_LOCALID, SLURM_NODEID set and returns the worst exit code.
* Elastic restart: a worker of a two-node run is killed with SIGKILL; the agents restart the
  workers, which resume from the last epoch boundary.

Every process writes to a log in ``tmp_path``; a failing assertion shows the log tails.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
PYTHON = sys.executable  # the interpreter running pytest: the venv with torch and distgraft

# Launcher, Slurm and script knobs that must not leak in from the caller's environment.
_LEAKY = re.compile(
    r"(NPROC|NNODES|NODE_RANK|MAX_RESTARTS|MASTER_ADDR|MASTER_PORT|RDZV_\w+|PYTHON|RANK"
    r"|LOCAL_RANK|WORLD_SIZE|GROUP_RANK|SLURM_\w+|SRUN_\w+|TORCHELASTIC_\w+|STUB_\w+)"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LEAKY.fullmatch(k)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=PYTHON, **extra)
    return env


def _train_args(run_dir: Path, name: str, epochs: int, *extra: str) -> list[str]:
    # A relative config path: the scripts must run from the submit dir / repository root.
    return [
        "--config", "configs/digits.toml", f"--run.dir={run_dir}", f"--run.name={name}",
        f"--run.epochs={epochs}", "--telemetry.publish=tcp://127.0.0.1:0", *extra,
    ]  # fmt: skip


def _events(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tails(*logs: Path, n: int = 2500) -> str:
    out = []
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        out.append(f"----- {log.name} (last {n} chars) -----\n{text[-n:]}")
    return "\n".join(out)


class _Procs:
    """Processes started in their own sessions, so a whole tree can be stopped at once."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.dead: list[subprocess.Popen] = []  # replaced by relaunch(): stopped, not awaited
        self.envs: dict[int, dict[str, str]] = {}  # pid -> environment it was started with

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with log.open("w") as f:
            p = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(p)
        self.envs[p.pid] = env
        return p

    def relaunch(self, index: int, log: Path) -> subprocess.Popen:
        """Start process ``index``'s command again, in its place (a node restarted by hand)."""
        old = self.procs.pop(index)
        old.wait(timeout=30)
        self.dead.append(old)
        new = self.start(list(old.args), log, self.envs[old.pid])
        self.procs.insert(index, self.procs.pop())
        return new

    def wait_all(self, timeout: float, grace: float = 10.0) -> list[int | None]:
        """Wait for every process; once one fails, give the others ``grace`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.1)
        return [p.poll() for p in self.procs]

    def stop(self) -> None:
        # The whole session: also workers or tasks left behind by an agent that exited.
        for p in self.procs + self.dead:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.fixture
def procs():
    ps = _Procs()
    yield ps
    ps.stop()


def _assert_grafted(run: Path, epochs: int, logs: str) -> list[dict]:
    """Both networks trained every epoch, grafted from each other, and a summary exists."""
    evs = _events(run)
    assert evs, f"no metrics.jsonl in {run}\n{logs}"
    for net in (0, 1):
        seen = {e["epoch"] for e in evs if e["event"] == "epoch" and e["network"] == net}
        assert seen == set(range(epochs)), f"net{net} epochs {sorted(seen)}\n{logs}"
        grafts = [e for e in evs if e["event"] == "graft" and e["network"] == net]
        assert grafts and all(g["peer"] == 1 - net for g in grafts), logs
        assert (run / f"net{net}" / "last.pt").exists(), logs
    summary = [e for e in evs if e["event"] == "summary"]
    assert len(summary) == 1 and len(summary[0]["networks"]) == 2, logs
    assert all(e["world_size"] == 2 for e in evs if e["event"] == "start"), logs
    return evs


# ---------------------------------------------------------------- multinode.sh, 2 nodes


def _multinode(
    procs: _Procs,
    tmp_path: Path,
    args: list[str],
    per_node: tuple[dict[str, str], dict[str, str]] = ({}, {}),
    **knobs: str,
) -> list[Path]:
    """Two launch/multinode.sh on 127.0.0.1, one worker each: a 2-node, 2-network job;
    ``per_node`` holds each node's own knobs (NODE_RANK, LOCAL_ADDR)."""
    env = _env(
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        NNODES="2",
        NPROC="1",
        RDZV_ID=f"{tmp_path.name}-{os.getpid()}",
        **knobs,
    )
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    for log, own in zip(logs, per_node, strict=True):  # the same command on each "node"
        procs.start(["bash", str(LAUNCH / "multinode.sh"), *args], log, {**env, **own})
    return logs


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_multinode_sh_two_nodes_graft(procs, tmp_path: Path) -> None:
    logs = _multinode(procs, tmp_path, _train_args(tmp_path, "mn", 1))
    codes = procs.wait_all(timeout=130)
    tails = _tails(*logs)
    assert codes == [0, 0], f"exit codes {codes}\n{tails}"
    _assert_grafted(tmp_path / "mn", 1, tails)


# ------------------------------------------------------------------- Slurm, stubbed

STUB_SBATCH = r"""#!{python}
# sbatch stand-in: runs the job at once (like `sbatch --wait`) on this machine.
import os, re, shutil, subprocess, sys
argv = sys.argv[1:]
cli = {{}}
while argv and argv[0].startswith("-"):
    key, _, value = argv.pop(0).lstrip("-").partition("=")
    cli[key] = value
script, args = argv[0], argv[1:]
opts = dict(re.findall(r"^#SBATCH\s+--([\w-]+)=?(\S*)", open(script).read(), re.M))
opts.update(cli)  # command-line options override #SBATCH lines
job = os.environ.get("STUB_JOB_ID", "4242")
nodes = int(opts.get("nodes", "1"))
per_node = int(opts.get("ntasks-per-node", "1"))
hosts = os.environ["STUB_HOSTS"].split(",")[:nodes]
assert len(hosts) == nodes, f"STUB_HOSTS has fewer than {{nodes}} hosts"
env = dict(os.environ)
env.update(
    SLURM_JOB_ID=job, SLURM_JOBID=job, SLURM_JOB_NAME=opts.get("job-name", "sbatch"),
    SLURM_JOB_NODELIST=",".join(hosts), SLURM_NODELIST=",".join(hosts),
    SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_NTASKS=str(nodes * per_node), SLURM_NPROCS=str(nodes * per_node),
    SLURM_NTASKS_PER_NODE=str(per_node), SLURM_SUBMIT_DIR=os.getcwd(),
    SLURM_SUBMIT_HOST="localhost", SLURM_RESTART_COUNT="0",
    SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
)
if "cpus-per-task" in opts:
    env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
# Slurm runs a copy of the script from its spool dir, in the submit dir.
spool = os.path.join(os.environ["STUB_SPOOL"], "job" + job)
os.makedirs(spool, exist_ok=True)
copy = os.path.join(spool, "slurm_script")
shutil.copy(script, copy)
os.chmod(copy, 0o755)
out = opts.get("output", "slurm-%j.out").replace("%j", job)
mode = "a" if opts.get("open-mode") == "append" else "w"
print("Submitted batch job " + job, flush=True)
with open(out, mode) as log:
    sys.exit(subprocess.run([copy, *args], env=env, stdout=log, stderr=log).returncode)
"""

STUB_SRUN = r"""#!{python}
# srun stand-in: one process per task, Slurm's per-task variables, worst exit code.
import json, os, subprocess, sys, time
argv = sys.argv[1:]
opts = {{}}
while argv and argv[0].startswith("-"):
    key, _, value = argv.pop(0).lstrip("-").partition("=")
    opts[key] = value
nnodes = int(os.environ["SLURM_NNODES"])
if "ntasks-per-node" in opts:
    per_node = int(opts["ntasks-per-node"])
    ntasks = per_node * nnodes
else:
    ntasks = int(opts.get("ntasks", os.environ["SLURM_NTASKS"]))
    per_node = -(-ntasks // nnodes)
hosts = os.environ["SLURM_JOB_NODELIST"].split(",")
with open(os.environ["STUB_RECORD"], "a") as f:
    f.write(json.dumps({{"opts": opts, "argv": argv, "ntasks": ntasks,
                        "srun_cpus": os.environ.get("SRUN_CPUS_PER_TASK")}}) + "\n")
tasks = []
for i in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
               SLURM_NODEID=str(i // per_node), SLURMD_NODENAME=hosts[i // per_node],
               SLURM_NTASKS=str(ntasks), SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_ID="0")
    if "SRUN_CPUS_PER_TASK" in env:
        env["SLURM_CPUS_PER_TASK"] = env["SRUN_CPUS_PER_TASK"]
    tasks.append(subprocess.Popen(argv, env=env))
kill_on_bad_exit = opts.get("kill-on-bad-exit", "0") != "0"  # a bare flag means 1
while any(t.poll() is None for t in tasks):
    if kill_on_bad_exit and any(t.poll() not in (None, 0) for t in tasks):
        for t in tasks:
            if t.poll() is None:
                t.terminate()
    time.sleep(0.1)
sys.exit(max(128 - t.returncode if t.returncode < 0 else t.returncode for t in tasks))
"""

STUB_SCONTROL = r"""#!/bin/bash
# scontrol stand-in: only `scontrol show hostnames LIST` (a comma-separated LIST here).
set -euo pipefail
if [[ "${1:-} ${2:-}" == "show hostnames" || "${1:-} ${2:-}" == "show hostname" ]]; then
    tr ',' '\n' <<<"${3:-$SLURM_JOB_NODELIST}"
    exit 0
fi
echo "stub scontrol: unsupported: $*" >&2
exit 1
"""


class _Slurm:
    """A bin/ with stub sbatch, srun and scontrol, and how to submit a job through them."""

    # Two names of this machine: the first one hosts the store / rendezvous.
    HOSTS = "127.0.0.1,localhost"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.record = tmp / "srun_calls.jsonl"
        for name, text in (("sbatch", STUB_SBATCH), ("srun", STUB_SRUN)):
            (self.bin / name).write_text(text.format(python=PYTHON))
        (self.bin / "scontrol").write_text(STUB_SCONTROL)
        for exe in self.bin.iterdir():
            exe.chmod(0o755)

    def submit(
        self, procs: _Procs, script: str, sbatch_opts: list[str], args: list[str], **knobs: str
    ) -> tuple[Path, Path]:
        """Start ``sbatch --wait ... script args``; (the job's log, sbatch's own output)."""
        job = str(free_port())  # some unique number
        env = _env(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            STUB_HOSTS=self.HOSTS,
            STUB_JOB_ID=job,
            STUB_SPOOL=str(self.tmp / "spool"),
            STUB_RECORD=str(self.record),
            **knobs,
        )
        out = self.tmp / f"slurm-{job}.out"
        cmd = ["sbatch", "--wait", f"--output={self.tmp}/slurm-%j.out", *sbatch_opts]
        procs.start([*cmd, script, *args], self.tmp / "sbatch.log", env)
        return out, self.tmp / "sbatch.log"

    def calls(self) -> list[dict]:
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        return [json.loads(line) for line in lines]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slurm_multi_node_sbatch_two_nodes(procs, tmp_path: Path) -> None:
    slurm = _Slurm(tmp_path)
    port = free_port()
    out, sblog = slurm.submit(
        procs,
        "launch/slurm/multi_node.sbatch",
        ["--nodes=2"],
        _train_args(tmp_path, "slurm_mn", 1),
        NPROC="1",
        MAX_RESTARTS="0",
        RDZV_PORT=str(port),
    )
    codes = procs.wait_all(timeout=130)
    tails = _tails(sblog, out)
    assert codes == [0], f"sbatch exit {codes}\n{tails}"
    assert f"2 nodes x 1 workers, rendezvous 127.0.0.1:{port}" in out.read_text(), tails
    (call,) = slurm.calls()
    assert call["ntasks"] == 2 and call["opts"] == {"ntasks-per-node": "1"}, call
    assert call["argv"][:3] == [PYTHON, "-m", "torch.distributed.run"], call
    assert call["srun_cpus"] == "32", call  # --cpus-per-task handed on to srun
    _assert_grafted(tmp_path / "slurm_mn", 1, tails)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slurm_srun_plain_sbatch_two_tasks(procs, tmp_path: Path) -> None:
    slurm = _Slurm(tmp_path)
    port = free_port()
    out, sblog = slurm.submit(
        procs,
        "launch/slurm/srun_plain.sbatch",
        ["--nodes=1", "--ntasks-per-node=2"],  # LOCAL_RANK 0 and 1 from SLURM_LOCALID
        _train_args(tmp_path, "slurm_plain", 1),
        MASTER_PORT=str(port),
    )
    codes = procs.wait_all(timeout=130)
    tails = _tails(sblog, out)
    assert codes == [0], f"sbatch exit {codes}\n{tails}"
    assert f"2 tasks, store 127.0.0.1:{port}" in out.read_text(), tails
    (call,) = slurm.calls()
    assert call["ntasks"] == 2 and call["argv"][:4] == [PYTHON, "-m", "distgraft", "train"]
    assert call["opts"] == {"kill-on-bad-exit": "1", "gpu-bind": "none"}, call
    _assert_grafted(tmp_path / "slurm_plain", 1, tails)


# ---------------------------------------------------------------- elastic restart


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # the field after "(comm)" is the state, then the parent pid
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(d.name))
    return kids


def _worker_of_rank(agents: list[int], rank: int) -> tuple[int, int] | None:
    """(agent index, pid) of the torchrun worker whose environment says RANK=rank."""
    for i, agent in enumerate(agents):
        for pid in _children(agent):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return i, pid
    return None


def _await_epoch(procs: _Procs, run: Path, epoch: int, logs: list[Path]) -> None:
    """Wait until both networks have finished ``epoch`` (an epoch event each)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs.procs), _tails(*logs)
        done = {e["network"] for e in _events(run) if e["event"] == "epoch" and e["epoch"] >= epoch}
        if done == {0, 1}:
            return
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} not finished in time\n" + _tails(*logs))


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_elastic_restart_after_sigkill_resumes(procs, tmp_path: Path) -> None:
    epochs = 6
    # dist.timeout_s bounds how long a broken restart can hang before it fails.
    args = _train_args(tmp_path, "elastic", epochs, "--dist.timeout_s=30")
    logs = _multinode(procs, tmp_path, args, MAX_RESTARTS="1")
    agents = [p.pid for p in procs.procs]  # multinode.sh execs torchrun: same pid
    _await_epoch(procs, tmp_path / "elastic", 1, logs)
    victim = _worker_of_rank(agents, 1)
    assert victim is not None, "worker of rank 1 not found\n" + _tails(*logs)
    os.kill(victim[1], signal.SIGKILL)

    codes = procs.wait_all(timeout=140)
    tails = f"(killed the rank 1 worker of node{victim[0]})\n" + _tails(*logs)
    assert codes == [0, 0], f"exit codes {codes}\n{tails}"
    evs = _assert_grafted(tmp_path / "elastic", epochs, tails)
    starts = [e for e in evs if e["event"] == "start"]
    assert len(starts) == 2, f"{len(starts)} start events\n{tails}"
    assert starts[1]["epoch"] >= 1, f"the restart did not resume: {starts[1]}\n{tails}"
    # Network 0's worker failed with its peer, in the epoch it was in (or its closing barrier).
    (err,) = [e for e in evs if e["event"] == "error"]
    done = max(e["epoch"] for e in evs[: evs.index(err)] if e["event"] == "epoch" and
               e["network"] == err["network"])  # fmt: skip
    assert err["epoch"] in (done, done + 1), f"error event at epoch {err['epoch']}\n{tails}"


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts workers in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_multinode_sh_survives_relaunched_rank0_node(procs, tmp_path: Path) -> None:
    """A node crash: the rank-0 agent and its workers die by SIGKILL, and the node is started
    again with the same command and RDZV_ID. The run goes on: both agents end with exit 0 and
    each network trains every epoch exactly once.

    Nodes take ranks in the order of their addresses, so node0 (127.0.0.1) is rank 0 before
    and after its relaunch, while node1 (127.0.0.2) hosts the rendezvous: the case where
    torchrun's shared agent store left node1's workers dialling the dead node0's port."""
    epochs = 8
    args = _train_args(tmp_path, "relaunch", epochs, "--dist.timeout_s=30")
    nodes = ({"LOCAL_ADDR": "127.0.0.1", "NODE_RANK": "1"},
             {"LOCAL_ADDR": "127.0.0.2", "NODE_RANK": "0"})  # fmt: skip
    logs = _multinode(procs, tmp_path, args, nodes, MAX_RESTARTS="3")
    _await_epoch(procs, tmp_path / "relaunch", 1, logs)
    agents = [p.pid for p in procs.procs]  # multinode.sh execs torchrun: same pid
    found = _worker_of_rank(agents, 0)
    assert found is not None and found[0] == 0, f"rank 0 not on node0: {found}\n" + _tails(*logs)
    for pid in _tree(agents[0]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    relaunched = tmp_path / "node0.relaunched.log"
    agent = procs.relaunch(0, relaunched).pid
    deadline = time.monotonic() + 60  # rank 0 again: the case the store fix is about
    while _worker_of_rank([agent], 0) is None and time.monotonic() < deadline:
        assert procs.procs[0].poll() is None, _tails(*logs, relaunched)
        time.sleep(0.05)
    assert _worker_of_rank([agent], 0), "relaunched node0 is not rank 0\n" + _tails(relaunched)

    codes = procs.wait_all(timeout=220)
    tails = "(killed node0, the rank-0 agent, and relaunched it)\n" + _tails(*logs, relaunched)
    assert codes == [0, 0], f"exit codes {codes}\n{tails}"
    evs = _assert_grafted(tmp_path / "relaunch", epochs, tails)
    done = collections.Counter((e["network"], e["epoch"]) for e in evs if e["event"] == "epoch")
    twice = {k: n for k, n in done.items() if n != 1}
    assert not twice, f"epochs trained more than once (network, epoch): {twice}\n{tails}"
    starts = [e for e in evs if e["event"] == "start"]
    assert len(starts) >= 2 and starts[-1]["epoch"] >= 1, f"no resume: {starts}\n{tails}"
