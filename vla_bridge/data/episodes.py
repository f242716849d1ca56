"""Decoded episodes: every frame of a few episodes, with their actions and states, for evaluation and probes.

One type, :class:`EpisodeData`, and its loaders: :func:`collect_episodes` streams every frame of a few episodes (raw
lerobot frames; the data figures use them), :func:`load_episodes` decodes episodes from an opened stream (the
evaluation, the probes, the benchmark, the Octo shards and the export check use it); :func:`load_episode_groups`
gives the probes and the rollout video those episodes grouped by evaluation group, every ``frame_stride``-th frame
stacked, the other camera dropped when it is missing or black, and the embedded world's per-episode metadata
(:func:`world_sidecar`) attached.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ..images import to_uint8_hwc
from ..progress import tqdm
from .build import load_episode_sidecar
from .schema import MAIN_CAMERA
from .source import StreamError
from .stream import resolve_cameras, torch_threads, zero_frames_error

OTHER_CAMERA = "observation.images.image_1"
BLACK_MAX = 10                # an image whose 99th-percentile pixel is <= this is "black" (a dead camera)


@dataclasses.dataclass
class EpisodeData:
    episode_index: int
    instruction: str          # the task string as shown (what the policy is told)
    images: Any               # uint8 HxWx3 main-camera frames, dataset resolution: a list, or stacked (T, H, W, 3)
    actions: np.ndarray       # (T, 7) demonstrated
    states: np.ndarray        # (T, 8) (zeros when the dataset has no observation.state)
    other: Any = None         # uint8 HxWx3 frames of the other camera when asked for and present (list or stacked)
    group: str = ""           # the evaluation group it was loaded for (load_episode_groups)
    meta: dict = dataclasses.field(default_factory=dict)  # the world's sidecar row (seed, canonical_task, ...) or {}


def collect_episodes(ds, episodes: Sequence[int], timeout_s: float | None = None,
                     cameras: Sequence[str] | str | None = None) -> dict[int, list[dict]]:
    """Every frame of a few ``episodes`` (sorted by frame_index), streamed through a copy of ``ds`` restricted to
    them (for figures: nothing else is decoded). ``cameras``: the video keys to decode (default: ``ds.cameras``;
    ``"all"``, or a list: ``stream.resolve_cameras``)."""
    want = [int(e) for e in episodes]
    lengths = {e: int(ds._episode_table.at[e, "length"]) for e in want}
    sub = copy.copy(ds)
    if cameras is not None:
        sub.cameras = resolve_cameras(ds.meta.video_keys, cameras)
    sub.buffer_size = 1
    sub.video_decoder_cache = None
    sub._select(want)
    sub.selected_episodes = sorted(want)
    out: dict[int, list[dict]] = {e: [] for e in want}
    t0 = time.perf_counter()
    with torch_threads(1):
        for fr in sub:
            e = int(fr["episode_index"])
            if e in out:
                out[e].append(fr)
            if all(len(out[k]) >= lengths[k] for k in want):
                break
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                raise StreamError(f"collecting episodes {want} took longer than {timeout_s:.0f} s")
    missing = [e for e in want if not out[e]]
    if missing:
        raise zero_frames_error(sub)
    return {e: sorted(frs, key=lambda f: int(f["frame_index"])) for e, frs in out.items()}


def load_episodes(ds: Any, episodes: Sequence[int], camera: str | None = None,
                  progress: bool = False, other_camera: str | None = None) -> dict[int, EpisodeData]:
    """Every frame of ``episodes`` from the opened stream ``ds`` (``camera``, default the main one, decoded to uint8
    HxWx3; ``other_camera`` too when given and present in every frame). The one decoder of evaluation episodes:
    the evaluation, the probes, the benchmark and the Octo shards use it."""
    camera = camera or MAIN_CAMERA
    out: dict[int, EpisodeData] = {}
    eps = [int(e) for e in episodes]
    chunk = 32  # episodes per streaming pass (lerobot frames are float32: ~0.4 MB per 128 px frame pair)
    bar = None
    if progress:
        bar = tqdm(total=len(eps), desc="decoding evaluation episodes", unit="episode", leave=False, mininterval=1.0)
    for i in range(0, len(eps), chunk):
        part = collect_episodes(ds, eps[i:i + chunk], cameras=[camera] + ([other_camera] if other_camera and
                                                                            other_camera in ds.meta.video_keys else []))
        for e, frames in part.items():
            out[e] = EpisodeData(
                episode_index=e, instruction=str(frames[0].get("task", "")),
                images=[to_uint8_hwc(f[camera]) for f in frames],
                actions=np.stack([np.asarray(f["action"], np.float64) for f in frames]),
                states=np.stack([np.asarray(f["observation.state"], np.float64) for f in frames])
                if "observation.state" in frames[0] else np.zeros((len(frames), 8)),
                other=[to_uint8_hwc(f[other_camera]) for f in frames]
                if other_camera and all(other_camera in f for f in frames) else None)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    return out


def is_missing_or_black(image: Any) -> bool:
    """True when a camera image is absent, empty, or black (99th-percentile pixel <= ``BLACK_MAX``)."""
    if image is None:
        return True
    arr = to_uint8_hwc(image)
    return arr.size == 0 or float(np.percentile(arr, 99)) <= BLACK_MAX


def world_sidecar(ds) -> dict[int, dict] | None:
    """Episode → the embedded world's per-episode metadata (seed, canonical task, ...); None for other datasets."""
    root = getattr(getattr(ds, "meta", None), "root", None)
    rows = load_episode_sidecar(root) if root is not None else None
    return None if rows is None else {int(r["episode_index"]): r for r in rows}


def load_episode_groups(ds, episodes_by_group: Mapping[str, Sequence[int]], frame_stride: int = 1,
                        sidecar: Mapping[int, dict] | None = None, split=None) -> list[EpisodeData]:
    """Decode the episodes once (:func:`load_episodes`: image_0 and image_1, actions, states) and group them,
    keeping every ``frame_stride``-th frame, stacked; image_1 becomes None when it is missing or black. The
    instruction falls back to the split's task string when the frames carry none."""
    want = sorted({int(e) for eps in episodes_by_group.values() for e in eps})
    if not want:
        return []
    decoded = load_episodes(ds, want, MAIN_CAMERA, other_camera=OTHER_CAMERA)
    keep = slice(None, None, max(1, int(frame_stride)))
    out = []
    for group, eps in episodes_by_group.items():
        for e in eps:
            d = decoded[int(e)]
            other = None
            if d.other is not None:
                cand = np.stack(d.other[keep])
                other = None if is_missing_or_black(cand) else cand
            task = d.instruction or (split.tasks.get(int(e), "") if split is not None else "")
            out.append(EpisodeData(episode_index=int(e), instruction=task, images=np.stack(d.images[keep]),
                                   actions=d.actions[keep], states=d.states[keep], other=other, group=group,
                                   meta=dict((sidecar or {}).get(int(e), {}))))
    return out


__all__ = ["OTHER_CAMERA", "BLACK_MAX", "EpisodeData", "collect_episodes", "load_episodes", "is_missing_or_black",
           "world_sidecar", "load_episode_groups"]
