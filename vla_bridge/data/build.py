"""Write the embedded demo world as a LeRobot v3.0 dataset with lerobot's own writer, cached under ``data/``.

``build_demo_dataset(data_dir, episodes, seed, image_size)`` returns the dataset root
``<data_dir>/demo_world/<key>/``. The key hashes the world's code (``world.world_fingerprint()``), this file's
source, the lerobot version and the parameters, so the dataset is rebuilt only when one of them changes; a
complete build with the same key is reused in milliseconds. A build is written to a temporary directory and renamed
when complete, so an interrupted build is never reused.

What lands in the root (Bridge's schema; see docs/ARCHITECTURE.md "Layouts"):

* lerobot's layout: ``meta/info.json`` (``codebase_version`` v3.0, 5 fps, robot ``widowx``), ``meta/tasks.parquet``,
  ``meta/episodes/``, ``meta/stats.json``, ``data/chunk-*/file-*.parquet`` and one MP4 stream per camera under
  ``videos/observation.images.image_{0,1}/``;
* features ``observation.images.image_0`` / ``image_1`` (video, HxWx3), ``observation.state`` (8 float32: x y z
  roll pitch yaw pad gripper), ``action`` (7 float32: dx dy dz droll dpitch dyaw gripper, gripper 1 = open);
* ``meta/stats.json`` with q01/q10/q50/q90/q99. lerobot 0.4.4 does write quantiles, but its dataset-level value is
  the frame-weighted MEAN of per-episode quantiles, which is narrower than the true 1st/99th percentile of all
  frames. OpenVLA normalizes with the true percentiles, so after ``finalize()`` we overwrite the quantiles of
  ``action`` and ``observation.state`` with exact ones over all frames (same layout, same keys);
* ``meta/vla_bridge_episodes.jsonl``: one line per episode with the world's metadata (split, task as written, the
  canonical task, world seed, colour, family, target, ...). ``TabletopEnv().reset(canonical_task, seed)``
  reproduces the episode's scene, which is what the closed-loop evaluation uses. Split "finetune_eval" (in the
  default size) holds fresh episodes — seeds never used for training — of a few fine-tuning tasks
  (``finetune_eval_draws``), the evaluation's contrast rows;
* ``meta/vla_bridge_build.json``: the cache key, the parameters, the codec and the build time (written last).

Video codec: H.264 (libx264 through PyAV), lerobot's GOP 2 and CRF 30, frames fed straight to the encoder
(``streaming_encoding=True``: no PNG round trip, ~2x faster than lerobot's PNG-then-encode path). Measured on 2
cores at 128x128: writing runs ~1.2x faster than with lerobot's default SVT-AV1 and the files are ~27 % smaller;
torchcodec decodes both at the same speed (within 10-25 %, either way); and every FFmpeg build decodes H.264, while
AV1 needs FFmpeg built with dav1d/libaom. Decoded frames differ from the rendered ones by ~3 grey levels on average.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib.metadata as md
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import datasets.utils.logging as dslog
import numpy as np
import pandas as pd
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from ..progress import tqdm
from . import world

REPO_ID = "local/vla_bridge_demo"
ROBOT_TYPE = "widowx"
BUILD_FORMAT = 2                     # bump when the layout of what this module writes changes (2: image stats
                                     # from a pixel subsample, see _image_stats_subsample)
IMAGE_STATS_STRIDE = 4               # image statistics read every 4th pixel of every 4th row
VIDEO_CODEC = "h264"
VIDEO_CODEC_NOTE = ("h264 (libx264), GOP 2, CRF 30, yuv420p, streamed to the encoder: on 2 CPU cores ~1.2x faster to "
                    "write and ~27% smaller than lerobot's default SVT-AV1 at 128 px, decoded as fast by torchcodec, "
                    "and decodable by every FFmpeg build")
# One MP4 per camera grows by re-muxing the whole file after every episode (lerobot's concatenate_video_files), so
# its cost grows quadratically with the file; a small cap keeps each file to a few dozen episodes.
VIDEO_FILE_SIZE_MB = 2
EPISODES_SIDECAR = "meta/vla_bridge_episodes.jsonl"
BUILD_SIDECAR = "meta/vla_bridge_build.json"

# Default size: the "pretrain" split (the pretraining tasks' episodes, one per task, for the split table and the
# leakage check: the tiny base itself is pretrained on freshly generated episodes, see pretrain.py, so 40 show it
# without spending a third of the build on frames nothing reads), "finetune" (what LoRA fine-tunes on) plus the
# evaluation's episodes: ``eval_episodes`` per task (the run's EVAL_EPISODES; default EVAL_EPISODES_PER_TASK = 4,
# the CPU evaluation's) for every held-out group — the evaluation reports each task over its first EVAL_EPISODES
# episodes, so more would be built and never read; the closed-loop success rate resets the env to each of these
# episodes' scenes — "paraphrase" (the 16 fine-tuning tasks re-phrased, one each) and "finetune_eval": FRESH
# episodes (new seeds, never trained on) of FINETUNE_EVAL_TASKS of the fine-tuning tasks — the evaluation's
# contrast rows ("how well does it do on the tasks it was fine-tuned on?").
FINETUNE_EVAL_TASKS = 4
EVAL_EPISODES_PER_TASK = 4


def default_episodes(eval_episodes: int | None = None) -> dict[str, int]:
    """The default episodes per split, with ``eval_episodes`` (default ``EVAL_EPISODES_PER_TASK``) per task in the
    held-out groups and the fine-tuning tasks' fresh episodes."""
    per = max(1, int(eval_episodes or EVAL_EPISODES_PER_TASK))
    return {
        "pretrain": 40,
        "finetune": 100,
        "heldout": per * len(world.SPLITS.heldout_tasks),                 # 5 held-out task strings
        "heldout_family": per * len(world.SPLITS.heldout_family_tasks),   # 4 banana tasks
        "unseen_color": per * len(world.SPLITS.unseen_color_tasks),       # 5 purple tasks
        "paraphrase": len(world.SPLITS.finetune),                         # the 16 finetune tasks, re-phrased
        "finetune_eval": per * FINETUNE_EVAL_TASKS,                       # fresh episodes of fine-tuning tasks
    }


