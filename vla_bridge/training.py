"""The LoRA fine-tuning loop, the same for OpenVLA-7B and the tiny VLA.

What it does, in upstream's terms (openvla/vla-scripts/finetune.py):

- AdamW on the trainable (LoRA) parameters, linear warmup then cosine decay to ``max_steps``, grad-norm clip 1.0;
- gradient accumulation: ``batch_size`` examples per micro-batch, ``grad_accum`` micro-batches per optimizer step;
- bf16 autocast on a GPU (through accelerate), fp32 on a CPU;
- every ``log_every`` optimizer steps one JSON line in ``outputs/logs/<run>/train_log.jsonl``: step, loss,
  action_accuracy, l1 (de-normalized action units; ``l1_normalized`` is upstream's [-1, 1] figure), lr (read
  back by :mod:`vla_bridge.train_log`);
- checkpoints every ``save_every`` steps and at the end in ``outputs/checkpoints/<run>/step_XXXXXX/`` (adapter
  weights + config, ``training_state.pt``, ``dataset_statistics.json``, ``checkpoint.json`` with the run's
  parameters), each written to a temporary directory and renamed into place; ``latest`` is a symlink to the newest
  one, swapped with one ``os.replace``, so a kill at any moment leaves every visible checkpoint complete
  (the layout, its writer and RESUME's reader: :mod:`vla_bridge.checkpoints`);
- ``resume=True`` continues from the newest complete ``step_*`` (``latest``'s target, or a newer one a kill left
  unpublished): optimizer, scheduler, step, RNG states and the data position, so the resumed run matches an
  uninterrupted one. A resume whose parameters would change the run (rank, alpha, learning rate, schedule, batch,
  seed, ...) is refused with the old-vs-new difference; logging, saving and evaluation settings may change;
- a non-finite loss, a loss that diverges (back at the uniform distribution's ln(vocabulary) or far above where
  it started) or non-finite / absurd weights stop training with a :class:`TrainingError`; no such weights are
  ever written, so ``latest`` stays the last good checkpoint.

Data arrive through a :class:`FrameSource`: ``iterate(start)`` yields raw frames (dicts with ``image``,
``instruction``, ``action``) in a deterministic order, starting after the first ``start`` frames.

Data parallelism: launched in N processes (``accelerate launch``, ``torchrun``, ``accelerate.notebook_launcher``),
the model is wrapped in ``DistributedDataParallel`` and each process reads its own ``FrameSource`` (a
``TrainingStream`` shard: its own episodes). One optimizer step = ``batch_size × grad_accum × N`` frames (the global
batch); the gradient is their mean, so N processes at ``grad_accum=A`` take the same steps as one process at
``grad_accum=N·A`` reading the same frames. The LR schedule counts optimizer steps. The logged loss and metrics are
the means over all processes, ``frames_seen`` their sum; every decision that stops training (non-finite loss,
divergence, blown-up weights) is taken on those shared numbers, so all processes stop together instead of leaving
the others waiting in a collective. Only process 0 writes the log, W&B, and checkpoints; a checkpoint keeps every
process's data position and RNG state (``data_position``, ``rank_rng``), so RESUME continues each process where
it stopped, or re-deals the data when the number of processes changed (``TrainingStream.resume_start``). One
process is exactly the single-process loop (no collective, no extra checkpoint keys).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
import torch

from .checkpoints import (LATEST, TrainingError, WeightsError, clean_leftovers, load_checkpoint_weights, open_resume,
                          resume_position, rng_state, save_checkpoint, weights_problem)
from .images import train_transform
from .progress import tqdm
from .tokenization import ActionCollator, ActionTokenizer, action_metrics, make_training_example, num_image_patches

# Divergence: the smoothed loss back at a uniform distribution over the vocabulary (ln V) after starting well below
# it, or far above the first step's loss. Blown-up weights: checkpoints.weights_problem.
UNIFORM_FRACTION = 0.9        # loss ≥ 0.9·ln V counts as "back at uniform" ...
UNIFORM_START_BELOW = 0.75    # ... when the run started below 0.75·ln V
RISE_FACTOR = 3.0             # or the loss is ≥ 3× the first step's
LOSS_EMA_ALPHA = 0.2          # the smoothing of `train_log.smoothed` (the loss curve's line)


class FrameSource(Protocol):
    def iterate(self, start: int = 0) -> Iterator[Mapping[str, Any]]:
        """Raw frames {image, instruction, action} in a fixed order, skipping the first ``start``; may repeat."""


@dataclasses.dataclass
class TrainConfig:
    run_name: str
    outputs_dir: str = "outputs"
    max_steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 2
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    log_every: int = 10
    save_every: int = 500
    seed: int = 0
    image_aug: bool = True
    use_wandb: bool = False
    resume: bool = False
    unnorm_key: str = "bridge_orig"
    mixed_precision: str | None = None  # None → "bf16" on CUDA with bf16 support, else "no"
    progress: bool = True
    save_full_model: bool = False       # True for the tiny base's pretraining (no LoRA)
    stop_after: int | None = None       # stop (as if killed) after this many steps; tests use it to simulate a crash

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.outputs_dir) / "checkpoints" / self.run_name

    @property
    def log_path(self) -> Path:
        return Path(self.outputs_dir) / "logs" / self.run_name / "train_log.jsonl"


@dataclasses.dataclass
class TrainResult:
    steps: int
    frames_seen: int
    log_path: Path
    last_checkpoint: Path | None
    stopped_reason: str
    seconds: float
    history: list[dict]
    resumed_from: Path | None = None


def lr_lambda(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0 to 1 over ``warmup_steps``, then cosine from 1 to 0 at ``max_steps``."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



def divergence(loss: float, first_loss: float, uniform_loss: float) -> str | None:
    """Why ``loss`` (smoothed) says the run diverged, or None: back at ln(vocabulary) after starting well below it,
    or ≥ ``RISE_FACTOR`` × the first step's loss."""
    if first_loss < UNIFORM_START_BELOW * uniform_loss and loss >= UNIFORM_FRACTION * uniform_loss:
        return (f"the loss rose from {first_loss:.3f} to {loss:.3f}, the level of a uniform guess over the "
                f"vocabulary (ln V = {uniform_loss:.3f}): the model no longer predicts anything")
    if first_loss > 0 and loss >= RISE_FACTOR * first_loss:
        return f"the loss rose from {first_loss:.3f} to {loss:.3f} (≥ {RISE_FACTOR:g}× where it started)"
    return None


