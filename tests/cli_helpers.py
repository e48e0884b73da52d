"""Running distgraft as a user does: subprocesses, torchrun, the run folder's events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import free_port

__all__ = ["ROOT", "DIGITS", "env", "torchrun_cmd", "common", "events", "run", "worker_with_rank"]

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.toml"


def env() -> dict[str, str]:
    """The test's environment without launcher variables; a crash dumps every thread's stack."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        e.pop(k, None)
    return e


def torchrun_cmd(
    nproc: int, *args: str, restarts: int = 0, command: tuple[str, ...] = ("train",)
) -> list[str]:
    """``torchrun ... -m distgraft COMMAND ARGS`` on a free rendezvous port of this machine."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", str(restarts),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "-m", "distgraft", *command, *args,
    ]  # fmt: skip


def common(tmp_path: Path, name: str, epochs: int) -> list[str]:
    return [
        "--config", str(DIGITS), f"--run.dir={tmp_path}", f"--run.name={name}",
        f"--run.epochs={epochs}", "--telemetry.publish=tcp://127.0.0.1:0",
    ]  # fmt: skip


def events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def worker_with_rank(agent: int, rank: int) -> int | None:
    """The pid of torchrun ``agent``'s worker process of ``rank`` (None if not found)."""
    for pid in _children(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root ignores permissions: /sys then)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    try:
        (Path("/sys") / "distgraft-probe").touch()
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses writes")
