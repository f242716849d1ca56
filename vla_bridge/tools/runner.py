"""Execute ``notebook.py`` headless with papermill (what ``bash setup.sh --run`` / ``--test`` call).

The percent-format source is converted in memory with jupytext, so the headless run never depends on a stale
``notebook.ipynb``. A cell that raises makes the run exit non-zero with one line naming the cell; the partially
executed notebook is still written so the traceback can be read there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from ..config import DEFAULT_PARAMS, check_params, parse_param
from ..hardware import PreflightError
from ..paths import PROJECT_ROOT


def load_params_file(path: str | os.PathLike | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: parameters file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: parameters file {p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: parameters file {p} must hold a JSON object of NAME: value")
    return data


def parse_kv(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs, each VALUE parsed as a person writes it (:func:`vla_bridge.config.parse_param`:
    True/False/None in either case, numbers, lists) and checked against the parameter's type."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: parameter {pair!r} must look like NAME=VALUE")
        k, v = pair.split("=", 1)
        try:
            out[k] = parse_param(k, v)
        except PreflightError as exc:
            raise SystemExit(f"error: {exc}") from None
    return out


def describe_failed_cell(src: Path, nb: Any, exc: Any) -> str:
    """Name the failed cell the ways a reader finds it: the line in ``notebook.py`` (the VS Code gutter), the
    section heading above it, ``In [n]`` in the executed notebook, and papermill's own "Cell k" (its streamed log
    counts every cell from 1, markdown and the injected-parameters cell included, so it differs from both)."""
    parts = []
    cells = list(getattr(nb, "cells", []))
    index = next((i for i, c in enumerate(cells) if c.cell_type == "code" and c.source == exc.source), None)
    if index is not None:
        if src.suffix == ".py" and exc.source.strip():
            text = src.read_text()
            at = text.find(exc.source)
            if at >= 0:
                parts.append(f"{src.name} line {text.count(chr(10), 0, at) + 1}")
        heading = next((c.source.lstrip("#").strip().splitlines()[0] for c in reversed(cells[:index])
                        if c.cell_type == "markdown" and c.source.lstrip().startswith("#")), None)
        if heading:
            parts.append(f"section {heading!r}")
    where = ", ".join(parts) or "a notebook cell"
    return f"the cell at {where} (In [{exc.exec_count}] in the executed notebook; papermill's Cell {exc.cell_index + 1})"


def execute_notebook(
    source: str | os.PathLike,
    output: str | os.PathLike,
    parameters: Mapping[str, Any] | None = None,
    kernel_name: str = "python3",
    cwd: str | os.PathLike | None = None,
    check_names: bool = True,
) -> Path:
    """Run ``source`` (percent .py or .ipynb) with papermill; raise ``SystemExit(1)`` with one line on a failing cell."""
    # The project's `notebook.py` would shadow Jupyter's `notebook` package, which papermill's imports probe for:
    # keep the repository root off sys.path while importing them (vla_bridge is already imported).
    root = str(PROJECT_ROOT)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", root) and Path(p or ".").resolve() != PROJECT_ROOT]
    # lazy: only after the repository root is off sys.path (see above)
    import jupytext
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    parameters = dict(parameters or {})
    if check_names:
        unknown = sorted(set(parameters) - set(DEFAULT_PARAMS))
        if unknown:
            raise SystemExit(f"error: unknown notebook parameter(s) {unknown}; known: {', '.join(DEFAULT_PARAMS)}")
        try:
            parameters = check_params(parameters)
        except PreflightError as exc:
            raise SystemExit(f"error: {exc}") from None
    src = Path(source)
    if not src.is_file():
        raise SystemExit(f"error: notebook {src} does not exist")
    nb = jupytext.read(src) if src.suffix == ".py" else jupytext.read(src, fmt="ipynb")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Stream each cell's output into the terminal / CI log as it runs.
    pm_log = logging.getLogger("papermill")
    if not pm_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        pm_log.addHandler(handler)
        pm_log.setLevel(logging.INFO)
        pm_log.propagate = False
    os.environ.setdefault("VLA_BRIDGE_PROGRESS", "line")  # the kernel inherits it: one progress line per loop
    t0 = time.time()
    print(f"papermill: {src} → {out} (kernel {kernel_name}, parameters {json.dumps(parameters)})", flush=True)
    try:
        pm.execute_notebook(
            nb, str(out), parameters=parameters, kernel_name=kernel_name, language="python",
            cwd=str(cwd or PROJECT_ROOT), progress_bar=False, log_output=True,
        )
    except PapermillExecutionError as exc:
        print(
            f"error: {describe_failed_cell(src, nb, exc)} raised {exc.ename}: "
            f"{exc.evalue.splitlines()[0] if exc.evalue else ''} — executed notebook with the traceback: {out}",
            file=sys.stderr, flush=True,
        )
        raise SystemExit(1) from None
    print(f"papermill: finished in {time.time() - t0:.1f} s → {out}", flush=True)
    return out
