"""Stream a LeRobot dataset (hub id or local root): open it after the checks, fix two lerobot bugs, feed training.

The order of the checks is the point of :func:`open_dataset` — each one turns a failure that would otherwise surface
deep inside lerobot (or not at all) into a one-line error with the way out:

1. ``meta/info.json`` is read FIRST and its ``codebase_version`` checked (``source.resolve_source`` /
   ``source.check_version``): v3.x streams; v2.x / v1.x raise ``DatasetVersionError`` with the conversion path;
2. torchcodec must load (``source.require_torchcodec``): without system FFmpeg the stream yields zero frames;
3. after streaming starts, the first frames must arrive within a time bound; zero frames raise ``StreamError``
   with the FFmpeg explanation and the real decoder error (lerobot swallows it and silently drops the shard).

Two bugs of lerobot 0.4.4's ``StreamingLeRobotDataset`` are worked around in :class:`BridgeStreamingDataset`:

* ``episodes=[...]`` is stored but never applied (upstream PR huggingface/lerobot#4335): we filter the frame stream
  by ``episode_index`` before any video is decoded, so a split really streams only its episodes;
* video frames are looked up at the dataset-global time ``index / fps`` (upstream issue #4524): correct only while
  the whole dataset sits in ONE mp4 per camera; with several files (Bridge has thousands) the decoder raises
  ``IndexError`` or returns another episode's frame. We query ``from_timestamp`` of the episode's file + the frame's
  time within its episode, as the map-style ``LeRobotDataset`` does.

lerobot also decodes every camera of every frame (Bridge has four; training and evaluation read ``image_0``): the
stream decodes only ``cameras`` (default the main camera; the data figures and the camera probe ask for more).

A third issue is made explicit rather than left to chance: inside ``torch.utils.data.DataLoader`` workers,
``datasets`` splits each of lerobot's one-shard sub-streams across workers, so worker 0 streams everything and the
other workers stream nothing. :class:`BridgeStreamingDataset` gives each worker its own share of the episodes.

:class:`TrainingStream` is what training and the notebook iterate: epochs over a split's episodes through the input
pipeline (:class:`FramePipeline`: decode → uint8 HxWx3 → resize to the model's image size; the prompt / tokenize /
collate step plugs in as ``example_fn`` / ``collate_fn``), with a ``counting.SampleCounter`` of unique and repeated
``(episode_index, frame_index)`` pairs per epoch. It satisfies ``training.FrameSource`` (``iterate(start)``).

Data parallelism (``shard=(rank, world)``): each of ``world`` training processes streams its own episodes
(``counting.shard_episodes``: the split's sorted episode list dealt round-robin), shuffled per epoch with its own
seed, so no frame reaches two processes; ``counting.merge_counts`` sums the processes' counters per epoch and raises
when a frame came to two of them. ``world == 1`` is exactly the unsharded stream.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import queue
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import lerobot.datasets.streaming_dataset as lerobot_streaming
import lerobot.datasets.video_utils as video_utils
import numpy as np
import torch
import torch.utils.data as tud
from lerobot.datasets.streaming_dataset import StreamingLeRobotDataset
from lerobot.datasets.utils import item_to_torch

from .. import preflight
from ..images import to_uint8_hwc
from .counting import SampleCounter, shard_episodes
from .schema import MAIN_CAMERA
from .source import StreamError, check_version, require_torchcodec, resolve_source

DEFAULT_BUFFER_SIZE = 1000        # lerobot's shuffle buffer (frames); the first frame waits until it is full
FIRST_FRAME_TIMEOUT_LOCAL_S = 60.0
FIRST_FRAME_TIMEOUT_HUB_S = 180.0
STREAM_CHECK_SECONDS = 3.0        # the notebook's stream check (section 3e) by default: one pass over the demo split
                                  # (~2.3 s at ~800 frames/s on 2 cores) and into the second

# Square image size each policy's processor works at; the training pipeline resizes to it once, up front.
MODEL_IMAGE_SIZE = {"openvla": 224, "openvla-4bit": 224, "octo": 256, "tiny": 128}


def policy_image_size(policy: str) -> int:
    """The square size POLICY works at, known before its model is loaded (a loaded processor says it itself:
    ``models.openvla.model_image_size``)."""
    return MODEL_IMAGE_SIZE.get(policy, 224)


# ----------------------------------------------------------------------------------------------- the stream


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (None: unchanged).

    Why the data path uses 1: lerobot does small tensor ops per frame (stack, /255) while FFmpeg decodes on its own
    threads. With 2 intra-op threads on a 2-core (or busy) machine each tiny op waits on a descheduled OpenMP
    thread: on 2 cores we measured 5–180 frames/s with 2 threads (the low end on a busy machine) vs 700–780 with 1.
    """
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    if prev != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if prev != n:
            torch.set_num_threads(prev)


