"""Metrics and statistics of the evaluation and the probes (pure numpy).

Per episode: open-loop L1 (all 7 dimensions, motion and gripper apart), the replay drift of the integrated xyz
deltas, the gripper's close/open events and Bridge's success proxy built from them. Over episodes: the percentile
bootstrap CI of a mean (:func:`summarize`), the weighted one of the probes, and whether two intervals separate.
Probes: the KL divergence of the first action token's distribution, per-frame L1, mean |Δ| per dimension and the
within-episode spread of the predictions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

REPLAY_HORIZON = 16                # predicted / demonstrated xyz deltas integrated for the drift
DRIFT_THRESHOLD_CM = 5.0           # Bridge proxy: replay drift below this ...
GRIPPER_TOLERANCE_STEPS = 2        # ... and gripper events within ± this many steps of the demonstration's
GRIPPER_THRESHOLD = 0.5            # gripper command > 0.5 = open (Bridge / bridge_orig convention)
N_BOOT = 1000
CI_LEVEL = 0.95


def l1_action_error(pred: np.ndarray, demo: np.ndarray) -> tuple[float, np.ndarray]:
    """Open-loop L1 of one episode: (mean over frames and dimensions, per-dimension mean over frames)."""
    pred, demo = np.asarray(pred, np.float64), np.asarray(demo, np.float64)
    if pred.shape != demo.shape or pred.ndim != 2 or len(pred) == 0:
        raise ValueError(f"predicted {pred.shape} and demonstrated {demo.shape} actions must be equal (T, D), T > 0")
    err = np.abs(pred - demo)
    return float(err.mean()), err.mean(axis=0)


def split_l1(l1_per_dim: np.ndarray) -> tuple[float, float]:
    """(motion, gripper) L1 from the 7 per-dimension L1s: the mean over xyz + rotation (m, rad), and the gripper's
    (0/1). They are reported apart because a gripper error of 0.5 dwarfs centimetre-scale motion errors in the
    7-dimension mean."""
    d = np.asarray(l1_per_dim, np.float64)
    return float(d[:-1].mean()), float(d[-1])


def integrate_xyz(initial_xyz: Sequence[float], deltas: np.ndarray) -> np.ndarray:
    """End-effector path from ``initial_xyz`` under per-step xyz deltas: (T + 1, 3), row 0 = the start."""
    d = np.asarray(deltas, np.float64).reshape(-1, 3)
    start = np.asarray(initial_xyz, np.float64).reshape(1, 3)
    return np.concatenate([start, start + np.cumsum(d, axis=0)], axis=0)


def replay_drift_cm(pred: np.ndarray, demo: np.ndarray, initial_xyz: Sequence[float],
                    horizon: int = REPLAY_HORIZON) -> float:
    """Distance (cm) between the end points of the first ``horizon`` predicted and demonstrated xyz deltas (metres),
    both integrated from ``initial_xyz``; episodes shorter than ``horizon`` use all their frames."""
    pred, demo = np.asarray(pred, np.float64), np.asarray(demo, np.float64)
    n = min(int(horizon), len(pred), len(demo))
    if n <= 0:
        raise ValueError("no frames to integrate")
    end_p = integrate_xyz(initial_xyz, pred[:n, :3])[-1]
    end_d = integrate_xyz(initial_xyz, demo[:n, :3])[-1]
    return float(np.linalg.norm(end_p - end_d) * 100.0)


def gripper_events(gripper: Sequence[float], initial: float | None = None,
                   threshold: float = GRIPPER_THRESHOLD) -> list[tuple[int, str]]:
    """[(step, "close" | "open")] where the binarized gripper command changes. The state before step 0 is
    ``initial`` (e.g. the episode's initial gripper state; > threshold = open), else the first command."""
    g = np.asarray(gripper, np.float64).reshape(-1)
    if g.size == 0:
        return []
    is_open = g > threshold
    prev = bool(is_open[0]) if initial is None else bool(float(initial) > threshold)
    out = []
    for t, now in enumerate(is_open.tolist()):
        if now != prev:
            out.append((t, "open" if now else "close"))
        prev = now
    return out


def gripper_events_match(pred_events: Sequence[tuple[int, str]], demo_events: Sequence[tuple[int, str]],
                         tolerance: int = GRIPPER_TOLERANCE_STEPS) -> bool:
    """Same events in the same order, each within ± ``tolerance`` steps."""
    if len(pred_events) != len(demo_events):
        return False
    return all(kp == kd and abs(tp - td) <= tolerance for (tp, kp), (td, kd) in zip(pred_events, demo_events))


def proxy_success(pred: np.ndarray, demo: np.ndarray, initial_state: Sequence[float],
                  threshold_cm: float = DRIFT_THRESHOLD_CM, tolerance: int = GRIPPER_TOLERANCE_STEPS,
                  horizon: int = REPLAY_HORIZON) -> bool:
    """Bridge's success proxy for one episode (see ``evaluate.py``'s docstring). ``initial_state``: Bridge's 8-dim state
    (x y z roll pitch yaw pad gripper); its gripper (index 7, when present) is the events' starting point."""
    s = np.asarray(initial_state, np.float64).reshape(-1)
    drift = replay_drift_cm(pred, demo, s[:3], horizon)
    initial = float(s[7]) if s.size >= 8 else None
    ev_p = gripper_events(np.asarray(pred)[:, -1], initial)
    ev_d = gripper_events(np.asarray(demo)[:, -1], initial)
    return bool(drift < threshold_cm and gripper_events_match(ev_p, ev_d, tolerance))


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (resampling ``values`` — one per episode — with replacement).
    One value → (v, v); none → (nan, nan)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """{"mean", "ci": [lo, hi], "n"} over episodes."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    lo, hi = bootstrap_ci(v, n_boot, seed)
    return {"mean": float(np.mean(v)) if v else float("nan"), "ci": [lo, hi], "n": len(v)}


def ci_separated(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two summaries' 95 % intervals do not overlap (a difference these episodes resolve)."""
    return a["ci"][1] < b["ci"][0] or b["ci"][1] < a["ci"][0]


def compare_metric(metric: str, finetuned: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """The fine-tuned summary against a baseline's on ``metric``: strictly better (higher success / grasp rate, lower
    error or drift) and whether the intervals separate."""
    a, b = finetuned["mean"], baseline["mean"]
    better = a > b if metric.endswith("_rate") else a < b  # rates: higher is better; errors, drift: lower
    return {"finetuned": finetuned, "baseline": baseline, "better": bool(better),
            "separated": ci_separated(finetuned, baseline)}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) in nats per row; p, q = softmax of the given logits (..., K). 0 iff the distributions match."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def l1_per_frame(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean over the action dimensions of |pred - target|, one value per frame (N, D) -> (N,)."""
    return np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64)).mean(axis=-1)


