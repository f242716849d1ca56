"""Plain JSON types from what the package writes: the one converter of eval.json, probe.json and the norm-stats
entries (stdlib + numpy; bottom layer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def to_jsonable(x: Any, *, finite_only: bool = False) -> Any:
    """Mappings (keys as str), lists and tuples (as lists), numpy arrays and scalars, torch tensors (anything with
    ``detach``) and paths (as str) → plain JSON types, recursively; everything else unchanged. ``finite_only``:
    NaN and ±inf become None (strict JSON; eval.json), else they stay floats (json writes NaN / Infinity)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):   # a torch tensor (no torch import here)
        x = x.detach().cpu().numpy()
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v, finite_only=finite_only) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v, finite_only=finite_only) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist(), finite_only=finite_only)
    if isinstance(x, np.generic):
        return to_jsonable(x.item(), finite_only=finite_only)
    if finite_only and isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


__all__ = ["to_jsonable"]
