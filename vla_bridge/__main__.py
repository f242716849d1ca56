"""Command line: ``python -m vla_bridge <command>``; run with ``-h`` for the list."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import hardware, preflight
from .config import EMBEDDED_UNNORM_KEY, resolve_run_config, write_json
from .data.build import ensure_demo_dataset
from .export import ExportError, export_policy
from .finetune import cli_train
from .plots import check_figures
from .pretrain import SHIPPED_BASE, PretrainParams, describe_base, ensure_tiny_base
from .tools.bench import EVAL_THREADS, bench_eval, bench_loader, format_bench, format_bench_eval
from .tools.bench_all import DEFAULT_OUT as BENCH_ALL_OUT
from .tools.bench_all import SIZES as BENCH_SIZES
from .tools.bench_all import bench_all, eval_ratios
from .tools.bench_train import bench_train, bench_train_worker, format_bench_train
from .tools.ratios import format_ratios
from .tools.runner import execute_notebook, load_params_file, parse_kv


def _cmd_run_notebook(args: argparse.Namespace) -> int:
    params = load_params_file(args.params_file)
    params.update(parse_kv(args.param or []))
    execute_notebook(args.notebook, args.out, params, kernel_name=args.kernel)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    params = load_params_file(args.params)
    params.update(parse_kv(args.param or []))
    return cli_train(params)


def _cmd_check_figures(args: argparse.Namespace) -> int:
    files, problems = check_figures(*args.dirs)
    if not files:
        print(f"check-figures: no PNG under {', '.join(args.dirs)}: run the notebook first", file=sys.stderr)
        return 1
    for msg in problems:
        print(f"check-figures: {msg}", file=sys.stderr)
    print(f"check-figures: {len(files) - len(problems)} of {len(files)} figures show content")
    return 1 if problems else 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    cfg = resolve_run_config({"POLICY": args.policy, "DATASET": args.dataset})
    results = preflight.run_preflight(cfg.policy, cfg.dataset, cfg.model_id, hardware.Decision(cfg.hub, cfg.hub_reason),
                                     cfg.outputs_dir)
    print(json.dumps(hardware.detect_hardware().as_dict(), indent=2))
    print(cfg.summary())
    print(preflight.format_checks(results))
    return 0 if all(r.ok or not r.required for r in results) else 1


def _cmd_demo_data(args: argparse.Namespace) -> int:
    build = ensure_demo_dataset(args.out, episodes=args.episodes, seed=args.seed, image_size=args.image_size,
                                force=args.force, progress=not args.quiet)
    print(build.describe())
    print("episodes per split: " + ", ".join(f"{k}={v}" for k, v in build.info["episodes_per_split"].items()))
    print(build.root)
    return 0


def _cmd_bench_loader(args: argparse.Namespace) -> int:
    res = bench_loader(args.dataset, root=args.root, frames=args.frames, image_size=args.image_size,
                       workers=args.workers, data_dir=args.data_dir, seed=args.seed, buffer_size=args.buffer_size,
                       default_threads=args.default_threads, batch_size=args.batch_size, split=args.split,
                       warmup=args.warmup, trainer_steps=args.trainer_steps, trainer_warmup=args.trainer_warmup,
                       demo_episodes=args.episodes)
    print(format_bench(res))
    if args.json:
        print(f"saved {write_json(args.json, res)}")
    return 0


def _cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    params = PretrainParams(steps=args.steps) if args.steps else PretrainParams()
    if args.ship and (params != PretrainParams() or args.unnorm_key != EMBEDDED_UNNORM_KEY):
        print(f"--ship rebuilds the default recipe's base (no --steps, --unnorm-key {EMBEDDED_UNNORM_KEY})")
        return 2
    out = SHIPPED_BASE if args.ship else f"{args.data_dir}/tiny_vla_base"
    path, info = ensure_tiny_base(out, args.unnorm_key, params, force=args.force or args.ship)
    print(f"{path}: {describe_base(info)}")
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    if args.worker_json:  # one of the processes of the multi-process row (started by bench_train itself)
        bench_train_worker(args.worker_json, args.data_dir, args.steps, args.batch_size, args.rank, args.threads,
                           warmup=args.warmup, image_size=args.image_size, episodes=args.episodes)
        return 0
    print(format_bench_train(bench_train(args.data_dir, args.steps, args.batch_size, args.rank, args.threads,
                                         warmup=args.warmup, image_size=args.image_size, processes=args.processes,
                                         episodes=args.episodes)))
    return 0


def _cmd_bench_eval(args: argparse.Namespace) -> int:
    res = bench_eval(args.data_dir, frames=args.frames, batch_size=args.batch_size, threads=args.threads or None,
                     also_threads=args.also_threads, repeats=args.repeats)
    print(format_bench_eval(res))
    print(format_ratios(eval_ratios(res)))
    if args.json:
        print(f"saved {write_json(args.json, res)}")
    return 0


def _cmd_bench_all(args: argparse.Namespace) -> int:
    return bench_all(args.size, args.out, data_dir=args.data_dir)[1]


def _cmd_export(args: argparse.Namespace) -> int:
    adapter = args.adapter or str(Path(args.outputs_dir) / "checkpoints" / args.run / "latest")
    try:
        result = export_policy(adapter, out_dir=args.out, base=args.base, unnorm_key=args.unnorm_key,
                               dtype=args.dtype, device=args.device, n_frames=args.frames,
                               outputs_dir=args.outputs_dir)
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vla_bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run-notebook", help="execute notebook.py headless with papermill")
    p.add_argument("--notebook", default="notebook.py")
    p.add_argument("--out", default="outputs/notebooks/notebook.executed.ipynb")
    p.add_argument("--params-file", default=None, help="JSON object of parameter overrides")
    p.add_argument("-p", "--param", action="append", help="NAME=VALUE override (repeatable)")
    p.add_argument("--kernel", default="python3")
    p.set_defaults(func=_cmd_run_notebook)

    p = sub.add_parser("train", help="the notebook's sections 3b-8 (split, statistics, load, LoRA, train, loss "
                       "curve) without Jupyter; works under accelerate launch / torchrun")
    p.add_argument("--params", default=None, help="JSON object of notebook parameters (NAME: value)")
    p.add_argument("-p", "--param", action="append", help="NAME=VALUE override (repeatable)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("check-figures", help="check that every PNG a run wrote shows content (no empty panels)")
    p.add_argument("dirs", nargs="+", help="folders to search for PNGs, e.g. outputs/figures/ci outputs/videos/ci")
    p.set_defaults(func=_cmd_check_figures)

    p = sub.add_parser("preflight", help="print hardware, the policy decision and the pre-flight checks")
    p.add_argument("--policy", default="auto")
    p.add_argument("--dataset", default="auto")
    p.set_defaults(func=_cmd_preflight)

    p = sub.add_parser("demo-data", help="build (or reuse) the embedded demo world's LeRobot v3.0 dataset")
    p.add_argument("--out", default="data", help="data directory; the dataset lands in OUT/demo_world/<key>/")
    p.add_argument("--episodes", default=None,
                   help="total episodes (split proportionally) or split=n,... (default: the tiny VLA's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--force", action="store_true", help="rebuild even when a complete build with the key exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("bench-loader", help="frames/s: bare streaming vs the training input pipeline")
    p.add_argument("dataset", nargs="?", default="embedded", help="embedded | hub id | local LeRobot v3.0 root")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200, help="untimed frames through each path first (cold caches)")
    p.add_argument("--image-size", type=int, default=224, help="model image size the pipeline resizes to")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the third row (0: skip)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the DataLoader row")
    p.add_argument("--split", choices=("train", "all"), default="train")
    p.add_argument("--buffer-size", type=int, default=1000, help="lerobot's shuffle buffer (frames)")
    p.add_argument("--root", default=None, help="local root of a hub-id dataset")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default-threads", action="store_true",
                   help="also time the bare stream with torch's default thread count (slow on small machines)")
    p.add_argument("--trainer-steps", type=int, default=10,
                   help="tiny-VLA LoRA steps on in-memory frames: what training consumes (0: skip that ratio)")
    p.add_argument("--trainer-warmup", type=int, default=3, help="untimed first trainer steps")
    p.add_argument("--episodes", default=None, help="size of the embedded dataset (as demo-data --episodes)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_bench_loader)

    p = sub.add_parser("pretrain-tiny", help="train (or reuse) the tiny VLA's base on the world's pretraining split")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--steps", type=int, default=0, help="0 → the default PretrainParams")
    p.add_argument("--unnorm-key", default="demo_world")
    p.add_argument("--force", action="store_true")
    p.add_argument("--ship", action="store_true",
                   help="rebuild the shipped base in assets/tiny_vla_base (the default recipe; commit the result)")
    p.set_defaults(func=_cmd_pretrain_tiny)

    p = sub.add_parser("bench-train", help="tiny-VLA optimizer steps/s, samples/s and peak RSS (1 vs N processes)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (each of N processes gets 1/N)")
    p.add_argument("--processes", type=int, default=1,
                   help="also time N data-parallel processes at the same global batch, side by side with 1")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps of each row")
    p.add_argument("--image-size", type=int, default=128, help="the tiny VLA's image size")
    p.add_argument("--episodes", default=None, help="size of the embedded dataset (as demo-data --episodes)")
    p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_bench_train)

    p = sub.add_parser("bench-eval", help="frames/s: batched evaluation inference vs per-frame predict_action")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=EVAL_THREADS,
                   help="torch threads for both rows of the headline ratio (default: the evaluation's; 0: torch's "
                        "default)")
    p.add_argument("--also-threads", type=int, nargs="*", default=[1],
                   help="also time both rows at these thread counts (none: only --threads)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timed runs per row, the best kept")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_bench_eval)

    p = sub.add_parser("bench-all", help="every benchmark (loader, train, eval) in one run: RATIO lines, one JSON")
    p.add_argument("--size", choices=tuple(BENCH_SIZES), default="default",
                   help="smallest: a plumbing check (CI; the figures mean nothing); default: each bench's size")
    p.add_argument("--out", default=BENCH_ALL_OUT, help="the JSON file")
    p.add_argument("--data-dir", default="data")
    p.set_defaults(func=_cmd_bench_all)

    p = sub.add_parser("export", help="merge a LoRA checkpoint into its base once, save it standalone, reload, check")
    p.add_argument("adapter", nargs="?", default=None,
                   help="adapter checkpoint directory (default: OUTPUTS_DIR/checkpoints/RUN/latest)")
    p.add_argument("--run", default="tiny-embedded", help="RUN_NAME whose latest checkpoint to export")
    p.add_argument("--outputs-dir", default="outputs")
    p.add_argument("--out", default=None, help="where the merged checkpoint goes (default: OUTPUTS_DIR/export/RUN/)")
    p.add_argument("--base", default=None, help="the base MODEL_ID (default: the one adapter_config.json records)")
    p.add_argument("--unnorm-key", default=None, help="default: the run's UNNORM_KEY (checkpoint.json)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: fp32 for the tiny VLA, bf16 (upstream's) for OpenVLA")
    p.add_argument("--device", default="auto", help="auto (CUDA when the merge fits there) | cpu | cuda[:i]")
    p.add_argument("--frames", type=int, default=4, help="frames of the reload check")
    p.set_defaults(func=_cmd_export)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