def mean_abs_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean over frames of |a - b| per action dimension (N, D) -> (D,)."""
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=0)


def weighted_bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, n_boot: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the (weighted) mean of per-episode ``values``; None with < 2 values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = (v[idx] * w[idx]).sum(1) / np.maximum(w[idx].sum(1), 1e-12)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def prediction_spread(preds: Sequence[np.ndarray], demos: Sequence[np.ndarray], dim_range: np.ndarray,
                      decimals: int = 4) -> dict:
    """Does the policy's output change within an episode as the demonstration's does? Per episode: distinct
    predicted vs demonstrated actions (rounded to ``decimals``), and the spread ratio = mean over dimensions of
    std(pred) / std(demo) over the episode's frames (dimensions where the demonstration varies, in units of the
    q01-q99 range); averaged over episodes. A ratio near 0 = one action per episode whatever the camera shows."""
    distinct_p, distinct_d, ratios = [], [], []
    for p, d in zip(preds, demos):
        p, d = np.asarray(p, np.float64), np.asarray(d, np.float64)
        distinct_p.append(len({tuple(np.round(x, decimals)) for x in p}))
        distinct_d.append(len({tuple(np.round(x, decimals)) for x in d}))
        sp, sd = p.std(0) / dim_range, d.std(0) / dim_range
        keep = sd > 1e-6
        if keep.any():
            ratios.append(float(np.mean(sp[keep] / sd[keep])))
    return {"pred_distinct_per_episode": float(np.mean(distinct_p)) if distinct_p else float("nan"),
            "demo_distinct_per_episode": float(np.mean(distinct_d)) if distinct_d else float("nan"),
            "pred_spread_ratio": float(np.mean(ratios)) if ratios else float("nan")}


__all__ = [
    "REPLAY_HORIZON", "DRIFT_THRESHOLD_CM", "GRIPPER_TOLERANCE_STEPS", "GRIPPER_THRESHOLD", "N_BOOT", "CI_LEVEL",
    "l1_action_error", "split_l1", "integrate_xyz", "replay_drift_cm", "gripper_events", "gripper_events_match",
    "proxy_success", "bootstrap_ci", "summarize", "ci_separated", "compare_metric", "log_softmax", "kl_divergence",
    "l1_per_frame", "mean_abs_delta", "weighted_bootstrap_ci", "prediction_spread",
]
