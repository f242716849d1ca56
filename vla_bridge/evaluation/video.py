"""The rollout video (:func:`rollout_video`).

Embedded world: a closed-loop rollout of the policy from a held-out episode's (instruction, seed), image_0 with the
gripper's path drawn (world xyz projected with the world's own camera model, ``world._cams``) and the instruction,
step and success overlaid. Bridge (or ``kind="open_loop"``): the demonstration's frames with the predicted and the
demonstrated action as arrows (xy deltas from the image centre, scaled). MP4 (imageio-ffmpeg), GIF as a fallback,
plus a PNG strip of a few frames for inline display, under ``outputs/videos/<run>/``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from .. import plots
from ..data import world
from ..data.episodes import load_episode_groups, world_sidecar
from ..data.schema import MAIN_CAMERA
from ..data.stream import torch_threads
from .perturbations import PROBE_GROUPS
from .policies import VLAPolicy
from .rollout import CLOSED_LOOP_STEPS, ClosedLoopEpisode, run_closed_loop


@dataclasses.dataclass
class VideoResult:
    kind: str                   # "closed_loop" (world) | "open_loop" (demonstration + arrows)
    path: Path                  # .mp4, or .gif when MP4 writing failed
    strip_path: Path            # PNG strip of a few frames
    episode: int
    instruction: str
    n_frames: int
    success: bool | None
    seconds: float


def _pick_episode(split, group: str | None, episode: int | None) -> tuple[str, int]:
    if episode is not None:
        g = next((g for g, eps in split.eval.items() if int(episode) in eps), group or "heldout")
        return g, int(episode)
    for g in ([group] if group else []) + list(PROBE_GROUPS) + list(split.eval):
        if g in split.eval and split.eval[g]:
            return g, int(sorted(split.eval[g])[0])
    raise ValueError("the split has no evaluation episode to film")


def world_to_image0(xyz: np.ndarray, image_size: int) -> np.ndarray:
    """Project world points (N, 3) to image_0 pixel coordinates (N, 2) with the world's own camera model
    (``world._cams``: the renderer's pinhole camera at the supersampled resolution, scaled back)."""
    cam = world._cams(int(image_size))[MAIN_CAMERA]
    uv, _ = cam.project(np.asarray(xyz, dtype=np.float64).reshape(-1, 3))
    return uv / float(world._SS)


def rollout_video(model, processor, ds, split, *, unnorm_key: str, out_dir: str | os.PathLike,
                  center_crop: bool = True, group: str | None = "heldout", episode: int | None = None,
                  kind: str = "auto", max_steps: int = CLOSED_LOOP_STEPS, scale: int = 4, fps: float = 5.0,
                  fmt: str = "mp4",
                  strip_frames: int = 6, threads: int | None = None, predictor=None) -> VideoResult:
    """Film the policy on one held-out episode (see the module docstring). ``kind``: "auto" (closed loop on the
    embedded world, open loop elsewhere), "closed_loop" or "open_loop". Files: ``<kind>_ep<episode>.mp4|gif`` and
    ``<kind>_ep<episode>_strip.png`` under ``out_dir``."""
    t0 = time.perf_counter()
    sidecar = world_sidecar(ds)
    if kind == "auto":
        kind = "closed_loop" if sidecar is not None else "open_loop"
    if kind == "closed_loop" and sidecar is None:
        raise ValueError("a closed-loop rollout needs the embedded world (its sidecar metadata)")
    g, ep = _pick_episode(split, group, episode)
    predictor = predictor or VLAPolicy.from_model(model, processor, unnorm_key, center_crop)
    with torch_threads(threads):
        data = load_episode_groups(ds, {g: [ep]}, 1, sidecar, split)[0]
        if kind == "closed_loop":
            inst, seed = data.meta["canonical_task"], int(data.meta["seed"])
            size = int(data.images.shape[1])
            # the whole episode, also past the point where it can no longer succeed: a viewer watches what the
            # policy does with its max_steps (it is one env: stopping early would save little and cut the film)
            r = run_closed_loop(predictor, [ClosedLoopEpisode(inst, seed, data.instruction)],
                                max_steps=max_steps, image_size=size, record=True, stop_hopeless=False)[0]
            uv = world_to_image0(r["path"], size)
            frames = []
            for t, img in enumerate(r["frames"]):
                done = r["success"] and t == len(r["frames"]) - 1
                frames.append(plots.draw_rollout_frame(
                    img, uv[: t + 1], gripper_open=bool(r["gripper"][t] > 0.5), scale=scale,
                    lines=[data.instruction, f"step {t}/{len(r['frames']) - 1} · "
                           + ("SUCCESS" if done else ("…" if t < len(r["frames"]) - 1 else "failed"))]))
            success = bool(r["success"])
        else:
            acts, _ = predictor.run(list(data.images), [data.instruction] * len(data.images))
            frames = [plots.draw_action_arrows(img, pred_xy=acts[t, :2], demo_xy=data.actions[t, :2],
                                               ref=float(np.abs(data.actions[:, :2]).max() or 1.0), scale=scale,
                                               lines=[data.instruction, f"frame {t}/{len(data.images) - 1} · L1 "
                                                      f"{float(np.abs(acts[t] - data.actions[t]).mean()):.4f}"])
                      for t, img in enumerate(data.images)]
            success = None
    out = Path(out_dir)
    stem = f"{kind}_ep{ep}"
    path = plots.save_video(frames, out / f"{stem}.{fmt}", fps=fps)
    strip = plots.save_frame_strip(frames, out / f"{stem}_strip.png", n=strip_frames)
    return VideoResult(kind, path, strip, ep, data.instruction, len(frames), success, time.perf_counter() - t0)


__all__ = ["VideoResult", "world_to_image0", "rollout_video"]
