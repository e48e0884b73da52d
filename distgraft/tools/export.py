"""``distgraft export``: a checkpoint to ONNX, checked against PyTorch, with its latency.

Pruning that removes channels for real only pays where the model is deployed, so this
command takes any checkpoint distgraft writes (a training checkpoint, or a pruned,
decomposed or sparse one from ``distgraft compress``), rebuilds the network the checkpoint
records, and writes it as one ONNX file with the weights inside and a dynamic batch axis.

The exporter is torch's ``torch.onnx.export(..., dynamo=True)``: torch.export captures the
graph and onnxscript translates it. It handles every model family distgraft builds (CIFAR
ResNets with option-A shortcuts, VGG, MobileNetV2, the digits nets, the LeNets, convs
decomposed by low-rank approximation, torchvision classifiers) and is the exporter torch
develops; the TorchScript one is deprecated. ONNX has no sparse Conv or Gemm, so a sparse
checkpoint is exported dense: the file holds its zeros and runs at dense speed.

Before the file is written, onnxruntime runs it on the same random input as the PyTorch
model (float32, CPU), at ``--batch`` and at a second batch size through the same file, and
the export fails (exit 1, the numbers printed, nothing written) when
max|ort - eager| / max|eager| exceeds the tolerance (1e-4). ``--latency`` then times both
at ``--batch``: the median of repeated runs after warm-up, with the same number of threads
for PyTorch's intra-op pool and onnxruntime's.

Bad input (a checkpoint that cannot be read or rebuilt, an unknown checkpoint kind, an
``--onnx`` path that cannot be written, an opset the exporter cannot target, missing
packages) stops with one line and exit code 2, before any export work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ExportError",
    "ExportFailed",
    "EXTRA",
    "MIN_OPSET",
    "TOLERANCE",
    "Check",
    "Exported",
    "missing_packages",
    "require_onnx",
    "check_opset",
    "prepare_output",
    "open_model",
    "export_onnx",
    "session",
    "model_input",
    "relative_error",
    "compare",
    "median_ms",
    "latency",
    "register",
    "run_export",
]

EXTRA = ("onnx", "onnxruntime", "onnxscript")
"""The packages of ``pip install 'distgraft[onnx]'``: torch's exporter needs onnx and
onnxscript, the check and the latency need onnxruntime."""
MIN_OPSET = 18
"""The oldest opset torch.export-based export targets (an older request gets 18 silently)."""
TOLERANCE = 1e-4
"""max|ort - eager| / max|eager| above which an export is refused."""
KIND_NAMES = {"train": "training checkpoint", "pruned": "pruned (filters removed)",
              "lowrank": "low-rank decomposed", "sparse": "sparse (magnitude-pruned)"}  # fmt: skip

EXAMPLES = """\
examples:
  distgraft export runs/demo/net0/last.pt --onnx digits.onnx
  distgraft export r56b.pt --onnx r56b.onnx --batch 64 --latency
  distgraft export lra.pt --onnx lra.onnx --opset 18 --json
  distgraft export lenet300_sparse.pt --onnx lenet.onnx     # exported dense, it says so
the file's input is "input" [batch, C, H, W] (any batch size), its output "logits":
  python -c "import onnxruntime as o; print(o.InferenceSession('digits.onnx').get_inputs()[0])"
"""


class ExportError(ValueError):
    """Bad input to ``distgraft export`` (exit code 2); the message says what and why."""


class ExportFailed(RuntimeError):
    """The exporter or onnxruntime failed on this network, or the file does not compute
    what the PyTorch model computes (exit code 1)."""


# -- checks before any work ---------------------------------------------------------------


def missing_packages() -> list[str]:
    """The packages of the ``onnx`` extra that do not import here."""
    import importlib

    missing = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_onnx() -> None:
    """ExportError naming the extra when onnx, onnxruntime or onnxscript is missing, or
    when torch predates the torch.export-based exporter (2.6)."""
    missing = missing_packages()
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(EXTRA)} ({', '.join(missing)} not installed); "
            "install them with: pip install 'distgraft[onnx]'"
        )
    import torch

    if torch.__version__ < "2.6":
        raise ExportError(
            f"ONNX export needs torch >= 2.6 (torch.onnx.export with dynamo=True); this is "
            f"torch {torch.__version__}"
        )


def check_opset(opset: int | None) -> None:
    """ExportError unless ``opset`` is one torch's exporter and the installed onnx can write."""
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"--opset {opset}: allowed {MIN_OPSET} to {newest} (torch.export-based export "
            f"starts at opset {MIN_OPSET}; onnx {onnx.__version__} knows up to {newest})"
        )


