#!/usr/bin/env python3
"""``make test-cluster``: the docker-compose cluster end to end, on a real Docker daemon.

1. Docker: a running daemon is used as it is; otherwise Debian's docker.io (with
   docker-compose and debootstrap) is installed when missing and ``dockerd`` started, and
   stopped again at the end.
2. Base image: ``$BASE_IMAGE`` when set; else ``python:3.11-slim-bookworm`` when a registry
   answers; else ``debootstrap --variant=minbase bookworm`` + ``docker import``
   (kept as ``distgraft-base:bookworm`` for the next run).
3. Wheels: the host's pip downloads the torch and torchvision this checkout's venv runs and
   distgraft's other dependencies into ``docker/wheels/``; the build installs them with
   no network (``--no-index``).
4. The image ``distgraft:cluster-test`` from ``docker/Dockerfile``.
5. Demo: 2 nodes, 3 epochs. Both containers exit 0, rank 0 prints the table, and
   ``metrics.jsonl`` has graft events for both networks.
6. Crashes: 2 nodes, ``--epochs`` epochs. Mid-run ``docker exec node1 kill -9 <its torchrun
   agent>`` (node1 is rank 0: ranks follow hostnames, and a container id sorts before
   "node0"); Docker restarts node1 and training goes on. Later the same for node0, which
   hosts the rendezvous (node1's agent loses it, fails, and is restarted too). The run
   ends with every epoch of both networks in metrics.jsonl exactly once.
7. Manual stop: ``docker kill`` of node1 is not restarted by Docker; ``docker start``
   brings it back, and again every epoch appears exactly once.

Every compose project gets a unique name and ``down -v`` in the end, whatever happened.
Every step has a timeout. Exit status: 0 passed, 1 failed; 0 with "SKIPPED: why" only
when no Docker daemon can run on this machine (not root and none running, or the install
or the daemon fails).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
WHEELS = ROOT / "docker" / "wheels"
IMAGE = "distgraft:cluster-test"
DEBOOTSTRAP_TAG = "distgraft-base:bookworm"
REGISTRY_BASE = "python:3.11-slim-bookworm"
T0 = time.monotonic()


class Skip(Exception):
    """The machine cannot run Docker: not a failure of distgraft."""


class Failed(Exception):
    """What the cluster did differs from what the README promises."""


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sh(
    cmd: list[str], timeout: float, check: bool = True, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (output captured), bounded by ``timeout`` seconds."""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw
        )
    except subprocess.TimeoutExpired as e:
        raise Failed(f"{' '.join(cmd)} took more than {timeout:.0f}s") from e
    if check and proc.returncode != 0:
        raise Failed(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc


# ------------------------------------------------------------------------------ docker


def daemon_up() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    )


def apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Skip(f"{', '.join(packages)} missing, and no root apt-get to install them")
    say(f"installing {' '.join(packages)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0:
            raise Skip(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


@contextlib.contextmanager
def docker_daemon() -> Iterator[None]:
    """A running Docker daemon: the one there is, or dockerd started here (and stopped)."""
    if daemon_up():
        yield
        return
    if shutil.which("dockerd") is None:
        apt_install(["docker.io"])
    if os.geteuid() != 0:
        raise Skip("no Docker daemon runs and only root can start dockerd")
    log = open(ROOT / "docker" / "dockerd.log", "w")  # noqa: SIM115 (open while it runs)
    say("starting dockerd")
    proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not daemon_up():
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (ROOT / "docker" / "dockerd.log").read_text()[-2000:]
                raise Skip(f"dockerd did not start (exit {proc.poll()}):\n{text}")
            time.sleep(0.5)
        yield
    finally:
        say("stopping the dockerd started here")
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def compose_cmd() -> list[str]:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1), installed when missing."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        apt_install(["docker-compose"])
    return ["docker-compose"]


# ------------------------------------------------------------------------------ image


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def base_image() -> str:
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    if image_exists(DEBOOTSTRAP_TAG):
        return DEBOOTSTRAP_TAG
    try:
        pulled = sh(["docker", "pull", REGISTRY_BASE], timeout=120, check=False)
        if pulled.returncode == 0:
            return REGISTRY_BASE
    except Failed:
        pass
    say(f"no registry: building {DEBOOTSTRAP_TAG} with debootstrap")
    if shutil.which("debootstrap") is None:
        apt_install(["debootstrap"])
    rootfs = ROOT / "docker" / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-pip",
             "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode != 0:
            raise Skip(f"no registry and debootstrap failed:\n{proc.stdout[-2000:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        sh(["docker", "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["bash"]', "-",
            DEBOOTSTRAP_TAG], timeout=300, stdin=tar.stdout)  # fmt: skip
        tar.wait(timeout=60)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return DEBOOTSTRAP_TAG


