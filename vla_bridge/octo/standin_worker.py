"""A JAX-free stand-in for the Octo worker, so the main environment's side of POLICY=octo runs where octo cannot
be installed (CI: octo is GitHub-only). Selected with ``VLA_BRIDGE_OCTO_WORKER=standin`` (see
:func:`vla_bridge.octo.protocol.worker_command`); it runs with the main environment's interpreter.

It is the real worker's interface with a toy model inside: the same command line (:func:`vla_bridge.octo.protocol.
build_parser`), the same shard reader (:class:`~vla_bridge.octo.worker_common.ShardData`) and augmentation, the same
``train_log.jsonl`` lines, atomic checkpoints (``base/``, ``step_XXXXXX/``, ``latest/`` with
``dataset_statistics.json`` and ``training_state.json``) and ``RESULT`` line, and the same framed serve protocol
(:func:`~vla_bridge.octo.protocol.serve_loop`). The model is a linear map from an image's mean colour (plus a bias)
to the normalized action chunk, fitted by a few gradient steps on the masked MSE: deterministic (same shards and
seed → same log and actions), it reads the images and the shards, and it is **not a policy** — its numbers say
nothing about Octo. Real-octo behaviour stays covered by ``tests/test_octo_worker.py`` wherever ``.venv-octo``
exists.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .protocol import RESULT_PREFIX, WORKER_MODULES, build_parser, protocol_streams, serve_loop
from .worker_common import ShardData, augment_images, log, log_record, save_checkpoint

WORKER_NAME = "standin"
PARAMS_FILE = "standin_params.json"
CONFIG_FILE = "config.json"
STATS_FILE = "dataset_statistics.json"
GRAD_CLIP = 1.0


def image_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 4): a bias and the mean of each colour channel, centred on 0."""
    means = np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(axis=1) / 255.0 - 0.5
    return np.concatenate([np.ones((len(images), 1)), means], axis=1)


def warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    """The learning rate before optimizer step ``step`` (0-based): linear warmup from 0, then cosine to 0 (the
    shape of the real worker's optax schedule)."""
    if step < warmup:
        return peak * step / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * frac))


