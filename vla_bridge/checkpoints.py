"""The checkpoint directory layout and RESUME: what a checkpoint holds, how it is written, how a resume finds,
validates and loads it.

``outputs/checkpoints/<run>/step_XXXXXX/`` holds the weights (adapter + config, or the full model with
``save_full_model``), ``training_state.pt`` (optimizer, scheduler, step, RNG states, data position, the config),
``dataset_statistics.json`` and ``checkpoint.json`` (step, frames_seen, saved_at and the run's parameters: small,
read without torch). Each is written to a temporary directory and renamed into place; ``latest`` is a relative
symlink to the newest one, swapped with one ``os.replace``, so a kill at any moment leaves every visible checkpoint
complete, and the ``.*.tmp-<pid>`` / ``.*.old-<pid>`` leftovers of a killed writer are removed by the next one.
NaN/inf or blown-up weights are never written (:class:`WeightsError`).

RESUME continues from the newest complete ``step_*`` (``latest``'s target, or a newer one a kill left unpublished)
and refuses parameters that would change the run (``RUN_DEFINING`` and the adapter's; the number of processes may
change when the global batch stays). With several training processes a checkpoint keeps every process's data
position and RNG state (``data_position``, ``rank_rng``): a resume with as many processes continues each where it
stopped, one with another number re-deals the data (``TrainingStream.resume_start``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file

from .data.stats import save_dataset_statistics

STATE_FILE = "training_state.pt"
META_FILE = "checkpoint.json"     # step, frames_seen, saved_at and the run's parameters: small, read without torch
LATEST = "latest"                 # a symlink to the newest step_XXXXXX/
STEP_DIR = re.compile(r"step_\d{6,}")
LEFTOVER = re.compile(r"\..+\.(tmp|old)-\d+")   # what a killed writer leaves behind

# TrainConfig fields that define the run, by their notebook names: RESUME refuses to change them (the adapter's
# LORA_RANK / LORA_ALPHA / LORA_DROPOUT / LORA_TARGETS are read from the model and checked too). Everything else
# (LOG_EVERY, SAVE_EVERY, USE_WANDB, progress, ...) may change between a run and its resume.
RUN_DEFINING = {"max_steps": "MAX_STEPS", "batch_size": "BATCH_SIZE", "grad_accum": "GRAD_ACCUM",
                "learning_rate": "LEARNING_RATE", "warmup_steps": "WARMUP_STEPS", "max_grad_norm": "MAX_GRAD_NORM",
                "weight_decay": "WEIGHT_DECAY", "seed": "SEED", "image_aug": "IMAGE_AUG", "unnorm_key": "UNNORM_KEY",
                "save_full_model": "SAVE_FULL_MODEL"}

MAX_ABS_WEIGHT = 1e4       # weights beyond it are treated as blown up, like NaN


class TrainingError(RuntimeError):
    """Training cannot start or had to stop; the message says why and what to do.

    Defined here, below the loop: RESUME's checks and the checkpoint writer raise it too, and ``training`` imports
    this module (never the other way round)."""


class WeightsError(TrainingError):
    """The weights are non-finite or blown up: they are not written as a checkpoint."""


def rng_state(np_rng: np.random.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "aug": np_rng.bit_generator.state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, np_rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["aug"]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_dir_write(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a directory through ``write(tmp)`` and rename it into place; replace ``final`` if it exists.

    Only a complete directory ever carries the final name. Replacing an existing ``final`` takes two renames (it is
    moved aside first); a kill between them leaves ``final`` absent and its old copy in ``.<name>.old-<pid>``, which
    the next write (or :func:`clean_leftovers`) removes.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def _publish_latest(ckpt_dir: Path, step_dir: Path) -> None:
    """Point ``latest`` at ``step_dir`` with one atomic ``os.replace`` of a relative symlink."""
    link = ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(step_dir.name, link)
    latest = ckpt_dir / LATEST
    if latest.is_dir() and not latest.is_symlink():  # a copied latest/ from before the symlink layout
        latest.rename(ckpt_dir / f".{LATEST}.old-{os.getpid()}")
    os.replace(link, latest)


def clean_leftovers(ckpt_dir: Path) -> list[str]:
    """Remove the ``.*.tmp-<pid>`` / ``.*.old-<pid>`` entries a killed writer left in ``ckpt_dir``; their names."""
    removed = []
    for p in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if LEFTOVER.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    return removed


def weights_problem(params) -> str | None:
    """Why the parameters are unusable — non-finite, or beyond ``MAX_ABS_WEIGHT`` (a blown-up run) — or None."""
    worst = 0.0
    for p in params:
        d = p.detach()
        if not torch.isfinite(d).all():
            return "the weights hold NaN/inf"
        worst = max(worst, float(d.abs().max()))
    if worst > MAX_ABS_WEIGHT:
        return f"a weight reached |w| = {worst:.3g} (> {MAX_ABS_WEIGHT:g}): the run blew up"
    return None



def run_parameters(model, cfg, world_size: int = 1) -> dict[str, Any]:
    """The parameters that define the run, by their notebook names: ``RUN_DEFINING`` plus the adapter's (and
    ``WORLD_SIZE``, the number of training processes, when it is not 1)."""
    out = {name: getattr(cfg, field) for field, name in RUN_DEFINING.items()}
    if world_size > 1:
        out["WORLD_SIZE"] = int(world_size)
    lora = (getattr(model, "peft_config", None) or {}).get("default")
    if lora is not None:
        out.update(_adapter_parameters(lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules))
    return out


def _adapter_parameters(r, alpha, dropout, targets) -> dict[str, Any]:
    targets = sorted(targets) if isinstance(targets, (list, set, tuple)) else targets
    return {"LORA_RANK": r, "LORA_ALPHA": alpha, "LORA_DROPOUT": dropout, "LORA_TARGETS": targets}


def save_checkpoint(model, optimizer, scheduler, step: int, frames_seen: int, np_rng: np.random.Generator,
                    norm_stats: Mapping[str, Any], cfg, extra_state: Mapping[str, Any] | None = None,
                    world_size: int = 1) -> Path:
    """``step_XXXXXX/`` (weights — adapter or full —, training_state.pt, dataset_statistics.json, checkpoint.json),
    then ``latest`` → it. The weights are checked first: NaN/inf or blown-up weights are never written.
    With several training processes only process 0 calls this (``checkpoint.json`` then names its writer)."""
    bad = weights_problem(p for p in model.parameters() if p.requires_grad)
    if bad:
        raise WeightsError(f"{bad}; the step-{step} checkpoint was not written")
    meta = {"step": step, "frames_seen": frames_seen, "saved_at": time.time(),
            "run": run_parameters(model, cfg, world_size)}
    if world_size > 1:
        meta["written_by"] = {"rank": 0, "world_size": int(world_size), "pid": os.getpid()}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp))
        torch.save({"step": step, "frames_seen": frames_seen, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(np_rng),
                    "config": dataclasses.asdict(cfg), **(extra_state or {})}, tmp / STATE_FILE)
        save_dataset_statistics(tmp, norm_stats)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))

    step_dir = _atomic_dir_write(cfg.checkpoint_dir / f"step_{step:06d}", write)
    _publish_latest(cfg.checkpoint_dir, step_dir)
    clean_leftovers(cfg.checkpoint_dir)
    return step_dir


def _checkpoint_meta(ckpt: Path) -> dict | None:
    """A complete checkpoint's ``checkpoint.json`` (older ones: step and time from the state file), else None."""
    weights = ("adapter_model.safetensors", "model.safetensors")
    if not (ckpt / STATE_FILE).is_file() or not any((ckpt / w).is_file() for w in weights):
        return None
    if (ckpt / META_FILE).is_file():
        return json.loads((ckpt / META_FILE).read_text())
    return {"step": int(ckpt.name.split("_")[1]), "saved_at": (ckpt / STATE_FILE).stat().st_mtime}