def requirements() -> list[str]:
    """Distgraft's runtime dependencies (+ digits, plot), torch and torchvision pinned to
    the versions this interpreter runs, so the image trains with what the tests ran."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]
    reqs = []
    for req in project["dependencies"] + extra["digits"] + extra["plot"]:
        name = req.split(">")[0].split("=")[0].split("<")[0].strip()
        if name in ("torch", "torchvision"):
            req = f"{name}=={importlib.metadata.version(name)}"
        reqs.append(req)
    return reqs


def build_image(base: str) -> None:
    reqs = requirements()
    say(f"pip download into docker/wheels: {' '.join(reqs)}")
    sh([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
        "-d", str(WHEELS), *reqs], timeout=900)  # fmt: skip
    say(f"docker build {IMAGE} on {base}")
    env = dict(os.environ, DOCKER_BUILDKIT="0")  # the legacy builder is always there
    proc = sh(["docker", "build", "-f", "docker/Dockerfile", "-t", IMAGE,
               "--build-arg", f"BASE_IMAGE={base}", "."],
              timeout=1200, cwd=ROOT, env=env)  # fmt: skip
    if "Successfully tagged" not in proc.stdout:
        raise Failed("docker build did not tag the image\n" + proc.stdout[-3000:])
    # The build's own smoke test is skipped when its layer is cached: run it again here.
    code = ("import distgraft, torch, torchvision as tv; "
            "print('distgraft on torch', torch.__version__, 'torchvision', tv.__version__)")
    smoke = sh(["docker", "run", "--rm", "--entrypoint", "python3", IMAGE, "-c", code],
               timeout=120)  # fmt: skip
    say(f"image built: {smoke.stdout.strip()}")


# ------------------------------------------------------------------------------ compose


class Cluster:
    """One compose project: 2 nodes of the image, a fresh runs volume."""

    def __init__(self, compose: list[str], name: str, train_args: str) -> None:
        self.project = f"distgraft-test-{name}-{os.getpid()}"
        self.compose = [*compose, "-p", self.project, "-f", str(COMPOSE_FILE)]
        self.env = dict(
            os.environ, IMAGE=IMAGE, NODES="2", NPROC="1", RDZV_ID=self.project,
            MAX_RESTARTS="3", TRAIN_ARGS=train_args,
        )  # fmt: skip
        self.env.pop("BASE_IMAGE", None)
        self._ids: dict[str, str] = {}

    def run(self, *args: str, timeout: float = 120, check: bool = True):
        return sh([*self.compose, *args], timeout=timeout, check=check, env=self.env)

    def up(self) -> None:
        self.run("up", "-d", "--no-build", timeout=180)

    def down(self) -> None:
        with contextlib.suppress(Failed):
            self.run("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)

    def container(self, service: str) -> str:
        """The service's container id (Docker restarts keep the container, so it is cached)."""
        if service not in self._ids:
            ids = self.run("ps", "-q", service).stdout.split()
            if len(ids) != 1:
                raise Failed(f"expected one {service} container, found {ids}")
            self._ids[service] = ids[0]
        return self._ids[service]

    def state(self, service: str) -> dict:
        out = sh(["docker", "inspect", self.container(service)], timeout=30).stdout
        return json.loads(out)[0]

    def logs(self) -> str:
        return self.run("logs", "--no-color", timeout=60, check=False).stdout

    def read(self, rel: str) -> str:
        """A file of the runs volume ('' when it does not exist yet)."""
        volume = f"{self.project}_runs"
        where = sh(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", volume], timeout=30)
        path = Path(where.stdout.strip()) / rel
        with contextlib.suppress(PermissionError):
            return path.read_text() if path.exists() else ""
        proc = sh(["docker", "run", "--rm", "-v", f"{volume}:/runs", "--entrypoint", "cat",
                   IMAGE, f"/runs/{rel}"], timeout=60, check=False)  # fmt: skip
        return proc.stdout

    def events(self, run: str) -> list[dict]:
        lines = self.read(f"{run}/metrics.jsonl").splitlines()
        out = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                out.append(json.loads(line))
        return out

    def wait_done(self, timeout: float) -> None:
        """Until both nodes exited 0 for good; fails when one gave up or time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = {s: self.state(s) for s in ("node0", "node1")}
            states = {s: i["State"] for s, i in info.items()}
            if all(st["Status"] == "exited" and st["ExitCode"] == 0 for st in states.values()):
                return
            for s, st in states.items():
                restarts = info[s]["RestartCount"]
                if st["Status"] == "exited" and st["ExitCode"] != 0 and restarts >= 3:
                    raise Failed(f"{s} exited {st['ExitCode']} after {restarts} restarts")
            time.sleep(1)
        raise Failed(f"the run did not end within {timeout:.0f}s")

    def await_epochs(self, run: str, epochs: int, timeout: float = 240) -> dict[int, int]:
        """Until both networks have completed ``epochs`` epochs; the counts then."""
        deadline = time.monotonic() + timeout
        while True:
            done = epochs_done(self.events(run))
            if min(done.get(n, 0) for n in (0, 1)) >= epochs:
                return done
            if time.monotonic() > deadline:
                raise Failed(f"epoch {epochs} not reached within {timeout:.0f}s: {dict(done)}")
            time.sleep(0.2)

    def kill_agent(self, service: str) -> int:
        """SIGKILL the node's torchrun agent (the container's main process under init)."""
        find = (
            'for d in /proc/[0-9]*; do tr "\\0" " " < "$d/cmdline" 2>/dev/null '
            '| grep -q "torch[.]distributed[.]run" && echo "${d#/proc/}"; done; true'
        )
        cid = self.container(service)
        pids = sh(["docker", "exec", cid, "bash", "-c", find], timeout=30).stdout.split()
        if len(pids) != 1:
            raise Failed(f"expected one torchrun agent in {service}, found pids {pids}")
        sh(["docker", "exec", cid, "bash", "-c", f"kill -9 {pids[0]}"], timeout=30)  # builtin
        return int(pids[0])


@contextlib.contextmanager
def cluster(compose: list[str], name: str, train_args: str) -> Iterator[Cluster]:
    c = Cluster(compose, name, train_args)
    try:
        yield c
    except Failed as e:
        raise Failed(f"{e}\n----- {c.project} logs (tail) -----\n{c.logs()[-6000:]}") from None
    finally:
        c.down()


def epochs_done(evs: list[dict]) -> dict[int, int]:
    """Per network, the number of epochs completed so far."""
    done: dict[int, int] = collections.Counter()
    for e in evs:
        if e["event"] == "epoch":
            done[e["network"]] += 1
    return done


def check_epochs(evs: list[dict], epochs: int) -> None:
    count = collections.Counter((e["network"], e["epoch"]) for e in evs if e["event"] == "epoch")
    expected = {(n, k) for n in (0, 1) for k in range(epochs)}
    if set(count) != expected:
        missing = sorted(expected - set(count))
        raise Failed(f"epochs missing (network, epoch): {missing}")
    twice = {k: n for k, n in count.items() if n != 1}
    if twice:
        raise Failed(f"epochs trained more than once (network, epoch): count {twice}")


# ------------------------------------------------------------------------------ phases


def demo(compose: list[str]) -> None:
    with cluster(compose, "demo", "--run.name=demo --run.epochs=3") as c:
        say(f"demo: {c.project} up, 2 nodes x 1 worker, 3 epochs")
        c.up()
        c.wait_done(timeout=240)
        logs = c.logs()
        header = re.search(r"network +best acc .* final acc", logs)
        if header is None or "ensemble acc:" not in logs:
            raise Failed("rank 0 printed no results table")
        if "is loopback but the job" in logs:  # TELEMETRY_ADDRESS of the compose file
            raise Failed("the collector listens on loopback: other nodes cannot reach it")
        evs = c.events("demo")
        check_epochs(evs, 3)
        for net in (0, 1):
            grafts = [e for e in evs if e["event"] == "graft" and e["network"] == net]
            if len(grafts) != 3 or any(g["peer"] != 1 - net for g in grafts):
                raise Failed(f"network {net}: graft events {grafts}")
        if sum(e["event"] == "summary" for e in evs) != 1:
            raise Failed("no single summary event in metrics.jsonl")
        say("demo: table printed, collector reachable, 3 epochs and 3 grafts per network in "
            "metrics.jsonl")


def crashes(compose: list[str], epochs: int) -> None:
    args = f"--run.name=crash --run.epochs={epochs} --dist.timeout_s=60"
    with cluster(compose, "crash", args) as c:
        say(f"crash: {c.project} up, {epochs} epochs")
        c.up()
        kills = []
        for service, after in (("node1", 2), ("node0", 2 + epochs // 3)):
            c.await_epochs("crash", after)
            restarts = c.state(service)["RestartCount"]
            pid = c.kill_agent(service)
            done = epochs_done(c.events("crash"))
            say(f"crash: kill -9 of {service}'s torchrun agent (pid {pid}) "
                f"after epochs {dict(done)} per network")  # fmt: skip
            kills.append((service, restarts))
            if max(done.values()) >= epochs - 2:
                raise Failed(f"the run was nearly over at the kill ({dict(done)}): more epochs")
        c.wait_done(timeout=400)
        for service, before in kills:
            restarts = c.state(service)["RestartCount"]
            if restarts <= before:
                raise Failed(f"Docker did not restart {service} after the kill")
        evs = c.events("crash")
        check_epochs(evs, epochs)
        starts = [e["epoch"] for e in evs if e["event"] == "start"]
        if len(starts) < 3:
            raise Failed(f"expected a start and 2 resumes, start events at epochs {starts}")
        say(f"crash: both kills recovered; resumed at epochs {starts[1:]}; every epoch of "
            f"both networks exactly once ({epochs} each)")  # fmt: skip


def manual_stop(compose: list[str], epochs: int = 12) -> None:
    """`docker kill` is a manual stop: Docker leaves the node down; `docker start` brings
    it back while the other node waits at the rendezvous, and the run goes on."""
    with cluster(compose, "stop", f"--run.name=stop --run.epochs={epochs}") as c:
        say(f"manual stop: {c.project} up, {epochs} epochs")
        c.up()
        c.await_epochs("stop", 2)
        node1 = c.container("node1")
        sh(["docker", "kill", node1], timeout=60)
        time.sleep(5)
        state = c.state("node1")
        if state["State"]["Status"] != "exited" or state["RestartCount"] != 0:
            raise Failed(f"Docker restarted a killed container: {state['State']}")
        sh(["docker", "start", node1], timeout=60)
        c.wait_done(timeout=300)
        check_epochs(c.events("stop"), epochs)
        say("manual stop: `docker kill node1` stayed down until `docker start`; every epoch "
            "of both networks exactly once")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15, help="epochs of the crash run (15)")
    p.add_argument("--skip-build", action="store_true", help=f"use the existing {IMAGE}")
    args = p.parse_args()
    # A CI timeout or Ctrl-C still runs every `down -v` and stops the dockerd started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with docker_daemon():
            compose = compose_cmd()
            if not (args.skip_build and image_exists(IMAGE)):
                build_image(base_image())
            demo(compose)
            crashes(compose, args.epochs)
            manual_stop(compose)
    except Skip as e:
        say(f"SKIPPED: {e}")
        return 0
    except Failed as e:
        say(f"FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    say("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
