"""The import rules the package layout keeps, checked on the source (no imports run).

* Only ``distgraft/comm`` touches ``torch.distributed``: ``graft/`` and ``compress/`` are
  pure tensor code, and training, telemetry and tools reach other processes through comm.
* ``comm/`` knows nothing of training: it imports no other part of distgraft.
* Nothing below ``train/`` imports it (nor the tools and the CLI above it).
* No command module of ``tools/`` imports another command module; ``tools/compress/``
  imports only downward (the library, ``train.run``, ``train.evaluate``, ``train.data``),
  never the trainer, the ``train`` command or other tools.

Every ``import`` statement counts, also those inside functions (lazy imports), and so does
an attribute chain such as ``torch.distributed.all_reduce`` after a plain ``import torch``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distgraft"

# Packages that sit below train/: they must never import it or anything above it.
BELOW_TRAIN = ("graft", "comm", "compress", "distill", "telemetry", "models")
ABOVE = ("distgraft.train", "distgraft.tools", "distgraft.cli", "distgraft.__main__")


def modules(*folders: str) -> list[Path]:
    found = [p for f in folders for p in sorted((PACKAGE / f).rglob("*.py"))]
    assert found, f"no modules under {folders}"
    return found


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, and ``torch.distributed`` if it names it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the package
            base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level])
            module = f"{base}.{node.module}" if node.module else base
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            names.add("torch.distributed")
    return names


def offending(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(
        n for n in imported(path) if any(n == p or n.startswith(p + ".") for p in prefixes)
    )


def rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    """The rules below are only as good as this parser: feed it each way to import."""
    forms = [
        "import torch.distributed as dist",
        "from torch.distributed import all_reduce",
        "from torch import distributed",
        "import torch\ntorch.distributed.barrier()",
        "def f():\n    import torch.distributed\n",
    ]
    for text in forms:
        f = tmp_path / "m.py"
        f.write_text(text + "\n")
        assert offending(f, ("torch.distributed",)), text
    f.write_text("import torch\nimport torch.nn as nn\nfrom torch import Tensor\n")
    assert offending(f, ("torch.distributed",)) == []


@pytest.mark.parametrize(
    "path",
    [p for p in PACKAGE.rglob("*.py") if "comm" not in p.relative_to(PACKAGE).parts],
    ids=rel,
)
def test_only_comm_touches_torch_distributed(path: Path) -> None:
    assert offending(path, ("torch.distributed",)) == [], (
        f"{rel(path)} imports torch.distributed; collectives belong in distgraft/comm"
    )


@pytest.mark.parametrize("path", modules("comm"), ids=rel)
def test_comm_knows_nothing_of_training(path: Path) -> None:
    others = [n for n in offending(path, ("distgraft",)) if not n.startswith("distgraft.comm")]
    assert others == [], f"{rel(path)} imports {others}; comm/ must stand alone"


@pytest.mark.parametrize("path", modules(*BELOW_TRAIN), ids=rel)
def test_nothing_below_train_imports_it(path: Path) -> None:
    assert offending(path, ABOVE) == [], f"{rel(path)} imports a layer above it"


@pytest.mark.parametrize("path", modules("compress", "distill"), ids=rel)
def test_compress_is_pure_tensor_code(path: Path) -> None:
    """Distributed compression work is driven from train/ and the CLI, not from here."""
    assert offending(path, ("distgraft.comm", "torch.distributed")) == [], rel(path)


# tools/: the command modules, and the two that only serve them.
TOOLS = PACKAGE / "tools"
COMPRESS_TOOLS = TOOLS / "compress"
NOT_COMMANDS = {
    TOOLS / "__init__.py",
    COMPRESS_TOOLS / "__init__.py",
    COMPRESS_TOOLS / "cli.py",  # registers the compress commands: imports each of them
    COMPRESS_TOOLS / "common.py",  # what the compress commands share
}
COMMANDS = [p for p in sorted(TOOLS.rglob("*.py")) if p not in NOT_COMMANDS]



def test_the_trainer_knows_no_method() -> None:
    """Losses, gradient edits and training-time compression are parts in train/ that the
    trainer calls; it imports nothing from compress/ (nor distill/)."""
    trainer = PACKAGE / "train" / "trainer.py"
    assert offending(trainer, ("distgraft.compress", "distgraft.distill")) == []

def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_the_command_modules_are_found() -> None:
    names = {module_name(p) for p in COMMANDS}
    expected = {f"distgraft.tools.compress.{c}" for c in
                ("prune", "info", "magnitude", "lowrank", "sensitivity", "trim")}  # fmt: skip
    expected |= {f"distgraft.tools.{c}" for c in ("analyze", "report", "compare", "export")}
    assert expected <= names


@pytest.mark.parametrize("path", COMMANDS, ids=rel)
def test_no_command_imports_another(path: Path) -> None:
    others = tuple(module_name(p) for p in COMMANDS if p != path)
    assert offending(path, others) == [], f"{rel(path)} imports another command module"


@pytest.mark.parametrize("path", sorted(COMPRESS_TOOLS.rglob("*.py")), ids=rel)
def test_compress_tools_import_only_downward(path: Path) -> None:
    above = ("distgraft.train.trainer", "distgraft.train.cli", "distgraft.cli",
             "distgraft.__main__", "distgraft.tools")  # fmt: skip
    own = "distgraft.tools.compress"
    found = [n for n in offending(path, above) if n != own and not n.startswith(own + ".")]
    assert found == [], f"{rel(path)} imports {found}: tools/compress/ imports only downward"
    if path.name != "cli.py":  # only the registration imports the command modules
        commands = tuple(module_name(p) for p in COMMANDS if p.parent == COMPRESS_TOOLS)
        assert offending(path, commands) == [], f"{rel(path)} imports a command module"


def test_the_checker_sees_a_command_importing_another(tmp_path: Path, monkeypatch) -> None:
    """The package-relative and absolute forms both count, inside functions too."""
    folder = tmp_path / "distgraft" / "tools" / "compress"
    folder.mkdir(parents=True)
    forms = ["from distgraft.tools.compress.prune import run_prune",
             "from distgraft.tools.compress import prune",
             "def f():\n    from .prune import run_prune\n",
             "import distgraft.tools.compress.prune"]  # fmt: skip
    for text in forms:
        f = folder / "lowrank.py"
        f.write_text(text + "\n")
        monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "distgraft")
        assert offending(f, ("distgraft.tools.compress.prune",)), text
