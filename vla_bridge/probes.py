"""Where does the fine-tuned policy generalize, and where does it fall apart? Probes, a rollout video, failure mining.

Everything here works on the shared interface (``processor(prompt, image)``, the model's forward with
``past_key_values``, ``config.norm_stats``), so it runs the same on the tiny VLA and on OpenVLA-7B.

Probes (:func:`run_probes`)
---------------------------
For the held-out evaluation groups (embedded world: held-out task strings, the held-out object family, the unseen
colour; Bridge: held-out task strings and the held-out object), every evaluated frame is fed to the policy once
unperturbed ("base") and once per probe:

* ``paraphrase`` — the instruction re-phrased: ``world.paraphrases`` on the embedded world (cycled over the episodes
  so every template is used), a small set of template rewrites on Bridge (:func:`bridge_paraphrases`);
* ``color_shift`` — a deterministic hue rotation of the camera image by ``hue_shift_deg`` degrees (default 90°:
  red → yellow-green, blue → magenta; greys, i.e. the table edges and the robot, are untouched), see
  :func:`color_shift`;
* ``other_camera`` — ``image_1`` in place of ``image_0``. Episodes where ``image_1`` is missing or black (Bridge has
  some) are skipped and counted.

and, as a yardstick, another scene (``other_scene``, the reference): the same camera's frame from a different
evaluated episode (same frame index, the instruction kept) — how far the policy moves when the scene's content
changes completely but stays in distribution. An image probe that moves it much less than that is one the policy
handles; when even another scene barely moves it, the policy does not look at the scene, and the bullets say so
instead of calling it robust. A second
sanity check is the within-episode spread of the predictions against the demonstrations' (:func:`prediction_spread`):
a policy that emits one action per instruction whatever it sees is flagged as collapsed.

Per (group, probe) against the unperturbed input, with n (frames and episodes):

* open-loop L1 (de-normalized, mean over the 7 dimensions, vs the demonstration) with and without the probe: the
  change, the ratio and a 95 % bootstrap interval of the change over episodes;
* mean |Δ| of the predicted actions per dimension, in action units and as a share of the dimension's q01–q99 range;
* the KL divergence KL(base ‖ probe) of the first action token's distribution: softmax over the 256 action-token
  logits at the first action position (nats; 0 = the probe does not change what the model believes), and how often
  its most likely token changes.

On the embedded world the probes are also re-measured in closed loop (success on the same (instruction, seed)
scenes, with and without the probe, all conditions' envs stepped in one lockstep batch) for ``closed_loop_probes``
on ``closed_loop_episodes`` scenes per group. ``run_probes`` writes ``outputs/eval/<run>/
probe.json`` and ``probe.md``: 5-10 bullets generated from the numbers by :func:`probe_bullets` (thresholds stated in
the file), then the table.

Rollout video (:func:`rollout_video`)
-------------------------------------
Embedded world: a closed-loop rollout of the policy from a held-out episode's (instruction, seed), image_0 with the
gripper's path drawn (world xyz projected with the world's own camera model, ``world._cams``) and the instruction,
step and success overlaid. Bridge (or ``kind="open_loop"``): the demonstration's frames with the predicted and the
demonstrated action as arrows (xy deltas from the image centre, scaled). MP4 (imageio-ffmpeg), GIF as a fallback,
plus a PNG strip of a few frames for inline display, under ``outputs/videos/<run>/``.

Failure mining (:func:`mine_failures`)
--------------------------------------
Held-out episodes ranked by error (failures first where success was measured, then open-loop L1), sliced by verb and
by object noun (``world.parse_task`` on the embedded world, :func:`verb_noun` on Bridge) with n, mean L1 and success
per slice, and a contact sheet of the worst 8 (``outputs/figures/<run>/worst_episodes.png``). Its input is best the
evaluation report (``evaluation.run_evaluation``: every evaluated held-out episode, closed-loop success on the world,
the proxy on Bridge); a :class:`ProbeResult` or hand-made rows work too.

Inference goes through ``evaluation.BatchedActionPredictor.predict_with_logits`` (actions and first-token logits from
the same ``generate()`` calls, the evaluation table's preprocessing) via :func:`make_predictor`, and the closed loop
through ``evaluation.run_closed_loop`` (its episodes can name another camera or a perturbation of the view, and it
can record the frames and the gripper path the video needs): one predictor and one closed-loop runner for the
evaluation table and the probes alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .images import to_uint8_hwc
from .evaluation import ClosedLoopEpisode, run_closed_loop
from .data.stream import feature_names

MAIN_CAMERA = "observation.images.image_0"
OTHER_CAMERA = "observation.images.image_1"
PROBES = ("paraphrase", "color_shift", "other_camera")
PROBE_TITLES = {"paraphrase": "Paraphrased instructions", "color_shift": "A {deg:g}° hue rotation of the image",
                "other_camera": "The other camera (image_1 for image_0)",
                "other_scene": "Another episode's scene (same camera, instruction kept)"}
# The reference condition: how far the policy moves when the scene's content changes completely (another evaluated
# episode's frame). A probe that moves it much less than this is one the policy handles; when even another scene
# barely moves it, the policy does not look at the scene.
REFERENCE = "other_scene"
# Evaluation groups probed, in this order, when present in the split (world: first three; Bridge: heldout + object).
PROBE_GROUPS = ("heldout", "heldout_family", "unseen_color", "heldout_object")

HUE_SHIFT_DEG = 90.0
BLACK_MAX = 10                # an image whose 99th-percentile pixel is <= this is "black" (a dead camera)

# Thresholds the generated bullets use (stated in probe.md).
KL_SMALL = 0.10               # nats: below it the first action token's distribution "barely moves"
COLLAPSE_SPREAD = 0.2         # predictions' within-episode spread / the demonstrations' below this = "collapsed"
L1_SMALL = 0.10               # relative change of open-loop L1 below which the error "barely moves"
L1_BREAK_RATIO = 1.5          # L1 with the probe / without it at or above which the probe "breaks" the policy


# ==================================================================================================================
# Perturbations
# ==================================================================================================================
def color_shift(image: Any, degrees: float = HUE_SHIFT_DEG) -> np.ndarray:
    """Rotate the hue of every pixel by ``degrees`` (HSV, PIL's 8-bit hue: a shift of round(degrees / 360 * 256)).

    Deterministic (no randomness); saturation and value are kept, so greys stay grey. 90° maps red to yellow-green,
    green to blue-ish, blue to magenta. Input: uint8 HxWx3 (or anything ``images.to_uint8_hwc`` takes).
    """
    from PIL import Image

    arr = to_uint8_hwc(image)
    h, s, v = Image.fromarray(arr).convert("HSV").split()
    k = int(round(float(degrees) / 360.0 * 256.0)) % 256
    h = Image.fromarray(((np.asarray(h, dtype=np.int32) + k) % 256).astype(np.uint8))
    return np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"), dtype=np.uint8).copy()


def is_missing_or_black(image: Any) -> bool:
    """True when a camera image is absent, empty, or black (99th-percentile pixel <= ``BLACK_MAX``)."""
    if image is None:
        return True
    arr = to_uint8_hwc(image)
    return arr.size == 0 or float(np.percentile(arr, 99)) <= BLACK_MAX


_BRIDGE_VERB_SWAPS = {"put": "place", "place": "put", "move": "bring", "pick": "grab", "take": "grab",
                      "push": "slide", "slide": "push", "flip": "turn over", "open": "pull open", "close": "shut"}


def bridge_paraphrases(task: str) -> list[str]:
    """Template rewrites of a Bridge task string: a verb synonym (put ↔ place, move → bring, pick up → grab, ...),
    "please …" and "go ahead and …". [] for a blank task."""
    t = " ".join(str(task or "").strip().rstrip(".").split())
    if not t:
        return []
    low = t.lower()
    words = low.split()
    out: list[str] = []
    if words[0] in _BRIDGE_VERB_SWAPS:
        rest = words[1:]
        if words[0] == "pick" and rest[:1] == ["up"]:
            rest = rest[1:]
        out.append(" ".join([_BRIDGE_VERB_SWAPS[words[0]]] + rest))
    out += [f"please {low}", f"go ahead and {low}"]
    return [s for i, s in enumerate(out) if s != low and s not in out[:i]]


def paraphrase_for(task: str, k: int, world_mode: bool) -> str | None:
    """The k-th paraphrase (cycled) of ``task``: ``world.paraphrases`` on the embedded world, else
    :func:`bridge_paraphrases`; None when there is none (blank task)."""
    if world_mode:
        from .data import world

        alts = world.paraphrases(task)
    else:
        alts = bridge_paraphrases(task)
    return alts[k % len(alts)] if alts else None


# ==================================================================================================================
# Metrics (pure numpy)
# ==================================================================================================================
def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) in nats per row; p, q = softmax of the given logits (..., K). 0 iff the distributions match."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def l1_per_frame(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean over the action dimensions of |pred - target|, one value per frame (N, D) -> (N,)."""
    return np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64)).mean(axis=-1)


