"""Progress bars that are live where someone watches them and one line where nobody does.

A live tqdm bar redraws itself every ``mininterval`` seconds; in a terminal or Jupyter that is one line that moves.
In a headless run (papermill, a CI log, output piped to a file) every redraw is kept: the executed notebook of the
default run held 1,205 redraws (233 KB) for one loop. So every bar in this package comes from :func:`tqdm` here:

- **live** (a Jupyter frontend, or a terminal): tqdm.auto's bar — the widget in Jupyter when ipywidgets is installed,
  the text bar otherwise (never tqdm's "IProgress not found" TqdmWarning);
- **line** (headless): a plain text bar that draws once when it opens and once when it closes (``mininterval`` and
  ``maxinterval`` infinite), so a loop leaves one line with its total, time and rate.

The mode: ``VLA_BRIDGE_PROGRESS=live|line`` wins; ``python -m vla_bridge run-notebook`` sets ``line`` for the kernel
papermill starts; otherwise live in a Jupyter kernel or when stderr is a terminal, line elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from tqdm import std as _std

ENV = "VLA_BRIDGE_PROGRESS"
_HEADLESS_KW = {"mininterval": float("inf"), "maxinterval": float("inf"), "miniters": 0, "dynamic_ncols": False,
                "ncols": 100, "leave": True}


def _in_jupyter_kernel() -> bool:
    ip = sys.modules.get("IPython")
    if ip is None or "ipykernel" not in sys.modules:
        return False
    shell = ip.get_ipython() if hasattr(ip, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def mode() -> str:
    """"live" or "line" (see the module docstring)."""
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("live", "line"):
        return env
    if _in_jupyter_kernel():
        return "live"
    stream = sys.stderr
    return "live" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "line"


class _LineBar(_std.tqdm):
    """Headless: draws when opened and when closed, never in between (a postfix update does not redraw)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        return super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        return super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        return super().set_description(desc, refresh=False)


def tqdm(*args: Any, **kwargs: Any):
    """A tqdm bar for this package's loops: same arguments as ``tqdm.tqdm``; headless, one line per loop."""
    if mode() == "line":
        kwargs.update(_HEADLESS_KW)
        return _LineBar(*args, **kwargs)
    if _in_jupyter_kernel() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm   # lazy: needs ipywidgets, present only in some kernels

        return notebook_tqdm(*args, **kwargs)
    return _std.tqdm(*args, **kwargs)


__all__ = ["ENV", "mode", "tqdm"]
