"""The data hand-off to Octo: the training split, written once as compact shards the Octo worker reads.

Octo's own input pipeline is tf.data over RLDS; its environment has neither lerobot nor torchcodec. So the main
environment streams exactly the episodes OpenVLA / the tiny VLA train on (``split.train``), and writes:

* ``images`` — the primary camera (``observation.images.image_0``), resized to Octo's 256×256 with the training
  pipeline's own resize (:func:`vla_bridge.images.to_uint8_hwc`), uint8;
* ``actions`` — per frame, Octo's targets: for each of the ``window`` observation steps ending at the frame, the next
  ``horizon`` actions, **normalized with the project's q01/q99 rule** (:func:`vla_bridge.tokenization.
  normalize_actions`: one definition, the one OpenVLA's tokens use; the gripper passes through by its mask), with
  ``action_pad_mask`` False where the chunk runs past the episode's end (those steps repeat the last action and
  carry no loss) and ``window_index`` −1 where the window starts before the episode (a padded, masked step);
* ``raw_actions``, ``episode_index``, ``frame_index``, ``instruction_id`` + ``instructions`` (the task as shown);
* ``dataset_statistics.json`` — the statistics, in OpenVLA's ``norm_stats`` layout under ``unnorm_key``, and
  ``manifest.json`` — window, horizon, image size, the episodes, the shard files, the key.

Shards are ``np.savez_compressed`` files of ``episodes_per_shard`` episodes, under ``data/octo_shards/<key>/``; the
key hashes the dataset, the episodes, the statistics and the parameters, so a rerun reuses them (milliseconds) and
any change rebuilds. The directory is written to a temporary name and renamed when complete.

Octo's fine-tuning defaults (``scripts/configs/finetune_config.py`` in octo-models/octo): window 1, action horizon 4,
256×256 primary camera (octo-small-1.5 was *pre*trained with window 2; the shards support any window).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.build import load_build_info
from ..data.episodes import load_episodes
from ..data.schema import MAIN_CAMERA
from ..data.stats import norm_stats_entry, save_dataset_statistics
from ..images import to_uint8_hwc
from ..paths import STATS_FILENAME
from ..progress import tqdm
from ..tokenization import action_stats, normalize_actions

SHARD_FORMAT = 1
OCTO_WINDOW = 1            # octo's finetune_config: window_size = 1
OCTO_HORIZON = 4           # octo-small-1.5's diffusion head: action_horizon = 4
OCTO_IMAGE_SIZE = 256      # octo's primary camera resolution
MANIFEST = "manifest.json"


def chunk_actions(actions: np.ndarray, window: int = OCTO_WINDOW,
                  horizon: int = OCTO_HORIZON) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One episode's (T, D) actions → Octo's per-frame targets.

    Returns ``window_index`` (T, W): the frame each window step observes (−1 = before the episode: padding),
    ``chunks`` (T, W, H, D): from each window step's frame, the next H actions (the last action repeated past the
    end), ``mask`` (T, W, H): False on padded window steps and on steps past the episode's end.
    """
    a = np.asarray(actions)
    if a.ndim != 2 or len(a) == 0:
        raise ValueError(f"actions must be (T, D) with T > 0, got {a.shape}")
    if window < 1 or horizon < 1:
        raise ValueError(f"window ({window}) and horizon ({horizon}) must be ≥ 1")
    T = len(a)
    t = np.arange(T)[:, None]                                   # (T, 1)
    src = t - (window - 1 - np.arange(window))[None, :]         # (T, W) frame of each window step
    window_index = np.where(src >= 0, src, -1)
    future = src[..., None] + np.arange(horizon)[None, None, :]  # (T, W, H)
    mask = (src[..., None] >= 0) & (future < T)
    chunks = a[np.clip(future, 0, T - 1)]
    chunks = np.where((src >= 0)[..., None, None], chunks, 0.0)   # padded window steps: zeros (masked)
    return window_index.astype(np.int32), chunks, mask


@dataclasses.dataclass
class OctoShards:
    dir: Path
    manifest: dict
    reused: bool
    seconds: float

    @property
    def n_samples(self) -> int:
        return int(self.manifest["n_samples"])

    def describe(self) -> str:
        m = self.manifest
        how = "reused" if self.reused else f"written in {self.seconds:.1f} s"
        size = sum(p.stat().st_size for p in self.dir.iterdir()) / 1e6
        return (f"Octo shards {self.dir} ({how}): {m['n_samples']:,} frames of {m['n_episodes']} training episodes, "
                f"{len(m['shards'])} shard(s), {size:.1f} MB; images {m['image_size']}×{m['image_size']} uint8, "
                f"window {m['window']}, action horizon {m['horizon']}, actions normalized with q01/q99 "
                f"(unnorm_key {m['unnorm_key']!r})")