def _wandb_run(cfg: TrainConfig, extra: Mapping[str, Any] | None = None):
    """A W&B run when asked for and logged in; otherwise None, and never an interactive prompt."""
    if not cfg.use_wandb:
        os.environ.setdefault("WANDB_MODE", "disabled")
        return None
    try:
        import wandb
    except ImportError:
        print("USE_WANDB=True but wandb is not installed (`pip install wandb`): logging to train_log.jsonl only")
        return None
    try:
        key = os.environ.get("WANDB_API_KEY") or getattr(getattr(wandb, "api", None), "api_key", None)
        if not key and os.environ.get("WANDB_MODE", "") not in ("offline", "disabled", "dryrun"):
            os.environ["WANDB_MODE"] = "offline"
            print("USE_WANDB=True without a W&B API key (WANDB_API_KEY or `wandb login`): logging offline to "
                  "./wandb/offline-run-*; `wandb sync <that folder>` uploads it once you are logged in")
        return wandb.init(project="openvla-bridge-finetune", name=cfg.run_name,
                          config={**dataclasses.asdict(cfg), **(extra or {})})
    except Exception as exc:  # W&B trouble must not stop training
        print(f"W&B disabled ({type(exc).__name__}: {exc})")
        return None


def _collective(accelerator):
    """Helpers over all training processes (only called when there are several)."""
    from accelerate.utils import broadcast_object_list, gather_object  # lazy: accelerate imports take seconds

    def mean(values: list[float]) -> list[float]:  # NaN-aware mean over processes of each value
        t = accelerator.gather(torch.tensor([values], dtype=torch.float64, device=accelerator.device)).cpu().numpy()
        return [float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in t.T]

    def total(value: int) -> int:
        return int(accelerator.reduce(torch.tensor([int(value)], dtype=torch.int64, device=accelerator.device),
                                      "sum").item())

    def from_main(obj):
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    return mean, total, from_main, lambda obj: gather_object([obj])


