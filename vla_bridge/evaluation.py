"""Held-out evaluation: batched action inference, open-loop L1, replay drift, success, baselines and bootstrap CIs.

The same code evaluates OpenVLA-7B on BridgeData V2 and the tiny VLA on the embedded world. For every evaluated task
(each held-out task, and — for contrast — a few fine-tuning tasks on episodes never trained on) and for three
policies side by side — the **fine-tuned** model, the **base** model before LoRA (the same weights with the adapter
switched off), and the **mean-action** baseline (the mean of the training split's actions, every step) — it measures,
per episode, then averages over the task's episodes with a bootstrap 95 % CI (resampling episodes):

* ``mean_l1_action_error`` — open loop: the policy sees each demonstration frame (image + instruction) and predicts
  the action; L1 between the de-normalized prediction and the demonstrated action, averaged over the episode's frames
  and the 7 dimensions (per dimension too, in eval.json). Units are the dataset's: metres (xyz), radians (rotation)
  and the 0/1 gripper command, so the gripper dominates whenever it is wrong.
* ``replay_pose_drift_cm`` — from the episode's initial end-effector position, integrate the first
  ``REPLAY_HORIZON`` (16) predicted xyz deltas (the predictions at demonstration frames 0..15) and the demonstration's
  16; the distance between the two end points, in cm (shorter episodes use all their frames).
* ``success_rate`` —
  - **embedded world: true closed-loop success.** ``TabletopEnv().reset(instruction, seed, prompt=task)`` rebuilds
    the episode's initial scene from the dataset's sidecar (meta/vla_bridge_episodes.jsonl); the policy then acts
    from the rendered main camera for at most ``max_steps`` (60, the world's episode limit) steps; success = the
    instructed object released inside the instructed target (the world's own check). All episodes run in parallel
    envs and each step's policy calls are batched across them.
  - **Bridge: a documented proxy** (a real success rate needs a WidowX): an episode counts as a success when the
    replay drift is below ``DRIFT_THRESHOLD_CM`` (5 cm) AND the gripper close/open events of the open-loop
    predictions match the demonstration's — same events in the same order, each within ±``GRIPPER_TOLERANCE_STEPS``
    (2) steps (the gripper command is binarized at 0.5; the initial state's gripper is the starting point). On the
    embedded world the proxy is computed too (``proxy_success_rate`` in eval.json), so the two can be compared.

Batched inference (:class:`BatchedActionPredictor`): one ``generate()`` per batch — greedy, KV cache, exactly 7 new
tokens. OpenVLA's forward (and the tiny VLA's) inserts the image patches right after BOS and its generation path
passes no ``position_ids``, so a batch cannot simply be left-padded through ``model.generate`` (it also refuses
batches > 1). The predictor therefore builds the multimodal sequence itself — ``[pads][BOS][patches][prompt][▁]``
with the pads masked out — and calls the language model's ``generate(inputs_embeds=..., attention_mask=...)``, whose
Llama ``prepare_inputs_for_generation`` derives ``position_ids`` from the attention mask, so every real token keeps
the position it has in the per-frame call. By default frames are bucketed by prompt length (the same instruction
gives the same length, so evaluation batches need no padding at all) and the tokens are identical to per-frame
``predict_action`` in fp32 (tests/test_evaluation.py checks it on a mixed batch); ``padding=True`` left-pads mixed
lengths into one call instead (correct positions; tokens identical up to float rounding of the padded rows' matmuls).

``python -m vla_bridge bench-eval`` times batched vs per-frame inference on the same frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from .tokenization import (
    ActionTokenizer,
    action_stats as _action_stats,
    build_prompt,
    space_token_id,
    unnormalize_actions,
)
from .data.splits import GROUP_TITLES as _SPLIT_GROUP_TITLES
from .data.stream import feature_names

SCHEMA_VERSION = 1
REPLAY_HORIZON = 16                # predicted / demonstrated xyz deltas integrated for the drift
DRIFT_THRESHOLD_CM = 5.0           # Bridge proxy: replay drift below this ...
GRIPPER_TOLERANCE_STEPS = 2        # ... and gripper events within ± this many steps of the demonstration's
GRIPPER_THRESHOLD = 0.5            # gripper command > 0.5 = open (Bridge / bridge_orig convention)
N_BOOT = 1000
CI_LEVEL = 0.95
DEFAULT_MAX_BATCH = 64

POLICY_FINETUNED = "fine-tuned"
POLICY_BASE = "base (before LoRA)"
POLICY_MEAN = "mean-action"
DEFAULT_POLICIES = (POLICY_FINETUNED, POLICY_BASE, POLICY_MEAN)
_POLICY_ALIASES = {"finetuned": POLICY_FINETUNED, "fine-tuned": POLICY_FINETUNED, "ft": POLICY_FINETUNED,
                   "base": POLICY_BASE, POLICY_BASE: POLICY_BASE, "mean": POLICY_MEAN, "mean-action": POLICY_MEAN}

# Evaluation groups and their titles; "train_seen" is the fallback contrast group for datasets without fresh
# episodes of training tasks (Bridge): episodes of the most frequent training tasks that training DID see.
GROUP_TITLES = {**_SPLIT_GROUP_TITLES, "train_seen": "fine-tuning tasks, episodes seen in training"}
CONTRAST_GROUPS = ("finetune_eval", "train_seen")

CLOSED_LOOP_DEFINITION = (
    "closed-loop success on the embedded world: TabletopEnv().reset(instruction, seed, prompt=task) rebuilds the "
    "episode's initial scene from meta/vla_bridge_episodes.jsonl, the policy acts from the rendered main camera "
    "(image_0) for at most {max_steps} steps at 5 Hz, success = the instructed object released inside the instructed "
    "target (the world's own check, sticky)")
PROXY_DEFINITION = (
    "proxy success (no robot to run the policy on): replay drift over the first {horizon} steps < {threshold:g} cm AND "
    "the gripper close/open events of the open-loop predictions (command binarized at {grip:g}) equal the "
    "demonstration's in kind and order, each within ±{tol} steps")


# ====================================================================================================== metrics


def l1_action_error(pred: np.ndarray, demo: np.ndarray) -> tuple[float, np.ndarray]:
    """Open-loop L1 of one episode: (mean over frames and dimensions, per-dimension mean over frames)."""
    pred, demo = np.asarray(pred, np.float64), np.asarray(demo, np.float64)
    if pred.shape != demo.shape or pred.ndim != 2 or len(pred) == 0:
        raise ValueError(f"predicted {pred.shape} and demonstrated {demo.shape} actions must be equal (T, D), T > 0")
    err = np.abs(pred - demo)
    return float(err.mean()), err.mean(axis=0)


def split_l1(l1_per_dim: np.ndarray) -> tuple[float, float]:
    """(motion, gripper) L1 from the 7 per-dimension L1s: the mean over xyz + rotation (m, rad), and the gripper's
    (0/1). They are reported apart because a gripper error of 0.5 dwarfs centimetre-scale motion errors in the
    7-dimension mean."""
    d = np.asarray(l1_per_dim, np.float64)
    return float(d[:-1].mean()), float(d[-1])


def integrate_xyz(initial_xyz: Sequence[float], deltas: np.ndarray) -> np.ndarray:
    """End-effector path from ``initial_xyz`` under per-step xyz deltas: (T + 1, 3), row 0 = the start."""
    d = np.asarray(deltas, np.float64).reshape(-1, 3)
    start = np.asarray(initial_xyz, np.float64).reshape(1, 3)
    return np.concatenate([start, start + np.cumsum(d, axis=0)], axis=0)


def replay_drift_cm(pred: np.ndarray, demo: np.ndarray, initial_xyz: Sequence[float],
                    horizon: int = REPLAY_HORIZON) -> float:
    """Distance (cm) between the end points of the first ``horizon`` predicted and demonstrated xyz deltas (metres),
    both integrated from ``initial_xyz``; episodes shorter than ``horizon`` use all their frames."""
    pred, demo = np.asarray(pred, np.float64), np.asarray(demo, np.float64)
    n = min(int(horizon), len(pred), len(demo))
    if n <= 0:
        raise ValueError("no frames to integrate")
    end_p = integrate_xyz(initial_xyz, pred[:n, :3])[-1]
    end_d = integrate_xyz(initial_xyz, demo[:n, :3])[-1]
    return float(np.linalg.norm(end_p - end_d) * 100.0)


def gripper_events(gripper: Sequence[float], initial: float | None = None,
                   threshold: float = GRIPPER_THRESHOLD) -> list[tuple[int, str]]:
    """[(step, "close" | "open")] where the binarized gripper command changes. The state before step 0 is
    ``initial`` (e.g. the episode's initial gripper state; > threshold = open), else the first command."""
    g = np.asarray(gripper, np.float64).reshape(-1)
    if g.size == 0:
        return []
    is_open = g > threshold
    prev = bool(is_open[0]) if initial is None else bool(float(initial) > threshold)
    out = []
    for t, now in enumerate(is_open.tolist()):
        if now != prev:
            out.append((t, "open" if now else "close"))
        prev = now
    return out


def gripper_events_match(pred_events: Sequence[tuple[int, str]], demo_events: Sequence[tuple[int, str]],
                         tolerance: int = GRIPPER_TOLERANCE_STEPS) -> bool:
    """Same events in the same order, each within ± ``tolerance`` steps."""
    if len(pred_events) != len(demo_events):
        return False
    return all(kp == kd and abs(tp - td) <= tolerance for (tp, kp), (td, kd) in zip(pred_events, demo_events))


def proxy_success(pred: np.ndarray, demo: np.ndarray, initial_state: Sequence[float],
                  threshold_cm: float = DRIFT_THRESHOLD_CM, tolerance: int = GRIPPER_TOLERANCE_STEPS,
                  horizon: int = REPLAY_HORIZON) -> bool:
    """Bridge's success proxy for one episode (see the module docstring). ``initial_state``: Bridge's 8-dim state
    (x y z roll pitch yaw pad gripper); its gripper (index 7, when present) is the events' starting point."""
    s = np.asarray(initial_state, np.float64).reshape(-1)
    drift = replay_drift_cm(pred, demo, s[:3], horizon)
    initial = float(s[7]) if s.size >= 8 else None
    ev_p = gripper_events(np.asarray(pred)[:, -1], initial)
    ev_d = gripper_events(np.asarray(demo)[:, -1], initial)
    return bool(drift < threshold_cm and gripper_events_match(ev_p, ev_d, tolerance))


def bootstrap_ci(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (resampling ``values`` — one per episode — with replacement).
    One value → (v, v); none → (nan, nan)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """{"mean", "ci": [lo, hi], "n"} over episodes."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    lo, hi = bootstrap_ci(v, n_boot, seed)
    return {"mean": float(np.mean(v)) if v else float("nan"), "ci": [lo, hi], "n": len(v)}


# ====================================================================================================== inference


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


EVAL_PROMPT_TOKENS = 64            # prompt tokens budgeted per frame when sizing the eval batch ("In: What ... Out: ▁")
EVAL_VRAM_SHARE = 0.7              # share of the free VRAM the eval batch may take (allocator slack, activations)


def eval_batch_size(free_bytes: float, *, num_layers: int, hidden_size: int, seq_len: int, dtype_bytes: int = 2,
                    num_heads: int | None = None, num_kv_heads: int | None = None, vocab_size: int = 0,
                    cap: int = DEFAULT_MAX_BATCH, share: float = EVAL_VRAM_SHARE) -> int:
    """Frames per ``generate()`` call that fit in ``free_bytes``: ``share`` of it over the bytes one frame needs,
    at least 1 and at most ``cap``. One frame of ``seq_len`` tokens needs its KV cache,
    2 (K and V) x layers x KV width x dtype bytes per token (Llama-2-7B: 2 x 32 x 4096 x 2 B = 0.5 MiB), plus the
    prefill's logits, which transformers 4.40 computes for every position and upcasts to fp32
    (vocab x (dtype bytes + 4) per token)."""
    kv_width = hidden_size * num_kv_heads / num_heads if num_heads and num_kv_heads else hidden_size
    per_token = 2 * num_layers * kv_width * dtype_bytes + vocab_size * (dtype_bytes + 4)
    per_frame = max(1.0, seq_len * per_token)
    return int(max(1, min(int(cap), int(share * max(0.0, float(free_bytes)) // per_frame))))


def auto_eval_batch_size(model: torch.nn.Module, seq_len: int, cap: int = DEFAULT_MAX_BATCH) -> tuple[int, str]:
    """(batch size, reason): sized from the free VRAM on CUDA (:func:`eval_batch_size` with the language model's
    config); ``cap`` on a CPU, where the tiny VLA's cache is a few MB."""
    from .models.openvla import base_model, model_device, model_dtype

    device = model_device(model)
    if device.type != "cuda":
        return int(cap), f"{cap} (no CUDA device: not sized from VRAM)"
    cfg = getattr(base_model(model).config, "text_config", None) or base_model(model).config
    free, _ = torch.cuda.mem_get_info(device)
    dtype = model_dtype(model)
    dtype_bytes = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    n = eval_batch_size(free, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, seq_len=seq_len,
                        dtype_bytes=dtype_bytes, num_heads=getattr(cfg, "num_attention_heads", None),
                        num_kv_heads=getattr(cfg, "num_key_value_heads", None),
                        vocab_size=getattr(cfg, "vocab_size", 0), cap=cap)
    return n, f"{n} (sized from {free / 1024**3:.1f} GiB free VRAM for {seq_len}-token sequences, cap {cap})"


class BatchedActionPredictor:
    """Actions for a batch of frames in one ``generate()`` call, identical to per-frame ``predict_action``.

    ``model``: the VLA (OpenVLA-7B or the tiny VLA), plain or PEFT-wrapped — the adapter is used when active, and
    ``with model.disable_adapter():`` around a call gives the base model. ``processor``: its processor.
    ``unnorm_key``: the norm_stats entry to de-normalize with. ``center_crop``: apply the evaluation crop
    (``images.eval_transform``: 90 % area center crop) — True when training used IMAGE_AUG.

    Images may be uint8 HxWx3 arrays, LeRobot's float CxHxW tensors or PIL images of any size: each is resized to
    the model's input size (as the training pipeline does), center-cropped if asked, then run through the
    processor — the same steps as the training examples minus the randomness.

    ``max_batch_size``: frames per ``generate()`` call. ``padding``: False (default) buckets frames by prompt
    length (exact parity, one call per distinct length and chunk); True left-pads mixed lengths into one call.
    ``threads``: torch intra-op threads during the calls (None: unchanged).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, unnorm_key: str, center_crop: bool,
                 max_batch_size: int | str | None = "auto", padding: bool = False, threads: int | None = None):
        from .models.openvla import base_model, check_unnorm_key, model_device, model_dtype, model_image_size

        self.model = model
        self.vla = base_model(model)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.unnorm_key = check_unnorm_key(model, unnorm_key)
        self.stats = _action_stats(self.vla.config.norm_stats[self.unnorm_key])
        self.action_dim = len(self.stats["q01"])
        self.mask = self.stats.get("mask", [True] * self.action_dim)
        self.action_tokenizer = ActionTokenizer(self.tokenizer)
        self.space_id = space_token_id(self.tokenizer)
        self.center_crop = bool(center_crop)
        self.image_size = model_image_size(processor)
        self.device = model_device(model)
        self.dtype = model_dtype(model)
        if max_batch_size in (None, "auto"):   # sized from free VRAM: [BOS][patches][prompt][▁] + the action tokens
            from .tokenization import num_image_patches

            seq_len = num_image_patches(model) + EVAL_PROMPT_TOKENS + self.action_dim
            max_batch_size, self.batch_reason = auto_eval_batch_size(model, seq_len)
        else:
            self.batch_reason = f"{int(max_batch_size)} (given)"
        self.max_batch_size = max(1, int(max_batch_size))
        self.padding = bool(padding)
        self.threads = threads
        self._ids: dict[str, list[int]] = {}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.calls = 0          # generate() calls made (for the benchmark / tests)

    # ---- inputs
    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of ``build_prompt(instruction)`` with "▁" appended (as ``openvla.action_inputs`` does)."""
        ids = self._ids.get(instruction)
        if ids is None:
            ids = list(self.tokenizer(build_prompt(instruction), add_special_tokens=True).input_ids)
            if ids[-1] != self.space_id:
                ids.append(self.space_id)
            self._ids[instruction] = ids
        return ids

    def preprocess(self, image: Any):
        """One image → the PIL image the processor gets (resized to the model size, then the eval crop if asked)."""
        from .images import eval_transform, to_uint8_hwc

        return eval_transform(to_uint8_hwc(image, self.image_size), self.center_crop)

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        ip = getattr(self.processor, "image_processor", self.processor)
        pv = ip([self.preprocess(im) for im in images], return_tensors="pt")["pixel_values"]
        return pv.to(self.device, dtype=self.dtype)

    # ---- the batched call
    def _embed(self, rows: list[list[int]], pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[pads][BOS][patches][prompt ids after BOS] embeddings and their attention mask (0 on the pads)."""
        vla = self.vla
        lengths = [len(r) for r in rows]
        L, B = max(lengths), len(rows)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        text = vla.get_input_embeddings()(ids.to(self.device))
        patches = vla.projector(vla.vision_backbone(pixel_values)).to(text.dtype)
        n_patch = patches.shape[1]
        if len(set(lengths)) == 1:  # the common case: no padding
            embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            return embeds, mask
        seqs, masks = [], []
        for i, n in enumerate(lengths):
            k = L - n
            seqs.append(torch.cat([text[i, :k], text[i, k:k + 1], patches[i], text[i, k + 1:]], dim=0))
            masks.append(torch.cat([torch.zeros(k, dtype=torch.long), torch.ones(n + n_patch, dtype=torch.long)]))
        return torch.stack(seqs), torch.stack(masks).to(self.device)

    @torch.no_grad()
    def _generate(self, rows: list[list[int]], pixel_values: torch.Tensor,
                  want_logits: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        embeds, mask = self._embed(rows, pixel_values)
        d = self.action_dim
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config chatter (temperature set with do_sample=False, ...)
            out = self.vla.language_model.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=d, min_new_tokens=d, do_sample=False,
                num_beams=1, use_cache=True, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                output_logits=want_logits, return_dict_in_generate=True)
        self.calls += 1
        tokens = out.sequences[:, -d:].cpu().numpy().astype(np.int64)
        logits = out.logits[0].float().cpu() if want_logits else None
        return tokens, logits

    def _batches(self, instructions: Sequence[str]) -> list[list[int]]:
        """Index lists, one per generate() call: by prompt length (unless padding), then chunks of max_batch_size."""
        if self.padding:
            idx = list(range(len(instructions)))
            return [idx[i:i + self.max_batch_size] for i in range(0, len(idx), self.max_batch_size)]
        buckets: dict[int, list[int]] = OrderedDict()
        for i, ins in enumerate(instructions):
            buckets.setdefault(len(self.prompt_ids(ins)), []).append(i)
        out = []
        for idx in buckets.values():
            out += [idx[i:i + self.max_batch_size] for i in range(0, len(idx), self.max_batch_size)]
        return out

    def _run(self, images: Sequence[Any], instructions: Sequence[str], want_logits: bool,
             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, torch.Tensor | None]:
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        n = len(images)
        tokens = np.zeros((n, self.action_dim), dtype=np.int64)
        logits = None
        if n == 0:
            return tokens, None
        with _threads(self.threads), _eval_mode(self.model):
            for idx in self._batches(instructions):
                pv = self.pixel_values([images[i] for i in idx])
                tok, lg = self._generate([self.prompt_ids(instructions[i]) for i in idx], pv, want_logits)
                tokens[idx] = tok
                if lg is not None:
                    if logits is None:
                        logits = torch.zeros((n, lg.shape[-1]), dtype=torch.float32)
                    logits[idx] = lg
                if progress is not None:
                    progress(len(idx))
        return tokens, logits

    # ---- public API
    def predict_token_ids(self, images: Sequence[Any], instructions: Sequence[str],
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
        """The 7 generated action-token ids per frame: (B, 7) int64."""
        return self._run(images, instructions, False, progress)[0]

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (B, 7) → de-normalized actions (B, 7), exactly as ``predict_action`` decodes them."""
        normalized = self.action_tokenizer.decode(np.asarray(token_ids))
        return np.asarray(unnormalize_actions(normalized, self.stats["q01"], self.stats["q99"], self.mask))

    def predict(self, images: Sequence[Any], instructions: Sequence[str],
                progress: Callable[[int], None] | None = None) -> np.ndarray:
        """De-normalized actions (B, 7) for frames ``images`` with instructions ``instructions``."""
        return self.decode(self.predict_token_ids(images, instructions, progress))

    def predict_with_logits(self, images: Sequence[Any], instructions: Sequence[str],
                            action_only: bool = True) -> tuple[np.ndarray, torch.Tensor]:
        """(actions (B, 7), first-action-token logits) from the same generate() calls."""
        tokens, logits = self._run(images, instructions, True)
        return self.decode(tokens), self._select_logits(logits, action_only)

    def first_token_logits(self, images: Sequence[Any], instructions: Sequence[str],
                           action_only: bool = True) -> torch.Tensor:
        """Logits of the next-token distribution at the FIRST action position (the last prompt position, "▁"),
        before any logits processor. ``action_only``: (B, 256) over the action-token ids in ascending id order
        (``ActionTokenizer.action_token_ids``; softmax over them for a distribution, e.g. for a KL); else (B, V) over
        the model's whole (padded) vocabulary."""
        return self._select_logits(self._run(images, instructions, True)[1], action_only)

    def _select_logits(self, logits: torch.Tensor | None, action_only: bool) -> torch.Tensor:
        if logits is None:
            return torch.zeros((0, self.action_tokenizer.n_bins if action_only else 0))
        if not action_only:
            return logits
        r = self.action_tokenizer.action_token_ids
        return logits[:, r.start:r.stop]

    def __repr__(self) -> str:
        return (f"BatchedActionPredictor(unnorm_key={self.unnorm_key!r}, center_crop={self.center_crop}, "
                f"image_size={self.image_size}, max_batch_size={self.batch_reason}, padding={self.padding})")


def per_frame_predict(model: torch.nn.Module, processor: Any, images: Sequence[Any], instructions: Sequence[str],
                      unnorm_key: str, center_crop: bool) -> np.ndarray:
    """The reference: ``model.predict_action`` one frame at a time (the same preprocessing as the predictor)."""
    from .models.openvla import action_inputs, base_model

    pre = BatchedActionPredictor(model, processor, unnorm_key, center_crop)
    vla = base_model(model)
    out = []
    with _eval_mode(model):
        for im, ins in zip(images, instructions):
            inputs = action_inputs(processor, ins, pre.preprocess(im), model=model)
            out.append(np.asarray(vla.predict_action(**inputs, unnorm_key=pre.unnorm_key, do_sample=False)))
    return np.stack(out) if out else np.zeros((0, pre.action_dim))


# ====================================================================================================== policies


class Policy(Protocol):
    """What the open-loop and closed-loop evaluations call: actions for a batch of frames."""

    name: str
    needs_images: bool

    def act(self, images: Sequence[Any] | None, instructions: Sequence[str],
            envs: Sequence[Any] | None = None) -> np.ndarray:
        """(B, 7) de-normalized actions; ``envs`` (closed loop only) for policies that read the simulator."""


class VLAPolicy:
    """A VLA through :class:`BatchedActionPredictor`; ``adapter=False`` runs the PEFT model with its adapter
    disabled (the base model before LoRA)."""

    needs_images = True

    def __init__(self, predictor: BatchedActionPredictor, name: str = POLICY_FINETUNED, adapter: bool = True):
        self.predictor, self.name, self.adapter = predictor, name, bool(adapter)
        if not adapter and not hasattr(predictor.model, "disable_adapter"):
            raise ValueError("the base-model baseline needs a PEFT-wrapped model (model.disable_adapter())")

    def _ctx(self):
        return contextlib.nullcontext() if self.adapter else self.predictor.model.disable_adapter()

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        with self._ctx():
            return self.predictor.predict(images, instructions, progress)


class ConstantPolicy:
    """The same action at every step (the mean-action baseline: the training split's mean action)."""

    needs_images = False

    def __init__(self, action: Sequence[float], name: str = POLICY_MEAN):
        self.action = np.asarray(action, np.float64).reshape(-1)
        self.name = name

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        return np.tile(self.action, (len(instructions), 1))


class ExpertPolicy:
    """The embedded world's scripted expert, reading each env's internal state (an upper bound; tests use it)."""

    needs_images = False
    name = "expert"

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        from .data import world

        if envs is None:
            raise ValueError("the expert acts from the simulator: closed loop only")
        return np.stack([world.expert_action(env) for env in envs]).astype(np.float64)


class RandomPolicy:
    """Uniform random actions within the env's action bounds, gripper open/closed at random."""

    needs_images = False
    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        from .data import world

        n = len(instructions)
        a = self.rng.uniform(world.ACTION_LOW, world.ACTION_HIGH, size=(n, 7))
        a[:, 6] = (self.rng.random(n) < 0.5).astype(np.float64)
        return a


# ====================================================================================================== closed loop


@dataclasses.dataclass
class ClosedLoopEpisode:
    instruction: str       # canonical task (builds the scene)
    seed: int
    prompt: str            # what the policy is told (the task as shown in the dataset)
    episode_index: int = -1
    camera: str | None = None                                   # the view the policy sees (default image_0)
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # a perturbation of that view (probes)


def run_closed_loop(policy: Policy, episodes: Sequence[ClosedLoopEpisode], max_steps: int | None = None,
                    image_size: int | None = None, progress: bool = False, desc: str | None = None,
                    record: bool = False) -> list[dict]:
    """Run ``policy`` in one embedded-world env per episode, all in parallel: each step, ONE batched ``act`` call
    over the envs still running, then a step of each. An env stops at success (sticky) or ``max_steps``.

    Each episode's policy input is its ``camera`` view (image_0 by default) through its ``transform`` (if any) —
    the probes use that to run the loop on the other camera or a colour-shifted image.

    Returns per episode: {episode_index, success, steps, grasped (held the instructed object at some step),
    final_distance_cm (instructed object to target centre at the end), path ((steps + 1, 3) gripper xyz),
    gripper ((steps + 1,) opening)} and, with ``record``, frames (the unperturbed image_0 at every step).
    """
    from .data import world

    max_steps = int(max_steps or world.DEFAULT_MAX_STEPS)
    size = int(image_size or world.DEFAULT_IMAGE_SIZE)
    render = bool(policy.needs_images or record)
    envs, obs = [], []
    for ep in episodes:
        env = world.TabletopEnv(image_size=size, max_steps=max_steps, render=render)
        obs.append(env.reset(ep.instruction, int(ep.seed), prompt=ep.prompt))
        envs.append(env)
    n = len(envs)
    done = np.zeros(n, bool)
    success = np.zeros(n, bool)
    grasped = np.zeros(n, bool)
    steps = np.zeros(n, int)
    dist = np.full(n, np.nan)
    paths = [[env.pos.copy()] for env in envs]
    grips = [[env.gripper] for env in envs]
    frames = [[o[world.IMAGE_KEYS[0]]] if record else [] for o in obs]
    bar = None
    if progress:
        from .progress import tqdm

        bar = tqdm(total=max_steps, desc=desc or f"closed loop: {policy.name}", unit="step", leave=False,
                   mininterval=1.0)

    def view(i: int) -> np.ndarray:
        ep = episodes[i]
        im = obs[i][ep.camera or world.IMAGE_KEYS[0]]
        return ep.transform(im) if ep.transform is not None else im

    for _t in range(max_steps):
        active = np.flatnonzero(~done)
        if active.size == 0:
            break
        images = [view(i) for i in active] if policy.needs_images else None
        actions = policy.act(images, [episodes[i].prompt for i in active], [envs[i] for i in active])
        for j, i in enumerate(active):
            obs[i], d, s, info = envs[i].step(actions[j])
            steps[i] += 1
            grasped[i] |= bool(info["holding_instructed"])
            success[i] = bool(s)
            dist[i] = 100.0 * float(info["distance_to_target"])
            done[i] = bool(d)
            paths[i].append(envs[i].pos.copy())
            grips[i].append(envs[i].gripper)
            if record:
                frames[i].append(obs[i][world.IMAGE_KEYS[0]])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(running=int((~done).sum()), success=int(success.sum()))
    if bar is not None:
        bar.close()
    out = []
    for i, ep in enumerate(episodes):
        r = {"episode_index": ep.episode_index, "success": bool(success[i]), "steps": int(steps[i]),
             "grasped": bool(grasped[i]), "final_distance_cm": float(dist[i]), "path": np.asarray(paths[i]),
             "gripper": np.asarray(grips[i], dtype=np.float64)}
        if record:
            r["frames"] = frames[i]
        out.append(r)
    return out


# ====================================================================================================== selection


@dataclasses.dataclass
class EvalTask:
    group: str
    task_name: str
    episodes: list[int]

    @property
    def is_contrast(self) -> bool:
        return self.group in CONTRAST_GROUPS


def _norm(text: str) -> str:
    from .data.splits import normalize_task

    return normalize_task(text)


def select_eval_tasks(split: Any, sidecar: Sequence[Mapping[str, Any]] | None = None,
                      groups: Sequence[str] | None = None, episodes_per_task: int = 8,
                      max_tasks_per_group: int | None = None, contrast_tasks: int = 3) -> list[EvalTask]:
    """The evaluated (group, task, episodes): per group, episodes are grouped by task — the canonical task on the
    embedded world (so a group's paraphrases count as their task), the normalized task string elsewhere — and each
    task keeps its first ``episodes_per_task`` episodes; tasks are ranked by episode count (then name) and cut to
    ``max_tasks_per_group``. Groups: ``groups`` (default: every held-out group, paraphrases included, plus the
    contrast group). Contrast: ``split.contrast`` ("finetune_eval": fresh episodes of
    fine-tuning tasks) when the dataset has it, else "train_seen": the ``contrast_tasks`` most frequent training tasks'
    episodes, which training did see (stated in the group's title)."""
    by_index = {int(r["episode_index"]): r for r in (sidecar or [])}
    contrast = dict(getattr(split, "contrast", {}) or {})
    available: dict[str, list[int]] = {g: list(e) for g, e in split.eval.items() if e}
    available.update({g: list(e) for g, e in contrast.items() if e})
    if not contrast and getattr(split, "train", None):
        available["train_seen"] = list(split.train)
    if groups is None:
        groups = list(available)
    unknown = [g for g in groups if g not in available]
    if unknown:
        raise ValueError(f"no episodes for evaluation group(s) {unknown}; available: {sorted(available)}")
    out: list[EvalTask] = []
    for g in groups:
        per_task: dict[str, list[int]] = {}
        for e in sorted(available[g]):
            row = by_index.get(int(e))
            name = row["canonical_task"] if row is not None else _norm(split.tasks.get(int(e), ""))
            if not name:
                continue
            per_task.setdefault(name, []).append(int(e))
        ranked = sorted(per_task, key=lambda t: (-len(per_task[t]), t))
        limit = max_tasks_per_group
        if g == "train_seen":
            limit = min(limit or contrast_tasks, contrast_tasks)
        for t in ranked[:limit] if limit else ranked:
            out.append(EvalTask(g, t, per_task[t][: int(episodes_per_task)]))
    return out


# ====================================================================================================== data


@dataclasses.dataclass
class EpisodeData:
    episode_index: int
    instruction: str          # the task string as shown (what the policy is told)
    images: list              # uint8 HxWx3, main camera, dataset resolution
    actions: np.ndarray       # (T, 7) demonstrated
    states: np.ndarray        # (T, 8) (zeros when the dataset has no observation.state)
    other: list | None = None  # uint8 HxWx3 frames of ``other_camera`` when asked for and present


def load_episodes(ds: Any, episodes: Sequence[int], camera: str | None = None,
                  progress: bool = False, other_camera: str | None = None) -> dict[int, EpisodeData]:
    """Every frame of ``episodes`` from the opened stream ``ds`` (``camera``, default the main one, decoded to uint8
    HxWx3; ``other_camera`` too when given and present in every frame). The one decoder of evaluation episodes:
    the evaluation, the probes, the benchmark and the Octo shards use it."""
    from .data.stream import MAIN_CAMERA, collect_episodes
    from .images import to_uint8_hwc

    camera = camera or MAIN_CAMERA
    out: dict[int, EpisodeData] = {}
    eps = [int(e) for e in episodes]
    chunk = 32  # episodes per streaming pass (lerobot frames are float32: ~0.4 MB per 128 px frame pair)
    bar = None
    if progress:
        from .progress import tqdm

        bar = tqdm(total=len(eps), desc="decoding evaluation episodes", unit="episode", leave=False, mininterval=1.0)
    for i in range(0, len(eps), chunk):
        part = collect_episodes(ds, eps[i:i + chunk], cameras=[camera] + ([other_camera] if other_camera and
                                                                            other_camera in ds.meta.video_keys else []))
        for e, frames in part.items():
            out[e] = EpisodeData(
                episode_index=e, instruction=str(frames[0].get("task", "")),
                images=[to_uint8_hwc(f[camera]) for f in frames],
                actions=np.stack([np.asarray(f["action"], np.float64) for f in frames]),
                states=np.stack([np.asarray(f["observation.state"], np.float64) for f in frames])
                if "observation.state" in frames[0] else np.zeros((len(frames), 8)),
                other=[to_uint8_hwc(f[other_camera]) for f in frames]
                if other_camera and all(other_camera in f for f in frames) else None)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    return out


def training_mean_action(ds: Any, train_episodes: Sequence[int]) -> np.ndarray:
    """The mean action of the training split's frames (one pass over the parquet columns, no video decoded)."""
    from .data.stats import stats_from_stream

    return np.asarray(stats_from_stream(ds, list(train_episodes))["action"]["mean"], np.float64)


# ====================================================================================================== report


@dataclasses.dataclass
class EvalReport:
    """What :func:`run_evaluation` returns: ``data`` (= eval.json), ``markdown`` (= table.md), the paths, and the
    per-episode predicted actions (``predictions[policy][episode_index]``, (T, 7)) and decoded episodes
    (``episodes``) for probes and failure mining. Displays as its markdown table in a notebook."""

    data: dict
    markdown: str
    json_path: Path | None
    table_path: Path | None
    predictions: dict = dataclasses.field(default_factory=dict, repr=False)
    episodes: dict = dataclasses.field(default_factory=dict, repr=False)

    def _repr_markdown_(self) -> str:
        return self.markdown

    def rows(self, policy: str | None = None, group: str | None = None) -> list[dict]:
        return [r for r in self.data["rows"] if (policy is None or r["policy"] == policy)
                and (group is None or r["group"] == group)]

    def group(self, group: str, policy: str) -> dict:
        for g in self.data["groups"]:
            if g["group"] == group and g["policy"] == policy:
                return g
        raise KeyError((group, policy))

    def headline(self) -> list[str]:
        """One line per group: the fine-tuned model against each baseline on L1 and success, with whether the 95 %
        CIs overlap (non-overlapping = a difference these episodes resolve)."""
        out = []
        groups = list(dict.fromkeys(g["group"] for g in self.data["groups"]))
        for gname in groups:
            rows = {g["policy"]: g for g in self.data["groups"] if g["group"] == gname}
            ft = rows.get(POLICY_FINETUNED)
            if ft is None:
                continue
            parts = []
            for metric, kind in (("success_rate", "rate"), ("grasp_rate", "rate"), ("l1_motion", "l1"),
                                 ("l1_gripper", "l1"), ("replay_pose_drift_cm", "cm")):
                if not _finite_summary(ft.get(metric) or {}):
                    continue
                cmp = []
                for p in (POLICY_BASE, POLICY_MEAN):
                    if p not in rows or not _finite_summary(rows[p].get(metric) or {}):
                        continue
                    c = compare_metric(metric, ft[metric], rows[p][metric])
                    verdict = ("better" if c["better"] else "not better") + (", CIs do not overlap" if c["separated"]
                                                                             else ", CIs overlap")
                    cmp.append(f"{p} {format_metric(rows[p][metric], kind)} ({verdict})")
                parts.append(f"{metric} {format_metric(ft[metric], kind)} vs " + "; ".join(cmp))
            out.append(f"{ft['title']} ({ft['n_tasks']} tasks, {ft['n_episodes']} episodes): " + " | ".join(parts))
        return out


def ci_separated(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two summaries' 95 % intervals do not overlap (a difference these episodes resolve)."""
    return a["ci"][1] < b["ci"][0] or b["ci"][1] < a["ci"][0]


def compare_metric(metric: str, finetuned: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """The fine-tuned summary against a baseline's on ``metric``: strictly better (higher success / grasp rate, lower
    error or drift) and whether the intervals separate."""
    a, b = finetuned["mean"], baseline["mean"]
    better = a > b if metric.endswith("_rate") else a < b  # rates: higher is better; errors, drift: lower
    return {"finetuned": finetuned, "baseline": baseline, "better": bool(better),
            "separated": ci_separated(finetuned, baseline)}


def format_metric(m: Mapping[str, Any] | None, kind: str = "l1", missing: str = "–") -> str:
    """One metric summary ``{"mean", "ci"}`` as text: ``kind`` "rate" -> "75 % [50, 92]", "cm" -> "3.1 [2.0, 4.4]",
    anything else -> 4 decimals; ``missing`` when there is no finite mean. (The one formatter of table.md, the
    headline and the reflection.)"""
    if not m or m.get("mean") is None or not np.isfinite(m["mean"]):
        return missing
    mean, (lo, hi) = m["mean"], m["ci"]
    if kind == "rate":
        return f"{100 * mean:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"
    if kind == "cm":
        return f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{mean:.4f} [{lo:.4f}, {hi:.4f}]"


# The metrics a per-task verdict against the base is decided on (higher is better for the rates).
VERDICT_METRICS = (("success_rate", "success", "rate"), ("l1_motion", "L1 motion", "l1"),
                   ("l1_gripper", "L1 gripper", "l1"), ("grasp_rate", "grasp", "rate"))
SATURATED_SUCCESS = 0.9   # the base's success at or above this: "already saturated", nothing left to help
MIN_VERDICT_EPISODES = 3  # fewer episodes than this: a bootstrap "interval" is one or two points, no verdict


def task_verdicts(data: Mapping[str, Any], baseline: str = POLICY_BASE) -> list[dict[str, Any]]:
    """Per (group, task): the fine-tuned policy against ``baseline`` on :data:`VERDICT_METRICS`, each metric
    "better" / "worse" only when the two 95 % CIs do not overlap, else "same"; the verdict is "helped" (some metric
    better, none worse), "hurt" (the reverse), "mixed" (both) or "same" (no difference detectable at this n).
    ``saturated``: the base's success is already ≥ :data:`SATURATED_SUCCESS`. Rows without finite numbers are
    skipped for that metric (a NaN is not a finding). A task with fewer than :data:`MIN_VERDICT_EPISODES` episodes
    gets "too_few": resampling one episode gives a zero-width "interval" that separates from anything."""
    rows = {(r["group"], r["task_name"], r["policy"]): r for r in data["rows"]}
    out = []
    for (g, t, p), ft in rows.items():
        base = rows.get((g, t, baseline))
        if p != POLICY_FINETUNED or base is None:
            continue
        too_few = min(ft["n_episodes"], base["n_episodes"]) < MIN_VERDICT_EPISODES
        metrics = {}
        for key, _label, _kind in VERDICT_METRICS:
            a, b = ft.get(key), base.get(key)
            if not (a and b and _finite_summary(a) and _finite_summary(b)):
                continue
            higher = key.endswith("_rate")
            separated = compare_metric(key if higher else "l1", a, b)["separated"]
            metrics[key] = ("too_few" if too_few else "same" if a["mean"] == b["mean"] or not separated else
                            "better" if (a["mean"] > b["mean"]) == higher else "worse")
        ups = [k for k, v in metrics.items() if v == "better"]
        downs = [k for k, v in metrics.items() if v == "worse"]
        verdict = ("too_few" if too_few else "mixed" if ups and downs else "helped" if ups else "hurt" if downs
                   else "same")
        bs = base.get("success_rate") or {}
        out.append({"group": g, "task_name": t, "n_episodes": ft["n_episodes"], "metrics": metrics,
                    "better": ups, "worse": downs, "verdict": verdict,
                    "saturated": bool(_finite_summary(bs) and bs["mean"] >= SATURATED_SUCCESS)})
    return out


def _finite_summary(m: Mapping[str, Any]) -> bool:
    return bool(m) and m.get("mean") is not None and bool(np.isfinite(m["mean"]))


def format_verdicts(data: Mapping[str, Any]) -> str:
    """Markdown: one row per task, the fine-tuned and base numbers side by side and the verdict."""
    rows = {(r["group"], r["task_name"], r["policy"]): r for r in data["rows"]}
    keys = [k for k in VERDICT_METRICS if any(k[0] in r for r in data["rows"])]
    lines = ["| task_name | group | n | " + " | ".join(f"{label}: fine-tuned vs base" for _, label, _ in keys)
             + " | verdict (by CI separation) |", "|---|---|---:|" + "---|" * len(keys) + "---|"]
    for v in task_verdicts(data):
        ft, base = rows[(v["group"], v["task_name"], POLICY_FINETUNED)], rows[(v["group"], v["task_name"], POLICY_BASE)]
        cells = [f"{format_metric(ft.get(k), kind)} vs {format_metric(base.get(k), kind)}" for k, _, kind in keys]
        word = v["verdict"]
        if word in ("helped", "hurt", "mixed"):
            word += ": " + ", ".join(f"{dict((k, l) for k, l, _ in VERDICT_METRICS)[m]} "
                                     f"{'better' if m in v['better'] else 'worse'}" for m in v["better"] + v["worse"])
        elif word == "too_few":
            word = f"no verdict: n = {v['n_episodes']} is too few episodes for an interval"
        else:
            word = f"same: no difference detectable at n = {v['n_episodes']}"
        if v["saturated"]:
            word += " (base already saturated on success)"
        lines.append(f"| {v['task_name']} | {v['group']} | {v['n_episodes']} | " + " | ".join(cells) + f" | {word} |")
    return "\n".join(lines)


def _metric_cells(row: Mapping[str, Any]) -> str:
    """The table's metric cells of a group or task row: L1 (all 7 dims), L1 motion, L1 gripper, drift, success,
    grasp ("–" where not measured: grasp needs the closed loop, motion/gripper an eval.json of this version)."""
    return (f"{format_metric(row['mean_l1_action_error'], 'l1')} | {format_metric(row.get('l1_motion'), 'l1')} | "
            f"{format_metric(row.get('l1_gripper'), 'l1')} | {format_metric(row['replay_pose_drift_cm'], 'cm')} | "
            f"{format_metric(row['success_rate'], 'rate')} | {format_metric(row.get('grasp_rate'), 'rate')}")


_METRIC_HEAD = ("L1 all 7 dims | L1 motion (xyz+rot) | L1 gripper | replay_pose_drift_cm | success_rate | "
                "grasp_rate |")


def format_table(data: Mapping[str, Any]) -> str:
    """Markdown: the group summary, then one row per (task, policy)."""
    succ = data["success_definition"]
    lines = [f"### Evaluation: {data.get('run_name', '')}", "",
             f"Mean over episodes with bootstrap {int(100 * data['evaluation']['ci_level'])} % CIs "
             f"({data['evaluation']['n_boot']} resamples of episodes). L1 in action units (m, rad, gripper 0/1); "
             f"drift after {data['evaluation']['replay_horizon']} steps in cm; success: {succ['kind']} — "
             f"{succ['text']}. L1 motion = the 6 xyz + rotation dimensions (m, rad), L1 gripper = the 0/1 command "
             "alone: the 7-dimension mean is dominated by the gripper whenever it is wrong. Grasp = the gripper held "
             "the instructed object at some step (closed loop only).", "",
             "| group | policy | tasks | n_episodes | " + _METRIC_HEAD, "|---|---|---:|---:|---|---|---|---|---|---|"]
    for g in data["groups"]:
        lines.append(f"| {g['title']} | {g['policy']} | {g['n_tasks']} | {g['n_episodes']} | {_metric_cells(g)} |")
    lines += ["", "| task_name | group | policy | n_episodes | " + _METRIC_HEAD, "|---|---|---|---:|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['task_name']} | {r['group']} | {r['policy']} | {r['n_episodes']} | {_metric_cells(r)} |")
    if any(r["policy"] == POLICY_BASE for r in data["rows"]):
        lines += ["", "#### Per task: did LoRA help, hurt, or change nothing detectable against the base?", "",
                  "A metric counts as better or worse only when the two 95 % CIs do not overlap; otherwise the task "
                  "reads \"same: no difference detectable at n = …\" — not \"no difference\".", "",
                  format_verdicts(data)]
    t = data.get("timing", {})
    if t:
        lines += ["", f"Evaluation wall time {t.get('total_s', float('nan')):.0f} s "
                      f"(decode {t.get('load_episodes_s', 0):.0f} s, open loop {t.get('open_loop_s', 0):.0f} s, "
                      f"closed loop {t.get('closed_loop_s', 0):.0f} s)."]
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _model_info(model: Any, processor: Any, cfg: Any, train_result: Any) -> dict:
    from .models.lora import trainable_parameters
    from .models.openvla import base_model

    base = base_model(model)
    info: dict[str, Any] = {"class": type(base).__name__, "wrapper": type(model).__name__,
                            "peft": hasattr(model, "disable_adapter")}
    try:
        trainable, total, share = trainable_parameters(model)
        info.update(parameters=total, trainable_parameters=trainable, trainable_percent=round(share, 4))
    except Exception:  # pragma: no cover - exotic wrappers
        pass
    peft_cfg = getattr(model, "peft_config", None)
    if peft_cfg:
        c = next(iter(peft_cfg.values()))
        info["lora"] = {"r": getattr(c, "r", None), "lora_alpha": getattr(c, "lora_alpha", None),
                        "target_modules": sorted(getattr(c, "target_modules", []) or [])}
    if cfg is not None:
        info.update(policy=getattr(cfg, "policy", None), model_id=getattr(cfg, "model_id", None),
                    precision=getattr(cfg, "precision", None))
    if train_result is not None:
        info["training"] = {"steps": getattr(train_result, "steps", None),
                            "frames_seen": getattr(train_result, "frames_seen", None),
                            "seconds": getattr(train_result, "seconds", None),
                            "last_checkpoint": getattr(train_result, "last_checkpoint", None),
                            "stopped_reason": getattr(train_result, "stopped_reason", None)}
    return info


def _dataset_info(ds: Any, dataset: str | None) -> dict:
    from .data.build import load_build_info

    root = getattr(getattr(ds, "meta", None), "root", None)
    info = getattr(getattr(ds, "meta", None), "info", {}) or {}
    out = {"source": dataset or getattr(getattr(ds, "source", None), "dataset", None),
           "repo_id": getattr(ds, "repo_id", None), "root": str(root) if root else None,
           "codebase_version": info.get("codebase_version"), "fps": info.get("fps"),
           "total_episodes": info.get("total_episodes"), "total_frames": info.get("total_frames")}
    build = load_build_info(root) if root else None
    if build:
        out["embedded_build"] = {k: build.get(k) for k in ("key", "params", "episodes_per_split", "world_fingerprint")}
    return out


def _split_info(split: Any, tasks: Sequence[EvalTask]) -> dict:
    out = {"rule": getattr(split, "rule", None), "details": getattr(split, "details", {}),
           "train_episodes": len(getattr(split, "train", []) or []),
           "train_tasks": len(getattr(split, "train_tasks", []) or []),
           "groups": {}}
    for t in tasks:
        g = out["groups"].setdefault(t.group, {"title": GROUP_TITLES.get(t.group, t.group), "held_out":
                                               t.group not in CONTRAST_GROUPS, "tasks": {}})
        g["tasks"][t.task_name] = t.episodes
    return out


# ====================================================================================================== the run


def _resolve_policies(policies: Iterable[str]) -> list[str]:
    out = []
    for p in policies:
        if p not in _POLICY_ALIASES:
            raise ValueError(f"unknown policy {p!r}; expected some of {list(DEFAULT_POLICIES)}")
        out.append(_POLICY_ALIASES[p])
    return list(dict.fromkeys(out))


def run_evaluation(
    model: Any,
    processor: Any,
    ds: Any,
    split: Any,
    *,
    cfg: Any = None,
    unnorm_key: str | None = None,
    out_dir: str | Path | None = None,
    run_name: str | None = None,
    episodes_per_task: int | None = None,
    max_tasks_per_group: int | None = None,
    groups: Sequence[str] | None = None,
    policies: Sequence[str] = DEFAULT_POLICIES,
    closed_loop: bool | str = "auto",
    max_steps: int | None = None,
    center_crop: bool | None = None,
    mean_action: Sequence[float] | None = None,
    action_stats: Mapping[str, Any] | None = None,
    seed: int | None = None,
    n_boot: int = N_BOOT,
    max_batch_size: int | str | None = "auto",
    threads: int | None = None,
    contrast_tasks: int = 3,
    train_result: Any = None,
    progress: bool = True,
    write: bool = True,
    keep_frames: bool = False,
    policy_objects: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Evaluate the fine-tuned model, the base model before LoRA and the mean-action baseline on every selected task.

    ``model``/``processor``: the PEFT-wrapped fine-tuned VLA and its processor. ``ds``: the opened stream
    (``stream.open_dataset``; the episodes are decoded from it). ``split``: ``splits.make_split(ds)``.
    ``cfg`` (a RunConfig) supplies the defaults: ``unnorm_key``, ``eval_episodes`` (episodes per task), ``seed``,
    ``image_aug`` (→ ``center_crop``), ``path("eval")`` (→ ``out_dir``), ``run_name``, ``dataset``.

    Knobs for the time budget: ``episodes_per_task``, ``max_tasks_per_group``, ``groups`` (see
    :func:`select_eval_tasks`), ``policies`` (subset of "fine-tuned", "base", "mean-action"), ``closed_loop``
    ("auto": on the embedded world; False: skip it and report the proxy), ``max_steps`` (closed loop, default 60),
    ``max_batch_size`` (frames per generate() call; "auto": sized from free VRAM by :func:`eval_batch_size`, 64 on
    a CPU), ``threads`` (torch threads; None: unchanged).

    The mean-action baseline is ``mean_action`` if given, else the mean over the training split's frames: one pass
    over the parquet columns for a local dataset; for a hub stream the ``action_stats`` entry's mean when given (the
    notebook's statistics: whole dataset when meta/stats.json has them), else that streaming pass.
    ``keep_frames``: keep every decoded image in ``report.episodes`` (else only each episode's first frame, for
    failure mining's contact sheet, and the actions/states: ~50 KB per 128 px frame otherwise stay in memory).

    ``policy_objects`` (a policy name → :class:`Policy` mapping, e.g. Octo's, which runs in its own environment)
    replaces the VLA's batched predictor and the base-model switch: ``model``/``processor`` are then unused and
    ``model_info`` describes the model in eval.json (the "base (before LoRA)" row is whatever policy is given under
    that name: for Octo, the weights before fine-tuning). Metrics, closed loop and the table are the same code.

    Writes ``<out_dir>/eval.json`` and ``<out_dir>/table.md`` (unless ``write=False``) and returns an
    :class:`EvalReport` (its ``markdown`` is the table; it renders itself in a notebook).
    """
    from .data.build import load_episode_sidecar
    from .data.stream import MAIN_CAMERA

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    unnorm_key = unnorm_key or getattr(cfg, "unnorm_key", None)
    if unnorm_key is None:
        raise ValueError("run_evaluation needs unnorm_key (or cfg)")
    episodes_per_task = int(episodes_per_task or getattr(cfg, "eval_episodes", None) or 8)
    seed = int(seed if seed is not None else getattr(cfg, "seed", 0) or 0)
    if center_crop is None:
        center_crop = bool(getattr(cfg, "image_aug", True))
    run_name = run_name or getattr(cfg, "run_name", None) or "eval"
    if out_dir is None:
        out_dir = cfg.path("eval") if cfg is not None else Path("outputs") / "eval" / run_name
    out_dir = Path(out_dir)
    policies = _resolve_policies(policies)

    root = getattr(getattr(ds, "meta", None), "root", None)
    sidecar = load_episode_sidecar(root) if root is not None else None
    embedded = sidecar is not None
    if closed_loop == "auto":
        closed_loop = embedded
    if closed_loop and not embedded:
        raise ValueError("closed-loop success needs the embedded world (its episodes' scenes); on Bridge the success "
                         "column is the proxy: pass closed_loop=False or 'auto'")
    from .data import world

    max_steps = int(max_steps or world.DEFAULT_MAX_STEPS)
    if policy_objects is None and POLICY_BASE in policies and not hasattr(model, "disable_adapter"):
        warnings.warn("the model is not PEFT-wrapped: the base-model baseline is skipped", stacklevel=2)
        policies.remove(POLICY_BASE)

    tasks = select_eval_tasks(split, sidecar, groups, episodes_per_task, max_tasks_per_group, contrast_tasks)
    if not tasks:
        raise ValueError("nothing to evaluate: no evaluation group has episodes")
    all_eps = sorted({e for t in tasks for e in t.episodes})
    side = {int(r["episode_index"]): r for r in (sidecar or [])}

    t0 = time.perf_counter()
    data = load_episodes(ds, all_eps, MAIN_CAMERA, progress=progress)
    timing["load_episodes_s"] = time.perf_counter() - t0
    mean_source = "given"
    if mean_action is None:
        local = bool(getattr(getattr(ds, "source", None), "is_local", root is not None))
        if not local and action_stats is not None:
            mean_action = _action_stats(action_stats)["mean"]
            mean_source = "action_stats mean (" + str(action_stats.get("source", "norm_stats entry")) + ")"
        else:
            mean_action = training_mean_action(ds, split.train)
            mean_source = f"mean over the {len(split.train)} training episodes' frames"
    mean_action = np.asarray(mean_action, np.float64)

    predictor = None
    given = {_POLICY_ALIASES.get(k, k): v for k, v in (policy_objects or {}).items()}
    if policy_objects is None:
        predictor = BatchedActionPredictor(model, processor, unnorm_key, center_crop, max_batch_size,
                                           threads=threads)
    pol_objs: dict[str, Any] = {}
    for p in policies:
        if p in given:  # a policy from elsewhere (Octo's worker)
            pol_objs[p] = given[p]
        elif predictor is None and p != POLICY_MEAN:
            continue    # no VLA here to build it from
        elif p == POLICY_FINETUNED:
            pol_objs[p] = VLAPolicy(predictor, p, adapter=True)
        elif p == POLICY_BASE:
            pol_objs[p] = VLAPolicy(predictor, p, adapter=False)
        else:
            pol_objs[p] = ConstantPolicy(mean_action, p)

    # ---- open loop: every frame of every evaluated episode, one batched pass per policy
    images = [im for e in all_eps for im in data[e].images]
    instructions = [data[e].instruction for e in all_eps for _ in data[e].images]
    offsets = np.cumsum([0] + [len(data[e].images) for e in all_eps])
    predictions: dict[str, dict[int, np.ndarray]] = {}
    t0 = time.perf_counter()
    open_loop_s: dict[str, float] = {}
    for p, pol in pol_objs.items():
        t1 = time.perf_counter()
        bar = None
        cb = None
        if progress and pol.needs_images:
            from .progress import tqdm

            bar = tqdm(total=len(images), desc=f"open loop: {p}", unit="frame", leave=False, mininterval=1.0)
            cb = bar.update
        acts = pol.act(images, instructions, None, cb) if pol.needs_images else pol.act(None, instructions)
        if bar is not None:
            bar.close()
        predictions[p] = {e: np.asarray(acts[offsets[i]:offsets[i + 1]]) for i, e in enumerate(all_eps)}
        open_loop_s[p] = time.perf_counter() - t1
    timing["open_loop_s"] = time.perf_counter() - t0
    timing["open_loop_frames"] = len(images)

    # ---- closed loop (embedded world)
    closed: dict[str, dict[int, dict]] = {}
    closed_loop_s: dict[str, float] = {}
    t0 = time.perf_counter()
    if closed_loop:
        size = int(np.asarray(data[all_eps[0]].images[0]).shape[0])
        cl_eps = [ClosedLoopEpisode(side[e]["canonical_task"], int(side[e]["seed"]), side[e]["task"], e)
                  for e in all_eps]
        for p, pol in pol_objs.items():
            t1 = time.perf_counter()
            res = run_closed_loop(pol, cl_eps, max_steps, size, progress=progress, desc=f"closed loop: {p}")
            closed[p] = {r["episode_index"]: r for r in res}
            closed_loop_s[p] = time.perf_counter() - t1
    timing["closed_loop_s"] = time.perf_counter() - t0

    # ---- per-episode metrics
    action_dim = int(np.asarray(data[all_eps[0]].actions).shape[1]) if all_eps else len(world.ACTION_NAMES)
    action_names = feature_names(getattr(getattr(ds, "meta", None), "features", {}).get("action"), action_dim)
    per_episode: list[dict] = []
    task_of = {e: t for t in tasks for e in t.episodes}
    for p in pol_objs:
        for e in all_eps:
            d = data[e]
            pred = predictions[p][e]
            l1, l1_dim = l1_action_error(pred, d.actions)
            l1_motion, l1_gripper = split_l1(l1_dim)
            drift = replay_drift_cm(pred, d.actions, d.states[0, :3])
            prox = proxy_success(pred, d.actions, d.states[0])
            rec = {"episode_index": e, "policy": p, "group": task_of[e].group, "task_name": task_of[e].task_name,
                   "instruction": d.instruction, "n_frames": len(d.actions), "l1": l1,
                   "l1_motion": l1_motion, "l1_gripper": l1_gripper, "l1_per_dim": dict(zip(action_names, l1_dim.tolist())), "drift_cm": drift,
                   "proxy_success": prox}
            if closed_loop:
                c = closed[p][e]
                rec.update(success=c["success"], closed_loop_steps=c["steps"], grasped=c["grasped"],
                           final_distance_cm=c["final_distance_cm"])
            else:
                rec["success"] = prox
            if e in side:
                rec["seed"] = int(side[e]["seed"])
            per_episode.append(rec)

    def aggregate(recs: list[dict], s: int) -> dict:
        out = {"n_episodes": len(recs),
               "mean_l1_action_error": summarize([r["l1"] for r in recs], n_boot, s),
               "l1_motion": summarize([r["l1_motion"] for r in recs], n_boot, s + 5),
               "l1_gripper": summarize([r["l1_gripper"] for r in recs], n_boot, s + 6),
               "l1_per_dim": {k: float(np.mean([r["l1_per_dim"][k] for r in recs])) for k in action_names},
               "replay_pose_drift_cm": summarize([r["drift_cm"] for r in recs], n_boot, s + 1),
               "success_rate": summarize([float(r["success"]) for r in recs], n_boot, s + 2),
               "proxy_success_rate": summarize([float(r["proxy_success"]) for r in recs], n_boot, s + 3)}
        if closed_loop:
            out["grasp_rate"] = summarize([float(r["grasped"]) for r in recs], n_boot, s + 4)
        return out

    rows, group_rows = [], []
    group_order = list(dict.fromkeys(t.group for t in tasks))
    for gi, g in enumerate(group_order):
        for ti, t in enumerate([t for t in tasks if t.group == g]):
            for pi, p in enumerate(pol_objs):
                recs = [r for r in per_episode if r["policy"] == p and r["episode_index"] in set(t.episodes)]
                rows.append({"task_name": t.task_name, "group": g, "policy": p, "episodes": t.episodes,
                             **aggregate(recs, seed + 1000 * gi + 10 * ti)})
        for p in pol_objs:
            recs = [r for r in per_episode if r["policy"] == p and r["group"] == g]
            group_rows.append({"group": g, "title": GROUP_TITLES.get(g, g), "held_out": g not in CONTRAST_GROUPS,
                               "policy": p, "n_tasks": sum(1 for t in tasks if t.group == g),
                               **aggregate(recs, seed + 1000 * gi + 999)})

    if closed_loop:
        success_def = {"kind": "closed_loop", "max_steps": max_steps,
                       "text": CLOSED_LOOP_DEFINITION.format(max_steps=max_steps)}
    else:
        success_def = {"kind": "proxy", "drift_threshold_cm": DRIFT_THRESHOLD_CM,
                       "gripper_tolerance_steps": GRIPPER_TOLERANCE_STEPS, "replay_horizon": REPLAY_HORIZON,
                       "text": PROXY_DEFINITION.format(horizon=REPLAY_HORIZON, threshold=DRIFT_THRESHOLD_CM,
                                                       grip=GRIPPER_THRESHOLD, tol=GRIPPER_TOLERANCE_STEPS)}
    success_def["proxy_text"] = PROXY_DEFINITION.format(horizon=REPLAY_HORIZON, threshold=DRIFT_THRESHOLD_CM,
                                                        grip=GRIPPER_THRESHOLD, tol=GRIPPER_TOLERANCE_STEPS)

    timing["total_s"] = time.perf_counter() - t_start
    timing["open_loop_s_per_policy"] = open_loop_s
    timing["closed_loop_s_per_policy"] = closed_loop_s
    timing["generate_calls"] = predictor.calls if predictor is not None else None
    timing["torch_threads"] = threads if threads is not None else torch.get_num_threads()
    payload = {
        "schema_version": SCHEMA_VERSION,
        "run_name": run_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": cfg.as_dict() if hasattr(cfg, "as_dict") else ({} if cfg is None else dict(cfg)),
        "model": ({**_model_info(model, processor, cfg, train_result), "unnorm_key": predictor.unnorm_key}
                  if predictor is not None else {**dict(model_info or {}), "unnorm_key": unnorm_key}),
        "dataset": _dataset_info(ds, getattr(cfg, "dataset", None)),
        "split": _split_info(split, tasks),
        "evaluation": {"episodes_per_task": episodes_per_task, "max_tasks_per_group": max_tasks_per_group,
                       "groups": group_order, "policies": list(pol_objs), "closed_loop": bool(closed_loop),
                       "max_steps": max_steps if closed_loop else None, "replay_horizon": REPLAY_HORIZON,
                       "center_crop": bool(center_crop), "n_boot": n_boot, "ci_level": CI_LEVEL, "seed": seed,
                       "camera": MAIN_CAMERA,
                       "batched_inference": repr(predictor) if predictor is not None else
                       "; ".join(repr(p) for p in pol_objs.values()),
                       "metrics": {"mean_l1_action_error": "open-loop mean |predicted - demonstrated| over frames "
                                   "and action dimensions, de-normalized action units, per episode, then averaged",
                                   "l1_motion": "the same over the 6 motion dimensions (xyz in m, rotation in rad)",
                                   "l1_gripper": "the same over the gripper command (0/1) alone",
                                   "grasp_rate": "closed loop: share of episodes where the gripper held the "
                                   "instructed object at some step",
                                   "replay_pose_drift_cm": f"|sum of the first {REPLAY_HORIZON} predicted xyz deltas -"
                                   f" sum of the demonstration's| (both from the initial state), cm",
                                   "success_rate": success_def["text"]}},
        "success_definition": success_def,
        "baselines": {
            POLICY_MEAN: {"description": "the mean of the training split's actions, applied at every step "
                          "(open loop: as the prediction for every frame; closed loop: the constant action)",
                          "action": mean_action.tolist(), "source": mean_source},
            POLICY_BASE: {"description": (model_info or {}).get("base_description") or
                          "the same model with its LoRA adapter disabled (the weights before "
                          "fine-tuning), de-normalizing with the same statistics"},
        },
        "rows": rows,
        "groups": group_rows,
        "per_episode": per_episode,
        "timing": timing,
    }
    payload = _jsonable(payload)
    markdown = format_table(payload)
    json_path = table_path = None
    if write:
        from .config import write_json

        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = write_json(out_dir / "eval.json", payload)
        table_path = out_dir / "table.md"
        table_path.write_text(markdown)
    if not keep_frames:  # the first frame stays: failure mining's contact sheet shows it (one image per episode)
        data = {e: dataclasses.replace(d, images=list(d.images[:1])) for e, d in data.items()}
    return EvalReport(payload, markdown, json_path, table_path, predictions, data)


__all__ = [
    "REPLAY_HORIZON", "DRIFT_THRESHOLD_CM", "GRIPPER_TOLERANCE_STEPS", "GRIPPER_THRESHOLD", "N_BOOT", "CI_LEVEL",
    "POLICY_FINETUNED", "POLICY_BASE", "MIN_VERDICT_EPISODES", "POLICY_MEAN", "DEFAULT_POLICIES", "GROUP_TITLES",
    "l1_action_error", "integrate_xyz", "replay_drift_cm", "gripper_events", "gripper_events_match",
    "proxy_success", "bootstrap_ci", "summarize", "BatchedActionPredictor", "per_frame_predict", "Policy",
    "format_metric", "VLAPolicy", "ConstantPolicy", "ExpertPolicy", "RandomPolicy", "ClosedLoopEpisode",
    "run_closed_loop",
    "EvalTask", "select_eval_tasks", "EpisodeData", "load_episodes", "training_mean_action", "EvalReport",
    "ci_separated", "compare_metric", "format_table", "run_evaluation", "split_l1", "task_verdicts",
    "format_verdicts", "VERDICT_METRICS",
]
