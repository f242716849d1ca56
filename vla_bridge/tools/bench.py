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

Before anything is timed, both the bare stream and the pipeline pull ``--warmup`` frames (default 200, at most
``--frames``): the first pass over a dataset pays for cold file caches, decoder start-up and lazy imports, and
without the warm-up whichever row is timed first pays for it, so the pipeline/bare ratio depended on the order.
Each row then starts its own fresh iterator over the same seeded stream. The stream decodes only the camera the
pipeline reads (``image_0``), in both rows.

Everything runs with one torch intra-op thread per process (``stream.torch_threads``); ``--default-threads`` adds
a short run of the bare stream with torch's default thread count, to show what that costs on a small machine.

4. **trainer** (``--trainer-steps``, default 10; 0 skips it) — what the tiny path's training consumes, measured in
   the same run: ``bench_train.trainer_throughput``, the notebook's tiny-CPU training configuration (batch 16, LoRA
   r=32) through the real ``training.train`` loop on frames held in memory (no loading), at torch's thread count
   (what training runs with), its first ``--trainer-warmup`` steps untimed. The frames come from the pipeline at the
   tiny VLA's image size (128); when ``--image-size`` differs, one more pipeline row is timed at 128 for the ratio.

The goals, printed as ``RATIO`` lines (``tools/ratios.py``, ``loader_ratios``):
``bench-loader.overhead`` = bare frames/s ÷ pipeline frames/s ≤ 1.3×; ``bench-loader.pipeline_vs_trainer`` =
pipeline frames/s (at the trainer's image size, in one process, as training reads it) ÷ the trainer's samples/s
≥ 2× (the stream then takes at most a third of a training step's time); ``bench-loader.workers_vs_bare`` = the
DataLoader row's frames/s ÷ bare ≥ 1× (with workers, more frames/s than the bare stream).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data import stream as st
from ..data.build import build_demo_dataset, ensure_demo_dataset
from ..data.counting import SampleCounter
from ..data.episodes import load_episodes
from ..data.splits import make_split
from ..data.stats import compute_action_stats, norm_stats_entry
from ..evaluation import BatchedActionPredictor, per_frame_predict
from ..models.openvla import load_openvla, register_dataset_statistics
from ..pretrain import SHIPPED_BASE
from ..models.tiny_vla import build_tiny_vla
from .bench_train import trainer_throughput
from .ratios import Ratio, format_ratios, ratio

GOAL_OVERHEAD = 1.3
GOAL_PIPELINE_VS_TRAINER = 2.0
GOAL_WORKERS_VS_BARE = 1.0


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
                 example_fn: Callable[[dict], Any] | None = None, split: str = "train",
                 warmup: int = 200, trainer_steps: int = 0, trainer_warmup: int = 3,
                 demo_episodes: Any = None) -> dict[str, Any]:
    """Run the measurements on the ``split`` ("train": the training split's episodes; "all") or the given
    ``episodes``; returns rows of {name, frames, seconds, fps}, the ``trainer`` figures (``trainer_steps`` > 0) and
    the ratios. ``demo_episodes``: the size of the embedded dataset when ``dataset`` is "embedded" (None: the
    default build; see ``data.build.resolve_episode_counts``)."""
    if dataset == "embedded" and root is None:
        dataset, root = str(build_demo_dataset(data_dir, demo_episodes)), None
    if episodes is None and split == "train":
        meta_ds = st.open_dataset(dataset, root, probe=False, seed=seed, buffer_size=buffer_size)
        episodes = make_split(meta_ds, check=False).train
    elif episodes is None:
        episodes = st.open_dataset(dataset, root, probe=False).selected_episodes
    ds = st.open_dataset(dataset, root, episodes, seed=seed, buffer_size=buffer_size, probe=False)
    n = min(int(frames), int(ds.num_frames))
    rows = []

    warm = min(max(int(warmup), 0), n)
    if warm:  # both paths once, untimed, so neither timed row pays for the cold start
        _bare(ds, warm, 1)
        warm_ts = st.TrainingStream(dataset, root, ds=ds, image_size=image_size, seed=seed, example_fn=example_fn)
        _time_iter(warm_ts.epoch(0), warm)

    got, secs = _bare(ds, n, 1)
    rows.append({"name": "bare stream (StreamingLeRobotDataset)", "frames": got, "seconds": secs})

    ts = st.TrainingStream(dataset, root, ds=ds, image_size=image_size, seed=seed, example_fn=example_fn,
                           strict=True)
    got, secs = _time_iter(ts.epoch(0), n)
    rows.append({"name": f"pipeline (decode + resize {image_size} + count)", "frames": got, "seconds": secs})

    if workers > 0:
        ds_w = st.open_dataset(dataset, root, episodes, seed=seed, buffer_size=buffer_size, probe=False)
        ts_w = st.TrainingStream(dataset, root, ds=ds_w, image_size=image_size, seed=seed, example_fn=example_fn)
        counter = SampleCounter(strict=True)
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
        ds_d = st.open_dataset(dataset, root, episodes, seed=seed, buffer_size=buffer_size, probe=False)
        m = min(n, 300)
        got, secs = _bare(ds_d, m, None)
        rows.append({"name": f"bare stream, torch default {torch.get_num_threads()} threads", "frames": got,
                     "seconds": secs})

    trainer, trainer_row = None, None
    if trainer_steps > 0:
        def frames_at(size: int, k: int) -> list:
            src = st.TrainingStream(dataset, root, ds=ds, image_size=size, seed=seed, strict=False)
            return list(itertools.islice(src.iterate(0), k))

        stats = norm_stats_entry(compute_action_stats(ds, episodes))
        trainer = trainer_throughput(frames_at, stats, steps=trainer_steps, warmup=trainer_warmup)
        if trainer["image_size"] != image_size:  # the pipeline at the size the trainer reads, for the ratio
            ts_t = st.TrainingStream(dataset, root, ds=ds, image_size=trainer["image_size"], seed=seed,
                                     example_fn=example_fn)
            _time_iter(ts_t.epoch(0), warm)
            ts_t = st.TrainingStream(dataset, root, ds=ds, image_size=trainer["image_size"], seed=seed,
                                     example_fn=example_fn, strict=True)
            got, secs = _time_iter(ts_t.epoch(0), n)
            trainer_row = {"name": f"pipeline (decode + resize {trainer['image_size']} + count)", "frames": got,
                           "seconds": secs}
            rows.append(trainer_row)

    for r in rows:
        r["fps"] = r["frames"] / r["seconds"] if r["seconds"] > 0 else float("nan")
    bare, pipe = rows[0], rows[1]
    out: dict[str, Any] = {"dataset": dataset, "episodes": len(episodes), "frames": n, "image_size": image_size,
                           "buffer_size": buffer_size, "rows": rows, "warmup_frames": warm,
                           "cameras": list(ds.cameras),
                           "overhead": bare["fps"] / pipe["fps"] if pipe["fps"] else float("nan")}
    if workers > 0:
        out["workers_speedup_vs_bare"] = rows[2]["fps"] / bare["fps"]
    if trainer is not None:
        fed = trainer_row or pipe
        out["trainer"] = trainer
        out["pipeline_vs_trainer_row"] = rows.index(fed)  # the pipeline row at the trainer's image size
        out["pipeline_vs_trainer"] = fed["fps"] / trainer["samples_per_s"] if trainer["samples_per_s"] else float("nan")
    out["ratios"] = [r.as_dict() for r in loader_ratios(out)]
    return out


def loader_ratios(res: dict[str, Any]) -> list[Ratio]:
    """The loader benchmark's ratios (module docstring), from a ``bench_loader`` result."""
    rows = res["rows"]
    bare, pipe = rows[0], rows[1]
    out = [ratio("bench-loader.overhead", bare["fps"], pipe["fps"], GOAL_OVERHEAD, "≤",
                 "bare stream frames/s ÷ pipeline frames/s")]
    if "trainer" in res:
        fed = rows[res["pipeline_vs_trainer_row"]]
        out.append(ratio("bench-loader.pipeline_vs_trainer", fed["fps"], res["trainer"]["samples_per_s"],
                         GOAL_PIPELINE_VS_TRAINER, "≥",
                         "pipeline frames/s ÷ the tiny trainer's samples/s on in-memory frames"))
    if "workers_speedup_vs_bare" in res:
        out.append(ratio("bench-loader.workers_vs_bare", rows[2]["fps"], bare["fps"], GOAL_WORKERS_VS_BARE, "≥",
                         "DataLoader-workers frames/s ÷ bare stream frames/s"))
    return out


def format_bench(res: dict[str, Any]) -> str:
    lines = [f"loader benchmark: {res['dataset']}  ({res['episodes']} episodes, first {res['frames']:,} "
             f"frames of the same seeded stream, shuffle buffer {res['buffer_size']}, after "
             f"{res.get('warmup_frames', 0):,} warm-up frames through each; cameras decoded: "
             f"{', '.join(c.rsplit('.', 1)[-1] for c in res.get('cameras', [])) or '-'})",
             f"{'':<48}{'frames':>8}{'seconds':>10}{'frames/s':>10}"]
    for r in res["rows"]:
        lines.append(f"{r['name']:<48}{r['frames']:>8,}{r['seconds']:>10.2f}{r['fps']:>10.0f}")
    if "trainer" in res:
        t = res["trainer"]
        lines.append(f"{'trainer (tiny VLA + LoRA, in-memory frames)':<48}{t['samples_timed']:>8,}"
                     f"{t['seconds_timed']:>10.2f}{t['samples_per_s']:>10.1f}")
        lines.append(f"  trainer: the tiny path's training loop, LoRA r={t['lora_rank']}, batch {t['batch_size']}"
                     f"×{t['grad_accum']}, {t['image_size']} px, {t['threads']} torch thread(s), {t['device']}; "
                     f"{t['steps'] - t['warmup']} of {t['steps']} steps timed; frames/s = samples consumed per second")
    lines.append(f"pipeline overhead: {res['overhead']:.2f}x bare")
    if "workers_speedup_vs_bare" in res:
        lines.append(f"with DataLoader workers: {res['workers_speedup_vs_bare']:.2f}x the bare stream's frames/s")
    lines.append(format_ratios(loader_ratios(res)))
    return "\n".join(lines)


# ===================================================================================================== bench-eval
# ``python -m vla_bridge bench-eval``: frames/s of the evaluation's batched action inference
# (``evaluation.BatchedActionPredictor``: one decode call per batch, greedy, preallocated KV cache, 7 new tokens) vs
# per-frame ``model.predict_action`` on the SAME frames (held-out episodes of the embedded dataset, mixed
# instructions), and a check that both give identical actions. The model is the tiny base cached under
# ``<data_dir>/tiny_vla_base`` or the shipped ``assets/tiny_vla_base``, else a default-size tiny VLA with random
# weights (inference cost does not depend on the weights).
#
# Both rows of a ratio run at the same torch thread count: the headline at the evaluation's (the notebook runs
# ``EvalConfig(threads=2)``), and the same table at ``also_threads`` (1 by default), since the per-frame path gains
# little from a second thread. After a warm-up at every thread count, the rows are timed ``repeats`` times
# interleaved and the best time of each is kept: on a shared machine another process can take a core at any moment,
# and a 2-thread run pays for it twice (its threads wait on each other), so the load average is printed too.

GOAL_EVAL_SPEEDUP = 5.0
EVAL_THREADS = 2       # the notebook's evaluation cells: EvalConfig(threads=2)


def _bench_frames(ds, split, frames: int) -> tuple[list, list]:
    """``frames`` frames of held-out episodes, a few from each (every 5th frame), the episodes taken round-robin
    over the held-out groups (mixed instructions and prompt lengths even for a few frames); only the episodes that
    contribute a frame are decoded."""
    groups = [list(g[:8]) for g in split.eval.values()]
    eps = [e for tier in itertools.zip_longest(*groups) for e in tier if e is not None] or list(split.train[:16])
    per_ep = max(1, -(-int(frames) // max(1, len(eps))))
    eps = eps[:-(-int(frames) // per_ep)]
    data = load_episodes(ds, eps)
    images, instructions = [], []
    for e in eps:
        d = data[e]
        for k in range(min(per_ep, len(d.images))):
            images.append(d.images[(k * 5) % len(d.images)])
            instructions.append(d.instruction)
    return images[:frames], instructions[:frames]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_eval(data_dir: str = "data", frames: int = 64, batch_size: int = 64, threads: int | None = EVAL_THREADS,
               per_frame_frames: int | None = None, unnorm_key: str = "demo_world", seed: int = 0,
               also_threads: Sequence[int] = (1,), repeats: int = 2) -> dict[str, Any]:
    """Time per-frame ``predict_action`` and the batched predictor (bucketed by prompt length, and left-padded) on
    ``frames`` frames at ``threads`` torch threads (None: torch's current count) and at each of ``also_threads``.
    Returns the headline rows of {name, frames, seconds, fps}, ``speedup`` (bucketed / per-frame frames/s) and
    ``speedup_padded`` at ``threads``, ``goal``, whether the actions match (over every run), and ``by_threads``:
    the same figures per thread count. ``per_frame_frames``: time per-frame on only the first N frames."""
    prev = torch.get_num_threads()
    counts = list(dict.fromkeys([int(threads or prev)] + [int(t) for t in also_threads if t]))
    try:
        torch.set_num_threads(counts[0])
        root = ensure_demo_dataset(data_dir).root
        ds = st.open_dataset(root, probe=False)
        split = make_split(ds)
        cached = [d for d in (Path(data_dir) / "tiny_vla_base", SHIPPED_BASE) if (d / "config.json").is_file()]
        if cached:
            processor, model = load_openvla(str(cached[0]), precision="fp32", verbose=False)
            model_desc = f"tiny base {cached[0]}"
        else:
            model, processor = build_tiny_vla(seed=seed)
            model_desc = "default-size tiny VLA, random weights (no cached base; speed does not depend on weights)"
        stats = compute_action_stats(ds, split.train, source="stream", cache_dir=Path(data_dir) / "action_stats")
        register_dataset_statistics(model, unnorm_key, norm_stats_entry(stats))
        model.eval()
        images, instructions = _bench_frames(ds, split, frames)
        n = len(images)
        n_ref = min(n, int(per_frame_frames or n))

        batched = BatchedActionPredictor(model, processor, unnorm_key, center_crop=True, max_batch_size=batch_size)
        padded = BatchedActionPredictor(model, processor, unnorm_key, center_crop=True, max_batch_size=batch_size,
                                        padding=True)
        lengths = len({len(batched.prompt_ids(i)) for i in instructions})
        runs = {"per-frame": lambda: per_frame_predict(model, processor, images[:n_ref], instructions[:n_ref],
                                                       unnorm_key, True),
                "bucketed": lambda: batched.predict(images, instructions),
                "padded": lambda: padded.predict(images, instructions)}
        by_threads, identical = [], {"bucketed": True, "padded": True}
        load_before = os.getloadavg()
        for t in counts:
            torch.set_num_threads(t)
            batched.predict(images[:4], instructions[:4])                 # warm-up (first-call allocations)
            per_frame_predict(model, processor, images[:1], instructions[:1], unnorm_key, True)
            best: dict[str, float] = {}
            batched.calls = padded.calls = 0
            for _ in range(max(1, int(repeats))):
                out = {}
                for name, fn in runs.items():
                    out[name], secs = _timed(fn)
                    best[name] = min(secs, best.get(name, float("inf")))
                for name in identical:
                    identical[name] &= bool(np.array_equal(out[name][:n_ref], out["per-frame"]))
            reps = max(1, int(repeats))
            rows = [{"name": "per-frame predict_action", "frames": n_ref, "seconds": best["per-frame"]},
                    {"name": f"batched, bucketed: {lengths} prompt lengths, {batched.calls // reps} call(s)",
                     "frames": n, "seconds": best["bucketed"]},
                    {"name": f"batched, left-padded: {padded.calls // reps} call(s)", "frames": n,
                     "seconds": best["padded"]}]
            for r in rows:
                r["fps"] = r["frames"] / r["seconds"] if r["seconds"] > 0 else float("nan")
            by_threads.append({"threads": t, "rows": rows, "speedup": rows[1]["fps"] / rows[0]["fps"],
                               "speedup_padded": rows[2]["fps"] / rows[0]["fps"]})
        load_after = os.getloadavg()
    finally:
        torch.set_num_threads(prev)
    head = by_threads[0]
    per_frame_best = max(b["rows"][0]["fps"] for b in by_threads)
    return {"model": model_desc, "dataset": str(root), "frames": n, "per_frame_frames": n_ref,
            "instructions": len(set(instructions)), "prompt_lengths": lengths, "batch_size": batch_size,
            "chunk_size": batched.chunk_size, "repeats": max(1, int(repeats)), "threads": head["threads"],
            "rows": head["rows"], "speedup": head["speedup"], "speedup_padded": head["speedup_padded"],
            "goal": GOAL_EVAL_SPEEDUP, "by_threads": by_threads,
            "speedup_vs_best_per_frame": head["rows"][1]["fps"] / per_frame_best,
            "identical_bucketed": identical["bucketed"], "identical_padded": identical["padded"],
            "load_average": [round(load_before[0], 2), round(load_after[0], 2)], "cpus": os.cpu_count()}


def format_bench_eval(res: dict[str, Any]) -> str:
    lines = [f"eval inference benchmark: {res['model']}",
             f"{res['frames']} frames of held-out episodes ({res['instructions']} distinct instructions), batch "
             f"{res['batch_size']}, prefill chunks of {res.get('chunk_size', '-')} frames; best of "
             f"{res.get('repeats', 1)} interleaved run(s) per row after a warm-up; 1-min load average "
             f"{'/'.join(f'{x:.1f}' for x in res.get('load_average', []))} (before/after) on {res.get('cpus')} CPUs"]
    blocks = res.get("by_threads") or [{"threads": res["threads"], "rows": res["rows"], "speedup": res["speedup"],
                                        "speedup_padded": res["speedup_padded"]}]
    for b in blocks:
        lines.append(f"{str(b['threads']) + ' torch thread(s), every row':<50}{'frames':>8}{'seconds':>10}"
                     f"{'frames/s':>10}")
        for r in b["rows"]:
            lines.append(f"  {r['name']:<48}{r['frames']:>8}{r['seconds']:>10.2f}{r['fps']:>10.1f}")
    goal = res.get("goal", GOAL_EVAL_SPEEDUP)
    ok = "meets" if res["speedup"] >= goal else "MISSES"
    lines.append(f"batched / per-frame at {res['threads']} torch thread(s): {res['speedup']:.1f}x bucketed, "
                 f"{res['speedup_padded']:.1f}x padded ({ok} the ≥ {goal:g}x goal)")
    for b in blocks[1:]:
        lines.append(f"  at {b['threads']} torch thread(s): {b['speedup']:.1f}x bucketed, "
                     f"{b['speedup_padded']:.1f}x padded")
    if len(blocks) > 1:
        lines.append(f"  batched at {res['threads']} thread(s) vs per-frame at its fastest thread count: "
                     f"{res['speedup_vs_best_per_frame']:.1f}x")
    lines.append(f"identical actions to per-frame predict_action: bucketed {'yes' if res['identical_bucketed'] else 'NO'}"
                 f", padded {'yes' if res['identical_padded'] else 'NO'}")
    return "\n".join(lines)