class StandinModel:
    """Weights (4, horizon × action_dim); ``save_pretrained`` has the signature the worker's checkpointing calls."""

    def __init__(self, weights: np.ndarray, window: int, horizon: int, action_dim: int, statistics: dict):
        self.weights = np.asarray(weights, np.float64)
        self.window, self.horizon, self.action_dim = int(window), int(horizon), int(action_dim)
        self.statistics = statistics

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 frames → (N, horizon, action_dim) float32 normalized chunks."""
        out = image_features(images) @ self.weights
        return out.reshape(len(images), self.horizon, self.action_dim).astype(np.float32)

    def save_pretrained(self, step: int, checkpoint_path: str) -> None:
        d = Path(checkpoint_path)
        (d / PARAMS_FILE).write_text(json.dumps({"step": int(step), "weights": self.weights.tolist()}))
        (d / CONFIG_FILE).write_text(json.dumps({"worker": WORKER_NAME, "window": self.window,
                                                 "horizon": self.horizon, "action_dim": self.action_dim}))
        (d / STATS_FILE).write_text(json.dumps(self.statistics))

    @classmethod
    def load(cls, path: str | Path) -> "StandinModel":
        d = Path(path)
        if not (d / PARAMS_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a stand-in checkpoint (no {PARAMS_FILE}): the stand-in worker serves "
                                    "only what it trained; unset VLA_BRIDGE_OCTO_WORKER to serve a real Octo checkpoint")
        cfg = json.loads((d / CONFIG_FILE).read_text())
        params = json.loads((d / PARAMS_FILE).read_text())
        return cls(np.asarray(params["weights"]), cfg["window"], cfg["horizon"], cfg["action_dim"],
                   json.loads((d / STATS_FILE).read_text()))


def train(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    data = ShardData(args.shards)
    log(f"stand-in worker (no JAX; not Octo): shards {len(data):,} samples from {data.manifest['n_episodes']} "
        f"episodes, window {data.window}, horizon {data.horizon}")
    dim = data.horizon * data.action_dim
    model = StandinModel(np.zeros((4, dim)), data.window, data.horizon, data.action_dim, data.statistics)
    ckpt_dir = Path(args.outputs) / "checkpoints" / args.run
    log_dir = Path(args.outputs) / "logs" / args.run
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    extra = {"init": args.init, "shards": str(args.shards), "unnorm_key": data.unnorm_key,
             "image_aug": args.image_aug, "window": data.window, "horizon": data.horizon, "worker": WORKER_NAME}
    save_checkpoint(model, 0, ckpt_dir / "base", {**extra, "what": "weights before fine-tuning"})

    steps, warmup = int(args.max_steps), max(1, min(int(args.warmup), int(args.max_steps)))
    rng = np.random.default_rng(args.seed)
    order = np.array([], np.int64)
    log_path = log_dir / "train_log.jsonl"
    log_path.write_text("")
    frames, last_ckpt, t_train = 0, None, time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < args.batch_size:
            order = np.concatenate([order, rng.permutation(len(data))])
        idx, order = order[:args.batch_size], order[args.batch_size:]
        b = data.batch(idx)
        im = b["observation"]["image_primary"][:, -1]                 # the window's current frame
        if args.image_aug:
            im = augment_images(im, rng)
        x = image_features(im)                                        # (B, 4)
        y = b["action"][:, -1].reshape(len(idx), dim)                 # (B, H*D) normalized targets
        m = b["action_pad_mask"][:, -1].reshape(len(idx), dim).astype(np.float64)
        err = (x @ model.weights - y) * m
        loss = float((err ** 2).sum() / max(m.sum(), 1.0))
        grad = 2.0 * x.T @ err / max(m.sum(), 1.0)
        gnorm = float(np.linalg.norm(grad))
        lr = warmup_cosine(step - 1, float(args.lr), warmup, steps)
        model.weights -= lr * grad * min(1.0, GRAD_CLIP / max(gnorm, 1e-12))
        frames += len(idx)
        if step % args.log_every == 0 or step == 1 or step == steps:
            rec = log_record(step, loss, loss, gnorm, lr, frames, time.perf_counter() - t_train)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"step {step}/{steps} loss {loss:.4f} lr {lr:.2e} grad_norm {gnorm:.2f}")
        if step % args.save_every == 0 or step == steps:
            last_ckpt = save_checkpoint(model, step, ckpt_dir / f"step_{step:06d}", extra)
            save_checkpoint(model, step, ckpt_dir / "latest", extra)
            log(f"checkpoint {last_ckpt.name} + latest/")
    n_params = int(model.weights.size)
    result = {"steps": steps, "frames_seen": frames, "seconds": time.perf_counter() - t_start,
              "train_seconds": time.perf_counter() - t_train, "stopped_reason": "max_steps",
              "log_path": str(log_path), "last_checkpoint": str(last_ckpt) if last_ckpt else None,
              "parameters": n_params, "trainable_parameters": n_params, "init": args.init, "t5": None,
              "worker": WORKER_NAME, "versions": {"numpy": np.__version__, "worker": WORKER_NAME}}
    (log_dir / "octo_train_result.json").write_text(json.dumps(result, indent=2))
    log(f"done: {steps} steps, {frames:,} samples in {result['seconds']:.1f} s")
    return result


def serve(args: argparse.Namespace) -> None:
    out, inp = protocol_streams()
    models = {"finetuned": StandinModel.load(args.checkpoint)}
    if args.base and Path(args.base).is_dir():
        models["base"] = StandinModel.load(args.base)
    ft = models["finetuned"]
    log(f"stand-in worker (no JAX; not Octo) serving {sorted(models)} from {args.checkpoint}")
    hello = {"weights": sorted(models), "window": ft.window, "horizon": ft.horizon, "action_dim": ft.action_dim,
             "statistics": ft.statistics, "worker": WORKER_NAME}
    serve_loop(out, inp, hello, lambda which, images, texts: models[which].predict(images))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(prog=f"python -m {WORKER_MODULES['standin']}", description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if args.cmd == "check":
        print(json.dumps({"worker": WORKER_NAME, "numpy": np.__version__}))
        print("stand-in Octo worker: no JAX, deterministic linear actions (a CI check of the main-env side, not Octo)")
        return 0
    if args.cmd == "train":
        print(RESULT_PREFIX + json.dumps(train(args)), flush=True)
        return 0
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