def prepare_output(out: str, checkpoint: str) -> Path:
    """The ``--onnx`` path, once a file could be created beside it (a real probe, so a
    read-only folder, a path under a file or a full disk fail here, before the export)."""
    path = Path(out)
    if path.suffix.lower() != ".onnx":
        raise ExportError(f"--onnx {out!r}: the file name must end in .onnx")
    if path.is_dir():
        raise ExportError(f"--onnx {out!r} is a folder; give a file name ending in .onnx")
    if Path(checkpoint).exists() and path.resolve() == Path(checkpoint).resolve():
        raise ExportError(f"--onnx {out!r} is the checkpoint itself; choose another file")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ExportError(f"--onnx {out!r}: {str(above)!r} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(
            f"--onnx {out!r}: cannot write in {str(path.parent)!r} ({e.strerror or e})"
        ) from e
    return path


@dataclass
class Opened:
    """A checkpoint rebuilt for export."""

    path: str
    kind: str
    arch: dict[str, Any]
    model: Any
    """The rebuilt nn.Module, float32 on the CPU, in eval mode."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.arch["input_shape"])


def open_model(path: str) -> Opened:
    """Read, check the kind of, and rebuild a checkpoint; ExportError when it cannot be."""
    from distgraft.compress.archive import arch_of, build, kind_of, read_checkpoint, weights_of

    try:
        state = read_checkpoint(path)
        kind = kind_of(state)
        arch = arch_of(state)
        model = build(arch)
    except (ValueError, KeyError, TypeError) as e:
        # CheckpointError, UnsupportedModel and PruneError are ValueErrors; a malformed
        # arch record gives KeyError or TypeError.
        text = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise ExportError(f"{path}: {_brief(text)}") from e
    try:
        model.load_state_dict(weights_of(state), strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        raise ExportError(
            f"{path}: weights do not fit the recorded model ({_brief(str(e))})"
        ) from e
    return Opened(path, kind, arch, model.float().eval())


def _brief(text: str, limit: int = 300) -> str:
    """A multi-line error message as one line of at most ``limit`` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour codes of torch's messages
    line = " ".join(part.strip() for part in text.splitlines() if part.strip()) or "no details"
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- export, check, time ------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """An ONNX file in memory."""

    data: bytes
    """The file: the graph with the weights inside."""
    opset: int
    """The default-domain opset it was written for."""


def export_onnx(model: Any, input_shape: Sequence[int], opset: int | None = None) -> Exported:
    """The ONNX file of ``model`` (weights inside, batch axis named ``batch``).

    Input ``input``, output ``logits``. The example batch is 2, so torch.export does not
    specialise the batch size to 1. torch's exporter prints its progress; that goes into
    the exception when the export fails and is dropped otherwise.
    """
    import torch
    from torch.export import Dim

    example = torch.zeros(2, *input_shape)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, opset_version=opset,
                input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: Dim("batch")},),
            )  # fmt: skip
    except Exception as e:
        steps = [line for line in log.getvalue().splitlines() if line.strip()][-1:]
        raise ExportFailed(
            f"torch.onnx.export failed{' at ' + steps[0] if steps else ''}: "
            f"{type(e).__name__}: {_brief(str(e), 400)}"
        ) from e
    proto = program.model_proto
    version = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    try:  # serialised whole: the weights go inside the file, not into a .data file beside it
        data = proto.SerializeToString()
    except ValueError as e:  # protobuf's 2 GB limit
        raise ExportFailed(f"the network does not fit in one ONNX file ({e})") from e
    return Exported(data, int(version))


