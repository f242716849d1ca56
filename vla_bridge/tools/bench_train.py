"""``python -m vla_bridge bench-train [--processes N]``: tiny-VLA optimizer steps/s, samples/s and peak RSS on this
machine, in one process and (``--processes N``) in N data-parallel processes at the same global batch, side by side.

Measured on the real path: the embedded dataset streamed through ``TrainingStream`` (one episode shard per process),
the tiny VLA wrapped with the notebook's LoRA config, the training configuration from the notebook's parameters
(``finetune.train_config``), the shared ``training.train`` loop (DDP over gloo on a CPU). The first ``warmup`` steps
are excluded from the rate. The N-process row runs under ``accelerate launch``, the torch threads split between the
processes, so the rows use the same cores; a middle row (one process with the N-process row's threads per process)
separates what the processes do from what the thread count does (on a small busy CPU, torch's intra-op threads
wait on each other: fewer threads per process can be faster by itself).

Ratio (``train_ratios``; printed as ``RATIO bench-train.processes = …``, see ``tools/ratios.py``): only with
``--processes N`` > 1, the N-process row's samples/s ÷ the 1-process row's, goal ≥ ``GOAL_PROCESS_SCALING`` (0.8)
× the devices the N processes add: on a CPU they share the 1-process row's cores, so the goal is ≥ 0.8× (data
parallelism over gloo may cost at most a fifth of the throughput on the same cores; it buys nothing there, it is
the path a multi-GPU machine takes); on N GPUs, one each, ≥ 0.8·N×. One process has no ratio of its own: its
absolute figures are printed, and what the one-process trainer consumes is held against the input pipeline by
``bench-loader`` (``bench-loader.pipeline_vs_trainer``, measured with ``trainer_throughput`` below: the same loop
on in-memory frames).

Like ``__main__``, this is a command: it may use the top layer (``finetune``) for the one parameter → training map.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..config import resolve_run_config
from ..data.build import ensure_demo_dataset
from ..data.splits import make_split
from ..data.stats import compute_action_stats, norm_stats_entry
from ..data.stream import TrainingStream
from ..finetune import launch_command, launched_world, run_launcher, train_config
from ..hardware import Decision
from ..models.openvla import attach_lora, model_image_size
from ..models.tiny_vla import build_tiny_vla
from ..training import train
from .ratios import Ratio, format_ratios, ratio

GOAL_PROCESS_SCALING = 0.8   # N processes ≥ 0.8 × the devices they add × one process's samples/s


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _tiny_lora(stats: Mapping[str, Any], rank: int, alpha: int, image_size: int | None = None):
    """The tiny VLA (random weights: speed does not depend on them) wrapped with the notebook's LoRA config."""
    model, processor = build_tiny_vla(norm_stats=dict(stats), **({} if image_size is None else
                                                                 {"image_size": image_size}))
    return attach_lora(model, rank, alpha, seed=0), processor


def _timed_train(model, processor, frames, stats: Mapping[str, Any], run_cfg, warmup: int) -> dict:
    """``training.train`` with the notebook's training configuration (``finetune.train_config``) for
    ``run_cfg.max_steps`` steps; the rate over the steps after the first ``warmup``."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = train_config(run_cfg, run_name="bench", outputs_dir=out, log_every=1, save_every=10**9, progress=False)
        t0 = time.perf_counter()
        train(model, processor, frames, stats, cfg, on_log=lambda row: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t0
    timed = stamps[-1] - stamps[warmup - 1] if len(stamps) > warmup else total
    n = max(1, len(stamps) - warmup)
    return {"n": n, "timed": timed, "total": total}


def _measure(data_dir: str, steps: int, batch_size: int, rank: int, threads: int, warmup: int,
             image_size: int, episodes: Any = None) -> dict:
    """One timing in this process: alone, or as one of the processes a launcher started (then ``batch_size`` is
    the global batch, split over them, and the rates count every process's samples)."""
    proc, world = launched_world()
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {world} processes: the global batch is "
                         f"split evenly over them")
    torch.set_num_threads(threads)
    run_cfg = resolve_run_config({"POLICY": "tiny", "DATASET": "embedded", "DATA_DIR": data_dir, "MAX_STEPS": steps,
                                  "BATCH_SIZE": batch_size // world, "GRAD_ACCUM": 1, "LORA_RANK": rank,
                                  "WARMUP_STEPS": 2}, hub=Decision("no", "bench-train runs offline"))
    root = ensure_demo_dataset(data_dir, episodes).root
    split = make_split(root)
    stream = TrainingStream(root, episodes=split.train, image_size=image_size, seed=0, shard=(proc, world))
    stats = {run_cfg.unnorm_key: norm_stats_entry(compute_action_stats(stream.ds, split.train))}
    model, processor = _tiny_lora(stats, rank, run_cfg.lora_alpha, image_size)
    t = _timed_train(model, processor, stream, stats, run_cfg, warmup)
    n, timed = t["n"], t["timed"]
    return {"processes": world, "steps": steps, "batch_size": batch_size, "batch_per_process": batch_size // world,
            "threads": threads, "lora_rank": rank, "warmup": warmup, "steps_per_s": n / timed,
            "samples_per_s": n * batch_size / timed, "s_per_step": timed / n, "total_s": t["total"],
            "peak_rss_mb": peak_rss_mb(), "device": "cuda" if torch.cuda.is_available() else "cpu"}