def shard_key(dataset_id: str, episodes: Sequence[int], stats_entry: Mapping[str, Any], window: int, horizon: int,
              image_size: int) -> str:
    a = norm_stats_entry(stats_entry)["action"]
    blob = json.dumps({"format": SHARD_FORMAT, "dataset": dataset_id, "episodes": sorted(int(e) for e in episodes),
                       "q01": a["q01"], "q99": a["q99"], "mask": a["mask"], "window": int(window),
                       "horizon": int(horizon), "image_size": int(image_size)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dataset_id(ds: Any) -> str:
    root = getattr(getattr(ds, "meta", None), "root", None)
    build = load_build_info(root) if root else None
    if build:
        return f"embedded:{build.get('key')}"
    info = getattr(getattr(ds, "meta", None), "info", {}) or {}
    return f"{getattr(ds, 'repo_id', root)}:{info.get('total_frames')}"


def write_octo_shards(ds: Any, episodes: Sequence[int], stats_entry: Mapping[str, Any], unnorm_key: str,
                      out_root: str | os.PathLike, window: int = OCTO_WINDOW, horizon: int = OCTO_HORIZON,
                      image_size: int = OCTO_IMAGE_SIZE, episodes_per_shard: int = 32,
                      progress: bool = True) -> OctoShards:
    """Write (or reuse) the shards of ``episodes`` (the training split) from the opened stream ``ds``, normalized
    with ``stats_entry`` (the notebook's action statistics) under ``out_root/<key>/``."""

    t0 = time.perf_counter()
    eps = sorted(int(e) for e in episodes)
    if not eps:
        raise ValueError("no training episodes to write")
    key = shard_key(_dataset_id(ds), eps, stats_entry, window, horizon, image_size)
    final = Path(out_root) / key
    if (final / MANIFEST).is_file():
        return OctoShards(final, json.loads((final / MANIFEST).read_text()), True, time.perf_counter() - t0)

    q = action_stats(stats_entry)
    tmp = final.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, n_samples = [], 0
    bar = None
    if progress:
        bar = tqdm(total=len(eps), desc="Octo shards", unit="episode", mininterval=2.0)
    for si, start in enumerate(range(0, len(eps), episodes_per_shard)):
        part = eps[start:start + episodes_per_shard]
        data = load_episodes(ds, part, MAIN_CAMERA)
        texts: list[str] = []
        cols: dict[str, list] = {k: [] for k in ("images", "window_index", "actions", "action_pad_mask",
                                                 "raw_actions", "episode_index", "frame_index", "instruction_id")}
        offset = 0
        for e in part:
            d = data[e]
            if d.instruction not in texts:
                texts.append(d.instruction)
            norm = np.asarray(normalize_actions(d.actions, q["q01"], q["q99"], q.get("mask")), np.float32)
            win, chunks, mask = chunk_actions(norm, window, horizon)
            T = len(d.actions)
            cols["images"].append(np.stack([to_uint8_hwc(im, image_size) for im in d.images]))
            cols["window_index"].append(np.where(win >= 0, win + offset, -1).astype(np.int32))
            cols["actions"].append(chunks.astype(np.float32))
            cols["action_pad_mask"].append(mask)
            cols["raw_actions"].append(d.actions.astype(np.float32))
            cols["episode_index"].append(np.full(T, e, np.int32))
            cols["frame_index"].append(np.arange(T, dtype=np.int32))
            cols["instruction_id"].append(np.full(T, texts.index(d.instruction), np.int32))
            offset += T
        name = f"shard_{si:04d}.npz"
        np.savez_compressed(tmp / name, instructions=np.asarray(texts, dtype=np.str_),
                            **{k: np.concatenate(v) for k, v in cols.items()})
        shards.append(name)
        n_samples += offset
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    save_dataset_statistics(tmp / STATS_FILENAME, {unnorm_key: norm_stats_entry(stats_entry)})
    manifest = {"format": SHARD_FORMAT, "key": key, "dataset": _dataset_id(ds), "unnorm_key": unnorm_key,
                "window": int(window), "horizon": int(horizon), "image_size": int(image_size),
                "camera": MAIN_CAMERA, "episodes": eps, "n_episodes": len(eps), "n_samples": n_samples,
                "shards": shards, "normalization": "vla_bridge.tokenization.normalize_actions (q01 → -1, q99 → +1, "
                "clipped; mask False passes through)", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return OctoShards(final, manifest, False, time.perf_counter() - t0)


def read_octo_shards(directory: str | os.PathLike) -> dict[str, Any]:
    """Every shard of ``directory`` concatenated (window indices made global), plus the manifest, the statistics
    and ``instructions`` per sample — what the worker trains on, readable in the main environment for checks."""
    d = Path(directory)
    manifest = json.loads((d / MANIFEST).read_text())
    out: dict[str, list] = {}
    texts: list[str] = []
    offset = 0
    for name in manifest["shards"]:
        with np.load(d / name, allow_pickle=False) as z:
            local = [str(s) for s in z["instructions"]]
            n = len(z["images"])
            for k in z.files:
                if k == "instructions":
                    continue
                v = z[k]
                if k == "window_index":
                    v = np.where(v >= 0, v + offset, -1)
                out.setdefault(k, []).append(v)
            texts += [local[i] for i in z["instruction_id"]]
            offset += n
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays["instructions"] = texts
    arrays["manifest"] = manifest
    arrays["statistics"] = json.loads((d / STATS_FILENAME).read_text())
    return arrays