def resume_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint RESUME continues from: the most recently saved complete ``step_*`` (None if there is none).

    That is ``latest``'s target, or a newer step a kill left before ``latest`` was switched to it.
    """
    found = []
    for p in Path(ckpt_dir).iterdir() if Path(ckpt_dir).is_dir() else []:
        meta = _checkpoint_meta(p) if STEP_DIR.fullmatch(p.name) and p.is_dir() else None
        if meta is not None:
            found.append((float(meta["saved_at"]), int(meta["step"]), p))
    return max(found)[2] if found else None


def _saved_run_parameters(ckpt: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """The run parameters a checkpoint was trained with (older checkpoints: from its state and adapter config)."""
    meta = _checkpoint_meta(ckpt) or {}
    if "run" in meta:
        return meta["run"]
    saved = state.get("config", {})
    out = {name: saved[field] for field, name in RUN_DEFINING.items() if field in saved}
    adapter = ckpt / "adapter_config.json"
    if adapter.is_file():
        a = json.loads(adapter.read_text())
        out.update(_adapter_parameters(a.get("r"), a.get("lora_alpha"), a.get("lora_dropout"), a.get("target_modules")))
    return out


def global_batch(params: Mapping[str, Any]) -> int:
    """Frames per optimizer step of a run's parameters: BATCH_SIZE × GRAD_ACCUM × WORLD_SIZE (1 when absent)."""
    return int(params["BATCH_SIZE"]) * int(params["GRAD_ACCUM"]) * int(params.get("WORLD_SIZE", 1))


