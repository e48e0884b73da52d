"""``distgraft export``: every checkpoint kind to ONNX, run by onnxruntime against eager.

The checkpoints are made the way users make them: a training checkpoint of the format
``distgraft train`` writes, then ``distgraft compress prune --preset / lowrank / magnitude``
on it. Each exported file is opened again here with onnxruntime and run at batch 1 and 7
(one file, dynamic batch axis) against the rebuilt PyTorch model, independently of the
command's own check. Bad input is checked to stop with exit code 2 before any export work
(nothing printed on stdout, nothing written), and a missing onnxruntime with a real failing
import in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_helpers import ROOT, env, read_only_folder
from compress_helpers import CIFAR, DIGITS, compress_here, write_checkpoint

from distgraft.cli import main
from distgraft.compress.archive import load_model, save_compressed
from distgraft.files import save_atomic
from distgraft.models import build_model
from distgraft.tools.export import Check, compare, export_onnx, relative_error, session


def export_here(*args: str) -> subprocess.CompletedProcess:
    """``distgraft export ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def eager_vs_file(ckpt: Path, onnx_path: Path, batch: int) -> float:
    """max|ort - eager| / max|eager| of the file against the checkpoint's network."""
    model = load_model(ckpt)
    shape = tuple(model_input_shape(ckpt))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        eager = model(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    assert got.shape == eager.shape == (batch, 10)
    return float(np.abs(got - eager).max() / np.abs(eager).max())


def model_input_shape(ckpt: Path) -> list[int]:
    return torch.load(ckpt, weights_only=True)["arch"]["input_shape"]


def digits_checkpoint(folder: Path) -> Path:
    path = folder / "digits.pt"
    write_checkpoint(path, "digits_cnn", DIGITS)
    return path


def make(kind: str, folder: Path) -> Path:
    """A checkpoint of ``kind``, written by the compress command line as a user would."""
    if kind == "plain":
        return digits_checkpoint(folder)
    out = folder / f"{kind}.pt"
    if kind == "pruned":  # Li et al.'s VGG-16-A preset on a fresh VGG-16 (32x32x3)
        base = folder / "vgg16.pt"
        write_checkpoint(base, "vgg16_li", CIFAR)
        args = ["prune", str(base), "--preset", "vgg16-a"]
    elif kind == "lowrank":
        args = ["lowrank", str(digits_checkpoint(folder)), "--rank-ratio", "0.5"]
    elif kind == "sparse":
        args = ["magnitude", str(digits_checkpoint(folder)), "--sparsity", "0.9"]
    elif kind == "pruned+lowrank":
        half = folder / "half.pt"
        proc = compress_here("prune", str(digits_checkpoint(folder)), "--ratio", "0.5",
                             "--out", str(half))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        args = ["lowrank", str(half), "--rank-ratio", "0.5"]
    proc = compress_here(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("kind", ["plain", "pruned", "lowrank", "sparse", "pruned+lowrank"])
def test_every_checkpoint_kind_exports_and_matches_eager_at_batch_1_and_7(
    tmp_path: Path, kind: str
) -> None:
    ckpt = make(kind, tmp_path)
    out = tmp_path / "exported" / "model.onnx"  # the folder is created
    proc = export_here(str(ckpt), "--onnx", str(out), "--batch", "7", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["ok"] and [c["batch"] for c in row["checks"]] == [1, 7]
    assert all(c["rel_err"] <= 1e-4 for c in row["checks"])
    assert row["kind"] == kind.split("+")[-1].replace("plain", "train")
    assert row["sparse_as_dense"] == (kind == "sparse")

    # One file, weights inside (no external data beside it), batch axis symbolic.
    assert os.listdir(out.parent) == ["model.onnx"]
    assert out.stat().st_size == row["onnx_bytes"]
    graph = onnx.load(str(out))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == row["input_shape"]
    state = load_model(ckpt).state_dict()
    weights = sum(v.numel() for v in state.values() if v.is_floating_point())
    assert 4 * 0.9 * weights <= row["onnx_bytes"] <= 4 * weights + 200_000  # what was kept
    for batch in (1, 7):
        assert eager_vs_file(ckpt, out, batch) <= 1e-4


def test_a_sparse_checkpoint_says_it_is_exported_dense_and_times_both(tmp_path: Path) -> None:
    ckpt = make("sparse", tmp_path)
    out = tmp_path / "sparse.onnx"
    proc = export_here(str(ckpt), "--onnx", str(out), "--latency", "--repeats", "3",
                       "--threads", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "sparse checkpoint: exported dense" in text
    assert "batch 1:" in text and "batch 2:" in text  # default --batch 1, and a second size
    assert text.count(": ok") == 2 and f"wrote {out}" in text
    lines = [line.split() for line in text.splitlines()]
    eager = next(w for w in lines if w[:2] == ["PyTorch", "eager"])
    runtime = next(w for w in lines if w[:2] == ["onnxruntime", "CPU"])
    assert float(eager[2]) > 0 and float(runtime[2]) > 0 and eager[3] == runtime[3] == "ms"
    assert "1 thread(s)" in text


def test_latency_in_json_has_both_medians_and_the_threads(tmp_path: Path) -> None:
    ckpt = digits_checkpoint(tmp_path)
    proc = export_here(str(ckpt), "--onnx", str(tmp_path / "d.onnx"), "--latency", "--batch",
                       "5", "--repeats", "4", "--threads", "1", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lat = json.loads(proc.stdout)["latency"]
    assert lat["batch"] == 5 and lat["threads"] == 1 and lat["repeats"] >= 4
    assert lat["eager_ms"] > 0 and lat["onnxruntime_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["eager_ms"] / lat["onnxruntime_ms"], rel=1e-2)


def test_a_mismatch_exits_1_with_the_numbers_and_keeps_the_old_file(tmp_path: Path) -> None:
    """float32 rounding differs between the runtimes (ORT folds BatchNorm into the convs),
    so a tolerance of 1e-12 is a real mismatch; the file already there stays."""
    ckpt = digits_checkpoint(tmp_path)
    out = tmp_path / "d.onnx"
    out.write_bytes(b"the previous export")
    proc = export_here(str(ckpt), "--onnx", str(out), "--tolerance", "1e-12")
    assert proc.returncode == 1
    assert "MISMATCH" in proc.stdout and "max|ort - eager|" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "relative error" in err[0] and "not written" in err[0]
    assert out.read_bytes() == b"the previous export"


def test_non_finite_outputs_never_pass(tmp_path: Path) -> None:
    """A diverged checkpoint (NaN weights) gives NaN in both runtimes: not a match."""
    model = build_model("digits_cnn", 10, 1)
    with torch.no_grad():
        model.linear.weight.fill_(math.nan)
    ckpt = tmp_path / "nan.pt"
    arch = {"model": "digits_cnn", "num_classes": 10, "in_channels": 1,
            "input_shape": list(DIGITS), "edits": []}  # fmt: skip
    save_compressed(ckpt, model, arch, kind="pruned")
    proc = export_here(str(ckpt), "--onnx", str(tmp_path / "nan.onnx"), "--json")
    assert proc.returncode == 1 and "not finite" in proc.stderr
    row = json.loads(proc.stdout)  # NaN is written as null: valid JSON
    assert row["ok"] is False and row["checks"][0]["rel_err"] is None
    assert not (tmp_path / "nan.onnx").exists()


def test_relative_error_is_judged_against_the_largest_eager_output() -> None:
    eager = np.array([[1.0, -4.0], [2.0, 0.5]])
    check = relative_error(eager + np.array([[0.0, 0.0], [0.0, 2e-4]]), eager, batch=2)
    assert check.max_abs_diff == pytest.approx(2e-4) and check.max_abs_eager == 4.0
    assert check.rel_err == pytest.approx(5e-5) and check.ok(1e-4) and not check.ok(1e-5)
    assert not relative_error(eager[:1], eager, 2).ok(1.0)  # another shape
    assert not relative_error(eager * np.nan, eager * np.nan, 2).ok(1.0)
    assert relative_error(np.zeros(3), np.zeros(3), 1) == Check(1, 0.0, 0.0, 0.0)
    assert not relative_error(np.ones(3), np.zeros(3), 1).ok(1e9)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("resnet20", CIFAR), ("mobilenetv2", CIFAR), ("lenet300_100", DIGITS), ("lenet5", DIGITS)],
)
def test_every_model_family_exports_with_a_dynamic_batch(name: str, shape) -> None:
    """Option-A shortcuts (channel padding), depthwise convs, dropout, flatten: one exporter."""
    torch.manual_seed(0)
    model = build_model(name, 10, shape[0]).eval()
    sess = session(export_onnx(model, shape).data, threads=1)
    for batch in (1, 7):
        assert compare(model, sess, shape, batch).ok(1e-4)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("unknown kind", "unknown checkpoint kind 'quantized'"),
        ("missing checkpoint", "does not exist"),
        ("unreadable checkpoint", "cannot read"),
        ("weights of another model", "weights do not fit"),
        ("under a file", "is a file, not a folder"),
        ("unwritable folder", "cannot write in"),
        ("a folder", "is a folder"),
        ("not .onnx", "must end in .onnx"),
        ("old opset", "--opset 13: allowed 18 to"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_work(
    tmp_path: Path, case: str, expect: str
) -> None:
    ckpt = digits_checkpoint(tmp_path)
    out = tmp_path / "out.onnx"
    extra: list[str] = []
    if case == "unknown kind":
        state = torch.load(ckpt, weights_only=True)
        save_atomic({**state, "kind": "quantized"}, ckpt)
    elif case == "missing checkpoint":
        ckpt = tmp_path / "nothing.pt"
    elif case == "unreadable checkpoint":
        ckpt.write_bytes(b"not a torch file")
    elif case == "weights of another model":
        state = torch.load(ckpt, weights_only=True)
        save_atomic({**state, "model": build_model("lenet5", 10, 1).state_dict()}, ckpt)
    elif case == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub" / "out.onnx"
    elif case == "unwritable folder":
        out = read_only_folder(tmp_path) / "out.onnx"
    elif case == "a folder":
        out = tmp_path / "dir.onnx"
        out.mkdir()
    elif case == "not .onnx":
        out = tmp_path / "model.pt"
    elif case == "old opset":
        extra = ["--opset", "13"]
    proc = export_here(str(ckpt), "--onnx", str(out), *extra)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distgraft export: error: "), err
    assert expect in err[0]
    assert proc.stdout == ""  # nothing started: no progress line
    assert case == "a folder" or not out.exists()


def test_without_onnxruntime_it_exits_2_naming_the_extra(tmp_path: Path) -> None:
    """A fresh interpreter in which ``import onnxruntime`` really fails (a package of that
    name first on the path that raises the error a missing package raises)."""
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n"
    )
    ckpt = digits_checkpoint(tmp_path)
    out = tmp_path / "d.onnx"
    e = dict(env(), PYTHONPATH=os.pathsep.join([str(shadow.parent), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-m", "distgraft", "export", str(ckpt), "--onnx", str(out)],
        cwd=ROOT, env=e, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'distgraft[onnx]'" in err[0], err
    assert "onnxruntime not installed" in err[0]
    assert proc.stdout == "" and not out.exists()
