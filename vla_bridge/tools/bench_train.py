"""``python -m vla_bridge bench-train``: tiny-VLA optimizer steps/s, samples/s and peak RSS on this machine.

Measured on the real path: the embedded dataset streamed through ``TrainingStream``, the tiny VLA wrapped with the
notebook's LoRA config, the shared ``training.train`` loop. The first ``warmup`` steps are excluded from the rate.
"""

from __future__ import annotations

import resource
import tempfile
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def bench_train(data_dir: str = "data", steps: int = 30, batch_size: int = 16, rank: int = 32, threads: int = 2,
                warmup: int = 5, image_size: int = 128) -> dict:
    from ..data.build import ensure_demo_dataset
    from ..data.splits import make_split
    from ..data.stats import compute_action_stats, norm_stats_entry
    from ..data.stream import TrainingStream
    from ..models.openvla import attach_lora
    from ..models.tiny_vla import build_tiny_vla
    from ..training import TrainConfig, train

    torch.set_num_threads(threads)
    root = ensure_demo_dataset(data_dir).root
    split = make_split(root)
    stream = TrainingStream(root, episodes=split.train, image_size=image_size, seed=0)
    stats = {"demo_world": norm_stats_entry(compute_action_stats(stream.ds, split.train))}
    model, processor = build_tiny_vla(norm_stats=stats, image_size=image_size)
    model = attach_lora(model, rank, 16, seed=0)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(run_name="bench", outputs_dir=out, max_steps=steps, batch_size=batch_size, grad_accum=1,
                          log_every=1, save_every=10**9, warmup_steps=2, unnorm_key="demo_world", progress=False)
        t0 = time.perf_counter()
        train(model, processor, stream, stats, cfg, on_log=lambda row: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t0
    timed = stamps[-1] - stamps[warmup - 1] if len(stamps) > warmup else total
    n = max(1, len(stamps) - warmup)
    return {"steps": steps, "batch_size": batch_size, "threads": threads, "lora_rank": rank,
            "steps_per_s": n / timed, "samples_per_s": n * batch_size / timed, "s_per_step": timed / n,
            "total_s": total, "peak_rss_mb": peak_rss_mb()}


def format_bench_train(r: dict) -> str:
    return (f"tiny VLA + LoRA r={r['lora_rank']}, batch {r['batch_size']}, {r['threads']} torch threads, "
            f"{r['steps']} steps (first 5 excluded)\n"
            f"  {r['steps_per_s']:.2f} optimizer steps/s = {r['s_per_step']:.3f} s/step\n"
            f"  {r['samples_per_s']:.1f} samples/s\n"
            f"  peak RSS {r['peak_rss_mb']:.0f} MB; wall {r['total_s']:.1f} s including stream start")