DEFAULT_EPISODES: dict[str, int] = default_episodes()
# Splits that are not one of the world's task splits but an extra evaluation group: included by default
# (episodes=None/"auto") and when a mapping names them; a mapping that does not name them, or a total N, leaves them
# out (so "split=n,..." sizes and totals mean what they meant before the group existed).
OPTIONAL_SPLITS = ("finetune_eval",)

class BuildError(RuntimeError):
    """The embedded dataset could not be built; the message says why."""


@dataclasses.dataclass
class DemoBuild:
    """Where the embedded dataset is and how it got there."""

    root: Path
    reused: bool
    seconds: float             # this call's wall time (a reuse is milliseconds)
    info: dict                 # meta/vla_bridge_build.json

    def describe(self) -> str:
        how = "reused the cached build" if self.reused else "built"
        n = self.info.get("total_episodes"), self.info.get("total_frames")
        size = self.info.get("size_mb")
        took = f"{self.seconds:.2f} s" + ("" if self.reused else f" (build {self.info.get('build_seconds', 0):.0f} s)")
        return f"{how}: {self.root}  [{n[0]} episodes, {n[1]} frames, {size} MB, key {self.info.get('key')}] in {took}"


# --------------------------------------------------------------------------------------------------- parameters


def resolve_episode_counts(episodes: int | str | Mapping[str, int] | None = None,
                           eval_episodes: int | None = None) -> dict[str, int]:
    """Episodes per world split.

    ``None``/``"auto"`` → ``default_episodes(eval_episodes)`` (``DEFAULT_EPISODES`` without it); a mapping → those
    defaults updated with it (unknown split → error);
    an int N (or a digit string) → the defaults scaled to N episodes in total, every split keeping ≥ 1 (largest
    remainders get the rounding); ``"pretrain=40,finetune=20"`` → like a mapping. The ``OPTIONAL_SPLITS``
    ("finetune_eval") are in the defaults, but a mapping that does not name them and a total N leave them out.
    """
    defaults = default_episodes(eval_episodes)
    if episodes is None or (isinstance(episodes, str) and episodes.strip().lower() in ("", "auto")):
        return defaults
    if isinstance(episodes, str):
        text = episodes.strip()
        if text.isdigit():
            episodes = int(text)
        else:
            try:
                episodes = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
            except ValueError:
                raise ValueError(f"episodes={text!r}: expected an integer or 'split=n,split=n'") from None
    if isinstance(episodes, Mapping):
        unknown = set(episodes) - set(DEFAULT_EPISODES)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; known: {', '.join(DEFAULT_EPISODES)}")
        out = {k: v for k, v in defaults.items() if k not in OPTIONAL_SPLITS}
        out.update({k: int(v) for k, v in episodes.items()})
        if any(v < 0 for v in out.values()) or sum(out.values()) < 1:
            raise ValueError(f"episode counts must be ≥ 0 with at least one episode: {out}")
        return out
    total = int(episodes)
    required = {k: v for k, v in DEFAULT_EPISODES.items() if k not in OPTIONAL_SPLITS}
    n_splits = len(required)
    if total < n_splits:
        raise ValueError(f"episodes={total}: need at least {n_splits} (one per split: {', '.join(required)})")
    base = sum(required.values())
    exact = {k: max(1.0, v * total / base) for k, v in required.items()}
    out = {k: int(v) for k, v in exact.items()}
    order = sorted(exact, key=lambda k: exact[k] - out[k], reverse=True)
    i = 0
    while sum(out.values()) < total:
        out[order[i % n_splits]] += 1
        i += 1
    while sum(out.values()) > total:  # the ≥ 1 floor overshot: take from the largest splits
        k = max(out, key=out.get)
        out[k] -= 1
    return out


