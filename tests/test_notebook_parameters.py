"""Issue 14 item 9: papermill parses every line of the notebook's parameters cell (no "Unable to parse line" warning),
and infers exactly the parameters the package defines."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import jupytext
import papermill

from vla_bridge.config import DEFAULT_PARAMS

ROOT = Path(__file__).resolve().parents[1]


def test_papermill_parses_every_parameter_line(tmp_path, caplog):
    nb = jupytext.read(ROOT / "notebook.py")
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    path = tmp_path / "notebook.ipynb"
    jupytext.write(nb, path)
    with caplog.at_level(logging.WARNING, logger="papermill"):
        inferred = papermill.inspect_notebook(str(path))
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("papermill")]
    assert warnings == [], warnings
    assignments = [ln.split("=", 1)[0].strip() for ln in cell.source.splitlines()
                   if ln.strip() and not ln.lstrip().startswith("#")]
    assert list(inferred) == assignments and set(inferred) == set(DEFAULT_PARAMS)
    for name, p in inferred.items():
        assert ast.literal_eval(p["default"]) == DEFAULT_PARAMS[name], name   # the value papermill read is whole