def mean_abs_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean over frames of |a - b| per action dimension (N, D) -> (D,)."""
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=0)


def weighted_bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, n_boot: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the (weighted) mean of per-episode ``values``; None with < 2 values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = (v[idx] * w[idx]).sum(1) / np.maximum(w[idx].sum(1), 1e-12)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


# ==================================================================================================================
# Inference
# ==================================================================================================================
def make_predictor(model, processor, unnorm_key: str, center_crop: bool = True, batch_size: int = 32):
    """``evaluation.BatchedActionPredictor`` wrapped to ``run(images, instructions) -> (actions, logits (N, 256))``:
    actions and first-action-token logits from the same ``generate()`` calls as the evaluation table."""
    from .evaluation import BatchedActionPredictor

    return EvaluationPredictor(BatchedActionPredictor(model, processor, unnorm_key, center_crop,
                                                      max_batch_size=batch_size))


class EvaluationPredictor:
    """Adapter: ``evaluation.BatchedActionPredictor`` → ``run(images, instructions) -> (actions, logits)``."""

    def __init__(self, inner):
        self.inner = inner

    def run(self, images: Sequence[Any], instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not len(images):
            return np.zeros((0, self.inner.action_dim)), np.zeros((0, 256), dtype=np.float32)
        acts, logits = self.inner.predict_with_logits(list(images), list(instructions), action_only=True)
        logits = logits.detach().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
        return np.asarray(acts, dtype=np.float64), logits.astype(np.float32)

    def predict(self, images: Sequence[Any], instructions: Sequence[str]) -> np.ndarray:
        """Actions only (the closed loop's per-step call: no logits gathered)."""
        return np.asarray(self.inner.predict(list(images), list(instructions)), dtype=np.float64)

    def __repr__(self) -> str:
        return f"EvaluationPredictor({self.inner!r})"


# ==================================================================================================================
# Data
# ==================================================================================================================
@dataclasses.dataclass
class EpisodeData:
    episode: int
    group: str
    task: str
    images: np.ndarray                  # image_0, (T, H, W, 3) uint8 (every frame_stride-th frame)
    other: np.ndarray | None            # image_1 or None when missing / black
    actions: np.ndarray                 # (T, D) demonstration
    states: np.ndarray                  # (T, 8) (zeros when the dataset has none)
    meta: dict                          # world sidecar row (seed, canonical_task, ...) or {}


def world_sidecar(ds) -> dict[int, dict] | None:
    """Episode → the embedded world's per-episode metadata (seed, canonical task, ...); None for other datasets."""
    from .data.build import load_episode_sidecar

    root = getattr(getattr(ds, "meta", None), "root", None)
    rows = load_episode_sidecar(root) if root is not None else None
    return None if rows is None else {int(r["episode_index"]): r for r in rows}


def load_episodes(ds, episodes_by_group: Mapping[str, Sequence[int]], frame_stride: int = 1,
                  sidecar: Mapping[int, dict] | None = None, split=None) -> list[EpisodeData]:
    """Decode the episodes once (``evaluation.load_episodes``: image_0 and image_1, actions, states) and group them,
    keeping every ``frame_stride``-th frame; image_1 becomes None when it is missing or black."""
    from .evaluation import load_episodes as decode

    want = sorted({int(e) for eps in episodes_by_group.values() for e in eps})
    if not want:
        return []
    decoded = decode(ds, want, MAIN_CAMERA, other_camera=OTHER_CAMERA)
    keep = slice(None, None, max(1, int(frame_stride)))
    out = []
    for group, eps in episodes_by_group.items():
        for e in eps:
            d = decoded[int(e)]
            other = None
            if d.other is not None:
                cand = np.stack(d.other[keep])
                other = None if is_missing_or_black(cand) else cand
            task = d.instruction or (split.tasks.get(int(e), "") if split is not None else "")
            out.append(EpisodeData(int(e), group, task, np.stack(d.images[keep]), other, d.actions[keep],
                                   d.states[keep], dict((sidecar or {}).get(int(e), {}))))
    return out


# ==================================================================================================================
# Closed loop (embedded world)
# ==================================================================================================================
class PredictorPolicy:
    """A probe predictor (``run(images, instructions) -> (actions, logits)``) as an ``evaluation.Policy``, so the
    probes drive ``evaluation.run_closed_loop``."""

    needs_images = True

    def __init__(self, predictor, name: str = "probe"):
        self.predictor, self.name = predictor, name

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        if hasattr(self.predictor, "predict"):
            return self.predictor.predict(images, instructions)
        return self.predictor.run(list(images), list(instructions))[0]


def world_to_image0(xyz: np.ndarray, image_size: int) -> np.ndarray:
    """Project world points (N, 3) to image_0 pixel coordinates (N, 2) with the world's own camera model
    (``world._cams``: the renderer's pinhole camera at the supersampled resolution, scaled back)."""
    from .data import world

    cam = world._cams(int(image_size))[MAIN_CAMERA]
    uv, _ = cam.project(np.asarray(xyz, dtype=np.float64).reshape(-1, 3))
    return uv / float(world._SS)


# ==================================================================================================================
# Probes
# ==================================================================================================================
@dataclasses.dataclass
class ProbeResult:
    rows: list[dict]                    # one per (group, probe), plus group "all" (pooled frames)
    groups: dict[str, dict]             # unperturbed open-loop L1 (and closed-loop success) per group
    closed_loop: dict                   # {group|"all": {condition: {n, successes, rate}}}
    episodes: list[dict]                # per episode: group, task, verb, noun, n_frames, l1, success, ...
    first_frames: dict[int, np.ndarray]  # episode → first image_0 frame (for the contact sheet)
    bullets: list[str]
    config: dict
    timings: dict
    paths: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {"rows": self.rows, "groups": self.groups, "closed_loop": self.closed_loop, "config": self.config}

    def as_dict(self) -> dict:
        return {"config": self.config, "bullets": self.bullets, "rows": self.rows, "groups": self.groups,
                "closed_loop": self.closed_loop, "episodes": self.episodes, "timings": self.timings,
                "paths": {k: str(v) for k, v in self.paths.items()}}

    def table(self) -> str:
        return format_probe_table(self.rows)


def _group_title(g: str) -> str:
    from .data.splits import GROUP_TITLES

    return GROUP_TITLES.get(g, g)


def _probe_title(p: str, deg: float = HUE_SHIFT_DEG) -> str:
    return PROBE_TITLES.get(p, p).format(deg=deg)


def prediction_spread(preds: Sequence[np.ndarray], demos: Sequence[np.ndarray], dim_range: np.ndarray,
                      decimals: int = 4) -> dict:
    """Does the policy's output change within an episode as the demonstration's does? Per episode: distinct
    predicted vs demonstrated actions (rounded to ``decimals``), and the spread ratio = mean over dimensions of
    std(pred) / std(demo) over the episode's frames (dimensions where the demonstration varies, in units of the
    q01-q99 range); averaged over episodes. A ratio near 0 = one action per episode whatever the camera shows."""
    distinct_p, distinct_d, ratios = [], [], []
    for p, d in zip(preds, demos):
        p, d = np.asarray(p, np.float64), np.asarray(d, np.float64)
        distinct_p.append(len({tuple(np.round(x, decimals)) for x in p}))
        distinct_d.append(len({tuple(np.round(x, decimals)) for x in d}))
        sp, sd = p.std(0) / dim_range, d.std(0) / dim_range
        keep = sd > 1e-6
        if keep.any():
            ratios.append(float(np.mean(sp[keep] / sd[keep])))
    return {"pred_distinct_per_episode": float(np.mean(distinct_p)) if distinct_p else float("nan"),
            "demo_distinct_per_episode": float(np.mean(distinct_d)) if distinct_d else float("nan"),
            "pred_spread_ratio": float(np.mean(ratios)) if ratios else float("nan")}


def _summarize(eps: Sequence[EpisodeData], base: Mapping[int, tuple], probe: Mapping[int, tuple],
               dim_range: np.ndarray, names: Sequence[str], seed: int) -> dict:
    """Pool the frames of the episodes that have the probe: L1 with/without, Δ per dim, KL, bootstrap CI."""
    have = [e for e in eps if e.episode in probe]
    if not have:
        return {"n_episodes": 0, "n_frames": 0}
    ab = np.concatenate([base[e.episode][0] for e in have])
    lb = np.concatenate([base[e.episode][1] for e in have])
    ap = np.concatenate([probe[e.episode][0] for e in have])
    lp = np.concatenate([probe[e.episode][1] for e in have])
    demo = np.concatenate([e.actions for e in have])
    l1b, l1p = l1_per_frame(ab, demo), l1_per_frame(ap, demo)
    kl = kl_divergence(lb, lp)
    delta = mean_abs_delta(ap, ab)
    sizes = [len(e.actions) for e in have]
    bounds = np.cumsum([0] + sizes)
    per_ep = [float((l1p[a:b] - l1b[a:b]).mean()) for a, b in zip(bounds[:-1], bounds[1:])]
    ci = weighted_bootstrap_ci(per_ep, sizes, seed=seed)
    base_l1, probe_l1 = float(l1b.mean()), float(l1p.mean())
    return {
        "n_episodes": len(have), "n_frames": int(len(demo)),
        "l1_base": base_l1, "l1_probe": probe_l1, "dl1": probe_l1 - base_l1,
        "dl1_rel": (probe_l1 - base_l1) / base_l1 if base_l1 > 0 else float("nan"),
        "l1_ratio": probe_l1 / base_l1 if base_l1 > 0 else float("nan"),
        "dl1_ci95": list(ci) if ci else None,
        "kl": float(kl.mean()), "kl_median": float(np.median(kl)),
        "mean_abs_delta": {n: float(v) for n, v in zip(names, delta)},
        "mean_abs_delta_range": {n: float(v / r) for n, v, r in zip(names, delta, dim_range)},
        "argmax_changed": float((lb.argmax(-1) != lp.argmax(-1)).mean()),
    }


def pick_group_episodes(split, group: str, k: int | None = None) -> list[int]:
    """Up to ``k`` (None: all) episodes of an evaluation group, round-robin over its task strings (normalized; most
    episodes first), so a cap still covers every task; within a task, lowest episode index first. Sorted."""
    from .data.splits import normalize_task

    eps = sorted(int(e) for e in split.eval[group])
    if k is None or k >= len(eps):
        return eps
    by_task: dict[str, list[int]] = {}
    for e in eps:
        by_task.setdefault(normalize_task(split.tasks.get(e, "")), []).append(e)
    queues = [by_task[t] for t in sorted(by_task, key=lambda t: (-len(by_task[t]), t))]
    out: list[int] = []
    while len(out) < k:
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop(0))
    return sorted(out)


