"""Launch scripts (launch/, docker/): lint, usage, and the exact commands they run.

* shellcheck on every ``*.sh`` / ``*.sbatch`` and ``docker compose config`` on the compose
  file; a missing tool is installed with apt-get when we are root (bounded in time), else
  the test is skipped with the reason. ``DISTGRAFT_NO_APT=1`` disables the installation.
* Command lines: the scripts run with ``PYTHON``, ``srun``, ``scontrol`` and ``nvidia-smi``
  replaced by a recorder, so every flag, default and pass-through argument is checked
  without torch, Slurm or GPUs.
* Rendezvous (marked slow, a few seconds): the real ``torch.distributed.run`` launched by
  the scripts, with a stub ``distgraft`` package standing in for the trainer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dist_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"

EXPECTED_SCRIPTS = [
    "launch/torchrun.sh",
    "launch/multinode.sh",
    "launch/slurm/single_node.sbatch",
    "launch/slurm/multi_node.sbatch",
    "launch/slurm/srun_plain.sbatch",
    "docker/node.sh",
]
# Globbed as well, so a script added later is linted without editing this list.
SCRIPTS = sorted(
    {
        p.relative_to(ROOT).as_posix()
        for base in (LAUNCH, DOCKER)
        for pattern in ("*.sh", "*.sbatch")
        for p in base.rglob(pattern)
    }
    | set(EXPECTED_SCRIPTS)
)

APT_BUDGET_S = 200  # per tool, well inside pytest's 300 s timeout for the first test
DEFAULT_CONFIG = ["--config", "configs/cifar10_resnet32.toml"]

# Knobs of the scripts (and launcher state) that must not leak in from the caller.
_LEAKY = re.compile(
    r"(NPROC|NNODES|NODES|NODE_RANK|MAX_RESTARTS|MASTER_ADDR|MASTER_PORT|RDZV_\w+|PYTHON"
    r"|CONFIG|TRAIN_ARGS|RUNS_DIR|RANK|LOCAL_RANK|WORLD_SIZE|SLURM_\w+|SRUN_\w+"
    r"|TORCHELASTIC_\w+|CUDA_VISIBLE_DEVICES|STUB_\w+|FAKE_\w+|RECORD)"
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LEAKY.fullmatch(k)}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- tools


def _apt_install(package: str, binary: str) -> tuple[str | None, str]:
    """``binary`` on PATH, installing Debian's ``package`` if we may; (path, why-not)."""
    found = shutil.which(binary)
    if found:
        return found, ""
    if os.environ.get("DISTGRAFT_NO_APT"):
        return None, f"{binary} not found and DISTGRAFT_NO_APT is set"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, f"{binary} not found; install {package} (needs root to auto-install)"
    if not shutil.which("apt-get"):
        return None, f"{binary} not found and there is no apt-get to install {package}"
    deadline = time.monotonic() + APT_BUDGET_S
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=60"]  # wait for a concurrent apt, not forever
    install = ["apt-get", "install", "-y", "--no-install-recommends", *lock, package]
    # Installing first skips the slow `apt-get update` when the lists are fresh.
    steps = [install, ["apt-get", "update", *lock], install]
    why = ""
    for cmd in steps:
        left = deadline - time.monotonic()
        if left <= 1:
            return None, f"{binary}: apt-get ran out of its {APT_BUDGET_S} s budget"
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return None, f"{binary}: `{' '.join(cmd[:2])}` timed out"
        if cmd is install and r.returncode == 0 and shutil.which(binary):
            return shutil.which(binary), ""
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"{binary}: apt-get install {package} failed: {why}"


@pytest.fixture(scope="session")
def shellcheck() -> str:
    path, why = _apt_install("shellcheck", "shellcheck")
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """``docker compose`` (v2 plugin) if it works, else ``docker-compose`` (v1)."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if r.returncode == 0:
            return ["docker", "compose"]
    path, why = _apt_install("docker-compose", "docker-compose")
    if path is None:
        pytest.skip(why)
    return [path]


# ------------------------------------------------------------------ recorder stubs

RECORDER = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
if name == "nvidia-smi":
    gpus = os.environ.get("FAKE_GPUS")
    if gpus is None:
        sys.exit(9)  # like a node without a driver
    for i in range(int(gpus)):
        print(f"GPU {{i}}: NVIDIA H100 80GB HBM3 (UUID: GPU-{{i}})")
    sys.exit(0)
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"prog": name, "argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
if name == "scontrol":
    print("\\n".join(os.environ["FAKE_HOSTS"].split(",")))
"""


