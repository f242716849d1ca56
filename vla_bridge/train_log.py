"""Reading a run's ``train_log.jsonl`` (one JSON line per ``log_every`` optimizer steps, written by
``training.train``): the rows, their exponential moving average, and the loss-descent check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def read_log(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def smoothed(values: list[float], alpha: float = 0.2) -> list[float]:
    """Exponential moving average (the loss curve's smoothed line and the descent check use it)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def loss_descent_check(log: list[dict], within_steps: int = 500) -> dict:
    """Did the smoothed loss descend over the first ``within_steps`` steps (or the whole run if shorter)?

    Compares the mean raw loss of the first and last tenth of those logged steps; passes when the last tenth is below
    0.7× the first (the bar this project's issue sets).
    """
    rows = [r for r in log if r["step"] <= within_steps] or log
    losses = [r["loss"] for r in rows]
    if len(losses) < 2:
        return {"ok": False, "reason": "fewer than 2 logged points", "n": len(losses)}
    k = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    sm = smoothed(losses)
    return {"ok": last < 0.7 * first, "first_tenth": first, "last_tenth": last, "ratio": last / first,
            "smoothed_start": sm[0], "smoothed_end": sm[-1], "steps": rows[-1]["step"], "n": len(losses)}
