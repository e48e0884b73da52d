"""Can a local process slow rank 0's training by flooding the telemetry collector?

Rank 0 here is one process doing what rank 0 of a run does: a training loop in the main
thread (``digits_cnn`` on random 8x8 images, SGD, one thread) that sends a progress event
about once a second and an epoch event per epoch through a ``ZmqSink``, and the
``Collector`` in its thread, both with the run's keys (``telemetry.auth = "curve"``).

The attacker is another process that sends 10 kB random messages over a ZeroMQ PUSH socket
as fast as it can; when a send has waited 10 ms (its peer refuses it or is slow) it opens a
fresh connection, so a collector that refuses it sees a stream of new handshakes.

* **flood:** the attacker sends to the collector's address.
* **control:** the same attacker sends to a separate sink process (a PULL socket that reads
  and discards), so the machine carries the attacker's own load but the collector is left
  alone.
* **quiet** (for reference, not part of the target): no attacker at all.

The phases alternate (flood/control, then control/flood, ...) for ``--pairs`` pairs, each
phase ``--epochs`` epochs after a warm-up; the quiet phase of each pair comes between them.
Each case prints one JSON line per pair and a final line with rank 0's median epoch time
under flood and control, their ratio (target: at most 1.1 with authentication), flood over
quiet, the handshakes the collector refused and what it received. ``--auth none`` (also
run by default) is the collector without authentication, as before: the junk then reaches
Python decoding in rank 0.

    .venv/bin/python bench/telemetry_flood.py                  # about 5 minutes, 2-core CPU
    .venv/bin/python bench/telemetry_flood.py --auth curve --pairs 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import zmq

HERE = Path(__file__).resolve()
MESSAGE_BYTES = 10 * 1024


# -- the attacker and the control's sink (run as child processes of this script) ----------


def _stop_on_sigterm() -> list[bool]:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    return stop


def flooder(address: str, stall_ms: int) -> None:
    """Send random 10 kB messages to ``address`` until SIGTERM; print what it did."""
    stop = _stop_on_sigterm()
    ctx = zmq.Context()
    payloads = [os.urandom(MESSAGE_BYTES) for _ in range(16)]

    def connect() -> zmq.Socket:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.setsockopt(zmq.SNDTIMEO, stall_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, 1)
        sock.connect(address)
        return sock

    sock, sent, connections = connect(), 0, 1
    print("ready", flush=True)
    while not stop[0]:
        try:
            sock.send(payloads[sent % len(payloads)], copy=False)
            sent += 1
        except zmq.Again:  # refused or too slow: try a new connection
            sock.close(0)
            sock, connections = connect(), connections + 1
        except zmq.ZMQError:  # interrupted by the signal
            break
    sock.close(0)
    print(json.dumps({"sent": sent, "connections": connections}), flush=True)
    ctx.term()


def sink(address: str) -> None:
    """Bind a PULL socket at ``address``, read and discard until SIGTERM; print the count."""
    stop = _stop_on_sigterm()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    received = 0
    while not stop[0]:
        try:
            if sock.poll(50):
                sock.recv(copy=False)
                received += 1
        except zmq.ZMQError:
            break
    sock.close(0)
    print(json.dumps({"received": received}), flush=True)
    ctx.term()


def _spawn(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE), *args], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _finish(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


# -- rank 0 ---------------------------------------------------------------------------------


class Rank0:
    """The training loop and the collector of rank 0, with the run's telemetry."""

    def __init__(self, auth: str, steps: int, batch: int) -> None:
        import torch

        from distgraft.models import build_model
        from distgraft.telemetry import Collector, ZmqSink, new_keys

        torch.manual_seed(0)
        torch.set_num_threads(1)
        self.torch = torch
        self.model = build_model("digits_cnn", 10, in_channels=1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 1, 8, 8)
        self.y = torch.randint(0, 10, (batch,))
        self.steps = steps
        keys = new_keys() if auth == "curve" else None
        self.collector = Collector(publish="tcp://127.0.0.1:0", keys=keys).start()
        self.sink = ZmqSink(self.collector.address, keys=keys.client() if keys else None)
        self.epoch = 0

    def train_epoch(self) -> float:
        """One epoch of ``steps`` SGD steps with the trainer's events; its wall time."""
        import torch.nn.functional as F

        from distgraft.telemetry import make_event

        start = last = time.perf_counter()
        for step in range(self.steps):
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
            if time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                self.sink.emit(make_event("progress", 0, self.epoch, step=step + 1,
                                          steps=self.steps, loss=loss.item(),
                                          images_per_s=0.0))  # fmt: skip
        seconds = time.perf_counter() - start
        self.sink.emit(make_event("epoch", 0, self.epoch, train_loss=loss.item(), train_acc=0.0,
                                  test_loss=None, test_acc=None, lr=0.01, epoch_s=seconds,
                                  images_per_s=self.steps * len(self.x) / seconds))  # fmt: skip
        self.epoch += 1
        return seconds

    def close(self) -> dict:
        self.sink.close()
        self.collector.stop()
        return self.collector.stats()