def run_probes(model, processor, ds, split, *, unnorm_key: str, out_dir: str | os.PathLike | None = None,
               center_crop: bool = True, groups: Sequence[str] | None = None, probes: Sequence[str] = PROBES,
               max_episodes: int | None = 8, frame_stride: int = 2, hue_shift_deg: float = HUE_SHIFT_DEG,
               closed_loop: bool = True, closed_loop_probes: Sequence[str] = PROBES,
               closed_loop_episodes: int | None = 4, max_steps: int = 60, seed: int = 0, batch_size: int = 32,
               reference: bool = True, threads: int | None = 1, predictor=None, verbose: bool = True) -> ProbeResult:
    """Run the probes on the held-out groups of ``split`` and write ``probe.json`` / ``probe.md`` to ``out_dir``.

    ``reference``: also feed another episode's frame (``other_scene``: how much the scene's content matters), the
    yardstick the camera and colour probes are read against.
    Knobs for time: ``max_episodes`` per group (None: all), ``frame_stride`` (every k-th frame of each episode),
    ``closed_loop`` / ``closed_loop_probes`` / ``closed_loop_episodes`` per group (None: all) / ``max_steps``.
    ``threads``: torch intra-op threads while running (1 is fastest for these small batches on a small CPU).
    """
    from .data.stream import torch_threads

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    sidecar = world_sidecar(ds)
    world_mode = sidecar is not None
    groups = [g for g in (groups or PROBE_GROUPS) if g in split.eval and split.eval[g]]
    if not groups:
        raise ValueError(f"no held-out evaluation group to probe; split has {sorted(split.eval)}")
    unknown = set(probes) - set(PROBES)
    if unknown:
        raise ValueError(f"unknown probe(s) {sorted(unknown)}; known: {PROBES}")
    by_group = {g: pick_group_episodes(split, g, max_episodes) for g in groups}
    predictor = predictor or make_predictor(model, processor, unnorm_key, center_crop, batch_size)
    from .models.openvla import base_model

    stats = base_model(model).config.norm_stats[unnorm_key]["action"]
    dim_range = np.maximum(np.asarray(stats["q99"], np.float64) - np.asarray(stats["q01"], np.float64), 1e-8)
    names = feature_names(ds.meta.features.get("action"), len(dim_range))  # the dataset's own names (dict form too)

    with torch_threads(threads):
        t = time.perf_counter()
        eps = load_episodes(ds, by_group, frame_stride, sidecar, split)
        timings["load_s"] = time.perf_counter() - t

        # ---- inputs per condition (episode → images, instructions); skipped episodes are left out and counted
        paraphrases: dict[int, str] = {}
        skipped: dict[str, dict[str, int]] = {p: {} for p in probes}
        for g in groups:
            for k, e in enumerate(x for x in eps if x.group == g):
                alt = paraphrase_for(e.task, k + seed, world_mode)
                if alt is None:
                    if "paraphrase" in probes:
                        skipped["paraphrase"][g] = skipped["paraphrase"].get(g, 0) + 1
                else:
                    paraphrases[e.episode] = alt
                if e.other is None and "other_camera" in probes:
                    skipped["other_camera"][g] = skipped["other_camera"].get(g, 0) + 1

        # the reference's donor: the next evaluated episode (cyclic) with another scene
        donors = {e.episode: eps[(i + 1) % len(eps)] for i, e in enumerate(eps) if len(eps) > 1}

        def inputs(cond: str, e: EpisodeData):
            if cond == "base":
                return list(e.images), [e.task] * len(e.images)
            if cond == "paraphrase":
                return (list(e.images), [paraphrases[e.episode]] * len(e.images)) if e.episode in paraphrases else None
            if cond == "color_shift":
                return [color_shift(im, hue_shift_deg) for im in e.images], [e.task] * len(e.images)
            if cond == "other_camera":
                return (list(e.other), [e.task] * len(e.images)) if e.other is not None else None
            if cond == REFERENCE:
                d = donors.get(e.episode)
                if d is None:
                    return None
                return [d.images[min(t, len(d.images) - 1)] for t in range(len(e.images))], [e.task] * len(e.images)
            raise ValueError(cond)

        preds: dict[str, dict[int, tuple]] = {}
        for cond in ("base", *probes, *([REFERENCE] if reference else [])):
            t = time.perf_counter()
            imgs, ins, owners = [], [], []
            for e in eps:
                got = inputs(cond, e)
                if got is None:
                    continue
                imgs += got[0]
                ins += got[1]
                owners += [e.episode] * len(got[0])
            acts, logits = predictor.run(imgs, ins) if imgs else (np.zeros((0, len(names))), np.zeros((0, 256)))
            owners_arr = np.asarray(owners)
            preds[cond] = {ep: (acts[owners_arr == ep], logits[owners_arr == ep]) for ep in dict.fromkeys(owners)}
            timings[f"{cond}_s"] = time.perf_counter() - t
            timings[f"{cond}_frames"] = len(imgs)

        # ---- closed loop on the world: base and each closed-loop probe on the same (instruction, seed) scenes
        cl: dict[str, dict[int, dict]] = {}
        if closed_loop and world_mode:
            t = time.perf_counter()
            size = int(eps[0].images.shape[1])
            chosen = [e for g in groups for e in [x for x in eps if x.group == g][:closed_loop_episodes]
                      if e.meta.get("canonical_task")]
            specs, owners = [], []        # every condition's envs in ONE lockstep run: bigger policy batches
            for cond in ("base", *[p for p in closed_loop_probes if p in probes]):
                for e in chosen:
                    inst, sd = e.meta["canonical_task"], int(e.meta["seed"])
                    if cond == "base":
                        specs.append(ClosedLoopEpisode(inst, sd, e.task))
                    elif cond == "paraphrase" and e.episode in paraphrases:
                        specs.append(ClosedLoopEpisode(inst, sd, paraphrases[e.episode]))
                    elif cond == "color_shift":
                        specs.append(ClosedLoopEpisode(inst, sd, e.task,
                                                       transform=lambda im, d=hue_shift_deg: color_shift(im, d)))
                    elif cond == "other_camera":
                        specs.append(ClosedLoopEpisode(inst, sd, e.task, camera=OTHER_CAMERA))
                    else:
                        continue
                    owners.append((cond, e.episode))
            for (cond, ep), r in zip(owners, run_closed_loop(PredictorPolicy(predictor), specs,
                                                                max_steps=max_steps, image_size=size)):
                cl.setdefault(cond, {})[ep] = {"success": r["success"], "steps": r["steps"]}
            timings["closed_loop_s"] = time.perf_counter() - t

    # ---- summaries
    rows = []
    for g in [*groups, "all"]:
        ge = [e for e in eps if g == "all" or e.group == g]
        for p in [*probes, *([REFERENCE] if reference else [])]:
            s = _summarize(ge, preds["base"], preds[p], dim_range, names, seed)
            n_skip = sum(skipped.get(p, {}).values()) if g == "all" else skipped.get(p, {}).get(g, 0)
            rows.append({"group": g, "probe": p, "n_skipped": int(n_skip), **s})
    group_rows: dict[str, dict] = {}
    for g in [*groups, "all"]:
        ge = [e for e in eps if g == "all" or e.group == g]
        l1 = np.concatenate([l1_per_frame(preds["base"][e.episode][0], e.actions) for e in ge])
        group_rows[g] = {"title": "all probed groups" if g == "all" else _group_title(g), "n_episodes": len(ge),
                         "n_frames": int(len(l1)), "l1_base": float(l1.mean()),
                         **prediction_spread([preds["base"][e.episode][0] for e in ge], [e.actions for e in ge],
                                             dim_range)}
    closed: dict[str, dict] = {}
    for g in [*groups, "all"]:
        ge = {e.episode for e in eps if g == "all" or e.group == g}
        closed[g] = {}
        for cond, res in cl.items():
            r = [v["success"] for ep, v in res.items() if ep in ge]
            if r:
                closed[g][cond] = {"n": len(r), "successes": int(sum(r)), "rate": float(np.mean(r))}
        if "base" in closed[g]:
            group_rows[g]["success_base"] = closed[g]["base"]
    episodes = []
    for e in eps:
        vn = verb_noun(e.task, world_mode)
        b = preds["base"][e.episode]
        episodes.append({
            "episode": e.episode, "group": e.group, "task": e.task, "verb": vn["verb"], "noun": vn["noun"],
            "n_frames": int(len(e.actions)), "l1": float(l1_per_frame(b[0], e.actions).mean()),
            "success": cl.get("base", {}).get(e.episode, {}).get("success"),
            "closed_loop_steps": cl.get("base", {}).get(e.episode, {}).get("steps"),
            "paraphrase": paraphrases.get(e.episode),
            **{f"success_{p}": cl[p][e.episode]["success"] for p in cl if p != "base" and e.episode in cl[p]},
        })
    config = {"unnorm_key": unnorm_key, "center_crop": bool(center_crop), "groups": groups, "probes": list(probes),
              "reference": REFERENCE if reference else None,
              "frame_stride": int(frame_stride), "max_episodes": max_episodes, "hue_shift_deg": float(hue_shift_deg),
              "closed_loop": bool(closed_loop and world_mode), "closed_loop_probes": [c for c in cl if c != "base"],
              "closed_loop_episodes": closed_loop_episodes, "max_steps": int(max_steps), "seed": int(seed),
              "dataset": "embedded world" if world_mode else "LeRobot dataset (Bridge rules)",
              "predictor": type(predictor).__name__, "kl": "KL(base || probe) of the softmax over the 256 action "
              "tokens at the first action position, nats, mean over frames",
              "l1": "mean |pred - demo| over the action dimensions, de-normalized, mean over frames",
              "thresholds": {"kl_small": KL_SMALL, "l1_small": L1_SMALL, "l1_break_ratio": L1_BREAK_RATIO,
                             "collapse_spread": COLLAPSE_SPREAD}}
    result = ProbeResult(rows, group_rows, closed, episodes, {e.episode: e.images[0] for e in eps}, [], config,
                         timings)
    result.bullets = probe_bullets(result.summary())
    timings["total_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        result.paths.update(write_probe_report(result, out_dir))
    if verbose:
        print(f"probes on {len(eps)} episodes ({sum(len(e.actions) for e in eps)} frames, every "
              f"{frame_stride}. frame) in {timings['total_s']:.1f} s")
    return result


# ==================================================================================================================
# Bullets and report
# ==================================================================================================================
def _fmt_rel(x: float) -> str:
    return f"{x:+.0%}" if math.isfinite(x) else "n/a"


def _ci_text(row: Mapping[str, Any]) -> str:
    ci = row.get("dl1_ci95")
    if not ci:
        return ""
    lo, hi = ci
    verdict = "includes 0: within noise" if lo <= 0 <= hi else "excludes 0"
    return f"; 95 % CI of ΔL1 [{lo:+.4f}, {hi:+.4f}], {verdict}"


def ci_includes_zero(row: Mapping[str, Any]) -> bool:
    """True when the row's 95 % bootstrap CI of ΔL1 contains 0 (no change in error is detectable at its n)."""
    ci = row.get("dl1_ci95")
    return bool(ci) and ci[0] <= 0 <= ci[1]


def probe_verdict(row: Mapping[str, Any]) -> str:
    """'barely' | 'breaks' | 'degrades' | 'shifts' (distribution moves, error does not) | 'improves' |
    'undetected' (the error moves by ≥ L1_SMALL on average, but its CI includes 0: no conclusion at this n)."""
    rel, ratio, kl = row["dl1_rel"], row["l1_ratio"], row["kl"]
    if abs(rel) < L1_SMALL:
        return "barely" if kl < KL_SMALL else "shifts"
    if ci_includes_zero(row):
        return "undetected"
    if math.isfinite(ratio) and ratio >= L1_BREAK_RATIO:
        return "breaks"
    return "improves" if rel < 0 else "degrades"


def _short(probe: str, deg: float = HUE_SHIFT_DEG) -> str:
    return {"paraphrase": "paraphrased instructions", "color_shift": f"the {deg:g}° hue rotation",
            "other_camera": "the other camera", "other_scene": "another scene"}.get(probe, probe)


def _agree(probe: str, singular: str, plural: str) -> str:
    return plural if probe == "paraphrase" else singular


def _probe_sentence(row: Mapping[str, Any], deg: float) -> str:
    p = row["probe"]
    title = _probe_title(p, deg)
    n = f"n={row['n_frames']} frames in {row['n_episodes']} episodes"
    l1 = f"{row['l1_base']:.4f} → {row['l1_probe']:.4f}"
    kl = f"KL {row['kl']:.2f} nats"
    rel = _fmt_rel(row["dl1_rel"])
    flips = f"{row.get('argmax_changed', float('nan')):.0%} of frames"
    v = probe_verdict(row)
    if v == "breaks":
        return (f"{title} {_agree(p, 'breaks', 'break')} the policy: open-loop L1 ×{row['l1_ratio']:.1f} ({l1}), "
                f"{kl}, the most likely first action token changes on {flips} ({n}).")
    if v == "barely":
        return (f"{title} {_agree(p, 'barely moves', 'barely move')} the policy: {kl}, L1 {rel} ({l1}; "
                f"{n}{_ci_text(row)}).")
    if v == "shifts":
        return (f"{title} {_agree(p, 'shifts', 'shift')} what the model believes ({kl}, the first action token changes "
                f"on {flips}) but {_agree(p, 'moves', 'move')} its error little: L1 {rel} ({l1}; {n}{_ci_text(row)}).")
    if v == "undetected":
        return (f"{title} {_agree(p, 'moves', 'move')} the error by L1 {rel} on average ({l1}), but no change is "
                f"detectable at {n}{_ci_text(row)}; {kl}.")
    if v == "improves":
        return f"{title} {_agree(p, 'does', 'do')} not hurt: L1 {rel} ({l1}), {kl} ({n}{_ci_text(row)})."
    return (f"{title} {_agree(p, 'costs', 'cost')} accuracy: L1 {rel} (×{row['l1_ratio']:.2f}, {l1}), {kl} "
            f"({n}{_ci_text(row)}).")


def probe_bullets(summary: Mapping[str, Any], max_bullets: int = 10) -> list[str]:
    """5-10 sentences generated from the measured numbers (``ProbeResult.summary()``), most important first:

    a caution when the policy's predictions hardly vary within an episode (spread ratio < ``COLLAPSE_SPREAD``);
    one verdict per probe, pooled over the groups (thresholds ``KL_SMALL``, ``L1_SMALL``, ``L1_BREAK_RATIO``); the
    other-scene reference and how far each image probe moves the policy relative to it; closed-loop success with
    and without each probe; skipped episodes; where the unperturbed policy does best and worst; which group the
    most damaging probe hurts most; which action dimension it moves most. Cut to ``max_bullets``."""
    measured = [r for r in summary["rows"] if r.get("n_frames")]
    rows = [r for r in measured if all(math.isfinite(r[k]) for k in ("kl", "dl1_rel", "l1_base", "l1_probe"))]
    groups = summary.get("groups", {})
    cl = summary.get("closed_loop", {})
    deg = float(summary.get("config", {}).get("hue_shift_deg", HUE_SHIFT_DEG))
    ranked: list[tuple[int, str]] = []   # (priority, sentence); lower first
    pooled = [r for r in rows if r["group"] == "all" and r["probe"] != REFERENCE]
    ref = next((r for r in rows if r["group"] == "all" and r["probe"] == REFERENCE), None)

    # 0. a collapsed policy makes every "robust" verdict suspect
    allg = groups.get("all", {})
    spread = allg.get("pred_spread_ratio", float("nan"))
    if math.isfinite(spread) and spread < COLLAPSE_SPREAD:
        ranked.append((0, f"Caution: the policy's actions hardly change within an episode (on average "
                          f"{allg['pred_distinct_per_episode']:.1f} distinct predicted actions per episode vs "
                          f"{allg['demo_distinct_per_episode']:.1f} in the demonstrations; within-episode spread "
                          f"{spread:.0%} of the demonstrations'): it has collapsed towards one action per "
                          "instruction, so a probe that barely moves it is being ignored, not handled."))
    if len(rows) < len(measured):  # a NaN is not a finding
        ranked.append((0, f"{len(measured) - len(rows)} of {len(measured)} probe measurements came out non-finite "
                          "(NaN/inf): the policy's outputs are broken there, and nothing is concluded from them."))
    # 1. one verdict per probe
    for r in pooled:
        ranked.append((1, _probe_sentence(r, deg)))
    # 2. the reference: what no visual information does, and the image probes relative to it
    if ref is not None:
        img = [r for r in pooled if r["probe"] in ("color_shift", "other_camera")]
        if ref["kl"] < KL_SMALL and abs(ref["dl1_rel"]) < L1_SMALL:
            tail = ("the policy barely looks at the scene, so small colour and camera effects mean ignored, "
                    "not robust.")
        elif ci_includes_zero(ref):
            lo, hi = ref["dl1_ci95"]
            tail = (f"the error's change has a 95 % CI of [{lo:+.4f}, {hi:+.4f}], which includes 0, so this run "
                    "cannot show that the policy's accuracy depends on the scene it sees; the image probes are "
                    "judged by their own intervals, not against this yardstick.")
        elif img:
            tail = "relative to that, " + ", ".join(
                f"{_short(r['probe'], deg)} moves the first-token distribution {r['kl'] / ref['kl']:.0%} as far "
                f"and the error {r['dl1'] / ref['dl1']:.0%} as much" if ref["dl1"] > 1e-9 else
                f"{_short(r['probe'], deg)} moves the first-token distribution {r['kl'] / ref['kl']:.0%} as far"
                for r in img) + "."
        else:
            tail = "this is the yardstick for image perturbations."
        ranked.append((2, f"Reference, another episode's scene in place of this one: KL {ref['kl']:.2f} nats, L1 "
                          f"{_fmt_rel(ref['dl1_rel'])} (n={ref['n_frames']} frames); {tail}"))
    # 3. closed loop: one sentence over every condition measured on the same scenes
    allcl = cl.get("all", {})
    base = allcl.get("base")
    conds = [p for p in PROBES if allcl.get(p)]
    if base and conds:
        parts = [f"{allcl[p]['successes']}/{allcl[p]['n']} with {_short(p, deg)}" for p in conds]
        if base["successes"] == 0 and all(allcl[p]["successes"] == 0 for p in conds):
            ranked.append((3, f"Closed loop on {base['n']} held-out scenes: 0/{base['n']} successes unperturbed and "
                              "under every probe, so closed loop cannot separate the probes here; the open-loop "
                              "numbers are the evidence."))
        else:
            drops = {p: base["successes"] / base["n"] - allcl[p]["successes"] / allcl[p]["n"] for p in conds}
            worst = max(drops, key=drops.get)
            tail = (f"; {_short(worst, deg)} costs most ({100 * drops[worst]:.0f} percentage points)"
                    if drops[worst] > 0 else "; no probe lowers it")
            ranked.append((3, f"Closed loop on the same {base['n']} held-out scenes: success "
                              f"{base['successes']}/{base['n']} unperturbed, " + ", ".join(parts) + tail + "."))
    # 4. skipped episodes (also when a probe had no frame left at all)
    for r in (r for r in summary["rows"] if r["group"] == "all"):
        if r.get("n_skipped"):
            what = "image_1 missing or black" if r["probe"] == "other_camera" else "no paraphrase available"
            ranked.append((4, f"{_probe_title(r['probe'], deg)}: {r['n_skipped']} episode(s) skipped ({what})."))
    # 5. where the unperturbed policy generalizes and where it falls apart
    named = {g: v for g, v in groups.items() if g != "all" and v.get("n_frames")}
    if len(named) >= 2:
        best = min(named, key=lambda g: named[g]["l1_base"])
        worst = max(named, key=lambda g: named[g]["l1_base"])
        ratio = named[worst]["l1_base"] / max(named[best]["l1_base"], 1e-12)
        ranked.append((5, f"Without any probe, the policy does best on {named[best]['title']} (L1 "
                          f"{named[best]['l1_base']:.4f}, n={named[best]['n_episodes']} episodes) and worst on "
                          f"{named[worst]['title']} (L1 {named[worst]['l1_base']:.4f}, ×{ratio:.2f}, "
                          f"n={named[worst]['n_episodes']})."))
    # 6-7. the most damaging probe: which group it hurts most / least, which dimension it moves
    if pooled:
        worst_p = max(pooled, key=lambda r: (r["l1_ratio"] if math.isfinite(r["l1_ratio"]) else -1, r["kl"]))
        per_g = [r for r in rows if r["probe"] == worst_p["probe"] and r["group"] != "all"]
        title = _probe_title(worst_p["probe"], deg)
        if len(per_g) >= 2:
            hi = max(per_g, key=lambda r: r["dl1_rel"])
            lo = min(per_g, key=lambda r: r["dl1_rel"])
            t_hi = named.get(hi["group"], {}).get("title", hi["group"])
            t_lo = named.get(lo["group"], {}).get("title", lo["group"])
            ranked.append((6, f"{title} {_agree(worst_p['probe'], 'hurts', 'hurt')} {t_hi} most (L1 "
                              f"{_fmt_rel(hi['dl1_rel'])}, KL {hi['kl']:.2f}) and {t_lo} least (L1 "
                              f"{_fmt_rel(lo['dl1_rel'])}, KL {lo['kl']:.2f})."))
        rng_d = worst_p.get("mean_abs_delta_range") or {}
        if rng_d:
            top = max(rng_d, key=rng_d.get)
            low = min(rng_d, key=rng_d.get)
            ranked.append((7, f"Under {title[0].lower() + title[1:]}, the predicted {top} moves most (mean |Δ| "
                              f"{worst_p['mean_abs_delta'][top]:.4g} = {rng_d[top]:.0%} of its q01–q99 range) and "
                              f"{low} least ({rng_d[low]:.0%})."))
    keep = sorted(range(len(ranked)), key=lambda i: (ranked[i][0], i))[:max_bullets]
    return [ranked[i][1] for i in sorted(keep)]


def format_probe_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ("| group | probe | episodes | frames | skipped | L1 base | L1 probe | ΔL1 | ΔL1 95 % CI | KL (nats) | "
            "largest mean abs Δ (share of range) |\n|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    lines = [head]
    for r in rows:
        if not r.get("n_frames"):
            lines.append(f"| {r['group']} | {r['probe']} | 0 | 0 | {r.get('n_skipped', 0)} | | | | | | |")
            continue
        rng = r["mean_abs_delta_range"]
        top = max(rng, key=rng.get)
        ci = r.get("dl1_ci95")
        ci_s = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "—"
        lines.append(f"| {r['group']} | {r['probe']} | {r['n_episodes']} | {r['n_frames']} | {r['n_skipped']} | "
                     f"{r['l1_base']:.4f} | {r['l1_probe']:.4f} | {_fmt_rel(r['dl1_rel'])} | {ci_s} | {r['kl']:.3f} | "
                     f"{top} {rng[top]:.0%} |")
    return "\n".join(lines)


def write_probe_report(result: ProbeResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``probe.json`` (everything) and ``probe.md`` (bullets, thresholds, table, closed loop) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = result.config
    md = ["# Generalization probes", "",
          f"Dataset: {c['dataset']}; groups: {', '.join(c['groups'])}; every {c['frame_stride']}. frame; "
          f"KL = {c['kl']}; L1 = {c['l1']}.", "",
          f"Thresholds: \"barely\" = KL < {KL_SMALL} nats and |ΔL1| < {L1_SMALL:.0%}; \"breaks\" = L1 ratio ≥ "
          f"{L1_BREAK_RATIO}; \"shifts\" = KL ≥ {KL_SMALL} with |ΔL1| < {L1_SMALL:.0%}; \"no change detectable\" "
          "= |ΔL1| ≥ that but its 95 % CI includes 0; otherwise \"costs accuracy\" (or \"does not hurt\" when L1 "
          "drops). Reference: the same camera's frame from "
          "another evaluated episode (the instruction kept); \"collapsed\" = the predictions' within-episode "
          f"spread below {COLLAPSE_SPREAD:.0%} of the demonstrations'.", ""]
    md += [f"- {b}" for b in result.bullets]
    md += ["", "## Open loop", "", result.table(), ""]
    if any(result.closed_loop.values()):
        md += ["## Closed loop (success on the same scenes)", "", "| group | condition | successes | n | rate |",
               "|---|---|---:|---:|---:|"]
        for g, conds in result.closed_loop.items():
            for cond, v in conds.items():
                md.append(f"| {g} | {cond} | {v['successes']} | {v['n']} | {v['rate']:.0%} |")
        md.append("")
    p_md, p_json = out / "probe.md", out / "probe.json"
    p_md.write_text("\n".join(md))
    p_json.write_text(json.dumps(result.as_dict() | {"paths": {"probe_md": str(p_md), "probe_json": str(p_json)}},
                                 indent=2, default=_json_default))
    return {"probe_md": p_md, "probe_json": p_json}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# ==================================================================================================================
# Rollout video
# ==================================================================================================================
@dataclasses.dataclass
class VideoResult:
    kind: str                   # "closed_loop" (world) | "open_loop" (demonstration + arrows)
    path: Path                  # .mp4, or .gif when MP4 writing failed
    strip_path: Path            # PNG strip of a few frames
    episode: int
    instruction: str
    n_frames: int
    success: bool | None
    seconds: float


def _pick_episode(split, group: str | None, episode: int | None) -> tuple[str, int]:
    if episode is not None:
        g = next((g for g, eps in split.eval.items() if int(episode) in eps), group or "heldout")
        return g, int(episode)
    for g in ([group] if group else []) + list(PROBE_GROUPS) + list(split.eval):
        if g in split.eval and split.eval[g]:
            return g, int(sorted(split.eval[g])[0])
    raise ValueError("the split has no evaluation episode to film")


def rollout_video(model, processor, ds, split, *, unnorm_key: str, out_dir: str | os.PathLike,
                  center_crop: bool = True, group: str | None = "heldout", episode: int | None = None,
                  kind: str = "auto", max_steps: int = 60, scale: int = 4, fps: float = 5.0, fmt: str = "mp4",
                  strip_frames: int = 6, threads: int | None = 1, predictor=None) -> VideoResult:
    """Film the policy on one held-out episode (see the module docstring). ``kind``: "auto" (closed loop on the
    embedded world, open loop elsewhere), "closed_loop" or "open_loop". Files: ``<kind>_ep<episode>.mp4|gif`` and
    ``<kind>_ep<episode>_strip.png`` under ``out_dir``."""
    from . import plots
    from .data.stream import torch_threads

    t0 = time.perf_counter()
    sidecar = world_sidecar(ds)
    if kind == "auto":
        kind = "closed_loop" if sidecar is not None else "open_loop"
    if kind == "closed_loop" and sidecar is None:
        raise ValueError("a closed-loop rollout needs the embedded world (its sidecar metadata)")
    g, ep = _pick_episode(split, group, episode)
    predictor = predictor or make_predictor(model, processor, unnorm_key, center_crop)
    with torch_threads(threads):
        data = load_episodes(ds, {g: [ep]}, 1, sidecar, split)[0]
        if kind == "closed_loop":
            inst, seed = data.meta["canonical_task"], int(data.meta["seed"])
            size = int(data.images.shape[1])
            r = run_closed_loop(PredictorPolicy(predictor), [ClosedLoopEpisode(inst, seed, data.task)],
                                max_steps=max_steps, image_size=size, record=True)[0]
            uv = world_to_image0(r["path"], size)
            frames = []
            for t, img in enumerate(r["frames"]):
                done = r["success"] and t == len(r["frames"]) - 1
                frames.append(plots.draw_rollout_frame(
                    img, uv[: t + 1], gripper_open=bool(r["gripper"][t] > 0.5), scale=scale,
                    lines=[data.task, f"step {t}/{len(r['frames']) - 1} · "
                           + ("SUCCESS" if done else ("…" if t < len(r["frames"]) - 1 else "failed"))]))
            success = bool(r["success"])
        else:
            acts, _ = predictor.run(list(data.images), [data.task] * len(data.images))
            frames = [plots.draw_action_arrows(img, pred_xy=acts[t, :2], demo_xy=data.actions[t, :2],
                                               ref=float(np.abs(data.actions[:, :2]).max() or 1.0), scale=scale,
                                               lines=[data.task, f"frame {t}/{len(data.images) - 1} · L1 "
                                                      f"{float(np.abs(acts[t] - data.actions[t]).mean()):.4f}"])
                      for t, img in enumerate(data.images)]
            success = None
    out = Path(out_dir)
    stem = f"{kind}_ep{ep}"
    path = plots.save_video(frames, out / f"{stem}.{fmt}", fps=fps)
    strip = plots.save_frame_strip(frames, out / f"{stem}_strip.png", n=strip_frames)
    return VideoResult(kind, path, strip, ep, data.task, len(frames), success, time.perf_counter() - t0)


# ==================================================================================================================
# Failure mining
# ==================================================================================================================
_PREPS = {"on", "in", "into", "onto", "to", "from", "at", "inside", "near", "under", "over", "off", "out", "of",
          "and", "then", "towards", "toward", "next", "beside", "behind", "across", "with", "so", "until", "upright",
          "top", "left", "right"}
_PARTICLES = {"up", "down", "over", "out", "off", "away"}


def verb_noun(task: str, world_mode: bool = False) -> dict[str, str | None]:
    """Verb and object noun of an instruction. World: ``world.parse_task`` (verb, family). Bridge heuristic: the verb
    is the first word (plus a particle: "pick up"), the noun the last word of the phrase after it, up to the first
    preposition or "and" ("put the red block on the plate" → put / block; "pick up the spoon and ..." → pick up /
    spoon)."""
    if world_mode:
        from .data import world

        p = world.parse_task(task)
        if p["family"] is not None:
            return {"verb": p["verb"], "noun": p["family"]}
    words = re.findall(r"[a-z]+", str(task or "").lower())
    if not words:
        return {"verb": None, "noun": None}
    verb, i = words[0], 1
    if i < len(words) and words[i] in _PARTICLES:
        verb, i = f"{verb} {words[i]}", i + 1
    phrase = []
    for w in words[i:]:
        if w in _PREPS and phrase:
            break
        if w not in _PREPS:
            phrase.append(w)
    noun = next((w for w in reversed(phrase) if w not in ("the", "a", "an", "it")), None)
    return {"verb": verb, "noun": noun}


def rank_failures(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Worst first: closed-loop failures (success False) before unknown before successes, then by open-loop L1."""
    order = {False: 0, None: 1, True: 2}
    return sorted((dict(r) for r in rows), key=lambda r: (order.get(r.get("success"), 1), -float(r["l1"])))


def slice_failures(rows: Sequence[Mapping[str, Any]], by: str) -> list[dict]:
    """Per value of ``by`` ("verb", "noun", "group", ...): n, mean L1, closed-loop successes/n (where measured);
    sorted by mean L1, worst first."""
    acc: dict[Any, list] = {}
    for r in rows:
        acc.setdefault(r.get(by) or "(none)", []).append(r)
    out = []
    for k, rs in acc.items():
        meas = [r["success"] for r in rs if r.get("success") is not None]
        out.append({by: k, "n": len(rs), "mean_l1": float(np.mean([float(r["l1"]) for r in rs])),
                    "successes": int(sum(meas)) if meas else None, "n_closed_loop": len(meas),
                    "success_rate": float(np.mean(meas)) if meas else None})
    return sorted(out, key=lambda s: -s["mean_l1"])


def format_slices(slices: Sequence[Mapping[str, Any]], by: str) -> str:
    lines = [f"| {by} | n | mean L1 | success |", "|---|---:|---:|---:|"]
    for s in slices:
        succ = f"{s['successes']}/{s['n_closed_loop']}" if s.get("successes") is not None else "—"
        lines.append(f"| {s[by]} | {s['n']} | {s['mean_l1']:.4f} | {succ} |")
    return "\n".join(lines)


@dataclasses.dataclass
class FailureReport:
    ranked: list[dict]
    slices: dict[str, list[dict]]
    sheet_path: Path | None
    n_with_image: int = 0  # contact-sheet panels that show the episode's first frame (the rest say "(no image)")

    def text(self, n: int = 8) -> str:
        parts = []
        if self.sheet_path is not None:
            n_panels = min(n, len(self.ranked))
            parts.append(f"Contact sheet: {self.n_with_image} of {n_panels} panels show the episode's first frame.")
        parts += ["Worst episodes:", "| rank | episode | group | instruction | L1 | success |",
                 "|---:|---:|---|---|---:|---:|"]
        for i, r in enumerate(self.ranked[:n], 1):
            s = {True: "yes", False: "no", None: "—"}[r.get("success")]
            parts.append(f"| {i} | {r.get('episode', '')} | {r.get('group', '')} | {r.get('task', '')} | "
                         f"{float(r['l1']):.4f} | {s} |")
        for by, sl in self.slices.items():
            parts += ["", f"By {by}:", format_slices(sl, by)]
        return "\n".join(parts)


def failure_rows_from_eval(report, policy: str | None = None) -> tuple[list[dict], dict[int, np.ndarray]]:
    """Per-episode rows (and first frames) of the held-out groups from ``evaluation.run_evaluation``'s report, for
    ``policy`` (default: the fine-tuned model). Its success is closed-loop on the embedded world and the documented
    proxy on Bridge (``success_kind`` says which). Contrast groups (fine-tuning tasks) are left out."""
    from .evaluation import CONTRAST_GROUPS, POLICY_FINETUNED

    data = report.data
    policy = policy or POLICY_FINETUNED
    kind = data.get("success_definition", {}).get("kind", "closed_loop")
    world_mode = kind == "closed_loop"
    rows, images = [], {}
    for r in data["per_episode"]:
        if r["policy"] != policy or r["group"] in CONTRAST_GROUPS:
            continue
        e = int(r["episode_index"])
        vn = verb_noun(r.get("instruction", ""), world_mode)
        rows.append({"episode": e, "group": r["group"], "task": r.get("instruction", ""), "verb": vn["verb"],
                     "noun": vn["noun"], "n_frames": r.get("n_frames"), "l1": float(r["l1"]),
                     "success": None if r.get("success") is None else bool(r["success"]),
                     "success_kind": "closed loop" if world_mode else "proxy"})
        ep = getattr(report, "episodes", {}).get(e)
        if ep is not None and len(ep.images):
            images[e] = np.asarray(ep.images[0])
    return rows, images


def mine_failures(source, out_dir: str | os.PathLike | None = None, n_worst: int = 8,
                  by: Sequence[str] = ("verb", "noun"), images: Mapping[int, np.ndarray] | None = None
                  ) -> FailureReport:
    """Rank the held-out episodes by error, slice them by verb and object noun, draw the worst ``n_worst`` as a
    contact sheet (``worst_episodes.png`` in ``out_dir``: first image_0 frame, instruction, L1, success).

    ``source``: the evaluation report (``evaluation.run_evaluation``: every evaluated held-out episode, closed-loop
    success for all of them on the world), a :class:`ProbeResult` (the probed episodes; closed loop where run), or
    rows with episode, task, l1, success (None when not measured), verb, noun, group — then ``images`` (episode →
    image) for the sheet."""
    if isinstance(source, ProbeResult):
        rows, images = source.episodes, source.first_frames if images is None else images
    elif hasattr(source, "data") and "per_episode" in getattr(source, "data", {}):
        rows, found = failure_rows_from_eval(source)
        images = found if images is None else images
    else:
        rows = list(source)
    ranked = rank_failures(rows)
    slices = {b: slice_failures(rows, b) for b in by}
    sheet, n_with_image = None, 0
    if out_dir is not None and ranked:
        from . import plots

        worst = ranked[:n_worst]
        imgs = [None if images is None else images.get(r.get("episode")) for r in worst]
        n_with_image = sum(img is not None for img in imgs)
        sheet = plots.plot_worst_episodes(worst, imgs, out_dir)
    return FailureReport(ranked, slices, sheet, n_with_image)


__all__ = [
    "PROBES", "PROBE_GROUPS", "REFERENCE", "HUE_SHIFT_DEG", "KL_SMALL", "L1_SMALL", "L1_BREAK_RATIO",
    "COLLAPSE_SPREAD", "color_shift", "is_missing_or_black", "bridge_paraphrases", "paraphrase_for", "log_softmax",
    "kl_divergence", "l1_per_frame", "mean_abs_delta", "weighted_bootstrap_ci", "prediction_spread",
    "make_predictor", "EvaluationPredictor", "EpisodeData", "world_sidecar",
    "pick_group_episodes", "load_episodes", "PredictorPolicy", "world_to_image0", "ProbeResult",
    "run_probes", "ci_includes_zero", "probe_verdict", "probe_bullets", "format_probe_table", "write_probe_report", "VideoResult",
    "rollout_video", "verb_noun", "rank_failures", "slice_failures", "format_slices", "FailureReport",
    "failure_rows_from_eval", "mine_failures",
]
