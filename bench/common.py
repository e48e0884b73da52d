"""Pieces the benchmark scripts share: machine facts, CPU accounting, worker setup."""

from __future__ import annotations

import os
import platform
import resource
import socket


class NullTelemetry:
    """A Trainer telemetry that drops everything (benchmarks time training, not printing)."""

    def emit(self, event: str, network: int, epoch: int, **fields) -> None:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_worker_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun would set for a spawned worker on this machine."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_ticks() -> tuple[int, int] | None:
    """(busy jiffies of the machine incl. steal, jiffies of this process and its children).

    The difference tells how much CPU other processes took during a timed window, so a
    benchmark can judge its targets on quiet windows only. None where /proc is missing.
    """
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    me, own = os.getpid(), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == me or int(rest[1]) == me:
            own += int(rest[11]) + int(rest[12])  # utime + stime
    done = resource.getrusage(resource.RUSAGE_CHILDREN)  # children already joined
    own += round((done.ru_utime + done.ru_stime) * os.sysconf("SC_CLK_TCK"))
    return busy, own