def session(data: bytes, threads: int):
    """An onnxruntime CPU session of ``data`` with ``threads`` intra-op threads (one
    inter-op thread, sequential execution, every graph optimisation: ORT's defaults
    except the thread count, which matches PyTorch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would break the one-line output
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def model_input(batch: int, input_shape: Sequence[int], seed: int = 0):
    """The check's input: N(0, 1), like normalised images, the same for eager and ORT."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=g)


@dataclass(frozen=True)
class Check:
    """onnxruntime against eager on one batch."""

    batch: int
    max_abs_diff: float
    """max |ort - eager| over every output element."""
    max_abs_eager: float
    """max |eager|: the scale the difference is judged by."""
    rel_err: float
    """max_abs_diff / max_abs_eager; NaN when an output is not finite."""

    def ok(self, tolerance: float) -> bool:
        return math.isfinite(self.rel_err) and self.rel_err <= tolerance


def relative_error(ort_out: Any, eager_out: Any, batch: int) -> Check:
    """max|ort - eager| / max|eager| in float64; NaN (never ok) for non-finite outputs or
    shapes that differ, so a broken export cannot pass by comparing NaN."""
    import numpy as np

    o = np.asarray(ort_out, dtype=np.float64)
    e = np.asarray(eager_out, dtype=np.float64)
    if o.shape != e.shape or not (np.isfinite(o).all() and np.isfinite(e).all()):
        return Check(batch, math.nan, math.nan, math.nan)
    diff = float(np.abs(o - e).max()) if e.size else 0.0
    scale = float(np.abs(e).max()) if e.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return Check(batch, diff, scale, rel)


def _eager(model: Any, x: Any) -> Any:
    import torch

    with torch.inference_mode():
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the model returns a {type(out).__name__}; export handles one tensor")
    return out.numpy()


def compare(model: Any, sess: Any, input_shape: Sequence[int], batch: int) -> Check:
    """Eager and onnxruntime on the same input of ``batch`` images."""
    x = model_input(batch, input_shape)
    ort_out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return relative_error(ort_out, _eager(model, x), batch)


def median_ms(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int, rounds: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:  # fmt: skip
    """Median time per call, in ms, over ``repeats`` timed runs of each.

    The calls take turns in ``rounds`` blocks (each block warms up first), so a change in
    the machine's load during the measurement falls on both, not on whichever ran last;
    blocks rather than strict alternation keep one runtime's spinning worker threads out
    of the other's timed runs. ``clock`` is wall time; with one thread everything runs on
    the calling thread, and ``time.thread_time`` gives its CPU time instead, which other
    processes on a busy machine hardly change.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round = math.ceil(repeats / rounds)
    for _ in range(rounds):
        for name, call in calls.items():
            for i in range(warmup + per_round):
                start = clock()
                call()
                if i >= warmup:
                    times[name].append(clock() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def latency(model: Any, sess: Any, input_shape: Sequence[int], batch: int, *,
            repeats: int = 30, warmup: int = 3, rounds: int = 3) -> dict[str, Any]:  # fmt: skip
    """Median latency of PyTorch eager and of the onnxruntime session at ``batch``."""
    import torch

    x = model_input(batch, input_shape)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    with torch.inference_mode():
        ms = median_ms({"eager": lambda: model(x), "onnxruntime": lambda: sess.run(None, feed)},
                        repeats, warmup, rounds)  # fmt: skip
    return {"batch": batch, "repeats": math.ceil(repeats / rounds) * rounds,
            "eager_ms": round(ms["eager"], 4), "onnxruntime_ms": round(ms["onnxruntime"], 4),
            "speedup": round(ms["eager"] / ms["onnxruntime"], 3)}  # fmt: skip


# -- the command --------------------------------------------------------------------------


def _zero_share(model: Any) -> tuple[int, int]:
    """(zero weights, all weights) of the conv and linear layers."""
    from distgraft.compress.counting import WEIGHTED

    zeros = total = 0
    for m in model.modules():
        if isinstance(m, WEIGHTED):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros, total


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__}  # fmt: skip


class _Printer:
    """Progress lines for people; nothing with --json (one JSON object at the end)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)


