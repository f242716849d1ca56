"""Command line: ``python -m vla_bridge <command>``; run with ``-h`` for the list."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_run_notebook(args: argparse.Namespace) -> int:
    from .runner import execute_notebook, load_params_file, parse_kv

    params = load_params_file(args.params_file)
    params.update(parse_kv(args.param or []))
    execute_notebook(args.notebook, args.out, params, kernel_name=args.kernel)
    return 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    from . import hardware
    from .config import resolve_run_config

    cfg = resolve_run_config({"POLICY": args.policy, "DATASET": args.dataset})
    results = hardware.run_preflight(cfg.policy, cfg.dataset, cfg.model_id, hardware.Decision(cfg.hub, cfg.hub_reason),
                                     cfg.outputs_dir)
    print(json.dumps(hardware.detect_hardware().as_dict(), indent=2))
    print(cfg.summary())
    print(hardware.format_checks(results))
    return 0 if all(r.ok or not r.required for r in results) else 1


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

    p = sub.add_parser("preflight", help="print hardware, the policy decision and the pre-flight checks")
    p.add_argument("--policy", default="auto")
    p.add_argument("--dataset", default="auto")
    p.set_defaults(func=_cmd_preflight)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