class InMemoryFrames:
    """A ``training.FrameSource`` over frames already in memory, cycled: the training loop with no loading."""

    def __init__(self, frames: Sequence[Mapping[str, Any]]):
        if not frames:
            raise ValueError("InMemoryFrames needs at least one frame")
        self.frames = list(frames)

    def iterate(self, start: int = 0) -> Iterator[Mapping[str, Any]]:
        i = int(start)
        while True:
            yield self.frames[i % len(self.frames)]
            i += 1


def trainer_throughput(frames_at: Callable[[int, int], Sequence[Mapping[str, Any]]], action_stats: Mapping[str, Any],
                       steps: int = 10, warmup: int = 3, threads: int | None = None) -> dict:
    """Samples/s the tiny path's training loop consumes when loading costs nothing: the notebook's tiny-CPU
    configuration (``resolve_run_config(POLICY="tiny")``: batch 16, LoRA r=32, image augmentation; only
    ``MAX_STEPS`` changed) through ``training.train`` (augmentation, prompt + tokenize, collate, forward, backward,
    optimizer step) on two batches of frames held in memory and cycled (``InMemoryFrames``).

    ``frames_at(image_size, n)``: ``n`` pipeline frames at the model's image size (the tiny VLA's; asked once the
    model is built). ``action_stats``: the norm_stats entry of the frames' dataset. ``threads``: torch threads for
    the loop (None: torch's current count, what the notebook's training runs with); restored afterwards."""
    if steps <= warmup or warmup < 1:
        raise ValueError(f"trainer_throughput: need steps ({steps}) > warmup ({warmup}) ≥ 1")
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        run_cfg = resolve_run_config({"POLICY": "tiny", "DATASET": "embedded", "MAX_STEPS": steps},
                                     hub=Decision("no", "the trainer benchmark runs offline"))
        stats = {run_cfg.unnorm_key: dict(action_stats)}
        model, processor = _tiny_lora(stats, run_cfg.lora_rank, run_cfg.lora_alpha)
        size = model_image_size(processor)
        per_step = run_cfg.batch_size * run_cfg.grad_accum
        frames = list(frames_at(size, 2 * per_step))
        t = _timed_train(model, processor, InMemoryFrames(frames), stats, run_cfg, warmup)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
    n, timed = t["n"], t["timed"]
    return {"steps": steps, "warmup": warmup, "batch_size": run_cfg.batch_size, "grad_accum": run_cfg.grad_accum,
            "lora_rank": run_cfg.lora_rank, "image_size": size, "image_aug": run_cfg.image_aug, "threads": used,
            "in_memory_frames": len(frames), "steps_per_s": n / timed, "samples_per_s": n * per_step / timed,
            "s_per_step": timed / n, "samples_timed": n * per_step, "seconds_timed": timed, "total_s": t["total"],
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def bench_train_worker(out_json: str, data_dir: str, steps: int, batch_size: int, rank: int, threads: int,
                       warmup: int = 5, image_size: int = 128, episodes: Any = None) -> None:
    """One process of the N-process row; process 0 writes the result to ``out_json``."""
    res = _measure(data_dir, steps, batch_size, rank, threads, warmup, image_size, episodes)
    if launched_world()[0] == 0:
        Path(out_json).write_text(json.dumps(res))


def bench_train(data_dir: str = "data", steps: int = 30, batch_size: int = 16, rank: int = 32, threads: int = 2,
                warmup: int = 5, image_size: int = 128, processes: int = 1, episodes: Any = None) -> dict:
    """The 1-process row and, with ``processes`` > 1, the N-process row at the same global batch and cores.
    ``episodes``: the embedded dataset's size (``data.build.resolve_episode_counts``; None: the default build)."""
    if steps <= warmup or warmup < 1:
        raise ValueError(f"--steps {steps} must exceed the {warmup} warm-up steps (at least 1)")
    prev = torch.get_num_threads()
    try:
        rows = _rows(data_dir, steps, batch_size, rank, threads, warmup, image_size, processes, episodes)
    finally:
        torch.set_num_threads(prev)  # _measure sets the rows' thread counts
    return {"rows": rows, **rows[0], "episodes": episodes}


def _rows(data_dir: str, steps: int, batch_size: int, rank: int, threads: int, warmup: int, image_size: int,
          processes: int, episodes: Any) -> list[dict]:
    rows = [_measure(data_dir, steps, batch_size, rank, threads, warmup, image_size, episodes)]
    if processes > 1:
        per = max(1, threads // processes)
        if per != threads:  # the same threads per process as the N-process row: what the split of threads alone does
            rows.append(_measure(data_dir, steps, batch_size, rank, per, warmup, image_size, episodes))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            run_launcher(launch_command(processes, None,
                                        extra=["bench-train", "--worker-json", str(out), "--data-dir", data_dir,
                                               "--steps", str(steps), "--batch-size", str(batch_size),
                                               "--rank", str(rank), "--threads", str(per), "--warmup", str(warmup),
                                               "--image-size", str(image_size)]
                                        + (["--episodes", _episodes_arg(episodes)] if episodes is not None else [])),
                         quiet=True)
            rows.append(json.loads(out.read_text()))
    return rows


def _episodes_arg(episodes: Any) -> str:
    """``episodes`` as the CLI's ``--episodes`` text (an int, or split=n,...)."""
    if isinstance(episodes, Mapping):
        return ",".join(f"{k}={int(v)}" for k, v in episodes.items())
    return str(episodes)


def train_ratios(r: Mapping[str, Any]) -> list[Ratio]:
    """``bench-train.processes`` when an N-process row was timed (see the module docstring); none for 1 process."""
    rows = r.get("rows", [r])
    if len(rows) < 2:
        return []
    n = rows[-1]
    devices = n["processes"] if n.get("device") == "cuda" and torch.cuda.device_count() >= n["processes"] else 1
    where = f"on {devices} GPUs" if devices > 1 else "on the same cores"
    return [ratio("bench-train.processes", n["samples_per_s"], rows[0]["samples_per_s"], GOAL_PROCESS_SCALING * devices,
                  "≥", f"{n['processes']} data-parallel processes' samples/s ÷ 1 process's, {where}")]


def format_bench_train(r: dict) -> str:
    rows = r.get("rows", [r])
    lines = [f"tiny VLA + LoRA r={r['lora_rank']}, global batch {r['batch_size']}, {r['steps']} steps "
             f"(first {r.get('warmup', 5)} excluded), {r['threads']} torch threads in all",
             f"  {'processes':>9} {'batch/proc':>10} {'threads/proc':>12} {'steps/s':>8} {'s/step':>7} "
             f"{'samples/s':>9} {'peak RSS/proc':>13} {'wall':>7}"]
    for x in rows:
        lines.append(f"  {x['processes']:>9} {x.get('batch_per_process', x['batch_size']):>10} {x['threads']:>12} "
                     f"{x['steps_per_s']:>8.2f} {x['s_per_step']:>7.3f} {x['samples_per_s']:>9.1f} "
                     f"{x['peak_rss_mb']:>10.0f} MB {x['total_s']:>6.1f}s")
    if len(rows) > 1:
        n = rows[-1]
        lines.append(f"  {n['processes']} processes / 1 process: {n['samples_per_s'] / rows[0]['samples_per_s']:.2f}× "
                     f"samples/s on the same cores (on N GPUs each process has its own device)")
        if len(rows) > 2:
            lines.append(f"  {n['processes']} processes / 1 process at {n['threads']} thread(s) each: "
                         f"{n['samples_per_s'] / rows[1]['samples_per_s']:.2f}× (the processes alone: the rest of the "
                         f"first ratio is the thread count's doing)")
    lines.append("  wall includes the stream start and, for N processes, their model and stream set-up")
    ratios = train_ratios(r)
    if ratios:
        lines.append(format_ratios(ratios))
    return "\n".join(lines)
