"""``python -m vla_bridge bench-all [--size smallest|default] [--out PATH]``: every benchmark in one run, one JSON.

Runs, in this order, each with its own warm-up and its rows measured side by side:

1. ``bench-loader`` on the embedded dataset (bare stream, pipeline, DataLoader workers, the tiny trainer on
   in-memory frames; ``tools/bench.py``);
2. ``bench-train`` (1 process, and 2 data-parallel processes at the same global batch and cores;
   ``tools/bench_train.py``);
3. ``bench-eval`` (per-frame ``predict_action`` vs the batched predictor; ``tools/bench.py``).

Each prints its usual table and its ``RATIO`` lines (``tools/ratios.py``); the JSON (default
``outputs/bench/bench_all.json``) has, per bench, its parameters, rows, ratios ``{name, value, goal, op, meets}``
and the full result, plus the size, the versions and the hardware (torch threads, CPU count, load average: on a
shared machine the absolute figures move with the load, the ratios of rows timed side by side much less).

``--size smallest`` is a plumbing check (CI runs it, and asserts only that every ratio in ``EXPECTED_RATIOS`` was
printed, never a value): a handful of frames and steps on a small embedded dataset (``SMALLEST_EPISODES``); its
numbers mean nothing, and the JSON says ``"size": "smallest"``. ``--size default`` is each command's default size
(on the default embedded dataset).

A bench that fails is reported (its traceback on stderr, ``"error"`` in the JSON) and the others still run; the
exit status is then 1.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import inspect
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable, Mapping

import torch

from ..config import write_json
from . import bench as _bench
from .bench import bench_eval, bench_loader, format_bench, format_bench_eval, loader_ratios
from .bench_train import bench_train, format_bench_train, train_ratios
from .ratios import Ratio, format_ratios

DEFAULT_OUT = "outputs/bench/bench_all.json"

# Every ratio bench-all prints, at both sizes (CI greps for each: setup.sh --test keeps the same list).
EXPECTED_RATIOS = ("bench-loader.overhead", "bench-loader.pipeline_vs_trainer", "bench-loader.workers_vs_bare",
                   "bench-train.processes", "bench-eval.speedup")

# The smallest embedded dataset that keeps every split non-empty (~10 training episodes, ~200 frames; built in
# seconds where the default build takes minutes).
SMALLEST_EPISODES = {"pretrain": 1, "finetune": 10, "heldout": 1, "heldout_family": 1, "unseen_color": 1,
                     "paraphrase": 1}

SIZES: dict[str, dict[str, Any]] = {
    "smallest": {
        "episodes": SMALLEST_EPISODES,
        "bench-loader": {"frames": 96, "warmup": 24, "workers": 2, "batch_size": 16, "trainer_steps": 4,
                         "trainer_warmup": 1},
        "bench-train": {"steps": 4, "warmup": 1, "batch_size": 16, "threads": 2, "processes": 2},
        "bench-eval": {"frames": 8, "batch_size": 8},
    },
    "default": {
        "episodes": None,
        "bench-loader": {"frames": 2000, "warmup": 200, "workers": 2, "batch_size": 16, "trainer_steps": 10,
                         "trainer_warmup": 3},
        "bench-train": {"steps": 30, "warmup": 5, "batch_size": 16, "threads": 2, "processes": 2},
        "bench-eval": {"frames": 64, "batch_size": 64},
    },
}


def eval_ratios(res: Mapping[str, Any]) -> list[Ratio]:
    """``bench-eval.speedup``: the batched (bucketed) predictor's frames/s ÷ per-frame ``predict_action``'s."""
    goal = float(res.get("goal", _bench.GOAL_EVAL_SPEEDUP))
    return [Ratio("bench-eval.speedup", float(res["speedup"]), goal, "≥",
                  "batched (bucketed) frames/s ÷ per-frame predict_action frames/s")]


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with the figures."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "accelerate", "lerobot", "torchcodec", "numpy"):
        try:
            versions[pkg] = _md.version(pkg)
        except _md.PackageNotFoundError:
            versions[pkg] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    cuda = torch.cuda.is_available()
    return {"versions": versions, "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda
            else []}


def _split_rows(res: Mapping[str, Any]) -> tuple[list, dict]:
    return list(res.get("rows", [])), {k: v for k, v in res.items() if k != "rows"}


def _run_one(name: str, params: dict, run: Callable[[], dict], fmt: Callable[[dict], str],
             ratios_of: Callable[[dict], list[Ratio]], extra_lines: bool, report: dict) -> bool:
    print(f"\n=== {name} ===", flush=True)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"params": params}
    try:
        res = run()
        ratios = ratios_of(res)
        print(fmt(res))
        if extra_lines:  # the bench's own format does not print its RATIO lines
            print(format_ratios(ratios))
        rows, rest = _split_rows(res)
        entry.update(rows=rows, ratios=[r.as_dict() for r in ratios], result=rest)
        ok = True
    except Exception as exc:  # noqa: BLE001 - report it, run the other benches, exit 1 at the end
        traceback.print_exc()
        print(f"{name}: FAILED ({type(exc).__name__}: {exc})", flush=True)
        entry.update(rows=[], ratios=[], error=f"{type(exc).__name__}: {exc}")
        ok = False
    finally:
        torch.set_num_threads(threads)
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    report["benches"][name] = entry
    sys.stdout.flush()
    return ok


def bench_all(size: str = "smallest", out: str | os.PathLike = DEFAULT_OUT, data_dir: str = "data") -> tuple[dict, int]:
    """Run every bench at ``size``; write the JSON to ``out``; returns (the report, the exit status)."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {', '.join(SIZES)}")
    spec = SIZES[size]
    episodes = spec["episodes"]
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "size": size, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(), "data_dir": data_dir, "demo_episodes": episodes, "benches": {},
        "note": ("smallest: a plumbing check — a handful of frames and steps on a small dataset; the figures and "
                 "ratios mean nothing" if size == "smallest" else
                 "ratios of rows timed side by side in one run; absolute figures depend on the machine and its load"),
    }
    print(f"bench-all --size {size}: {len(EXPECTED_RATIOS)} ratios, JSON → {out}", flush=True)

    lp = dict(spec["bench-loader"])
    ok = _run_one("bench-loader", {"dataset": "embedded", "data_dir": data_dir, "demo_episodes": episodes, **lp},
                  lambda: bench_loader("embedded", data_dir=data_dir, demo_episodes=episodes, **lp),
                  format_bench, loader_ratios, False, report)
    tp = dict(spec["bench-train"])
    ok &= _run_one("bench-train", {"data_dir": data_dir, "episodes": episodes, **tp},
                   lambda: bench_train(data_dir, episodes=episodes, **tp), format_bench_train, train_ratios, False,
                   report)
    ep = dict(spec["bench-eval"])
    if episodes is not None and "episodes" in inspect.signature(bench_eval).parameters:
        ep["episodes"] = episodes  # bench_eval builds its dataset itself: the small one when it can be told to
    ok &= _run_one("bench-eval", {"data_dir": data_dir, **ep}, lambda: bench_eval(data_dir, **ep),
                   format_bench_eval, eval_ratios, True, report)

    report["ratios"] = [r for b in report["benches"].values() for r in b["ratios"]]
    report["all_meet"] = all(r["meets"] for r in report["ratios"]) and bool(report["ratios"])
    missing = [n for n in EXPECTED_RATIOS if n not in {r["name"] for r in report["ratios"]}]
    report["missing_ratios"] = missing
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    path = write_json(out, report)
    meets = sum(r["meets"] for r in report["ratios"])
    print(f"\nbench-all --size {size}: {len(report['ratios'])} ratios ({meets} meet their goals"
          + (f"; missing: {', '.join(missing)}" if missing else "") + f") in {report['wall_s']:.0f} s; "
          f"saved {path}", flush=True)
    return report, 0 if ok and not missing else 1