class Fakes:
    """A bin/ folder whose python, srun, scontrol and nvidia-smi record their calls."""

    def __init__(self, tmp: Path) -> None:
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.record = tmp / "calls.jsonl"
        for name in ("python", "srun", "scontrol", "nvidia-smi"):
            exe = self.bin / name
            exe.write_text(RECORDER.format(python=sys.executable))
            exe.chmod(0o755)
        self.python = str(self.bin / "python")

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = clean_env(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            RECORD=str(self.record),
            PYTHON=self.python,
            SLURM_SUBMIT_DIR=str(ROOT),
        )
        full_env.update(env)
        return subprocess.run(
            ["bash", str(ROOT / script), *args],
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self, prog: str | None = None) -> list[dict]:
        if not self.record.exists():
            return []
        rows = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [r for r in rows if prog is None or r["prog"] == prog]

    def only_call(self, prog: str) -> dict:
        calls = self.calls(prog)
        assert len(calls) == 1, f"expected one {prog} call, got {calls}"
        return calls[0]


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def torchrun_argv(flags: str, train: list[str]) -> list[str]:
    """``python -m torch.distributed.run FLAGS -m distgraft train TRAIN...``."""
    return ["-m", "torch.distributed.run", *flags.split(), "-m", "distgraft", "train", *train]


# ----------------------------------------------------------------- static checks


def test_deliverables_exist() -> None:
    for rel in [
        *EXPECTED_SCRIPTS,
        "docker/Dockerfile",
        "docker/docker-compose.yml",
        ".dockerignore",
        "launch/README.md",
    ]:
        assert (ROOT / rel).is_file(), rel
    for rel in SCRIPTS:
        if rel.endswith(".sh"):
            mode = (ROOT / rel).stat().st_mode
            assert mode & stat.S_IXUSR, f"{rel} is not executable"


