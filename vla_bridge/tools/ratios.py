"""The benchmarks' ratios: one measured ratio, its goal and the verdict, printed in one greppable form.

Every benchmark measures its rows side by side in one run, after a warm-up, and reports what it promises as a ratio
of two of those rows (never an absolute time: the machine's speed cancels out). Each ratio prints as one line::

    RATIO bench-loader.overhead = 1.12x (goal ≤ 1.3x: meets)
    RATIO bench-eval.speedup = 3.9x (goal ≥ 5x: MISSES)

``RATIO <bench>.<name> = <value>x (goal <op> <goal>x: meets|MISSES)``; the value with 2 decimals, the goal as
written (``%g``). A value that could not be measured (NaN) MISSES. ``bench-all`` writes the same ratios to its JSON
as ``{name, value, goal, op, meets, what}``; CI greps the lines (that they are printed, never their values).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

OPS = ("≥", "≤")
PREFIX = "RATIO"


@dataclasses.dataclass(frozen=True)
class Ratio:
    name: str            # "<bench>.<ratio>", e.g. "bench-loader.overhead"
    value: float
    goal: float
    op: str              # "≥": the value must reach the goal; "≤": it must stay at or under it
    what: str = ""       # one phrase: what is divided by what

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op {self.op!r}: expected one of {OPS}")
        if not self.name or " " in self.name:
            raise ValueError(f"ratio name {self.name!r}: one word, <bench>.<ratio>")

    @property
    def meets(self) -> bool:
        v = float(self.value)
        if not math.isfinite(v):
            return False
        return v >= self.goal if self.op == "≥" else v <= self.goal

    def line(self) -> str:
        v = float(self.value)
        shown = f"{v:.2f}" if math.isfinite(v) else "nan"
        return (f"{PREFIX} {self.name} = {shown}x (goal {self.op} {self.goal:g}x: "
                f"{'meets' if self.meets else 'MISSES'})")

    def as_dict(self) -> dict[str, Any]:
        v = float(self.value)
        return {"name": self.name, "value": v if math.isfinite(v) else None, "goal": float(self.goal),
                "op": self.op, "meets": self.meets, "what": self.what}


def ratio(name: str, num: float, den: float, goal: float, op: str, what: str = "") -> Ratio:
    """``num / den`` as a :class:`Ratio` (NaN when ``den`` is 0 or either is not finite)."""
    num, den = float(num), float(den)
    value = num / den if den and math.isfinite(num) and math.isfinite(den) else float("nan")
    return Ratio(name, value, float(goal), op, what)


def format_ratios(ratios: Iterable[Ratio]) -> str:
    return "\n".join(r.line() for r in ratios)