def check_resume_parameters(saved: Mapping[str, Any], now: Mapping[str, Any], ckpt: Path) -> None:
    """Refuse a resume whose run-defining parameters differ from the checkpoint's, with a one-line old-vs-new diff.

    The number of processes may change, and with it BATCH_SIZE / GRAD_ACCUM, as long as the global batch
    (BATCH_SIZE × GRAD_ACCUM × processes) stays the one the run was trained with; with the same number of
    processes BATCH_SIZE and GRAD_ACCUM are refused as before."""
    batch_keys = ("BATCH_SIZE", "GRAD_ACCUM", "WORLD_SIZE")
    diff = [k for k in now if k in saved and saved[k] != now[k]]
    if saved.get("WORLD_SIZE", 1) != now.get("WORLD_SIZE", 1) and all(
            k in saved and k in now for k in batch_keys[:2]):
        if global_batch(saved) == global_batch(now):
            diff = [k for k in diff if k not in batch_keys]
        else:
            g, n = global_batch(saved), int(now.get("WORLD_SIZE", 1))
            keep = (f"BATCH_SIZE × GRAD_ACCUM = {g // n} with {n} processes" if g % n == 0 else
                    f"a number of processes that divides {g}")
            raise TrainingError(
                f"RESUME refused: {ckpt} was trained with a global batch of {g} (BATCH_SIZE={saved['BATCH_SIZE']} × "
                f"GRAD_ACCUM={saved['GRAD_ACCUM']} × {saved.get('WORLD_SIZE', 1)} processes); this run asks for "
                f"{global_batch(now)} (BATCH_SIZE={now['BATCH_SIZE']} × GRAD_ACCUM={now['GRAD_ACCUM']} × {n} processes)"
                f" — keep the global batch ({keep}), or RESUME=False (or another RUN_NAME) to start a new run")
    if diff:
        old = ", ".join(f"{k}={saved[k]!r}" for k in diff)
        new = ", ".join(f"{k}={now[k]!r}" for k in diff)
        raise TrainingError(f"RESUME refused: {ckpt} was trained with {old}; this run asks for {new} — set them back "
                            f"to continue it, or RESUME=False (or another RUN_NAME) to start a new run")


def load_checkpoint_weights(model, ckpt: Path, full_model: bool = False) -> None:
    """Load a checkpoint's adapter (or, ``full_model``, its full weights) into ``model`` in place."""
    if full_model:
        state = load_file(str(ckpt / "model.safetensors"))
        model.load_state_dict(state, strict=False)
        return
    from peft import set_peft_model_state_dict  # lazy: peft imports transformers' heavy modules

    adapter = ckpt / "adapter_model.safetensors"
    if not adapter.exists():
        raise TrainingError(f"RESUME: {ckpt} has no adapter_model.safetensors; delete it or set RESUME=False")
    set_peft_model_state_dict(model, load_file(str(adapter)))


def open_resume(cfg, model, world: int, main: bool,
                share: Callable[[Any], Any] | None = None) -> tuple[Path, dict]:
    """The checkpoint RESUME continues from and its training state, its run parameters checked against ``cfg``'s
    (a ``TrainConfig``) and ``model``'s; ``latest`` is switched to it if a kill came before that. Process 0 picks the
    checkpoint; with ``world`` > 1 processes ``share`` (a broadcast from process 0) hands its choice to the others."""
    resumed_from = resume_checkpoint(cfg.checkpoint_dir) if main else None
    if world > 1:  # one process decides, so all continue from the same checkpoint
        resumed_from = share(resumed_from)
    if resumed_from is None:
        raise TrainingError(f"RESUME=True but {cfg.checkpoint_dir} holds no complete checkpoint: train once "
                            f"without RESUME first")
    state = torch.load(resumed_from / STATE_FILE, map_location="cpu", weights_only=False)
    check_resume_parameters(_saved_run_parameters(resumed_from, state), run_parameters(model, cfg, world),
                            resumed_from)
    if main and (cfg.checkpoint_dir / LATEST).resolve() != resumed_from.resolve():
        _publish_latest(cfg.checkpoint_dir, resumed_from)  # a kill came between the rename and the switch
    return resumed_from, state


def resume_position(state: Mapping[str, Any], rank: int, world: int, frames, np_rng: np.random.Generator,
                    seed: int) -> tuple[int, np.random.Generator, int]:
    """Where process ``rank`` of ``world`` continues: (its frames seen so far, its augmentation RNG, the number of
    processes the checkpoint was written by). The RNG states are restored in place. Same number of processes: each
    continues at its own data position with its own RNG state; another number: ``frames`` (a ``TrainingStream``)
    re-deals the episodes and every process starts at the same point of its epoch with fresh augmentation draws."""
    step, frames_seen = int(state["step"]), int(state["frames_seen"])
    position = state.get("data_position") or {"world_size": 1, "frames": [frames_seen]}
    rng = (state.get("rank_rng") or [state["rng"]])[rank if position["world_size"] == world else 0]
    _set_rng_state(rng, np_rng)
    if position["world_size"] == world:
        frames_seen = int(position["frames"][rank])
    elif not hasattr(frames, "resume_start"):
        raise TrainingError(f"RESUME with {world} processes from a {position['world_size']}-process checkpoint "
                            f"needs a TrainingStream (it re-deals the episodes); resume with "
                            f"{position['world_size']} processes instead")
    else:
        frames_seen = int(frames.resume_start(position["frames"]))
        np_rng = np.random.default_rng([seed, rank, step])
    return frames_seen, np_rng, int(position["world_size"])
