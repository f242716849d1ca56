"""The tiny VLA's "pretrained base": trained once on the embedded world's pretraining tasks, cached under data/.

OpenVLA-7B arrives pretrained on 970k Open X-Embodiment episodes (Bridge among them) over vision encoders that were
themselves pretrained on web images, and the tutorial then LoRA-fine-tunes it on a Bridge slice. The tiny path
mirrors that story in miniature: a randomly initialised tiny VLA is trained (all weights, no LoRA) on the world's
*pretraining* tasks, saved like a hub checkpoint (``config.json`` with ``norm_stats``, ``model.safetensors``,
tokenizer and processor files), and the notebook then LoRA-fine-tunes that base on the *fine-tuning* tasks, exactly
as it would OpenVLA-7B.

Because the tiny model has no pretrained vision encoder, its pretraining gets help the world gives for free
(``vla_bridge.data.world.labels``), in two stages over frames rendered from the world generator:

1. **vision stage** (``vision_steps``): the ViT alone learns dense per-patch labels - what colour / family / target
   is under each patch, where the gripper is and the patch-to-gripper offset on the table, the gripper's height,
   opening and whether it holds the object (a stand-in for the pretrained encoders OpenVLA starts from);
2. **action stage** (``steps``): the whole model learns the next-action tokens with OpenVLA's loss (the same
   ``make_training_example`` / collator as fine-tuning), while the per-patch loss stays on and a small head on the
   language model's last prompt position regresses the privileged state (offsets to the instructed object and
   target, height, opening, holding), which makes the language model ground the instruction in the image.

The auxiliary heads are dropped when the base is saved: the base is a plain tiny VLA and fine-tuning, evaluation and
probes see only what they would see with OpenVLA. The cache key covers the model / tokenization / training /
label code, the world's version and the pretraining parameters, so the base is rebuilt only when one of them
changes. ``python -m vla_bridge pretrain-tiny``.

**The shipped base.** The default recipe's base ships with the repository in ``assets/tiny_vla_base/`` (21 MB, fp32),
the way openvla-7b arrives pretrained from the hub, so a fresh clone does not spend ~5 minutes of two CPU cores
pretraining it. It is used when the parameters and the ``unnorm_key`` are the default recipe's and its marker's two
version constants match this code: ``world_version`` (:data:`vla_bridge.data.world.WORLD_VERSION`) and
``base_version`` (:data:`TINY_BASE_VERSION`, bumped whenever the tiny VLA's architecture, tokenizer, image
processing or this pretraining recipe change behaviour). Otherwise the base is pretrained here as before and the
reason is printed. ``python -m vla_bridge pretrain-tiny --ship`` rebuilds the shipped copy; a golden test
(``tests/test_tiny_base.py``) checks that the shipped weights still produce the logits recorded when they were
shipped, so a behaviour change that forgot to bump a constant fails CI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import images, tokenization, training
from .data import world
from .data.stats import norm_stats_entry, stats_from_arrays
from .data.world import labels as world_labels
from .data.world.labels import N_CLASSES, PRIVILEGED_NAMES, STATE_NAMES, labelled_frames
from .images import train_transform
from .models.tiny_vla import build_tiny_vla, configuration_tiny_vla, modeling_tiny_vla, processing_tiny_vla
from .paths import PROJECT_ROOT
from .progress import tqdm
from .tokenization import ActionCollator, ActionTokenizer, action_metrics, make_training_example, num_image_patches
from .training import lr_lambda

BASE_MARKER = "vla_bridge_pretrain.json"
SHIPPED_BASE = PROJECT_ROOT / "assets" / "tiny_vla_base"
TINY_BASE_VERSION = "1"    # bump when the tiny VLA, its tokenizer / image processing or this recipe change behaviour
SHIP_COMMAND = "python -m vla_bridge pretrain-tiny --ship"


@dataclasses.dataclass
class PretrainParams:
    episodes: int = 600            # generated pretraining episodes (world generator, pretraining tasks)
    perturb: float = 0.005         # DART noise (m) on the executed steps; labels stay the expert's clean commands
    vision_steps: int = 300        # stage 1: ViT + per-patch heads
    steps: int = 600               # stage 2: the whole model, action tokens + auxiliary losses
    vision_batch_size: int = 32
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    aux_weight: float = 1.0        # weight of the per-patch and privileged losses in stage 2
    image_aug: bool = True         # stage 2: half of each batch gets the fine-tuning crop + jitter
    seed: int = 0
    image_size: int = 128
    threads: int = 2


def _code_hash() -> str:
    h = hashlib.sha256()
    h.update(world.WORLD_VERSION.encode())
    for mod in (configuration_tiny_vla, processing_tiny_vla, modeling_tiny_vla, tokenization, training, images,
                world_labels):
        h.update(inspect.getsource(mod).encode())
    h.update(inspect.getsource(PretrainParams).encode())
    h.update(inspect.getsource(AuxHeads).encode())
    h.update(inspect.getsource(pretrain_base).encode())
    return h.hexdigest()[:12]


def base_cache_key(params: PretrainParams, unnorm_key: str) -> str:
    payload = json.dumps({"code": _code_hash(), "params": dataclasses.asdict(params), "unnorm_key": unnorm_key},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_base_info(path: str | os.PathLike) -> dict | None:
    marker = Path(path) / BASE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


class AuxHeads(nn.Module):
    """The pretraining-only heads: one linear map per patch feature (colour, family, target, gripper logits;
    patch-to-gripper offset; height / opening / holding) and a small MLP on the language model's last prompt
    position (the privileged state). Losses: cross-entropy for the classes (the rare gripper patch weighted 10x),
    smooth L1 (beta 0.1, x4) for the regressions."""

    def __init__(self, vision_width: int, llm_width: int) -> None:
        super().__init__()
        self.sizes = [N_CLASSES["color"], N_CLASSES["family"], N_CLASSES["target"], N_CLASSES["gripper"], 2,
                      len(STATE_NAMES)]
        self.patch = nn.Linear(vision_width, sum(self.sizes))
        self.privileged = nn.Sequential(nn.Linear(llm_width, llm_width), nn.GELU(),
                                        nn.Linear(llm_width, len(PRIVILEGED_NAMES)))

    def patch_loss(self, feats: torch.Tensor, labels: dict, keep: torch.Tensor | None = None) -> dict:
        """``feats`` (B, G*G, vision_width); ``labels`` batched world_labels fields; ``keep`` (B,) bool."""
        if keep is not None:
            feats, labels = feats[keep], {k: v[keep] for k, v in labels.items()}
        b, n, _ = feats.shape
        g = int(round(math.sqrt(n)))
        color, family, target, grip, offset, state = self.patch(feats).reshape(b, g, g, -1).split(self.sizes, -1)
        ce = lambda logits, y, **kw: F.cross_entropy(logits.permute(0, 3, 1, 2), y, **kw)  # noqa: E731
        reg = lambda x, y: 4.0 * F.smooth_l1_loss(x, y, beta=0.1)  # noqa: E731
        return {"color": ce(color, labels["color"]), "family": ce(family, labels["family"]),
                "target": ce(target, labels["target"]),
                "gripper": ce(grip, labels["gripper"], weight=torch.tensor([1.0, 10.0], device=feats.device)),
                "offset": reg(offset, labels["offset"]),
                "state": reg(state, labels["state"][:, None, None, :].expand(-1, g, g, -1))}

    def privileged_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 4.0 * F.smooth_l1_loss(self.privileged(hidden), target, beta=0.1)


def _label_batch(frames: dict, idx: np.ndarray) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(frames[k][idx]))
            for k in ("color", "family", "target", "gripper", "offset", "state", "privileged")}


def _optimizer_step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, params: list) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def pretrain_base(model, processor, frames: dict, norm_entry: dict, params: PretrainParams,
                  progress: bool = True) -> list[dict]:
    """Run the two pretraining stages on ``frames`` (:func:`world_labels.labelled_frames`) in place; return the
    log (one row per 10 steps: stage, step, loss, action-token accuracy in stage 2, auxiliary loss, lr)."""
    rng = np.random.default_rng([params.seed, 11])
    torch.manual_seed(params.seed)
    n = len(frames["action"])
    vit = model.vision_backbone
    heads = AuxHeads(model.config.vision_width, model.config.text_config.hidden_size)
    log: list[dict] = []
    bar = None
    if progress:
        bar = tqdm(total=params.vision_steps + params.steps, desc="pretraining the tiny base", unit="step",
                   mininterval=1.0)

    model.train()
    # -- stage 1: the vision tower and the per-patch heads ------------------------------------------------------
    params1 = list(vit.parameters()) + list(heads.patch.parameters())
    opt = torch.optim.AdamW(params1, lr=params.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(30, params.vision_steps // 5), params.vision_steps))
    for step in range(params.vision_steps):
        idx = rng.integers(0, n, params.vision_batch_size)
        pixel_values = processor.image_processor(list(frames["image"][idx]))["pixel_values"]
        loss = sum(heads.patch_loss(vit(pixel_values), _label_batch(frames, idx)).values())
        _optimizer_step(opt, sched, loss, params1)
        if step % 10 == 0 or step == params.vision_steps - 1:
            log.append({"stage": "vision", "step": step + 1, "aux_loss": loss.item(), "lr": sched.get_last_lr()[0]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(stage="vision", aux=f"{loss.item():.2f}")

    # -- stage 2: action tokens (OpenVLA's loss) + the auxiliary losses -----------------------------------------
    atok = ActionTokenizer(processor.tokenizer)
    collate = ActionCollator(pad_token_id=processor.tokenizer.pad_token_id)
    n_patches = num_image_patches(model)
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [vit.register_forward_hook(lambda m, i, o: grabbed.__setitem__("patches", o)),
             model.language_model.model.norm.register_forward_hook(lambda m, i, o: grabbed.__setitem__("hidden", o))]
    params2 = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params2, lr=params.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(params.warmup_steps, params.steps))
    try:
        for step in range(params.steps):
            idx = rng.integers(0, n, params.batch_size)
            aug = (rng.random(len(idx)) < 0.5) if params.image_aug else np.zeros(len(idx), bool)
            examples = [make_training_example(train_transform(frames["image"][i], rng, bool(a)),
                                              str(frames["instruction"][i]), frames["action"][i], processor, atok,
                                              norm_entry) for i, a in zip(idx, aug)]
            batch = collate(examples)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], labels=batch["labels"])
            labels = _label_batch(frames, idx)
            first = (batch["labels"] != -100).float().argmax(1)          # first supervised (action) position
            hidden = grabbed["hidden"][torch.arange(len(idx)), first - 1 + n_patches]
            keep = torch.from_numpy(~aug)                                  # per-patch labels: un-cropped images
            patch = heads.patch_loss(grabbed["patches"], labels, keep) if bool(keep.any()) else {}
            aux = sum(patch.values()) + heads.privileged_loss(hidden, labels["privileged"])
            loss = out.loss + params.aux_weight * aux
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at pretraining step {step + 1}")
            _optimizer_step(opt, sched, loss, params2)
            if step % 10 == 0 or step == params.steps - 1:
                m = action_metrics(out.logits.detach(), batch["labels"], n_patches, atok)
                log.append({"stage": "action", "step": step + 1, "loss": out.loss.item(),
                            "action_accuracy": m["action_accuracy"], "aux_loss": aux.item(),
                            "lr": sched.get_last_lr()[0]})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage="action", loss=f"{out.loss.item():.3f}")
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
    model.eval()
    return log


def describe_base(info: dict) -> str:
    """One line about a base from its marker: built or reused, budget, loss and action-token accuracy."""
    if info.get("shipped"):
        how = (f"loaded the shipped base ({SHIPPED_BASE.relative_to(PROJECT_ROOT)}/, pretrained once in "
               f"{info['seconds']:.0f} s)")
    elif info.get("reused"):
        how = "reused the cached base"
    else:
        why = f" ({info['not_shipped']})" if info.get("not_shipped") else ""
        how = f"pretrained it in {info['seconds']:.0f} s{why}"
    p = info["params"]
    kept = f"; {info['kept']}, left untouched" if info.get("kept") else ""
    return (f"tiny base: {how} ({p['vision_steps']} vision + {p['steps']} action steps on {info['frames']} frames "
            f"of {info['pretrain_episodes']} generated pretraining episodes of the embedded demo world; action loss "
            f"{info['first_loss']:.2f} → {info['last_loss']:.2f}, action-token accuracy "
            f"{info['last_action_accuracy']:.2f}{kept})")


def shipped_base(params: PretrainParams, unnorm_key: str, root: str | os.PathLike = SHIPPED_BASE
                 ) -> tuple[Path | None, dict | str]:
    """``(path, info)`` of the base shipped in ``root`` when it is the one ``params`` and ``unnorm_key`` ask for
    and its version constants match this code; else ``(None, why not)``."""
    root = Path(root)
    info = read_base_info(root)
    if info is None:
        return None, f"no shipped base in {root}"
    if info.get("params") != dataclasses.asdict(params) or info.get("unnorm_key") != unnorm_key:
        return None, (f"the shipped base is the default recipe's (PretrainParams(), unnorm_key "
                      f"{info.get('unnorm_key')!r}); this run asks for another")
    built = (info.get("world_version"), info.get("base_version"))
    if built != (world.WORLD_VERSION, TINY_BASE_VERSION):
        return None, (f"the shipped base was built for world {built[0]} / base recipe {built[1]}, this code is world "
                      f"{world.WORLD_VERSION} / base recipe {TINY_BASE_VERSION}: pretraining one here (rebuild the "
                      f"shipped copy with `{SHIP_COMMAND}`)")
    return root, dict(info, reused=True, shipped=True)


def ensure_tiny_base(out_dir: str | os.PathLike, unnorm_key: str, params: PretrainParams | None = None,
                     force: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Return ``(path, info)`` of the tiny base (see the module docstring): the one in ``out_dir`` when its key
    matches, else the shipped one when it fits, else train it (``force``: always train)."""
    params = params or PretrainParams()
    if params.episodes <= 0 or params.steps <= 0 or params.vision_steps < 0:
        raise ValueError(f"pretraining needs episodes > 0 and steps > 0 (got {params.episodes}, {params.steps})")
    out = Path(out_dir)
    key = base_cache_key(params, unnorm_key)
    info = read_base_info(out)
    if info and info.get("key") == key and not force:
        info["reused"] = True
        return out, info
    not_shipped = None
    if not force and out.resolve() != SHIPPED_BASE.resolve():
        path, found = shipped_base(params, unnorm_key)
        if path is not None:
            return path, found
        not_shipped = found
    if out.is_dir() and any(out.iterdir()) and not force:
        # out holds another run's base (other PRETRAIN_STEPS, older code) or one put there by hand: never overwrite
        # it - this run's base lives beside it, under its own key (``pretrain-tiny --force`` rebuilds out itself)
        keyed = out.parent / f"{out.name}-{key}"
        kept = f"{out} holds {'a base with key ' + str(info.get('key')) if info else 'a checkpoint not built here'}"
        info = read_base_info(keyed)
        if info and info.get("key") == key:
            info["reused"], info["kept"] = True, kept
            return keyed, info
        path, info = ensure_tiny_base(keyed, unnorm_key, params, force=True, progress=progress)
        info["kept"] = kept
        if not_shipped:
            info["not_shipped"] = not_shipped
        return path, info

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(params.threads)
    try:
        grid = params.image_size // 16   # build_tiny_vla's patch size: one label cell per image token
        frames = labelled_frames(params.episodes, params.seed, "pretrain", params.image_size, progress=progress,
                                 perturb=params.perturb, grid=grid)
        stats = norm_stats_entry(stats_from_arrays(frames["action"], num_trajectories=params.episodes))
        model, processor = build_tiny_vla(norm_stats={unnorm_key: stats}, image_size=params.image_size,
                                          seed=params.seed)
        t_data = time.time() - t0
        log_rows = pretrain_base(model, processor, frames, stats, params, progress=progress)
        action_rows = [r for r in log_rows if r["stage"] == "action"]
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        info = {"key": key, "world_version": world.WORLD_VERSION, "base_version": TINY_BASE_VERSION,
                "params": dataclasses.asdict(params),
                "unnorm_key": unnorm_key, "pretrain_episodes": params.episodes, "frames": len(frames["action"]),
                "seconds": round(time.time() - t0, 1), "data_seconds": round(t_data, 1),
                "first_loss": action_rows[0]["loss"], "last_loss": action_rows[-1]["loss"],
                "last_action_accuracy": action_rows[-1]["action_accuracy"], "log": log_rows}
        (tmp / BASE_MARKER).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        torch.set_num_threads(prev_threads)
    info["reused"] = False
    if not_shipped:
        info["not_shipped"] = not_shipped
    return out, info