def _lerobot_version() -> str:
    try:
        return md.version("lerobot")
    except md.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def build_params(episodes: Mapping[str, int], seed: int, image_size: int,
                 video_file_size_mb: int = VIDEO_FILE_SIZE_MB) -> dict[str, Any]:
    return {
        "episodes": dict(episodes),
        "seed": int(seed),
        "image_size": int(image_size),
        "fps": world.FPS,
        "vcodec": VIDEO_CODEC,
        "video_file_size_mb": int(video_file_size_mb),
        "build_format": BUILD_FORMAT,
        "world_version": world.WORLD_VERSION,
    }


def cache_key(params: Mapping[str, Any]) -> str:
    """Hash of the world's code, this file's source, the lerobot version and the parameters (16 hex chars)."""
    h = hashlib.sha256()
    h.update(world.world_fingerprint().encode())
    h.update(Path(__file__).read_bytes())
    h.update(_lerobot_version().encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def features(image_size: int = world.DEFAULT_IMAGE_SIZE) -> dict[str, dict]:
    """The dataset's features, named and shaped as in the LeRobot conversions of Bridge."""
    img = {"dtype": "video", "shape": (image_size, image_size, 3), "names": ["height", "width", "channels"]}
    return {
        world.IMAGE_KEYS[0]: dict(img),
        world.IMAGE_KEYS[1]: dict(img),
        world.STATE_KEY: {"dtype": "float32", "shape": (8,), "names": list(world.STATE_NAMES)},
        world.ACTION_KEY: {"dtype": "float32", "shape": (7,), "names": list(world.ACTION_NAMES)},
    }


# --------------------------------------------------------------------------------------------------- episodes


def episode_plan(episodes: Mapping[str, int], seed: int = 0) -> list[tuple[str, str, int, str | None]]:
    """(split, instruction, episode seed, shown prompt or None) per episode, in the order they are written.

    The same draws as ``world.generate_episodes(n, seed, split)`` (tasks cycle through shuffled rounds of the
    split's tasks; the paraphrase split shows a random paraphrase), so an episode is reproducible from the plan.
    """
    plan = []
    for split, n in episodes.items():
        if split == "finetune_eval":
            draws = finetune_eval_draws(int(n), seed, int(episodes.get("finetune", 0)))
        else:
            draws = world.sample_task_seeds(int(n), seed, split)
        for task, ep_seed, prompt in draws:
            plan.append((split, task, int(ep_seed), None if prompt == task else prompt))
    return plan


def finetune_eval_tasks(seed: int = 0, k: int = FINETUNE_EVAL_TASKS) -> list[str]:
    """The ``k`` fine-tuning tasks that get fresh evaluation episodes: a seeded shuffle of the world's finetune tasks,
    taken greedily so that no two share an object family (then filled in shuffle order)."""
    tasks = list(world.SPLITS.finetune)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(b"finetune_eval")])
    order = [tasks[i] for i in rng.permutation(len(tasks))]
    chosen: list[str] = []
    families: set = set()
    for t in order:
        fam = world.parse_task(t)["family"]
        if fam not in families and len(chosen) < k:
            chosen.append(t)
            families.add(fam)
    chosen += [t for t in order if t not in chosen][: max(0, k - len(chosen))]
    return chosen


