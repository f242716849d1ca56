"""The tiny VLA's "pretrained base": trained once on the embedded world's pretraining split, cached under data/.

OpenVLA-7B arrives pretrained on 970k Open X-Embodiment episodes (Bridge among them), and the tutorial then
LoRA-fine-tunes it on a Bridge slice. The tiny path mirrors that story in miniature: a randomly initialised tiny
VLA is trained (all weights, no LoRA) on the world's *pretraining* tasks, saved like a hub checkpoint
(``config.json`` with ``norm_stats``, ``model.safetensors``, tokenizer and processor files), and the notebook then
LoRA-fine-tunes that base on the *fine-tuning* tasks, exactly as it would OpenVLA-7B.

The cache key covers the model/tokenization/training code, the dataset's build key and the pretraining
parameters, so the base is rebuilt only when one of them changes. ``python -m vla_bridge pretrain-tiny``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BASE_MARKER = "vla_bridge_pretrain.json"


@dataclasses.dataclass
class PretrainParams:
    steps: int = 400
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    image_aug: bool = True
    seed: int = 0
    image_size: int = 128
    threads: int = 2


def _code_hash() -> str:
    from . import tokenization, training
    from .models import tiny_vla

    h = hashlib.sha256()
    for mod in (tiny_vla, tokenization, training):
        h.update(inspect.getsource(mod).encode())
    h.update(inspect.getsource(PretrainParams).encode())
    return h.hexdigest()[:12]


def base_cache_key(dataset_key: str, params: PretrainParams, unnorm_key: str) -> str:
    payload = json.dumps({"code": _code_hash(), "dataset": dataset_key, "params": dataclasses.asdict(params),
                          "unnorm_key": unnorm_key}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_base_info(path: str | os.PathLike) -> dict | None:
    marker = Path(path) / BASE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def ensure_tiny_base(out_dir: str | os.PathLike, dataset_root: str | os.PathLike, pretrain_episodes: list[int],
                     unnorm_key: str, params: PretrainParams | None = None, force: bool = False,
                     progress: bool = True) -> tuple[Path, dict]:
    """Return ``(path, info)`` of a tiny base pretrained on ``pretrain_episodes``; train it when missing or stale."""
    from .data.build import load_build_info
    from .data.stats import compute_action_stats, norm_stats_entry
    from .data.stream import TrainingStream
    from .models.tiny_vla import build_tiny_vla
    from .training import TrainConfig, loss_descent_check, train

    params = params or PretrainParams()
    out = Path(out_dir)
    build = load_build_info(dataset_root) or {}
    key = base_cache_key(str(build.get("key", Path(dataset_root).name)), params, unnorm_key)
    info = read_base_info(out)
    if info and info.get("key") == key and not force:
        info["reused"] = True
        return out, info
    if not pretrain_episodes:
        raise ValueError("the pretraining split is empty: rebuild the embedded dataset with pretrain episodes")

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(params.threads)
    try:
        stream = TrainingStream(dataset_root, episodes=pretrain_episodes, image_size=params.image_size,
                                seed=params.seed)
        stats = norm_stats_entry(compute_action_stats(stream.ds, pretrain_episodes, source="stream"))
        norm_stats = {unnorm_key: stats}
        model, processor = build_tiny_vla(norm_stats=norm_stats, image_size=params.image_size, seed=params.seed)
        with tempfile.TemporaryDirectory(prefix="tiny_pretrain_") as scratch:
            cfg = TrainConfig(run_name="tiny_base", outputs_dir=scratch, max_steps=params.steps,
                              batch_size=params.batch_size, grad_accum=1, learning_rate=params.learning_rate,
                              warmup_steps=params.warmup_steps, log_every=10, save_every=10**9, seed=params.seed,
                              image_aug=params.image_aug, unnorm_key=unnorm_key, save_full_model=True,
                              progress=progress)
            result = train(model, processor, stream, norm_stats, cfg)
            check = loss_descent_check(result.history, within_steps=params.steps)
            log_rows = result.history
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        info = {"key": key, "dataset_root": str(dataset_root), "dataset_key": build.get("key"),
                "params": dataclasses.asdict(params), "unnorm_key": unnorm_key,
                "pretrain_episodes": len(pretrain_episodes), "frames_seen": result.frames_seen,
                "seconds": round(time.time() - t0, 1), "first_loss": log_rows[0]["loss"] if log_rows else None,
                "last_loss": log_rows[-1]["loss"] if log_rows else None,
                "last_action_accuracy": log_rows[-1]["action_accuracy"] if log_rows else None,
                "loss_check": check, "log": log_rows}
        (tmp / BASE_MARKER).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        torch.set_num_threads(prev_threads)
    info["reused"] = False
    return out, info