@pytest.mark.parametrize("script", [*SCRIPTS, "launch/common.bash"])
def test_shellcheck_clean(script: str, shellcheck: str) -> None:
    r = subprocess.run(  # -x follows `source` into launch/common.bash
        [shellcheck, "-x", "--format=gcc", str(ROOT / script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_strict_mode(script: str) -> None:
    text = (ROOT / script).read_text()
    assert re.match(r"#!(/usr/bin/env bash|/bin/bash)\n", text), "needs a bash shebang"
    assert re.search(r"^set -euo pipefail$", text, re.M), "needs `set -euo pipefail`"
    assert re.search(r"^# Usage: ", text, re.M), "needs a usage header comment"


def test_sbatch_headers() -> None:
    want = {
        "single_node.sbatch": ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=4"],
        "multi_node.sbatch": ["--ntasks-per-node=1", "--gpus-per-node=4"],
        "srun_plain.sbatch": ["--ntasks-per-node=4", "--gpus-per-task=1"],
    }
    for name, specific in want.items():
        headers = re.findall(r"^#SBATCH (\S+)", (LAUNCH / "slurm" / name).read_text(), re.M)
        for h in ["--job-name=distgraft", "--output=slurm-%j.out", "--requeue", *specific]:
            assert h in headers, f"{name}: missing #SBATCH {h}"
        assert any(h.startswith("--cpus-per-task=") for h in headers), name


def test_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:"), "default base image"
    assert "-runtime" in base.group(1) and "cuda" in base.group(1)
    assert base.start() < text.index("FROM ${BASE_IMAGE}")
    assert "--no-cache-dir" in text and 'extra["digits"] + extra["plot"]' in text
    # Dependencies (from pyproject.toml alone) before the source: editing code keeps the
    # multi-GB layer; wheels in docker/wheels/ make that install offline.
    deps = text.index("-r /tmp/requirements.txt")
    assert text.index("COPY pyproject.toml /workspace/") < deps
    assert deps < text.index("distgraft /workspace/distgraft") < text.index("--no-deps")
    assert "--no-index --find-links /tmp/wheels" in text
    assert "COPY . " not in text  # not the wheels a second time, not the tests
    assert re.search(r"import distgraft, torch, torchvision", text)  # a CPU torch breaks it
    assert re.search(r"^USER distgraft$", text, re.M)
    assert re.search(r"^WORKDIR /workspace$", text, re.M)
    assert re.search(r'^ENTRYPOINT \[.*"/workspace/docker/node\.sh"\]$', text, re.M)


def test_dockerignore() -> None:
    lines = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for must in [".venv", "runs", "data", ".git", "**/__pycache__", ".pytest_cache"]:
        assert must in lines, must
    # The image needs these: the package, its configs and the entrypoint.
    for keep in ["distgraft", "configs", "docker", "pyproject.toml", "launch"]:
        assert keep not in lines and f"{keep}/" not in lines, keep


# ------------------------------------------------------------- usage and errors


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/multinode.sh", "docker/node.sh"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(script: str, flag: str, fakes: Fakes) -> None:
    r = ok(fakes.run(script, flag))
    assert "Usage" in r.stdout
    assert "MAX_RESTARTS" in r.stdout  # the environment knobs are documented
    assert fakes.calls() == [], "--help must not launch anything"


def test_multinode_requires_endpoint(fakes: Fakes) -> None:
    r = fakes.run("launch/multinode.sh", "--config", "configs/digits.toml", NNODES="2")
    assert r.returncode != 0
    assert "RDZV_ENDPOINT" in r.stderr
    r = fakes.run("launch/multinode.sh", RDZV_ENDPOINT="node01")  # no port
    assert r.returncode != 0
    assert "RDZV_ENDPOINT" in r.stderr and "HOST:PORT" in r.stderr
    assert fakes.calls() == []


# ----------------------------------------------------------------- command lines


def test_torchrun_sh_command(fakes: Fakes) -> None:
    args = ["--config", "configs/my run.toml", "--run.epochs=3", "--run.name=demo"]
    ok(fakes.run("launch/torchrun.sh", *args, NPROC="3", MAX_RESTARTS="5", MASTER_PORT="29555"))
    call = fakes.only_call("python")
    pid_id = call["argv"][call["argv"].index("--rdzv-id") + 1]
    assert re.fullmatch(r"distgraft-\d+", pid_id)
    assert call["argv"] == torchrun_argv(
        "--nnodes 1 --rdzv-backend c10d --rdzv-endpoint localhost:29555"
        f" --rdzv-id {pid_id} --rdzv-conf is_host=true --nproc-per-node 3 --max-restarts 5",
        train=args,
    )


@pytest.mark.parametrize(("gpus", "nproc"), [("4", "4"), ("0", "2"), (None, "2")])
def test_torchrun_sh_defaults(gpus: str | None, nproc: str, fakes: Fakes) -> None:
    env = {} if gpus is None else {"FAKE_GPUS": gpus}  # None: nvidia-smi fails
    ok(fakes.run("launch/torchrun.sh", **env))
    argv = fakes.only_call("python")["argv"]
    assert argv[argv.index("--nproc-per-node") + 1] == nproc
    assert argv[argv.index("--max-restarts") + 1] == "3"
    assert argv[argv.index("--rdzv-endpoint") + 1] == "localhost:29500"
    assert argv[-2:] == ["distgraft", "train"]  # no arguments added


def test_torchrun_sh_free_port(fakes: Fakes) -> None:
    ok(fakes.run("launch/torchrun.sh", "--run.name=x", MASTER_PORT="0", NPROC="2"))
    assert fakes.only_call("python")["argv"] == torchrun_argv(
        "--standalone --nproc-per-node 2 --max-restarts 3", train=["--run.name=x"]
    )


@pytest.mark.parametrize(
    ("node_rank", "conf"), [(None, ""), ("0", "is_host=true"), ("1", "is_host=false")]
)
def test_multinode_sh_command(node_rank: str | None, conf: str, fakes: Fakes) -> None:
    env = {"RDZV_ENDPOINT": "node01:29400", "NNODES": "2:4", "NPROC": "8"}
    if node_rank is not None:
        env["NODE_RANK"] = node_rank
    ok(fakes.run("launch/multinode.sh", "--config", "configs/imagenet_resnet18.toml", **env))
    extra = f" --rdzv-conf {conf}" if conf else ""
    assert fakes.only_call("python")["argv"] == torchrun_argv(
        "--nnodes 2:4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node01:29400"
        " --rdzv-id distgraft --max-restarts 3" + extra,
        train=["--config", "configs/imagenet_resnet18.toml"],
    )


def test_multinode_sh_defaults(fakes: Fakes) -> None:
    ok(fakes.run("launch/multinode.sh", RDZV_ENDPOINT="h:1", RDZV_ID="job9", FAKE_GPUS="8"))
    argv = fakes.only_call("python")["argv"]
    assert argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("--nproc-per-node") + 1] == "8"
    assert argv[argv.index("--rdzv-id") + 1] == "job9"


@pytest.mark.parametrize("args", [[], ["--config", "configs/digits.toml", "--run.name=a b"]])
def test_single_node_sbatch(args: list[str], fakes: Fakes) -> None:
    ok(
        fakes.run(
            "launch/slurm/single_node.sbatch", *args, SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="41"
        )
    )
    assert fakes.only_call("python")["argv"] == torchrun_argv(
        "--standalone --nproc-per-node 8 --max-restarts 3", train=args or DEFAULT_CONFIG
    )
    assert fakes.calls("srun") == []
    # Without SLURM_GPUS_ON_NODE the header's 4 GPUs are assumed.
    fakes.record.unlink()
    ok(fakes.run("launch/slurm/single_node.sbatch"))
    argv = fakes.only_call("python")["argv"]
    assert argv[argv.index("--nproc-per-node") + 1] == "4"


SLURM_JOB = {
    "SLURM_JOB_ID": "777",
    "SLURM_JOB_NODELIST": "gpu[01-03]",
    "FAKE_HOSTS": "gpu01,gpu02,gpu03",
    "SLURM_CPUS_PER_TASK": "16",
}


@pytest.mark.parametrize("args", [[], ["--config", "configs/imagenet_resnet18.toml"]])
def test_multi_node_sbatch(args: list[str], fakes: Fakes) -> None:
    env = {**SLURM_JOB, "SLURM_NNODES": "3", "SLURM_GPUS_ON_NODE": "4", "MAX_RESTARTS": "7"}
    ok(fakes.run("launch/slurm/multi_node.sbatch", *args, **env))
    assert fakes.only_call("scontrol")["argv"] == ["show", "hostnames", "gpu[01-03]"]
    srun = fakes.only_call("srun")
    assert srun["argv"] == [
        "--ntasks-per-node=1",
        fakes.python,
        *torchrun_argv(
            "--nnodes 3 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint gpu01:29400"
            " --rdzv-id 777 --max-restarts 7",
            train=args or DEFAULT_CONFIG,
        ),
    ]
    assert srun["env"]["SRUN_CPUS_PER_TASK"] == "16"
    assert fakes.calls("python") == []  # python only ever runs under srun


def test_srun_plain_sbatch(fakes: Fakes) -> None:
    env = {**SLURM_JOB, "SLURM_NTASKS": "8"}
    ok(fakes.run("launch/slurm/srun_plain.sbatch", "--run.name=plain", **env))
    srun = fakes.only_call("srun")
    assert srun["argv"][-5:] == [fakes.python, "-m", "distgraft", "train", "--run.name=plain"]
    assert srun["argv"][:-5] == ["--kill-on-bad-exit=1", "--gpu-bind=none"]
    assert srun["env"]["MASTER_ADDR"] == "gpu01"
    assert srun["env"]["MASTER_PORT"] == "29500"
    assert srun["env"]["SRUN_CPUS_PER_TASK"] == "16"
    fakes.record.unlink()
    ok(fakes.run("launch/slurm/srun_plain.sbatch", **env, MASTER_PORT="31000"))
    srun = fakes.only_call("srun")
    assert srun["env"]["MASTER_PORT"] == "31000"
    assert srun["argv"][-2:] == DEFAULT_CONFIG


def test_node_sh_command(fakes: Fakes) -> None:
    env = {
        "NODES": "2",
        "NPROC": "1",
        "CONFIG": "configs/digits.toml",
        "RDZV_HOST": "node0",
        "RDZV_PORT": "29400",
        "TRAIN_ARGS": " --run.name=demo  --run.epochs=3 ",
    }
    ok(fakes.run("docker/node.sh", "--run.seed=1", **env))
    assert fakes.only_call("python")["argv"] == torchrun_argv(
        "--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint node0:29400"
        " --rdzv-id distgraft --max-restarts 3",
        train=["--config", "configs/digits.toml", "--run.dir=/runs"]
        + ["--run.name=demo", "--run.epochs=3", "--run.seed=1"],  # TRAIN_ARGS, then "$@"
    )


# ----------------------------------------------------------------------- compose


def _compose_config(compose: list[str], **env: str) -> str:
    r = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "config"],
        cwd=DOCKER,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_compose_config_defaults(compose: list[str]) -> None:
    out = _compose_config(compose)
    for service in ("node0", "node1"):
        assert re.search(rf"^  {service}:$", out, re.M), service
    assert re.search(r"^    hostname: node0$", out, re.M)
    assert out.count("shm_size: 2gb") == 2
    assert out.count("runs:/runs") == 2
    for key, value in [
        ("NODES", "2"),
        ("NPROC", "1"),
        ("CONFIG", "configs/digits.toml"),
        ("RDZV_HOST", "node0"),
        ("RDZV_PORT", "29400"),
    ]:
        assert len(re.findall(rf"^      {key}: ['\"]?{re.escape(value)}['\"]?$", out, re.M)) == 2
    assert "driver: nvidia" not in out  # CPU by default; the GPU block is commented out


def test_compose_config_env_knobs(compose: list[str], tmp_path: Path) -> None:
    out = _compose_config(
        compose, NODES="4", NPROC="gpu", RDZV_PORT="29411", CONFIG="configs/cifar10_resnet32.toml"
    )
    assert len(re.findall(r"^      NODES: ['\"]?4['\"]?$", out, re.M)) == 2
    assert len(re.findall(r"^      RDZV_PORT: ['\"]?29411['\"]?$", out, re.M)) == 2
    assert "configs/cifar10_resnet32.toml" in out
    # The documented GPU variant, uncommented, is valid too.
    text = COMPOSE_FILE.read_text()
    gpu = re.sub(r"^  # deploy:$", "  deploy:", text, flags=re.M)
    gpu = re.sub(r"^  #   ", "    ", gpu, flags=re.M)
    assert gpu != text
    gpu_file = tmp_path / "docker-compose.gpu.yml"
    gpu_file.write_text(gpu)
    # --project-directory: relative paths (the build context) resolve as for the original.
    cmd = [*compose, "--project-directory", str(DOCKER), "-f", str(gpu_file), "config"]
    r = subprocess.run(cmd, cwd=DOCKER, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "driver: nvidia" in r.stdout and "gpu" in r.stdout


# -------------------------------------------------- real torchrun, stub trainer

STUB_MAIN = """
import json, os, sys
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
out = os.path.join(os.environ["STUB_OUT"], f"rank{os.environ['RANK']}-try{restart}.json")
with open(out, "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, f)
# Fail the first STUB_FAIL_TIMES attempts, as a crashing trainer would.
sys.exit(3 if restart < int(os.environ.get("STUB_FAIL_TIMES", "0")) else 0)
"""


@pytest.fixture
def stub_trainer(tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Env running a stub ``distgraft`` (cwd=tmp_path: it shadows the real package)."""
    pkg = tmp_path / "distgraft"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(STUB_MAIN)
    (tmp_path / "out").mkdir()

    def env(**extra: str) -> dict[str, str]:
        return clean_env(
            PYTHON=sys.executable, PYTHONPATH=str(tmp_path), STUB_OUT=str(tmp_path / "out"), **extra
        )

    return env


def results(tmp_path: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((tmp_path / "out").iterdir())}


def _check(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_torchrun_sh_restarts_workers(stub_trainer, tmp_path: Path) -> None:
    env = stub_trainer(
        NPROC="2", MAX_RESTARTS="1", MASTER_PORT=str(free_port()), STUB_FAIL_TIMES="1"
    )
    r = subprocess.run(
        ["bash", str(LAUNCH / "torchrun.sh"), "--config", "a b.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _check(r)
    got = results(tmp_path)
    # The second attempt (after the restart) ran both ranks of a 2-process world.
    for rank in (0, 1):
        run = got[f"rank{rank}-try1"]
        assert run["argv"] == ["train", "--config", "a b.toml"]
        assert run["env"]["WORLD_SIZE"] == "2" and run["env"]["LOCAL_RANK"] == str(rank)
    assert "rank0-try0" in got  # the first attempt ran and failed


@pytest.mark.slow
def test_multinode_sh_two_agents_rendezvous(stub_trainer, tmp_path: Path) -> None:
    """Two launchers on one host play two nodes meeting at one c10d endpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            ["bash", str(LAUNCH / "multinode.sh"), "--run.name=mn"],
            cwd=tmp_path,
            env=stub_trainer(
                RDZV_ENDPOINT=endpoint,
                NNODES="2",
                NPROC="1",
                RDZV_ID=f"t{os.getpid()}",
                NODE_RANK=str(node),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    got = results(tmp_path)
    assert sorted(got) == ["rank0-try0", "rank1-try0"]
    for run in got.values():
        assert run["env"]["WORLD_SIZE"] == "2" and run["env"]["LOCAL_WORLD_SIZE"] == "1"
        assert run["argv"] == ["train", "--run.name=mn"]