def _plain(check: Check) -> dict[str, Any]:
    """A check for JSON: NaN (non-finite outputs) becomes null, which every reader parses."""
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None
            for k, v in asdict(check).items()}  # fmt: skip


def _mismatch(checks: Sequence[Check], tolerance: float, out: Path) -> str:
    bad = [c for c in checks if not c.ok(tolerance)]
    broken = [c for c in bad if math.isnan(c.rel_err)]
    if broken:
        return (f"the outputs at batch {broken[0].batch} are not finite (NaN or Inf), or "
                f"onnxruntime's differ in shape, so the file cannot be checked; {out} not "
                "written")  # fmt: skip
    worst = max(bad, key=lambda c: c.rel_err)
    return (f"onnxruntime differs from PyTorch: relative error {worst.rel_err:.3g} at batch "
            f"{worst.batch} > {tolerance:g}; {out} not written")  # fmt: skip


def _check_batches(batch: int) -> tuple[int, ...]:
    """--batch and one other size, so every export proves its batch axis is dynamic."""
    return (1, batch) if batch > 1 else (1, 2)


def _describe(opened: Opened, say: _Printer) -> dict[str, Any]:
    """The checkpoint's row: what it holds, its size and cost (and, if sparse, its zeros)."""
    from distgraft.compress.counting import count

    counts = count(opened.model, opened.input_shape)
    shape = "x".join(str(s) for s in opened.input_shape)
    say(f"{opened.path}: {opened.arch['model']}, {KIND_NAMES[opened.kind]}, input {shape}, "
        f"{counts.params:,} params, {counts.flops:,} FLOPs (MACs per image)")  # fmt: skip
    row: dict[str, Any] = {"checkpoint": opened.path, "kind": opened.kind,
                           "model": opened.arch["model"], "input_shape": list(opened.input_shape),
                           "params": counts.params, "flops": counts.flops,
                           "sparse_as_dense": opened.kind == "sparse"}  # fmt: skip
    if opened.kind == "sparse":
        zeros, total = _zero_share(opened.model)
        row["zero_weights"] = zeros
        say(f"sparse checkpoint: exported dense (ONNX Conv and Gemm take dense weights): the "
            f"file holds all {total:,} conv/linear weights, {zeros:,} of them zero "
            f"({100 * zeros / max(total, 1):.1f}%), and runs at dense speed")  # fmt: skip
    return row


def _export(opened: Opened, opset: int | None, say: _Printer, row: dict) -> Exported:
    say("exporting with torch.onnx.export(dynamo=True) (torch.export + onnxscript), "
        "batch axis dynamic ...")
    start = time.perf_counter()
    exported = export_onnx(opened.model, opened.input_shape, opset)
    row.update(onnx_bytes=len(exported.data), opset=exported.opset,
               export_s=round(time.perf_counter() - start, 2), versions=_versions())
    say(f"exported in {row['export_s']:.1f} s: opset {exported.opset}, "
        f"{len(exported.data):,} bytes with the weights inside")
    return exported


