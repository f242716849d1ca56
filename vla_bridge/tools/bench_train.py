"""``python -m vla_bridge bench-train [--processes N]``: tiny-VLA optimizer steps/s, samples/s and peak RSS on this
machine, in one process and (``--processes N``) in N data-parallel processes at the same global batch, side by side.

Measured on the real path: the embedded dataset streamed through ``TrainingStream`` (one episode shard per process),
the tiny VLA wrapped with the notebook's LoRA config, the training configuration from the notebook's parameters
(``finetune.train_config``), the shared ``training.train`` loop (DDP over gloo on a CPU). The first ``warmup`` steps
are excluded from the rate. The N-process row runs under ``accelerate launch``, the torch threads split between the
processes, so the rows use the same cores; a middle row (one process with the N-process row's threads per process)
separates what the processes do from what the thread count does (on a small busy CPU, torch's intra-op threads
wait on each other: fewer threads per process can be faster by itself).

Like ``__main__``, this is a command: it may use the top layer (``finetune``) for the one parameter → training map.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from ..config import resolve_run_config
from ..data.build import ensure_demo_dataset
from ..data.splits import make_split
from ..data.stats import compute_action_stats, norm_stats_entry
from ..data.stream import TrainingStream
from ..finetune import launch_command, launched_world, run_launcher, train_config
from ..hardware import Decision
from ..models.openvla import attach_lora
from ..models.tiny_vla import build_tiny_vla
from ..training import train


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _measure(data_dir: str, steps: int, batch_size: int, rank: int, threads: int, warmup: int,
             image_size: int) -> dict:
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
    root = ensure_demo_dataset(data_dir).root
    split = make_split(root)
    stream = TrainingStream(root, episodes=split.train, image_size=image_size, seed=0, shard=(proc, world))
    stats = {run_cfg.unnorm_key: norm_stats_entry(compute_action_stats(stream.ds, split.train))}
    model, processor = build_tiny_vla(norm_stats=stats, image_size=image_size)
    model = attach_lora(model, rank, run_cfg.lora_alpha, seed=0)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = train_config(run_cfg, run_name="bench", outputs_dir=out, log_every=1, save_every=10**9, progress=False)
        t0 = time.perf_counter()
        train(model, processor, stream, stats, cfg, on_log=lambda row: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t0
    timed = stamps[-1] - stamps[warmup - 1] if len(stamps) > warmup else total
    n = max(1, len(stamps) - warmup)
    return {"processes": world, "steps": steps, "batch_size": batch_size, "batch_per_process": batch_size // world,
            "threads": threads, "lora_rank": rank, "warmup": warmup, "steps_per_s": n / timed,
            "samples_per_s": n * batch_size / timed, "s_per_step": timed / n, "total_s": total,
            "peak_rss_mb": peak_rss_mb()}


def bench_train_worker(out_json: str, data_dir: str, steps: int, batch_size: int, rank: int, threads: int,
                       warmup: int = 5, image_size: int = 128) -> None:
    """One process of the N-process row; process 0 writes the result to ``out_json``."""
    res = _measure(data_dir, steps, batch_size, rank, threads, warmup, image_size)
    if launched_world()[0] == 0:
        Path(out_json).write_text(json.dumps(res))


def bench_train(data_dir: str = "data", steps: int = 30, batch_size: int = 16, rank: int = 32, threads: int = 2,
                warmup: int = 5, image_size: int = 128, processes: int = 1) -> dict:
    """The 1-process row and, with ``processes`` > 1, the N-process row at the same global batch and cores."""
    if steps <= warmup:
        raise ValueError(f"--steps {steps} must exceed the {warmup} warm-up steps")
    rows = [_measure(data_dir, steps, batch_size, rank, threads, warmup, image_size)]
    if processes > 1:
        per = max(1, threads // processes)
        if per != threads:  # the same threads per process as the N-process row: what the split of threads alone does
            rows.append(_measure(data_dir, steps, batch_size, rank, per, warmup, image_size))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            run_launcher(launch_command(processes, None,
                                        extra=["bench-train", "--worker-json", str(out), "--data-dir", data_dir,
                                               "--steps", str(steps), "--batch-size", str(batch_size),
                                               "--rank", str(rank), "--threads", str(per)]), quiet=True)
            rows.append(json.loads(out.read_text()))
    return {"rows": rows, **rows[0]}


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
    return "\n".join(lines)