def finetune_eval_draws(n: int, seed: int = 0, n_finetune: int = 0) -> list[tuple[str, int, str]]:
    """``n`` (instruction, episode seed, prompt) draws of FRESH episodes of ``finetune_eval_tasks``: the tasks cycle
    (8 each for the default n = 32), seeds come from their own seeded stream and never repeat a (task, seed) of the
    build's ``n_finetune`` training episodes, so these scenes were never trained on. Prompts are the canonical task
    strings (no blanks, no paraphrases)."""
    tasks = finetune_eval_tasks(seed)
    seen = {(t, s) for t, s, _ in world.sample_task_seeds(int(n_finetune), seed, "finetune")}
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(b"finetune_eval"), 1])
    out = []
    for i in range(int(n)):
        task = tasks[i % len(tasks)]
        ep_seed = int(rng.integers(0, 2 ** 31 - 1))
        while (task, ep_seed) in seen:  # pragma: no cover - a 1-in-2^31 collision
            ep_seed = int(rng.integers(0, 2 ** 31 - 1))
        seen.add((task, ep_seed))
        out.append((task, ep_seed, task))
    return out


def _generate(item: tuple[str, str, int, str | None, int]) -> "world.Episode":
    split, task, ep_seed, prompt, image_size = item
    return world.generate_episode(task, ep_seed, split=split, prompt=prompt, image_size=image_size,
                                  blank_task_prob=world.default_blank_task_prob(split))


EPISODE_TIMEOUT_S = 300.0  # one episode renders in well under a second; a worker that never answers is an error


def _pool_context():
    """Linux: "fork" — the rendering function needs nothing from ``__main__``, so a build started from a notebook,
    ``python -c`` or a script piped on stdin all work (with "spawn" the children re-import ``__main__``, which a
    stdin script cannot). Elsewhere (macOS forks unsafely): None, i.e. render in the main process."""
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return None


@contextlib.contextmanager
def _episode_source(plan: list, image_size: int, workers: int, ahead: int = 8
                    ) -> Iterator[Iterable["world.Episode"]]:
    """Episodes in plan order; with ``workers`` ≥ 1 they are rendered in a process pool while the main process
    writes (rendering and writing then overlap on two cores). At most ``ahead`` episodes wait in memory (~2.5 MB
    each at 128 px): the writer is the slower side, an unbounded read-ahead would hold the whole dataset."""
    items = [(*p, image_size) for p in plan]
    ctx = _pool_context() if workers > 0 else None
    if ctx is None or len(items) < 8:
        yield (_generate(it) for it in items)
        return
    with ctx.Pool(workers) as pool:

        def windowed() -> Iterator["world.Episode"]:
            pending: collections.deque = collections.deque()
            nxt = 0
            while nxt < len(items) or pending:
                while nxt < len(items) and len(pending) < ahead:
                    pending.append(pool.apply_async(_generate, (items[nxt],)))
                    nxt += 1
                try:
                    yield pending.popleft().get(timeout=EPISODE_TIMEOUT_S)
                except mp.TimeoutError:
                    raise BuildError(f"an episode-rendering worker gave no answer in {EPISODE_TIMEOUT_S:.0f} s; "
                                     "rerun with workers=0") from None

        yield windowed()


# --------------------------------------------------------------------------------------------------- statistics