def _checked_session(opened: Opened, exported: Exported, threads: int,
                     args: argparse.Namespace, say: _Printer, row: dict) -> Any:  # fmt: skip
    """The onnxruntime session of the file, once it matched eager at both batch sizes."""
    try:
        sess = session(exported.data, threads)
        checks = [compare(opened.model, sess, opened.input_shape, b)
                  for b in _check_batches(args.batch)]  # fmt: skip
    except ExportError:
        raise
    except Exception as e:  # onnxruntime raises its own classes (Fail, InvalidGraph, ...)
        raise ExportFailed(f"onnxruntime cannot run the exported file: "
                           f"{type(e).__name__}: {_brief(str(e))}") from e  # fmt: skip
    ok = all(c.ok(args.tolerance) for c in checks)
    row.update(tolerance=args.tolerance, checks=[_plain(c) for c in checks], ok=ok)
    say(f"onnxruntime {row['versions']['onnxruntime']} against PyTorch eager, same random "
        "input (float32, CPU):")
    for c in checks:
        verdict = "ok" if c.ok(args.tolerance) else "MISMATCH"
        say(f"  batch {c.batch}: max|ort - eager| {c.max_abs_diff:.3g}, max|eager| "
            f"{c.max_abs_eager:.3g}, relative {c.rel_err:.3g} (limit {args.tolerance:g}): "
            f"{verdict}")  # fmt: skip
    if not ok:
        if args.json:
            print(json.dumps(row))
        raise ExportFailed(_mismatch(checks, args.tolerance, Path(args.onnx)))
    return sess


def _timed(opened: Opened, sess: Any, threads: int, args: argparse.Namespace,
           say: _Printer) -> dict[str, Any]:  # fmt: skip
    say(f"timing at batch {args.batch}: {args.repeats} runs each after warm-up, "
        f"{threads} thread(s) for PyTorch intra-op and onnxruntime intra-op ...")
    lat = {**latency(opened.model, sess, opened.input_shape, args.batch, repeats=args.repeats),
           "threads": threads}  # fmt: skip
    say(f"  PyTorch eager     {lat['eager_ms']:10.3f} ms (median)")
    say(f"  onnxruntime CPU   {lat['onnxruntime_ms']:10.3f} ms (median, "
        f"{lat['speedup']:.2f}x eager's speed)")
    return lat


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` (default: unchanged), restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield threads or previous
    finally:
        torch.set_num_threads(previous)


def run_export(args: argparse.Namespace) -> int:
    require_onnx()
    check_opset(args.opset)
    opened = open_model(args.checkpoint)
    out = prepare_output(args.onnx, args.checkpoint)
    from distgraft.files import write_atomic

    say = _Printer(args.json)
    row = {**_describe(opened, say), "onnx": str(out)}
    exported = _export(opened, args.opset, say, row)
    with _torch_threads(args.threads) as threads:
        sess = _checked_session(opened, exported, threads, args, say, row)
        write_atomic(out, lambda f: f.write(exported.data))
        say(f"wrote {out}")
        row["latency"] = _timed(opened, sess, threads, args, say) if args.latency else None
    if args.json:
        print(json.dumps(row))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _guarded(args: argparse.Namespace) -> int:
    """Bad input: one line, exit 2. A mismatch or a failed export: one line, exit 1."""
    try:
        return run_export(args)
    except ExportError as e:
        print(f"distgraft export: error: {e}", file=sys.stderr)
        return 2
    except ExportFailed as e:
        print(f"distgraft export: error: {e}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as ONNX, checked against PyTorch with onnxruntime",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a checkpoint of distgraft train or distgraft compress")  # fmt: skip
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--batch", type=_positive, default=1, metavar="N",
                   help="batch size of the check (with a second size) and of --latency "
                        "(default 1); the file's batch axis is dynamic either way")  # fmt: skip
    p.add_argument("--opset", type=int, metavar="K",
                   help=f"ONNX opset, {MIN_OPSET} or newer (default: the exporter's)")
    p.add_argument("--latency", action="store_true",
                   help="time PyTorch eager and onnxruntime CPU at --batch (medians)")
    p.add_argument("--repeats", type=_positive, default=30, metavar="R",
                   help="timed runs of each for --latency (default 30, after warm-up)")
    p.add_argument("--threads", type=_positive, metavar="T",
                   help="intra-op threads of both PyTorch and onnxruntime (default: "
                        "torch's, i.e. OMP_NUM_THREADS or the physical cores)")  # fmt: skip
    p.add_argument("--tolerance", type=_tolerance, default=TOLERANCE, metavar="TOL",
                   help=f"largest max|ort - eager| / max|eager| accepted (default {TOLERANCE:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress")
    p.set_defaults(func=_guarded)
