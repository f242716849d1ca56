"""Figures. Each function saves a PNG under ``outputs/figures/<run>/`` and returns its path; the notebook shows it
inline. matplotlib runs with the Agg backend (headless, papermill-safe).

Data figures (this module grows with the later sections):

* :func:`plot_episode_frames` — for a few episodes: per camera, the start / middle / end frames, titled with the
  episode's task text (what the policy is asked, and what it sees when);
* :func:`plot_action_stream` — the 7 action dimensions over time for the same episodes, with units (xyz deltas in
  metres per step, rotation deltas in radians per step, gripper 1 = open).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

_UNITS = {"dx": "m", "dy": "m", "dz": "m", "droll": "rad", "dpitch": "rad", "dyaw": "rad", "gripper": "1 = open"}


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def pick_episodes(episodes: Sequence[int], n: int = 3, seed: int = 0) -> list[int]:
    """``n`` episodes drawn without replacement with ``default_rng(seed)`` (sorted), or all if fewer."""
    eps = sorted(int(e) for e in episodes)
    if len(eps) <= n:
        return eps
    rng = np.random.default_rng(seed)
    return sorted(int(e) for e in rng.choice(eps, size=n, replace=False))


def _image(frame: Mapping[str, Any], key: str) -> np.ndarray:
    img = frame[key]
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return img


def _task(frames: Sequence[Mapping[str, Any]]) -> str:
    t = str(frames[0].get("task", "")) if frames else ""
    return t if t.strip() else "(blank task string)"


def _out(out_dir: str | os.PathLike, filename: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / filename


def plot_episode_frames(episode_frames: Mapping[int, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike,
                        cameras: Sequence[str] | None = None, filename: str = "episode_frames.png",
                        fps: float | None = None) -> Path:
    """One row per episode, titled with its task text; per camera, its start / middle / end frames.
    ``episode_frames``: episode → its frames (e.g. ``stream.collect_episodes``)."""
    plt = _plt()
    eps = list(episode_frames)
    first = episode_frames[eps[0]][0]
    cameras = list(cameras or sorted(k for k in first if k.startswith("observation.images.")))
    cols = 3 * len(cameras)
    fig, axes = plt.subplots(len(eps), cols, figsize=(1.9 * cols, 2.35 * len(eps)), squeeze=False)
    for i, ep in enumerate(eps):
        frames = episode_frames[ep]
        picks = [("start", 0), ("middle", len(frames) // 2), ("end", len(frames) - 1)]
        for j, cam in enumerate(cameras):
            for c, (label, k) in enumerate(picks):
                ax = axes[i][3 * j + c]
                ax.imshow(_image(frames[k], cam))
                ax.set_xticks([])
                ax.set_yticks([])
                t = f", {k / fps:.1f} s" if fps else ""
                ax.set_title(f"{cam.replace('observation.images.', '')} · {label}{t}", fontsize=7)
        axes[i][0].text(0.0, 1.2, f"episode {ep} ({len(frames)} frames): \u201c{_task(frames)}\u201d",
                        transform=axes[i][0].transAxes, fontsize=9, fontweight="bold", ha="left", va="bottom")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.05, hspace=0.45)
    path = _out(out_dir, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_action_stream(episode_frames: Mapping[int, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike,
                       action_names: Sequence[str] | None = None, fps: float = 5.0,
                       filename: str = "action_stream.png") -> Path:
    """One panel per action dimension, one line per episode, time in seconds on x, the unit on y."""
    plt = _plt()
    eps = list(episode_frames)
    acts = {ep: np.stack([np.asarray(f["action"].detach().cpu().numpy() if hasattr(f["action"], "detach")
                                     else f["action"], dtype=np.float64) for f in episode_frames[ep]]) for ep in eps}
    dim = next(iter(acts.values())).shape[1]
    names = list(action_names or [f"a{i}" for i in range(dim)])
    fig, axes = plt.subplots(dim, 1, figsize=(8, 1.35 * dim + 0.8), sharex=True, squeeze=False)
    for d in range(dim):
        ax = axes[d][0]
        for ep in eps:
            t = np.arange(len(acts[ep])) / fps
            ax.plot(t, acts[ep][:, d], marker=".", ms=3, lw=1.2,
                    label=f"ep {ep}: {_task(episode_frames[ep])[:48]}")
        unit = _UNITS.get(names[d], "")
        ax.set_ylabel(f"{names[d]}\n[{unit}]" if unit else names[d], fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[-1][0].set_xlabel(f"time [s] ({fps:g} Hz)")
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, 1.9), ncol=1, frameon=False)
    fig.suptitle("7-DoF action stream (xyz / rotation deltas per step, absolute gripper command)", fontsize=9, y=0.995)
    fig.tight_layout()
    path = _out(out_dir, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_data_figures(ds, episodes: Sequence[int], out_dir: str | os.PathLike, n: int = 3, seed: int = 0
                      ) -> dict[str, Any]:
    """Pick ``n`` episodes (seeded), stream them once, draw both data figures. Returns the paths and the episodes."""
    from .data.stream import collect_episodes

    picked = pick_episodes(episodes, n, seed)
    frames = collect_episodes(ds, picked)
    fps = float(ds.meta.fps)
    names = ds.meta.features.get("action", {}).get("names")
    names = names if isinstance(names, (list, tuple)) else None
    return {
        "episodes": picked,
        "episode_frames": plot_episode_frames(frames, out_dir, ds.meta.camera_keys, fps=fps),
        "action_stream": plot_action_stream(frames, out_dir, names, fps=fps),
    }


def plot_loss_curve(log: Sequence[Mapping[str, Any]], path: str | os.PathLike, alpha: float = 0.2) -> Path:
    """Loss (raw + EMA-smoothed) and action-token accuracy against the optimizer step, from train_log.jsonl rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .training import smoothed

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in log]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.6))
    if log:
        loss = [r["loss"] for r in log]
        acc = [r["action_accuracy"] for r in log]
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="logged (mean over LOG_EVERY steps)")
        ax_loss.plot(steps, smoothed(loss, alpha), color="tab:blue", lw=2, label=f"EMA (α={alpha})")
        ax_acc.plot(steps, acc, color="tab:green", alpha=0.35, lw=1, label="logged")
        ax_acc.plot(steps, smoothed(acc, alpha), color="tab:green", lw=2, label=f"EMA (α={alpha})")
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy on the 8 supervised tokens", title="training loss")
    ax_acc.set(xlabel="optimizer step", ylabel="share of action tokens exactly right", title="action-token accuracy",
               ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