def _exact_stats(x: np.ndarray) -> dict[str, list]:
    x = np.asarray(x, dtype=np.float64)
    q = np.quantile(x, [0.01, 0.10, 0.50, 0.90, 0.99], axis=0)
    return {
        "min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
        "count": [int(x.shape[0])],
        "q01": q[0].tolist(), "q10": q[1].tolist(), "q50": q[2].tolist(), "q90": q[3].tolist(), "q99": q[4].tolist(),
    }


def _patch_stats(root: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Replace lerobot's aggregated (averaged per-episode) quantiles with exact ones, same layout."""
    path = root / "meta" / "stats.json"
    stats = json.loads(path.read_text())
    for key, arr in arrays.items():
        stats.setdefault(key, {}).update(_exact_stats(arr))
    path.write_text(json.dumps(stats, indent=4))


# --------------------------------------------------------------------------------------------------- verification


def _verify(root: Path, lengths: list[int], image_size: int) -> None:
    """Cheap post-build checks: frame counts and that every episode's video spans all its frames (the streaming
    encoder drops frames silently when its queue is full)."""
    info = json.loads((root / "meta" / "info.json").read_text())
    if info.get("codebase_version") != "v3.0":
        raise BuildError(f"lerobot wrote codebase_version {info.get('codebase_version')!r}, expected v3.0")
    if info["total_episodes"] != len(lengths) or info["total_frames"] != sum(lengths):
        raise BuildError(f"info.json says {info['total_episodes']} episodes / {info['total_frames']} frames, "
                         f"expected {len(lengths)} / {sum(lengths)}")
    eps = pd.concat([pd.read_parquet(p) for p in sorted((root / "meta" / "episodes").rglob("*.parquet"))])
    eps = eps.sort_values("episode_index")
    fps = info["fps"]
    for key in world.IMAGE_KEYS:
        span = (eps[f"videos/{key}/to_timestamp"] - eps[f"videos/{key}/from_timestamp"]).to_numpy() * fps
        bad = np.flatnonzero(np.abs(span - np.asarray(lengths)) > 0.5)
        if bad.size:
            i = int(bad[0])
            raise BuildError(f"{key}: episode {i} has {span[i]:.1f} video frames for {lengths[i]} data frames "
                             "(the video encoder dropped frames)")
        if tuple(info["features"][key]["shape"]) != (image_size, image_size, 3):
            raise BuildError(f"{key}: shape {info['features'][key]['shape']} != {(image_size, image_size, 3)}")


# --------------------------------------------------------------------------------------------------- build


@contextlib.contextmanager
def _image_stats_subsample(stride: int = IMAGE_STATS_STRIDE) -> Iterator[None]:
    """lerobot's streaming encoder updates per-camera quantile statistics with EVERY pixel of every frame
    (``RunningQuantileStats`` over ``compute_stats.auto_downsample_height_width(frame)``, which leaves images under
    300 px whole): ~4 ms per 128 px frame, a third of the build's CPU. For the build, that downsampling takes every
    ``stride``-th pixel of every ``stride``-th row instead — as lerobot itself does for large images — so
    meta/stats.json's image mean/std/quantiles come from 1/16 of the pixels (they move in the third decimal).
    Nothing here reads image statistics (the processor normalizes pixels itself); the action and state statistics
    are exact (``_patch_stats``). Restored on exit."""
    import lerobot.datasets.compute_stats as cs   # lazy: patched only while a build runs

    original = cs.auto_downsample_height_width
    cs.auto_downsample_height_width = lambda img, *a, **k: img[:, ::stride, ::stride]
    try:
        yield
    finally:
        cs.auto_downsample_height_width = original


def _embeds_files(feature: Any) -> bool:
    """Whether a datasets feature (nested or not) holds Image/Audio data that ``embed_table_storage`` embeds."""
    import datasets   # lazy: only the build inspects HF features

    if isinstance(feature, (datasets.Image, datasets.Audio)):
        return True
    if isinstance(feature, dict):
        return any(_embeds_files(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_embeds_files(f) for f in feature)
    inner = getattr(feature, "feature", None)   # Sequence / List
    return inner is not None and _embeds_files(inner)


@contextlib.contextmanager
def _no_op_embedding() -> Iterator[None]:
    """lerobot's save_episode runs ``embed_images`` (a ``datasets.map`` of ``embed_table_storage`` over every row)
    on each episode before writing its parquet: ~15 % of the build's time here, for nothing — with the cameras in
    MP4s the frame table holds no Image column, and then that map returns the table unchanged. For the build,
    ``embed_images`` is skipped exactly when the episode's features hold no Image/Audio feature (otherwise lerobot's
    own runs). Restored on exit."""
    import lerobot.datasets.lerobot_dataset as lds   # lazy: patched only while a build runs

    original = lds.embed_images

    def embed_images(dataset):
        return original(dataset) if _embeds_files(dict(dataset.features)) else dataset

    lds.embed_images = embed_images
    try:
        yield
    finally:
        lds.embed_images = original


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lerobot's encoder re-installs FFmpeg's default log callback, which prints encoder chatter (x264 statistics,
    "moving the moov atom") straight to stderr — red text in a notebook. Keep FFmpeg (PyAV's copy) at errors only.
    The level is left there afterwards: lerobot keeps restoring the printing callback on every encode."""
    try:
        import av.logging as avlog   # lazy: PyAV's log control differs between versions (see except)

        avlog.set_libav_level(avlog.ERROR)
    except Exception:  # pragma: no cover - an older PyAV without set_libav_level: only cosmetic
        pass
    # lerobot's save_episode runs a datasets.map per episode: one "Map: 100%" progress bar per episode otherwise
    bars = dslog.is_progress_bar_enabled()
    dslog.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            dslog.enable_progress_bar()


def _dir_size_mb(root: Path) -> float:
    return round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6, 2)


def _write_dataset(root: Path, plan: list, image_size: int, workers: int, video_file_size_mb: int,
                   progress: Callable[[int, int], None] | None) -> tuple[list[dict], dict[str, np.ndarray]]:
    rows: list[dict] = []
    actions, states = [], []
    # the pool forks first, before the writer starts any encoder thread
    with _episode_source(plan, image_size, workers) as source:
        ds = LeRobotDataset.create(
            repo_id=REPO_ID, fps=world.FPS, root=root, features=features(image_size), robot_type=ROBOT_TYPE,
            use_videos=True, vcodec=VIDEO_CODEC, streaming_encoding=True,
            # an episode never waits on a full queue: the streaming encoder DROPS frames when its queue is full
            encoder_queue_maxsize=4 * world.DEFAULT_MAX_STEPS,
        )
        ds.meta.update_chunk_settings(video_files_size_in_mb=int(video_file_size_mb))
        try:
            for i, ep in enumerate(source):
                for fr in ep.frames:
                    ds.add_frame({
                        world.IMAGE_KEYS[0]: fr[world.IMAGE_KEYS[0]],
                        world.IMAGE_KEYS[1]: fr[world.IMAGE_KEYS[1]],
                        world.STATE_KEY: np.asarray(fr[world.STATE_KEY], dtype=np.float32),
                        world.ACTION_KEY: np.asarray(fr[world.ACTION_KEY], dtype=np.float32),
                        "task": ep.task,
                    })
                ds.save_episode()
                m = ep.meta
                rows.append({
                    "episode_index": i, "split": m["split"], "task": ep.task, "canonical_task": m["instruction"],
                    "seed": m["seed"], "color": m["color"], "family": m["family"], "target": m["target"],
                    "verb": m["verb"], "success": bool(m["success"]), "length": len(ep),
                })
                actions.append(ep.actions)
                states.append(ep.states)
                if progress is not None:
                    progress(i + 1, len(plan))
        finally:
            ds.finalize()
    return rows, {world.ACTION_KEY: np.concatenate(actions), world.STATE_KEY: np.concatenate(states)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def _remove_abandoned_builds(base: Path) -> None:
    """Delete ``.building-<key>-<pid>-<ms>`` directories whose process is gone (an interrupted or killed build)."""
    for d in base.glob(".building-*"):
        try:
            pid = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def ensure_demo_dataset(
    data_dir: str | os.PathLike = "data",
    episodes: int | str | Mapping[str, int] | None = None,
    seed: int = 0,
    image_size: int = world.DEFAULT_IMAGE_SIZE,
    force: bool = False,
    workers: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
    video_file_size_mb: int = VIDEO_FILE_SIZE_MB,
    eval_episodes: int | None = None,
) -> DemoBuild:
    """Build the embedded dataset under ``<data_dir>/demo_world/<key>/`` unless a complete build with the same key
    is there (then reuse it). ``workers``: processes rendering episodes while the main process writes (default 1
    when the machine has ≥ 2 cores). ``progress``: True for a tqdm bar, or a callable(done, total).
    ``video_file_size_mb``: size at which lerobot starts a new mp4 per camera (part of the key). ``eval_episodes``:
    the run's EVAL_EPISODES, which sizes the evaluation splits of the default build (see ``default_episodes``)."""
    t0 = time.perf_counter()
    counts = resolve_episode_counts(episodes, eval_episodes)
    params = build_params(counts, seed, image_size, video_file_size_mb)
    key = cache_key(params)
    base = Path(data_dir) / "demo_world"
    root = base / key
    marker = root / BUILD_SIDECAR
    if marker.is_file() and not force:
        info = json.loads(marker.read_text())
        if info.get("key") == key:
            return DemoBuild(root, True, time.perf_counter() - t0, info)

    base.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(base)
    tmp = base / f".building-{key}-{os.getpid()}-{int(time.time() * 1000)}"
    plan = episode_plan(counts, seed)
    if workers is None:
        workers = 1 if (os.cpu_count() or 1) >= 2 else 0
    bar = None
    if progress is True:
        bar = tqdm(total=len(plan), desc="building the embedded dataset", unit="episode", mininterval=2.0)
        progress = lambda done, total: bar.update(1)  # noqa: E731
    try:
        with _quiet(), _image_stats_subsample(), _no_op_embedding():
            rows, arrays = _write_dataset(tmp, plan, image_size, workers, video_file_size_mb, progress or None)
        _patch_stats(tmp, arrays)
        _verify(tmp, [r["length"] for r in rows], image_size)
        with open(tmp / EPISODES_SIDECAR, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        by_split = {s: sum(1 for r in rows if r["split"] == s) for s in counts}
        info = {
            "key": key, "params": params, "repo_id": REPO_ID, "world_fingerprint": world.world_fingerprint(),
            "lerobot": _lerobot_version(), "codec_note": VIDEO_CODEC_NOTE,
            "total_episodes": len(rows), "total_frames": int(sum(r["length"] for r in rows)),
            "episodes_per_split": by_split, "expert_success_rate": float(np.mean([r["success"] for r in rows])),
            "blank_task_episodes": int(sum(1 for r in rows if not r["task"])),
            "catalog": world.SPLITS.to_dict(),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        info["size_mb"] = _dir_size_mb(tmp)
        (tmp / BUILD_SIDECAR).write_text(json.dumps(info, indent=2))  # last: marks the build complete
        if root.exists():  # a forced rebuild, or a concurrent build finished first
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return DemoBuild(root, False, time.perf_counter() - t0, info)


def build_demo_dataset(
    data_dir: str | os.PathLike = "data",
    episodes: int | str | Mapping[str, int] | None = None,
    seed: int = 0,
    image_size: int = world.DEFAULT_IMAGE_SIZE,
    force: bool = False,
    **kwargs: Any,
) -> Path:
    """The embedded dataset's root (built, or reused from the cache). See ``ensure_demo_dataset``."""
    return ensure_demo_dataset(data_dir, episodes, seed, image_size, force, **kwargs).root


def load_build_info(root: str | os.PathLike) -> dict | None:
    """meta/vla_bridge_build.json of an embedded build, or None for any other dataset."""
    p = Path(root) / BUILD_SIDECAR
    return json.loads(p.read_text()) if p.is_file() else None


def load_episode_sidecar(root: str | os.PathLike) -> list[dict] | None:
    """meta/vla_bridge_episodes.jsonl rows (sorted by episode_index), or None when the dataset has none."""
    p = Path(root) / EPISODES_SIDECAR
    if not p.is_file():
        return None
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["episode_index"])
