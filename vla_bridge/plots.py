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
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.episodes import collect_episodes
from .data.schema import feature_names
from .images import to_uint8_hwc
from .train_log import smoothed

_UNITS = {"dx": "m", "dy": "m", "dz": "m", "droll": "rad", "dpitch": "rad", "dyaw": "rad", "gripper": "1 = open"}


def _unit(name: str) -> str:
    """The unit of an action dimension under the world's names (dx … gripper) or a dataset's own (Bridge's
    x y z roll pitch yaw gripper, also with a `d`/`delta_` prefix or any case)."""
    key = name.lower().removeprefix("delta_")
    return _UNITS.get(key) or _UNITS.get(f"d{key}", "")


def _plt():
    """pyplot on the Agg backend: every figure is written as a PNG and shown from the file."""
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt   # lazy: only after the backend is chosen

    return plt


def pick_episodes(episodes: Sequence[int], n: int = 3, seed: int = 0) -> list[int]:
    """``n`` episodes drawn without replacement with ``default_rng(seed)`` (sorted), or all if fewer."""
    eps = sorted(int(e) for e in episodes)
    if len(eps) <= n:
        return eps
    rng = np.random.default_rng(seed)
    return sorted(int(e) for e in rng.choice(eps, size=n, replace=False))


def _task(frames: Sequence[Mapping[str, Any]]) -> str:
    t = str(frames[0].get("task", "")) if frames else ""
    return t if t.strip() else "(blank task string)"


# What a figure must show, read back from its pixels. Axes, text and the white background are grey; camera frames
# and plotted lines are coloured. A figure whose panels hold images (frames, contact sheet, video strip) is mostly
# colour when it works (measured: 0.45-0.68) and ~0 when its panels are empty; a line plot is ~0.01-0.03 colour
# when its lines are drawn.
IMAGE_FIGURES = ("episode_frames", "worst_episodes", "_strip")
MIN_COLOUR_FRACTION = {"image": 0.15, "lines": 0.002}
_CHROMA = 30  # of 255: the spread between a pixel's largest and smallest channel above which it counts as colour


def colour_fraction(path: str | os.PathLike) -> float:
    """The share of a PNG's pixels that carry colour (largest minus smallest channel > 30 of 255)."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    return float(((rgb.max(-1) - rgb.min(-1)) > _CHROMA).mean())


def check_figure(path: str | os.PathLike) -> str | None:
    """None if the PNG at ``path`` shows content, else a one-line reason: an image figure (frames, contact sheet,
    strip) whose panels are empty, or a line plot with no line drawn."""
    path = Path(path)
    kind = "image" if any(k in path.stem for k in IMAGE_FIGURES) else "lines"
    frac = colour_fraction(path)
    if frac >= MIN_COLOUR_FRACTION[kind]:
        return None
    what = "its panels hold no images" if kind == "image" else "no line or bar is drawn"
    return (f"{path}: {frac:.1%} of its pixels carry colour, below the {MIN_COLOUR_FRACTION[kind]:.1%} a working "
            f"{kind} figure has — {what}")


def check_figures(*dirs: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Every PNG under ``dirs`` (recursively), checked with :func:`check_figure`: (the files, the problems)."""
    files = sorted(p for d in dirs for p in Path(d).rglob("*.png"))
    return files, [msg for msg in map(check_figure, files) if msg]


