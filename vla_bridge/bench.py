"""Loader benchmark: frames/s of bare streaming vs the project's training input pipeline over the same frames.

``python -m vla_bridge bench-loader DATASET [--frames N]`` (DATASET: ``embedded``, a hub id or a local root) runs,
on the training split's episodes with the same seed (so the same frames in the same order):

1. **bare** — iterating the stream (lerobot's ``StreamingLeRobotDataset`` with our two bug fixes, see
   ``data/stream.py``): parquet rows + video decode, nothing else;
2. **pipeline** — ``TrainingStream``: the same stream + uint8 conversion, resize to the model's image size and the
   (episode, frame) sample counter. The prompt / tokenize / collate step plugs in through ``example_fn`` (see
   ``FramePipeline``); pass one to include it;
3. **pipeline, DataLoader workers** — the pipeline in ``--workers`` processes, each streaming its own episodes
   with its share of the shuffle buffer, delivering batches of ``--batch-size`` frames (as training consumes them).

Everything runs with one torch intra-op thread per process (``stream.torch_threads``); ``--default-threads`` adds
a short run of the bare stream with torch's default thread count, to show what that costs on a small machine.
The goal: pipeline overhead ≤ 1.3× bare; with workers, more frames/s than bare.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Sequence

import numpy as np

from .data import stream as st

GOAL_OVERHEAD = 1.3


def _time_iter(it, n: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    got = sum(1 for _ in itertools.islice(it, n))
    return got, time.perf_counter() - t0


def _bare(ds, n: int, threads: int | None) -> tuple[int, float]:
    ds.rng = np.random.default_rng([ds.seed, 0])  # the same order TrainingStream.epoch(0) uses
    it = iter(ds)

    def frames():
        while True:
            with st.torch_threads(threads):
                try:
                    fr = next(it)
                except StopIteration:
                    return
            yield fr

    return _time_iter(frames(), n)


def bench_loader(dataset: str = "embedded", root: str | None = None, frames: int = 2000, image_size: int = 224,
                 workers: int = 2, data_dir: str = "data", episodes: Sequence[int] | None = None, seed: int = 0,
                 buffer_size: int = st.DEFAULT_BUFFER_SIZE, default_threads: bool = False, batch_size: int = 16,
                 example_fn: Callable[[dict], Any] | None = None, split: str = "train") -> dict[str, Any]:
    """Run the three measurements on the ``split`` ("train": the training split's episodes; "all") or the given
    ``episodes``; returns rows of {name, frames, seconds, fps} and the ratios."""
    if dataset == "embedded" and root is None:
        from .data.build import build_demo_dataset

        dataset, root = str(build_demo_dataset(data_dir)), None
    if episodes is None and split == "train":
        from .data.splits import make_split

        meta_ds = st.open_dataset(dataset, root, probe=False, seed=seed, buffer_size=buffer_size)
        episodes = make_split(meta_ds, check=False).train
    elif episodes is None:
        episodes = st.open_dataset(dataset, root, probe=False).selected_episodes
    ds = st.open_dataset(dataset, root, episodes, seed=seed, buffer_size=buffer_size, probe=False)
    n = min(int(frames), int(ds.num_frames))
    rows = []

    got, secs = _bare(ds, n, 1)
    rows.append({"name": "bare stream (StreamingLeRobotDataset)", "frames": got, "seconds": secs})

    ts = st.TrainingStream(dataset, root, ds=ds, image_size=image_size, seed=seed, example_fn=example_fn,
                           strict=True)
    got, secs = _time_iter(ts.epoch(0), n)
    rows.append({"name": f"pipeline (decode + resize {image_size} + count)", "frames": got, "seconds": secs})

    if workers > 0:
        ds_w = st.open_dataset(dataset, root, episodes, seed=seed, buffer_size=buffer_size, probe=False)
        ts_w = st.TrainingStream(dataset, root, ds=ds_w, image_size=image_size, seed=seed, example_fn=example_fn)
        counter = st.SampleCounter(strict=True)
        counter.start_epoch(0)

        def counted():
            for batch in st.dataloader(ts_w, num_workers=workers, batch_size=batch_size):
                for item in batch:
                    counter.add(item["episode_index"], item["frame_index"])
                    yield item

        got, secs = _time_iter(counted(), n)
        rows.append({"name": f"pipeline, DataLoader workers={workers} (batch {batch_size})", "frames": got, "seconds": secs,
                     "unique": counter.unique})

    if default_threads:
        import torch

        ds_d = st.open_dataset(dataset, root, episodes, seed=seed, buffer_size=buffer_size, probe=False)
        m = min(n, 300)
        got, secs = _bare(ds_d, m, None)
        rows.append({"name": f"bare stream, torch default {torch.get_num_threads()} threads", "frames": got,
                     "seconds": secs})

    for r in rows:
        r["fps"] = r["frames"] / r["seconds"] if r["seconds"] > 0 else float("nan")
    bare, pipe = rows[0], rows[1]
    out: dict[str, Any] = {"dataset": dataset, "episodes": len(episodes), "frames": n, "image_size": image_size,
                           "buffer_size": buffer_size, "rows": rows,
                           "overhead": bare["fps"] / pipe["fps"] if pipe["fps"] else float("nan")}
    if workers > 0:
        out["workers_speedup_vs_bare"] = rows[2]["fps"] / bare["fps"]
    return out


def format_bench(res: dict[str, Any]) -> str:
    lines = [f"loader benchmark: {res['dataset']}  ({res['episodes']} episodes, first {res['frames']:,} "
             f"frames of the same seeded stream, shuffle buffer {res['buffer_size']})",
             f"{'':<48}{'frames':>8}{'seconds':>10}{'frames/s':>10}"]
    for r in res["rows"]:
        lines.append(f"{r['name']:<48}{r['frames']:>8,}{r['seconds']:>10.2f}{r['fps']:>10.0f}")
    ok = "meets" if res["overhead"] <= GOAL_OVERHEAD else "MISSES"
    lines.append(f"pipeline overhead: {res['overhead']:.2f}x bare ({ok} the ≤ {GOAL_OVERHEAD}x goal)")
    if "workers_speedup_vs_bare" in res:
        lines.append(f"with DataLoader workers: {res['workers_speedup_vs_bare']:.2f}x the bare stream's frames/s")
    return "\n".join(lines)