@contextlib.contextmanager
def _hide_worker_info() -> Iterator[None]:
    """Make ``datasets`` iterate as if outside a DataLoader worker (we shard by episode ourselves)."""
    original = tud.get_worker_info
    tud.get_worker_info = lambda: None
    try:
        yield
    finally:
        tud.get_worker_info = original


def resolve_cameras(video_keys: Sequence[str], cameras: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The camera keys a stream decodes. ``None``: what training and evaluation read — the main camera
    (``image_0``), or every camera when the dataset has no ``image_0``; ``"all"``: every camera; else the given keys
    (a bare ``image_1`` means ``observation.images.image_1``), each of which must be one of the dataset's."""
    keys = list(video_keys)
    if cameras is None:
        return (MAIN_CAMERA,) if MAIN_CAMERA in keys else tuple(keys)
    if isinstance(cameras, str):
        cameras = keys if cameras == "all" else [cameras]
    out = tuple(c if c in keys or c.startswith("observation.") else f"observation.images.{c}" for c in cameras)
    bad = [c for c in out if c not in keys]
    if bad:
        raise ValueError(f"camera(s) {bad} not in the dataset; it has {keys}")
    return out


class BridgeStreamingDataset(StreamingLeRobotDataset):
    """lerobot's ``StreamingLeRobotDataset`` with the episode filter applied, file-relative video timestamps and
    per-worker episode shards (see the module docstring). ``delta_timestamps`` is not supported."""

    def __init__(self, repo_id: str, root: str | os.PathLike | None = None, episodes: Sequence[int] | None = None,
                 cameras: Sequence[str] | str | None = None, **kwargs: Any):
        if kwargs.get("delta_timestamps"):
            raise NotImplementedError("BridgeStreamingDataset streams single frames (no delta_timestamps)")
        if episodes is not None and len(episodes) == 0:
            raise ValueError("no episodes to stream: the episode list (the split) is empty")
        self._max_num_shards = int(kwargs.get("max_num_shards", 16))
        super().__init__(repo_id, root=root, episodes=list(episodes) if episodes is not None else None, **kwargs)
        self._unfiltered = self.hf_dataset
        cols = ["episode_index", "length", "dataset_from_index"] + [
            f"videos/{k}/from_timestamp" for k in self.meta.video_keys]
        table = self.meta.episodes.select_columns(cols).to_pandas().set_index("episode_index")
        self._episode_table = table
        known = set(int(e) for e in table.index)
        if episodes is not None:
            bad = sorted(set(int(e) for e in episodes) - known)
            if bad:
                raise ValueError(f"episodes not in the dataset: {bad[:10]}{' …' if len(bad) > 10 else ''}")
            self.selected_episodes = sorted(set(int(e) for e in episodes))
        else:
            self.selected_episodes = sorted(known)
        self._select(self.selected_episodes if episodes is not None else None)
        self.cameras = resolve_cameras(self.meta.video_keys, cameras)
        # Per-frame lookups as plain dicts (make_frame): episode → (first dataset index / fps, each camera's file
        # offset), and task index → task string.
        self._video_offsets = {int(e): (float(r["dataset_from_index"]) / self.fps,
                                        {k: float(r[f"videos/{k}/from_timestamp"]) for k in self.meta.video_keys})
                               for e, r in table.iterrows()}
        self._task_names = list(self.meta.tasks.index)
        self._video_paths: dict[tuple[int, str], str] = {}

    # -- the episode filter (lerobot 0.4.4 ignores `episodes`)
    def _select(self, episodes: Sequence[int] | None) -> None:
        if episodes is None:
            self.hf_dataset = self._unfiltered
        else:
            allowed = frozenset(int(e) for e in episodes)
            self.hf_dataset = self._unfiltered.filter(
                lambda eps: [int(e) in allowed for e in eps], input_columns="episode_index", batched=True,
                batch_size=1000)
        self.num_shards = min(self.hf_dataset.num_shards, self._max_num_shards)

    @property
    def num_frames(self) -> int:
        t = self._episode_table
        return int(t.loc[self.selected_episodes, "length"].sum())

    @property
    def num_episodes(self) -> int:
        return len(self.selected_episodes)

    def episode_lengths(self) -> dict[int, int]:
        t = self._episode_table
        return {int(e): int(t.at[e, "length"]) for e in self.selected_episodes}

    # -- one frame: what lerobot's make_frame yields without delta_timestamps, minus its per-frame reads of the
    # -- episode's whole metadata row (4 full-row reads of meta.episodes per frame, ~40 % of the stream's time, for
    # -- episode bounds that only delta_timestamps use)
    def make_frame(self, dataset_iterator) -> Iterator[dict]:
        item = item_to_torch(next(dataset_iterator))
        ep_idx = item["episode_index"]
        result = item.copy()
        if self.meta.video_keys:
            current_ts = item["index"] / self.fps
            video_frames = self._query_videos({key: [current_ts] for key in self.meta.video_keys}, ep_idx)
            if self.image_transforms is not None:
                for cam in self.meta.camera_keys:
                    video_frames[cam] = self.image_transforms(video_frames[cam])
            result.update(video_frames)
        result["task"] = self._task_names[int(item["task_index"])]
        yield result

    # -- file-relative video timestamps (lerobot 0.4.4 uses the dataset-global index / fps)
    # -- and only the cameras asked for (lerobot decodes every video key of every frame)
    # -- (lerobot's own loop, with each episode's video paths looked up once instead of once per frame)
    def _query_videos(self, query_timestamps: dict[str, list[float]], ep_idx: int) -> dict:
        ep = int(ep_idx)
        ep_start, offsets = self._video_offsets[ep]
        item = {}
        for key, tss in query_timestamps.items():
            if self.cameras is not None and key not in self.cameras:
                continue
            path = self._video_paths.get((ep, key))
            if path is None:
                root = self.meta.url_root if self.streaming and not self.streaming_from_local else self.root
                path = self._video_paths[(ep, key)] = f"{root}/{self.meta.get_video_file_path(ep, key)}"
            frames = lerobot_streaming.decode_video_frames_torchcodec(
                path, [offsets[key] + (ts - ep_start) for ts in tss], self.tolerance_s,
                decoder_cache=self.video_decoder_cache)
            item[key] = frames.squeeze(0) if len(tss) == 1 else frames
        return item

    # -- DataLoader workers: each worker streams its own episodes
    def __iter__(self):
        info = tud.get_worker_info()
        if info is None or info.num_workers <= 1:
            yield from super().__iter__()
            return
        mine = self.selected_episodes[info.id::info.num_workers]
        if not mine:
            return
        self._select(mine)
        self.rng = np.random.default_rng([int(self.seed), int(info.id)])
        with _hide_worker_info():
            yield from super().__iter__()


# ----------------------------------------------------------------------------------------------- first frames


_ZERO_FRAMES = (
    "the stream yielded ZERO frames. lerobot's StreamingLeRobotDataset catches video-decoding errors and silently "
    "drops the stream; the usual cause is torchcodec without system FFmpeg's shared libraries (libavutil, "
    "libavcodec, …). Fix: {hint}, then rerun `bash setup.sh`. Direct decode of episode {ep} ({key}): {diag}"
)


def _diagnose_decode(ds) -> tuple[int, str, str]:
    """Decode one frame directly, bypassing lerobot's error swallowing: (episode, camera, outcome)."""
    if not ds.meta.video_keys or not ds.selected_episodes:
        return -1, "-", "no video features / no episodes"
    ep = int(ds.selected_episodes[0])
    key = ds.meta.video_keys[0]
    try:
        ts = float(ds._episode_table.at[ep, f"videos/{key}/from_timestamp"])
        base = ds.meta.url_root if (ds.streaming and not ds.streaming_from_local) else ds.root
        path = f"{base}/{ds.meta.get_video_file_path(ep, key)}"
        video_utils.decode_video_frames_torchcodec(path, [ts], ds.tolerance_s)  # the attribute: tests patch it
        return ep, key, "works (so the frames were lost elsewhere: check the episode filter and the parquet files)"
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return ep, key, f"{type(exc).__name__}: {msg}"


def zero_frames_error(ds) -> StreamError:
    """The :class:`StreamError` for a stream of ``ds`` that yielded no frames: the FFmpeg explanation with the error
    of one frame decoded directly."""
    ep, key, diag = _diagnose_decode(ds)
    return StreamError(_ZERO_FRAMES.format(hint=preflight.ffmpeg_install_hint(), ep=ep, key=key, diag=diag))


def probe_first_frames(ds, n: int = 3, timeout_s: float = FIRST_FRAME_TIMEOUT_LOCAL_S) -> list[dict]:
    """The first ``n`` frames of ``ds`` in stream order (no shuffle buffer), within ``timeout_s``.

    Runs on a shallow copy with a 1-frame buffer so the first frame is not held back by lerobot's shuffle buffer.
    Zero frames → :class:`StreamError` with the FFmpeg explanation and the direct decoder error.
    """
    probe = copy.copy(ds)
    probe.buffer_size = 1
    probe.video_decoder_cache = None
    out: queue.Queue = queue.Queue()

    def run() -> None:
        frames: list[dict] = []
        try:
            with torch_threads(1):
                for fr in probe:
                    frames.append(fr)
                    if len(frames) >= n:
                        break
            out.put(("ok", frames))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
            out.put(("error", exc))

    threading.Thread(target=run, name="vla_bridge-first-frames", daemon=True).start()
    try:
        status, payload = out.get(timeout=timeout_s)
    except queue.Empty:
        raise StreamError(
            f"no frame arrived within {timeout_s:.0f} s. On the hub this is the network or a rate limit "
            "(`huggingface-cli login` raises it); locally, a very slow disk or a stuck decoder"
        ) from None
    if status == "error":
        exc = payload
        msg = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
        raise StreamError(f"streaming failed on its first frames: {type(exc).__name__}: {msg}") from exc
    if not payload:
        raise zero_frames_error(ds)
    return payload


# ----------------------------------------------------------------------------------------------- open


def open_dataset(
    dataset: str | os.PathLike,
    root: str | os.PathLike | None = None,
    episodes: Sequence[int] | None = None,
    *,
    shuffle: bool = True,
    seed: int = 0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    probe: bool = True,
    timeout_s: float | None = None,
    cameras: Sequence[str] | str | None = None,
):
    """Open a hub id or a local LeRobot root for streaming, after the checks in the module docstring.

    Returns a :class:`BridgeStreamingDataset`; with ``probe`` its first frames (stream order) are in
    ``ds.first_frames`` and ``ds.source`` is the ``source.DatasetSource``. ``cameras``: the video keys each frame
    decodes (:func:`resolve_cameras`; default the main camera only — Bridge has four, training reads one).
    """
    if episodes is not None and len(episodes) == 0:
        raise ValueError("no episodes to stream: the episode list (the split) is empty")
    if episodes is not None and len(episodes) == 0:
        raise ValueError(f"the split selects no episodes of {dataset}: nothing to stream (is the training split "
                         "empty? check the split cell's counts, or DEMO_EPISODES)")
    source = resolve_source(dataset, root)
    check_version(source.info, str(dataset))
    require_torchcodec()
    kwargs: dict[str, Any] = dict(episodes=episodes, shuffle=shuffle, seed=seed, buffer_size=buffer_size,
                                  cameras=cameras)
    if source.revision:
        kwargs["revision"] = source.revision
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Repo card metadata block.*")
        ds = BridgeStreamingDataset(source.repo_id, root=source.root, **kwargs)
    ds.source = source
    ds.first_frames = []
    if probe:
        if timeout_s is None:
            timeout_s = FIRST_FRAME_TIMEOUT_LOCAL_S if source.is_local else FIRST_FRAME_TIMEOUT_HUB_S
        ds.first_frames = probe_first_frames(ds, 3, timeout_s)
    return ds


# ----------------------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass
class FramePipeline:
    """The training input pipeline for one frame: decoded camera image (lerobot: float CxHxW in [0, 1]) → uint8
    HxWx3 → resized to the model's image size, plus the instruction, the action and the bookkeeping indices.

    Hook for the tokenization step: ``example_fn(frame_dict) -> model example`` is applied last (e.g. prompt build
    + tokenize + pixel_values with ``tokenization.make_training_example``), and ``collate_fn`` on batches.
    """

    image_size: int | None = None
    camera: str = MAIN_CAMERA
    example_fn: Callable[[dict], Any] | None = None

    def __call__(self, frame: Mapping[str, Any]) -> Any:
        out = {
            "image": to_uint8_hwc(frame[self.camera], self.image_size),
            "instruction": str(frame.get("task", "")),
            "action": _np32(frame["action"]),
            "state": _np32(frame["observation.state"]) if "observation.state" in frame else None,
            "episode_index": int(frame["episode_index"]),
            "frame_index": int(frame["frame_index"]),
            "task_index": int(frame["task_index"]) if "task_index" in frame else -1,
        }
        return self.example_fn(out) if self.example_fn is not None else out


def _np32(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)

# ----------------------------------------------------------------------------------------------- training stream


class TrainingStream:
    """Epochs over a split's episodes through :class:`FramePipeline`, with a :class:`SampleCounter`.

    ``iterate(start)`` (``training.FrameSource``) loops epochs forever in a deterministic order: epoch ``e`` shuffles
    with ``default_rng([seed, e])``, so skipping ``start`` frames (resume) skips whole epochs for free and replays at
    most one partial epoch. ``batches(batch_size, n)`` yields lists (or ``collate_fn`` outputs) of frames.
    Each frame is produced under ``torch_threads(loader_threads)`` (see :func:`torch_threads`).
    """

    def __init__(self, dataset: str | os.PathLike, root: str | os.PathLike | None = None,
                 episodes: Sequence[int] | None = None, *, image_size: int | None = None, camera: str = MAIN_CAMERA,
                 seed: int = 0, shuffle: bool = True, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 loader_threads: int | None = 1, strict: bool = True, example_fn: Callable[[dict], Any] | None = None,
                 ds=None, shard: tuple[int, int] | None = None):
        self.rank, self.world = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
        split_episodes = episodes
        if self.world > 1:
            if ds is not None or episodes is None:
                raise ValueError("shard=(rank, world) needs the split's episode list (and no pre-opened ds)")
            episodes = shard_episodes(episodes, self.rank, self.world)
        self.ds = ds if ds is not None else open_dataset(dataset, root, episodes, shuffle=shuffle, seed=seed,
                                                         buffer_size=buffer_size, probe=True, cameras=[camera])
        if camera not in getattr(self.ds, "cameras", (camera,)):  # a stream opened for other cameras: add ours
            self.ds.cameras = tuple(self.ds.cameras) + (camera,)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.pipeline = FramePipeline(image_size, camera, example_fn)
        self.loader_threads = loader_threads
        self.counter = SampleCounter(strict=strict)
        self.epoch_frames = int(self.ds.num_frames)
        self.epochs_started = 0
        table = getattr(self.ds, "_episode_table", None)
        self.split_frames = self.epoch_frames if self.world == 1 or table is None else int(
            table.loc[sorted(set(int(e) for e in split_episodes)), "length"].sum())

    def resume_start(self, frames_per_rank: Sequence[int]) -> int:
        """Where this process's stream resumes from the per-process data positions a checkpoint saved.

        The same number of processes: each continues its own shard where it stopped (exact). Another number: the
        episodes are dealt anew, and each process starts at the same fraction of its new shard's epoch as the old
        run had reached of the split's (completed epochs are kept; within the interrupted epoch, frames the old
        shards had already streamed may come again and others be skipped)."""
        if len(frames_per_rank) == self.world:
            return int(frames_per_rank[self.rank])
        return int(sum(int(f) for f in frames_per_rank) * self.epoch_frames // max(self.split_frames, 1))

    def _start(self, epoch: int) -> Iterator[dict]:
        self.ds.rng = np.random.default_rng([self.seed, int(epoch)] if self.world == 1 else
                                            [self.seed, int(epoch), self.rank])
        if not self.shuffle:
            self.ds.seed = self.seed
        return iter(self.ds)

    def epoch(self, epoch: int | None = None) -> Iterator[Any]:
        """One pass over the split (processed frames), counted."""
        epoch = self.epochs_started if epoch is None else int(epoch)
        self.epochs_started = max(self.epochs_started, epoch + 1)
        cur = self.counter.start_epoch(epoch, expected=self.epoch_frames)
        t0 = time.perf_counter()
        it = self._start(epoch)
        while True:
            with torch_threads(self.loader_threads):
                try:
                    fr = next(it)
                except StopIteration:
                    break
                self.counter.add(int(fr["episode_index"]), int(fr["frame_index"]))
                item = self.pipeline(fr)
            cur.seconds = time.perf_counter() - t0
            yield item
        cur.seconds = time.perf_counter() - t0
        if cur.frames == 0:
            raise zero_frames_error(self.ds)
        if cur.frames < self.epoch_frames:
            warnings.warn(f"epoch {epoch} streamed {cur.frames} of {self.epoch_frames} frames: lerobot dropped a "
                          "stream after a decoding error", RuntimeWarning, stacklevel=2)

    def iterate(self, start: int = 0) -> Iterator[Any]:
        """Frames forever (epoch after epoch), skipping the first ``start`` (``training.FrameSource``)."""
        epoch, skip = divmod(int(start), max(self.epoch_frames, 1))
        while True:
            for i, item in enumerate(self.epoch(epoch)):
                if i >= skip:
                    yield item
            skip = 0
            epoch += 1

    def batches(self, batch_size: int, n_batches: int | None = None,
                collate_fn: Callable[[list], Any] | None = None, seconds: float | None = None) -> Iterator[Any]:
        """Batches of ``batch_size`` items: ``n_batches`` of them, or with ``seconds`` for as long as that (timed
        from the first item), ending with the first batch past that time that lies beyond the first epoch, so a
        time-sized check always crosses one epoch boundary; neither: until the iterator ends."""
        buf: list = []
        made = 0
        t0 = None
        for item in self.iterate(0):
            if t0 is None:
                t0 = time.perf_counter()
            buf.append(item)
            if len(buf) == batch_size:
                yield collate_fn(buf) if collate_fn is not None else buf
                buf = []
                made += 1
                if n_batches is not None and made >= n_batches:
                    return
                if (seconds is not None and time.perf_counter() - t0 >= seconds
                        and len(self.counter.epochs) > 1):
                    return

    def summary(self) -> str:
        return self.counter.summary()


# ----------------------------------------------------------------------------------------------- DataLoader


def dataloader(stream: TrainingStream, num_workers: int = 2, batch_size: int | None = None,
               collate_fn: Callable[[list], Any] | None = None, prefetch_factor: int = 4):
    """A ``torch.utils.data.DataLoader`` over one epoch of ``stream``'s pipeline with ``num_workers`` processes.

    Each worker streams its own share of the episodes (``BridgeStreamingDataset.__iter__``) with its share of the
    shuffle buffer, and runs the pipeline; DataLoader workers use one torch thread each. ``batch_size=None`` yields
    single items; otherwise lists of items (or ``collate_fn`` outputs). Count samples on the consumer side.
    """
    ds, pipeline, threads = stream.ds, stream.pipeline, stream.loader_threads

    class _PipelineIterable(tud.IterableDataset):
        def __iter__(self):
            info = tud.get_worker_info()
            if info is not None and info.num_workers > 1:  # same total shuffle memory, split across workers
                ds.buffer_size = max(64, ds.buffer_size // info.num_workers)
            it = iter(ds)
            while True:
                with torch_threads(threads if tud.get_worker_info() is None else None):
                    try:
                        fr = next(it)
                    except StopIteration:
                        return
                    item = pipeline(fr)
                yield item

    kwargs: dict[str, Any] = dict(batch_size=batch_size, num_workers=num_workers)
    if batch_size is None:
        kwargs["collate_fn"] = collate_fn or (lambda x: x)
    elif collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    else:
        kwargs["collate_fn"] = lambda items: items
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
    return tud.DataLoader(_PipelineIterable(), **kwargs)