def _out(out_dir: str | os.PathLike, filename: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / filename


def plot_episode_frames(episode_frames: Mapping[int, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike,
                        cameras: Sequence[str] | None = None, filename: str = "episode_frames.png",
                        fps: float | None = None) -> Path:
    """One row per episode, titled with its task text; per camera, its start / middle / end frames.
    ``episode_frames``: episode → its frames (e.g. ``episodes.collect_episodes``)."""
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
                ax.imshow(to_uint8_hwc(frames[k][cam]))
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
    names = feature_names(action_names, dim)
    fig, axes = plt.subplots(dim, 1, figsize=(8, 1.35 * dim + 0.8), sharex=True, squeeze=False)
    for d in range(dim):
        ax = axes[d][0]
        for ep in eps:
            t = np.arange(len(acts[ep])) / fps
            ax.plot(t, acts[ep][:, d], marker=".", ms=3, lw=1.2,
                    label=f"ep {ep}: {_task(episode_frames[ep])[:48]}")
        unit = _unit(names[d])
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
    picked = pick_episodes(episodes, n, seed)
    frames = collect_episodes(ds, picked, cameras="all")  # this figure shows every camera
    fps = float(ds.meta.fps)
    names = feature_names(ds.meta.features.get("action")) or None
    return {
        "episodes": picked,
        "episode_frames": plot_episode_frames(frames, out_dir, ds.meta.camera_keys, fps=fps),
        "action_stream": plot_action_stream(frames, out_dir, names, fps=fps),
    }


def plot_loss_curve(log: Sequence[Mapping[str, Any]], path: str | os.PathLike, alpha: float = 0.2,
                    octo: bool = False) -> Path:
    """The loss (raw + EMA-smoothed) against the optimizer step from train_log.jsonl rows, beside the VLA's
    action-token accuracy — or, with ``octo``, beside the learning-rate schedule: Octo's diffusion head has no action
    tokens, its loss is the denoising error."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in log]
    fig, (ax_loss, ax_right) = plt.subplots(1, 2, figsize=(11, 3.6))
    if log:
        loss = [r["loss"] for r in log]
        raw_style = dict(marker="." if len(log) < 20 else None, label="logged") if octo else \
            dict(label="logged (mean over LOG_EVERY steps)")
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, **raw_style)
        ax_loss.plot(steps, smoothed(loss, alpha), color="tab:blue", lw=2, label=f"EMA (α={alpha})")
        if octo:
            ax_right.plot(steps, [r["lr"] for r in log], color="tab:orange", lw=2, label="learning rate")
        else:
            acc = [r["action_accuracy"] for r in log]
            ax_right.plot(steps, acc, color="tab:green", alpha=0.35, lw=1, label="logged")
            ax_right.plot(steps, smoothed(acc, alpha), color="tab:green", lw=2, label=f"EMA (α={alpha})")
    if octo:
        ax_loss.set(xlabel="optimizer step", ylabel="denoising MSE × action dim", title="Octo diffusion loss")
        ax_right.set(xlabel="optimizer step", ylabel="learning rate", title="warmup + cosine (Octo's recipe)")
    else:
        ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy on the 8 supervised tokens", title="training loss")
        ax_right.set(xlabel="optimizer step", ylabel="share of action tokens exactly right",
                     title="action-token accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_right):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Probes: rollout frames, videos, frame strips, the worst-episodes contact sheet (vla_bridge.evaluation.video, .failures)
# ------------------------------------------------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _upscale(image: Any, scale: int):
    img = Image.fromarray(to_uint8_hwc(image))
    return img.resize((img.width * scale, img.height * scale), Image.BICUBIC) if scale != 1 else img


def _caption(img, lines: Sequence[str], size: int):
    """A new PIL image: ``img`` below a black band holding the text ``lines`` (band height rounded up to a
    multiple of 16, so frames stay H.264-friendly when ``img``'s sides are)."""
    if not lines:
        return img
    font = _font(size)
    pad = max(2, size // 4)
    height = len(lines) * (size + pad) + pad
    height = int(np.ceil(height / 16.0) * 16)
    canvas = Image.new("RGB", (img.width, img.height + height), (0, 0, 0))
    canvas.paste(img, (0, height))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * (size + pad)), str(line), fill=(255, 255, 255), font=font)
    return canvas


def draw_rollout_frame(image: Any, path_uv: np.ndarray, gripper_open: bool = True, scale: int = 4,
                       lines: Sequence[str] = ()) -> np.ndarray:
    """One closed-loop video frame: the camera image upscaled ``scale``×, the gripper's path so far (pixel coords
    of the original image, e.g. ``video.world_to_image0``) as a yellow polyline with the current position as a dot
    (green = gripper open, red = closed), and ``lines`` of text on top. Returns uint8 HxWx3."""
    img = _upscale(image, scale).convert("RGB")
    draw = ImageDraw.Draw(img)
    pts = [(float(u) * scale, float(v) * scale) for u, v in np.asarray(path_uv, dtype=np.float64).reshape(-1, 2)]
    if len(pts) >= 2:
        draw.line(pts, fill=(255, 215, 0), width=max(2, scale // 2 + 1), joint="curve")
    if pts:
        r = max(3, scale + 1)
        u, v = pts[-1]
        draw.ellipse([u - r, v - r, u + r, v + r], fill=(60, 200, 80) if gripper_open else (230, 50, 50),
                     outline=(0, 0, 0))
    img = _caption(img, lines, size=max(10, 4 * scale))
    return np.asarray(img, dtype=np.uint8).copy()


def _arrow(draw, start: tuple, end: tuple, rgb: tuple, width: int) -> None:
    draw.line([start, end], fill=rgb, width=width)
    d = np.subtract(end, start).astype(np.float64)
    n = float(np.hypot(*d))
    if n < 1e-6:
        return
    d /= n
    head = min(3.0 * width + 4, 0.5 * n)
    left = (end[0] - head * (d[0] - 0.5 * d[1]), end[1] - head * (d[1] + 0.5 * d[0]))
    right = (end[0] - head * (d[0] + 0.5 * d[1]), end[1] - head * (d[1] - 0.5 * d[0]))
    draw.polygon([end, left, right], fill=rgb)


def draw_action_arrows(image: Any, pred_xy: Sequence[float], demo_xy: Sequence[float], ref: float, scale: int = 4,
                       lines: Sequence[str] = (), axes: tuple[str, str] = ("down", "right")) -> np.ndarray:
    """One open-loop video frame: the predicted (orange) and demonstrated (green) xy action deltas as arrows from
    the image centre, scaled so a delta of ``ref`` spans 40 % of the half-width. ``axes`` says where +x and +y point
    in the image ("down"/"up"/"left"/"right"; default: the embedded world's image_0, robot base at the top, +y to
    the right; on Bridge treat it as schematic). Returns uint8 HxWx3."""
    img = _upscale(image, scale).convert("RGB")
    draw = ImageDraw.Draw(img)
    unit = {"down": (0, 1), "up": (0, -1), "right": (1, 0), "left": (-1, 0)}
    ex, ey = np.array(unit[axes[0]], float), np.array(unit[axes[1]], float)
    c = (img.width / 2.0, img.height / 2.0)
    k = 0.4 * (img.width / 2.0) / max(float(ref), 1e-12)
    w = max(2, scale // 2 + 1)
    for xy, rgb in ((demo_xy, (60, 200, 80)), (pred_xy, (255, 140, 0))):
        v = k * (float(xy[0]) * ex + float(xy[1]) * ey)
        _arrow(draw, c, (c[0] + v[0], c[1] + v[1]), rgb, w)
    img = _caption(img, list(lines) + ["green: demonstrated dxy · orange: predicted dxy"], size=max(10, 4 * scale))
    return np.asarray(img, dtype=np.uint8).copy()


def save_video(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float = 5.0) -> Path:
    """Write ``frames`` (uint8 HxWx3, sides multiples of 16 are best) as MP4 (H.264 through imageio-ffmpeg); if that
    fails (no ffmpeg), or ``path`` ends in .gif, as a GIF with Pillow. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # imageio starts ffmpeg in a subprocess; a fast tokenizer used before that fork would print a warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if path.suffix.lower() != ".gif":
        try:
            import imageio.v2 as iio   # lazy: starts ffmpeg; only for mp4 (a GIF needs none)

            with iio.get_writer(str(path), fps=fps, codec="libx264", quality=7, macro_block_size=16,
                                pixelformat="yuv420p", ffmpeg_log_level="error") as w:
                for f in frames:
                    w.append_data(np.asarray(f, dtype=np.uint8))
            if path.is_file() and path.stat().st_size > 0:
                return path
        except Exception:
            pass
        path = path.with_suffix(".gif")
    ims = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
    return path


def save_frame_strip(frames: Sequence[np.ndarray], path: str | os.PathLike, n: int = 6) -> Path:
    """``n`` evenly spaced frames (always the first and the last) side by side as one PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = sorted(set(np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int).tolist()))
    picked = [np.asarray(frames[i], dtype=np.uint8) for i in idx]
    h = max(p.shape[0] for p in picked)
    gap = 4
    strip = Image.new("RGB", (sum(p.shape[1] for p in picked) + gap * (len(picked) - 1), h), (255, 255, 255))
    x = 0
    for p in picked:
        strip.paste(Image.fromarray(p), (x, 0))
        x += p.shape[1] + gap
    strip.save(path)
    return path


def plot_worst_episodes(rows: Sequence[Mapping[str, Any]], images: Sequence[Any], out_dir: str | os.PathLike,
                        filename: str = "worst_episodes.png", cols: int = 4) -> Path:
    """Contact sheet of the worst episodes: first image_0 frame, titled with rank, instruction, open-loop L1 and
    closed-loop outcome (where measured)."""
    plt = _plt()
    n = max(1, len(rows))
    ncols = min(cols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (r, img) in enumerate(zip(rows, list(images) + [None] * (len(rows) - len(images)))):
        ax = axes.flat[i]
        if img is not None:
            ax.imshow(to_uint8_hwc(img))
        else:
            ax.text(0.5, 0.5, "(no image)", ha="center", va="center", transform=ax.transAxes)
        s = r.get("success")
        kind = r.get("success_kind", "closed loop")
        outcome = "" if s is None else (f" · {kind}: success" if s else f" · {kind}: FAILED")
        task = textwrap.fill(f"\u201c{r.get('task') or '(blank)'}\u201d", 34)
        ax.set_title(f"#{i + 1} ep {r.get('episode', '?')} ({r.get('group', '')})\n{task}\n"
                     f"L1 {float(r['l1']):.4f}{outcome}", fontsize=7.5)
    fig.suptitle(f"The {len(rows)} worst held-out episodes (failures first, then open-loop L1)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=1.2)
    path = _out(out_dir, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SWEEP_PANELS = (("success_rate", "closed-loop success rate", "success"),
                 ("l1_motion", "open-loop L1, motion (xyz + rot)", "motion L1"),
                 ("l1_gripper", "open-loop L1, gripper (0/1)", "gripper L1"))


def plot_rank_sweep(runs: Sequence[Any], path: str | os.PathLike) -> Path:
    """Success rate, motion L1 and gripper L1 against LoRA rank (the 7-dimension L1 when a run has no split), one
    line per evaluation group, with 95 % CIs: the gripper dominates the 7-dimension mean, so the two are apart."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = list(dict.fromkeys(g for r in runs for g in r.groups))
    ranks = [r.rank for r in runs]
    split = all("l1_motion" in r.groups[g] for r in runs for g in r.groups)
    panels = _SWEEP_PANELS if split else (_SWEEP_PANELS[0], ("mean_l1_action_error", "open-loop mean L1", "L1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, ylabel, title) in zip(axes[0], panels):
        for g in groups:
            m = [r.groups[g][key] if g in r.groups else None for r in runs]
            xs = [x for x, v in zip(ranks, m) if v is not None]
            ys = np.array([v["mean"] for v in m if v is not None])
            lo = np.array([v["ci"][0] for v in m if v is not None])
            hi = np.array([v["ci"][1] for v in m if v is not None])
            n = next((r.groups[g]["n_episodes"] for r in runs if g in r.groups), 0)
            ax.errorbar(xs, ys, yerr=[np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)], marker="o", capsize=3,
                        label=f"{g} (n={n})")
        ax.set(xscale="log", xlabel="LoRA rank", ylabel=ylabel, title=f"{title} vs LoRA rank")
        if key == "success_rate":
            ax.set_ylim(-0.02, 1.02)
        ax.minorticks_off()  # the log axis' own minor labels (3×10¹, …) would print over the rank labels
        ax.set_xticks(ranks)
        ax.set_xticklabels([str(r) for r in ranks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
