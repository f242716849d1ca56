"""Where the notebook's time goes: seconds per section, saved as ``timings.json`` and printed as a table at the end.

Each section's first code cell calls ``timer.section("9 evaluation")``; everything run from there until the next
call counts toward that section. In a Jupyter kernel (Jupyter Lab, VS Code, papermill) the timer counts **cell
execution time only**, through IPython's ``pre_run_cell`` / ``post_run_cell`` events, so a person reading between
cells does not inflate a section; a cell's time goes to the section that is current when the cell finishes (a cell
that opens a section counts toward it). Outside a kernel (``python notebook.py``) it falls back to the wall clock
between ``section`` calls.

The file is rewritten after every cell, so a run that stops half-way still shows where its time went.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .jsonio import to_jsonable

try:  # the notebook's kernel; absent outside Jupyter is fine (the timer then uses the wall clock)
    from IPython import get_ipython
except ImportError:  # pragma: no cover - IPython is in requirements.txt
    def get_ipython() -> Any:
        return None

__all__ = ["CPU_BUDGET_S", "SectionTimer", "matmul_gflops"]

CPU_BUDGET_S = 600.0   # the default tiny-path run on 2 CPU cores, from a fresh clone (setup excluded)


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """This machine's float32 matrix-multiply throughput right now (GFLOPS, best of ``reps`` n x n products at the
    current torch thread count): the yardstick that makes two runs' timings comparable. A shared VM's speed can
    drift by 1.5x over hours (this project's 2-core VM: 135 and 177 GFLOPS on the same day), far more than the
    few percent between back-to-back runs, and the tiny path's time is mostly matrix products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b   # warm-up
    best = float("inf")
    for _ in range(int(reps)):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


class SectionTimer:
    """Seconds per named section of a run; ``path`` is the timings.json it keeps up to date."""

    def __init__(self, path: str | Path | None = None, *, ipython: Any = None, clock=time.perf_counter) -> None:
        self.path = Path(path) if path is not None else None
        self.clock = clock
        self.sections: dict[str, dict[str, float]] = {}   # name -> {"seconds", "cells"}, in the order first opened
        self.current: str | None = None
        self.ipython = ipython
        self.machine: dict[str, Any] = {}                  # calibrate(): the matmul yardstick at points of the run
        self._cell_t0: float | None = clock()            # the cell that creates the timer is running now
        self._wall_t0: float | None = None                 # without a kernel: when the current section opened
        if ipython is not None:
            ipython.events.register("pre_run_cell", self._pre_run_cell)
            ipython.events.register("post_run_cell", self._post_run_cell)

    @classmethod
    def for_this_kernel(cls, path: str | Path | None = None) -> "SectionTimer":
        """A timer on the running IPython kernel's cell events, or on the wall clock when there is none."""
        return cls(path, ipython=get_ipython())

    def save_to(self, path: str | Path) -> Path | None:
        """Keep ``path`` up to date from now on (written at once)."""
        self.path = Path(path)
        return self.save()

    # ---- recording
    def section(self, name: str) -> None:
        """Open section ``name`` (closing the current one); reopening a name adds to it."""
        now = self.clock()
        if self.ipython is None:
            self._close_wall(now)
            self._wall_t0 = now
        self.current = str(name)
        self.sections.setdefault(self.current, {"seconds": 0.0, "cells": 0})

    def _close_wall(self, now: float) -> None:
        if self.current is not None and self._wall_t0 is not None:
            self.sections[self.current]["seconds"] += now - self._wall_t0
            self.sections[self.current]["cells"] += 1
        self._wall_t0 = None

    def _pre_run_cell(self, *_args: Any) -> None:
        self._cell_t0 = self.clock()

    def _post_run_cell(self, *_args: Any) -> None:
        if self._cell_t0 is None:
            return
        seconds, self._cell_t0 = self.clock() - self._cell_t0, None
        name = self.current if self.current is not None else "(before the first section)"
        entry = self.sections.setdefault(name, {"seconds": 0.0, "cells": 0})
        entry["seconds"] += seconds
        entry["cells"] += 1
        self.save()

    def close(self) -> None:
        """Stop listening to the kernel (the last cell's time is still counted) and close the wall-clock section."""
        if self.ipython is not None:
            for event, fn in (("pre_run_cell", self._pre_run_cell), ("post_run_cell", self._post_run_cell)):
                try:
                    self.ipython.events.unregister(event, fn)
                except ValueError:
                    pass
            self.ipython = None
        else:
            self._close_wall(self.clock())

    def calibrate(self, label: str) -> float:
        """Record :func:`matmul_gflops` now under ``label`` (the notebook: "start" and "end"); it is saved with the
        timings and printed under the table."""
        gflops = matmul_gflops()
        self.machine.setdefault("matmul_gflops", {})[str(label)] = round(gflops, 1)
        self.machine["torch_threads"] = torch.get_num_threads()
        self.save()
        return gflops

    # ---- reading
    @property
    def total(self) -> float:
        return float(sum(s["seconds"] for s in self.sections.values()))

    def as_dict(self) -> dict:
        total = self.total
        return {"unit": "s", "counts": "cell execution time" if self.ipython is not None else "wall clock",
                "total_s": round(total, 2),
                "sections": [{"section": k, "seconds": round(v["seconds"], 2), "cells": int(v["cells"]),
                              "share": round(v["seconds"] / total, 4) if total > 0 else 0.0}
                             for k, v in self.sections.items()],
                "machine": dict(self.machine)}

    def save(self) -> Path | None:
        if self.path is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(to_jsonable(self.as_dict()), indent=2) + "\n")
        tmp.replace(self.path)
        return self.path

    def table(self, budget_s: float | None = None) -> str:
        """A Markdown table: seconds and share per section, the total, and the budget when given."""
        total = self.total
        lines = ["| section | seconds | share |", "|---|---:|---:|"]
        for name, v in self.sections.items():
            share = v["seconds"] / total if total > 0 else 0.0
            lines.append(f"| {name} | {v['seconds']:,.1f} | {share:.0%} |")
        lines.append(f"| **total** | **{total:,.1f}** | 100% |")
        if budget_s:
            verdict = "within" if total <= budget_s else "OVER"
            lines.append(f"\n{total:,.0f} s = {total / 60:.1f} min: {verdict} the {budget_s:,.0f} s budget of the "
                         f"default CPU run")
        speeds = self.machine.get("matmul_gflops")
        if speeds:
            measured = ", ".join(f"{v:,.0f} GFLOPS at the {k}" for k, v in speeds.items())
            lines.append(f"\nmachine speed (float32 matmul, {self.machine.get('torch_threads')} torch threads): "
                         f"{measured}. Compare runs' times only at similar speeds: the tiny path's time is "
                         f"mostly matrix products and scales roughly inversely with it.")
        return "\n".join(lines)