def phase(rank0: Rank0, kind: str, epochs: int, stall_ms: int) -> tuple[list[float], dict]:
    """``epochs`` epoch times while the attacker floods the collector or a sink."""
    if kind == "quiet":
        return [rank0.train_epoch() for _ in range(epochs)], {}
    target, target_proc = rank0.collector.address, None
    if kind == "control":
        target_proc, target = _spawn("--sink", "tcp://127.0.0.1:0")
    attacker, _ = _spawn("--flooder", target, "--stall-ms", str(stall_ms))
    time.sleep(0.5)  # the attacker is at full speed before the clock starts
    try:
        times = [rank0.train_epoch() for _ in range(epochs)]
    finally:
        counts = _finish(attacker)
        if target_proc is not None:
            counts |= _finish(target_proc)
    return times, counts


def run_case(args: argparse.Namespace, auth: str) -> dict:
    rank0 = Rank0(auth, args.steps, args.batch)
    for _ in range(args.warmup):
        rank0.train_epoch()
    times: dict[str, list[float]] = {"flood": [], "control": [], "quiet": []}
    totals: dict[str, int] = {}
    for pair in range(args.pairs):
        order = ("flood", "quiet", "control") if pair % 2 == 0 else ("control", "quiet", "flood")
        medians = {}
        for kind in order:
            epoch_s, counts = phase(rank0, kind, args.epochs, args.stall_ms)
            times[kind].extend(epoch_s)
            medians[kind] = statistics.median(epoch_s)
            for key, value in counts.items():
                totals[f"{kind}_{key}"] = totals.get(f"{kind}_{key}", 0) + value
        print(json.dumps({"bench": "telemetry_flood", "auth": auth, "pair": pair,
                          "order": "/".join(order),
                          **{f"{k}_s": round(v, 4) for k, v in medians.items()},
                          "ratio": round(medians["flood"] / medians["control"], 3)}),
              flush=True)  # fmt: skip
    stats = rank0.close()
    median = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = median["flood"] / median["control"]
    rejected = sum(v for k, v in stats.items() if k not in ("received", "accepted", "refused",
                                                            "callback_errors"))  # fmt: skip
    return {
        "bench": "telemetry_flood",
        "auth": auth,
        "flood_median_s": round(median["flood"], 4),
        "control_median_s": round(median["control"], 4),
        "quiet_median_s": round(median["quiet"], 4),
        "ratio": round(ratio, 3),
        "flood_over_quiet": round(median["flood"] / median["quiet"], 3),
        "target": "<= 1.1" if auth == "curve" else "none (the collector before authentication)",
        "met": ratio <= 1.1 if auth == "curve" else None,
        "pairs": args.pairs,
        "epochs_per_phase": args.epochs,
        "collector_refused": stats["refused"],
        "collector_received": stats["received"],
        "collector_accepted": stats["accepted"],
        "collector_rejected": rejected,
        **totals,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--auth", choices=("curve", "none", "both"), default="both")
    p.add_argument("--pairs", type=int, default=3, help="flood/control pairs (>= 3)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per phase")
    p.add_argument("--warmup", type=int, default=2, help="epochs before the first phase")
    p.add_argument("--steps", type=int, default=200, help="SGD steps per epoch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--stall-ms", type=int, default=10,
                   help="the attacker reconnects after a send waited this long")  # fmt: skip
    p.add_argument("--flooder", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--sink", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.flooder:
        return flooder(args.flooder, args.stall_ms)
    if args.sink:
        return sink(args.sink)
    if args.pairs < 3:
        p.error("--pairs must be >= 3 (medians over at least 3 alternating pairs)")
    from common import cpu_name

    print(json.dumps({"machine": cpu_name(), "cores": os.cpu_count(),
                      "loadavg": os.getloadavg()[0]}), flush=True)  # fmt: skip
    for auth in ("curve", "none") if args.auth == "both" else (args.auth,):
        print(json.dumps(run_case(args, auth)), flush=True)


if __name__ == "__main__":
    main()