def train(model, processor, frames: FrameSource, norm_stats: Mapping[str, Any], cfg: TrainConfig,
          on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune ``model`` (a PEFT-wrapped VLA, or a full model with ``save_full_model``) on ``frames``.

    ``norm_stats`` is the OpenVLA-layout dict ``{unnorm_key: {"action": {q01, q99, mask, ...}}}`` whose entry
    normalizes the actions here; it is saved with each checkpoint so inference de-normalizes identically.
    Raises :class:`TrainingError` when the run cannot start or resume, or had to stop (non-finite loss, divergence,
    blown-up weights); the checkpoints written before stay, and none holds bad weights.
    Under a multi-process launch every process calls this with its own shard of the data (module docstring).
    """
    from accelerate import Accelerator  # lazy: accelerate imports take seconds

    if cfg.unnorm_key not in norm_stats:
        raise TrainingError(f"unnorm_key {cfg.unnorm_key!r} not in the dataset statistics {sorted(norm_stats)}")
    stats_entry = norm_stats[cfg.unnorm_key]
    set_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)

    mp = cfg.mixed_precision
    if mp is None:
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    device = accelerator.device
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if world > 1:
        np_rng = np.random.default_rng([cfg.seed, rank])  # each process augments its frames with its own draws
        mean_all, total_all, from_main, gather_all = _collective(accelerator)

    step, frames_seen, first_loss, resumed_from, state = 0, 0, None, None, None
    if main:
        clean_leftovers(cfg.checkpoint_dir)
    if cfg.resume:
        resumed_from, state = open_resume(cfg, model, world, main, from_main if world > 1 else None)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters: wrap it with LoRA (get_peft_model) first")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    if not getattr(model, "is_loaded_in_4bit", False):
        model = model.to(device)
    model.train()

    action_tok = ActionTokenizer(processor.tokenizer)
    collator = ActionCollator(pad_token_id=int(processor.tokenizer.pad_token_id))
    n_patches = num_image_patches(model)

    if state is not None:
        load_checkpoint_weights(model, resumed_from, cfg.save_full_model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        first_loss = state.get("first_loss")
        frames_seen, np_rng, saved_world = resume_position(state, rank, world, frames, np_rng, cfg.seed)
        if main:
            print(f"resumed from {resumed_from} at step {step} ({int(state['frames_seen'])} frames seen)"
                  + (f"; {saved_world} → {world} processes: the episodes are dealt anew, each process "
                     f"starts at the same point of its epoch" if saved_world != world else ""))
            if step >= cfg.max_steps:
                print(f"already at MAX_STEPS={cfg.max_steps}: nothing to do")

    net = model
    if world > 1:  # after loading: DDP broadcasts process 0's weights to the others when it wraps the model.
        # Unused parameters exist: OpenVLA (and the tiny VLA) read the ViT's second-to-last block, so the last
        # block's LoRA weights never get a gradient.
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None, find_unused_parameters=True)
    launch = {"world_size": world, "global_batch": cfg.batch_size * cfg.grad_accum * world}
    if main:
        print(f"global batch {launch['global_batch']} frames per optimizer step = BATCH_SIZE {cfg.batch_size} × "
              f"GRAD_ACCUM {cfg.grad_accum} × {world} process{'es' if world > 1 else ''}")
        cfg.log_path.parent.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and cfg.log_path.exists():
            cfg.log_path.unlink()
        elif cfg.resume and cfg.log_path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [l for l in cfg.log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            cfg.log_path.write_text("".join(k + "\n" for k in kept))

    wb = _wandb_run(cfg, launch) if main else None
    stream = frames.iterate(frames_seen)
    history: list[dict] = []
    window: dict[str, list[float]] = {"loss": [], "action_accuracy": [], "l1": [], "l1_normalized": []}
    last_ckpt: Path | None = resumed_from
    loss_ema: float | None = None
    stopped = "max_steps"
    t0 = time.time()

    def next_batch() -> dict:
        nonlocal frames_seen
        examples = []
        for _ in range(cfg.batch_size):
            try:
                fr = next(stream)
            except StopIteration:
                raise TrainingError("the training frame source ran dry: it yielded no (more) frames — "
                                    "is the training split empty?") from None
            frames_seen += 1
            image = train_transform(fr["image"], np_rng, cfg.image_aug)
            examples.append(make_training_example(image, fr["instruction"], fr["action"], processor, action_tok,
                                                  stats_entry))
        return collator(examples)

    def stop(at_step: int, why: str) -> TrainingError:
        latest = cfg.checkpoint_dir / LATEST
        good = last_ckpt or (f"{latest.resolve()} (from before this run)" if latest.exists() else "none yet")
        return TrainingError(f"training stopped at step {at_step}: {why}; the last good checkpoint is {good} — "
                             f"lower LEARNING_RATE (now {cfg.learning_rate:g}) or check the data")

    # pixel_values go in the vision backbone's dtype (bf16 for OpenVLA loaded in bf16), as upstream does.
    pix_dtype = torch.bfloat16 if mp == "bf16" else next(
        (p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not (cfg.progress and main),
               dynamic_ncols=True, mininterval=3.0)
    try:
        while step < cfg.max_steps:
            micro_losses = []
            for micro in range(cfg.grad_accum):
                batch = next_batch()
                # gradients are averaged over the processes once per optimizer step, on its last micro-batch
                sync = world == 1 or micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else net.no_sync():
                    with accelerator.autocast():
                        out = net(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device),
                                  pixel_values=batch["pixel_values"].to(device, dtype=pix_dtype),
                                  labels=batch["labels"].to(device))
                    loss = out.loss
                    if world == 1 and not torch.isfinite(loss):
                        raise stop(step + 1, f"non-finite loss ({loss.item()})")
                    accelerator.backward(loss / cfg.grad_accum)
                micro_losses.append(float(loss.detach()))
                m = action_metrics(out.logits.detach().float(), batch["labels"], n_patches, action_tok, stats_entry)
                window["action_accuracy"].append(m["action_accuracy"])
                window["l1_normalized"].append(m["l1"])
                window["l1"].append(m.get("l1_denorm", float("nan")))
            step_loss = float(np.mean(micro_losses))
            if world > 1:  # the loss every process decides on: the mean over all of them (NaN if any is)
                step_loss = float(accelerator.reduce(torch.tensor([step_loss], dtype=torch.float64, device=device),
                                                     "mean").item())
                if not math.isfinite(step_loss):
                    raise stop(step + 1, f"non-finite loss ({step_loss}) on at least one of the {world} processes")
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            first_loss = step_loss if first_loss is None else first_loss
            loss_ema = step_loss if loss_ema is None else LOSS_EMA_ALPHA * step_loss + (1 - LOSS_EMA_ALPHA) * loss_ema
            uniform_loss = math.log(out.logits.shape[-1])
            why = divergence(loss_ema, first_loss, uniform_loss)
            if why:
                raise stop(step + 1, f"diverged — {why}")
            step += 1
            window["loss"].append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{window['action_accuracy'][-1]:.2f}")

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                means = {k: float(np.nanmean(v)) if v else float("nan") for k, v in window.items()}
                logged_frames = frames_seen
                if world > 1:
                    means = dict(zip(means, mean_all(list(means.values()))))
                    logged_frames = total_all(frames_seen)
                row = {"step": step, **means, "lr": float(scheduler.get_last_lr()[0]), "frames_seen": logged_frames,
                       "elapsed_s": round(time.time() - t0, 2)}
                if main:
                    with cfg.log_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    if wb is not None:
                        wb.log(row, step=step)
                history.append(row)
                if on_log is not None:
                    on_log(row)
                window = {k: [] for k in window}
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                # a checkpoint replaces `latest`: the last step's own loss must pass the divergence check too
                why = divergence(step_loss, first_loss, uniform_loss)
                if why:
                    raise stop(step, f"diverged — {why}; its checkpoint was not written")
                extra: dict[str, Any] = {"first_loss": first_loss}
                saved_frames = frames_seen
                if world > 1:  # the weights are the same everywhere: every process checks them, process 0 writes
                    bad = weights_problem(params)
                    if bad:
                        raise stop(step, f"{bad}; the step-{step} checkpoint was not written")
                    extra["data_position"] = {"world_size": world, "frames": gather_all(frames_seen)}
                    extra["rank_rng"] = gather_all(rng_state(np_rng))
                    saved_frames = sum(extra["data_position"]["frames"])
                if main:
                    try:
                        last_ckpt = save_checkpoint(model, optimizer, scheduler, step, saved_frames, np_rng,
                                                    norm_stats, cfg, extra, world)
                    except WeightsError as exc:
                        raise stop(step, str(exc)) from None
                else:
                    last_ckpt = cfg.checkpoint_dir / f"step_{step:06d}"
            if cfg.stop_after is not None and step >= cfg.stop_after:
                stopped = f"stop_after={cfg.stop_after}"
                break
    finally:
        bar.close()
        if wb is not None:
            wb.finish()
    return TrainResult(steps=step, frames_seen=total_all(frames_seen) if world > 1 else frames_seen,
                       log_path=cfg.log_path, last_checkpoint=last_ckpt, stopped_reason=stopped,
                       seconds=time.time() - t0, history=history, resumed_from=resumed_from)
