"""The package's layers (docs/ARCHITECTURE.md, the contracts in pyproject.toml) hold, and the check would notice an
upward import or a cycle: import-linter runs on this tree and on copies with one bad import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=str(root),
                          env=env, capture_output=True, text=True, timeout=300)


def _copy_with(tmp_path: Path, rel: str, line: str) -> Path:
    shutil.copytree(ROOT / "vla_bridge", tmp_path / "vla_bridge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / rel
    target.write_text(target.read_text() + f"\n{line}\n")
    return tmp_path


def test_the_tree_keeps_every_contract():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("rel, line, contract", [
    ("vla_bridge/data/tasks.py", "from ..evaluation import metrics  # noqa", "layers"),
    ("vla_bridge/data/schema.py", "from . import stats  # noqa", "cycles"),           # stats → schema already
    ("vla_bridge/octo/protocol.py", "import torch  # noqa", "Octo workers"),
])
def test_a_bad_import_breaks_a_contract(tmp_path, rel, line, contract):
    proc = _lint(_copy_with(tmp_path, rel, line))
    assert proc.returncode != 0, proc.stdout[-2000:]
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert {"layers": "the loop's layers", "cycles": "no import cycles",
            "Octo workers": "the Octo workers"}[contract] in broken, proc.stdout[-2000:]
