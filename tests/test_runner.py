"""Headless execution: parameters are injected, and a raising cell makes the command exit non-zero."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent

NOTEBOOK = """\
# %% tags=["parameters"]
RUN_NAME = "auto"

# %%
print("run name is", RUN_NAME)

# %% [markdown]
# ## 2. The part that fails
# It raises when asked to.

# %%
if RUN_NAME == "boom":
    raise ValueError("deliberate failure for the test")
print("finished")
"""


def _run(tmp_path: Path, *params: str) -> subprocess.CompletedProcess:
    src = tmp_path / "nb.py"
    src.write_text(NOTEBOOK)
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "vla_bridge", "run-notebook", "--notebook", str(src), "--out", str(out)]
    for p in params:
        cmd += ["-p", p]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_parameters_are_injected(tmp_path):
    res = _run(tmp_path, "RUN_NAME=hello")
    assert res.returncode == 0, res.stderr[-2000:]
    nb = jupytext.read(tmp_path / "out.ipynb")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "run name is hello" in outputs and "finished" in outputs


def test_raising_cell_exits_nonzero_with_one_line(tmp_path):
    res = _run(tmp_path, "RUN_NAME=boom")
    assert res.returncode != 0
    err_lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "ValueError" in err_lines[0] and "deliberate failure" in err_lines[0]
    assert (tmp_path / "out.ipynb").exists()  # the partial notebook with the traceback is kept
    # named as the reader sees it: the line of nb.py, the section above it, In [n] of the executed notebook, and
    # papermill's "Cell k" (its log counts markdown and the injected-parameters cell too)
    assert "nb.py line 12" in err_lines[0] and "section '2. The part that fails'" in err_lines[0], err_lines[0]
    assert "In [4]" in err_lines[0] and "papermill's Cell 5" in err_lines[0], err_lines[0]
    assert "Executing Cell 5-" in res.stdout   # the number papermill's own log shows for that cell


def test_unknown_parameter_is_rejected(tmp_path):
    res = _run(tmp_path, "MAX_STEP=3")
    assert res.returncode != 0 and "unknown notebook parameter" in res.stderr


def test_project_notebook_parameters_match_config_table():
    """The notebook's parameters cell and DEFAULT_PARAMS must list the same names with the same defaults."""
    from vla_bridge.config import DEFAULT_PARAMS

    nb = jupytext.read(ROOT / "notebook.py")
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    ns: dict = {}
    exec(cell.source, ns)
    got = {k: v for k, v in ns.items() if k.isupper()}
    assert got == DEFAULT_PARAMS
