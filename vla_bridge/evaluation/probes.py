"""Where does the fine-tuned policy generalize, and where does it fall apart? The probes.

Everything here works on the shared interface (``processor(prompt, image)``, the model's forward with
``past_key_values``, ``config.norm_stats``), so it runs the same on the tiny VLA and on OpenVLA-7B.

Probes (:func:`run_probes`)
---------------------------
For the held-out evaluation groups (embedded world: held-out task strings, the held-out object family, the unseen
colour; Bridge: held-out task strings and the held-out object), every evaluated frame is fed to the policy once
unperturbed ("base") and once per probe:

* ``paraphrase`` — the instruction re-phrased: ``world.paraphrases`` on the embedded world (cycled over the episodes
  so every template is used), a small set of template rewrites on Bridge (``data.tasks.bridge_paraphrases``);
* ``color_shift`` — a deterministic hue rotation of the camera image by ``hue_shift_deg`` degrees (default 90°:
  red → yellow-green, blue → magenta; greys, i.e. the table edges and the robot, are untouched), see
  ``perturbations.color_shift``;
* ``other_camera`` — ``image_1`` in place of ``image_0``. Episodes where ``image_1`` is missing or black (Bridge has
  some) are skipped and counted.

and, as a yardstick, another scene (``other_scene``, the reference): the same camera's frame from a different
evaluated episode (same frame index, the instruction kept) — how far the policy moves when the scene's content
changes completely but stays in distribution. An image probe that moves it much less than that is one the policy
handles; when even another scene barely moves it, the policy does not look at the scene, and the bullets say so
instead of calling it robust. A second
sanity check is the within-episode spread of the predictions against the demonstrations'
(``metrics.prediction_spread``):
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
probe.json`` and ``probe.md``: 5-10 bullets generated from the numbers by ``probe_report.probe_bullets``
(thresholds stated in the file), then the table.

Inference goes through ``policies.VLAPolicy.run`` (actions and first-token logits from the same ``generate()``
calls of the batched predictor, the evaluation table's preprocessing) and the closed loop through
``rollout.run_closed_loop`` (its episodes can name another camera or a perturbation of the view): one predictor and
one closed-loop runner for the evaluation table and the probes alike.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.episodes import OTHER_CAMERA, EpisodeData, load_episode_groups, world_sidecar
from ..data.schema import feature_names
from ..data.splits import GROUP_TITLES
from ..data.stream import torch_threads
from ..data.tasks import normalize_task, paraphrase_for, verb_noun
from ..models.openvla import base_model
from .metrics import kl_divergence, l1_per_frame, mean_abs_delta, prediction_spread, weighted_bootstrap_ci
from .perturbations import HUE_SHIFT_DEG, PROBE_GROUPS, PROBES, REFERENCE, color_shift
from .policies import VLAPolicy
from .probe_report import (COLLAPSE_SPREAD, KL_SMALL, L1_BREAK_RATIO, L1_SMALL, format_probe_table, probe_bullets,
                           write_probe_report)
from .rollout import CLOSED_LOOP_STEPS, ClosedLoopEpisode, run_closed_loop

# probe.json's "predictor" of the VLA (the name of the class that served it before policies.VLAPolicy took it over)
VLA_PREDICTOR_LABEL = "EvaluationPredictor"


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
    return GROUP_TITLES.get(g, g)


def _summarize(eps: Sequence[EpisodeData], base: Mapping[int, tuple], probe: Mapping[int, tuple],
               dim_range: np.ndarray, names: Sequence[str], seed: int) -> dict:
    """Pool the frames of the episodes that have the probe: L1 with/without, Δ per dim, KL, bootstrap CI."""
    have = [e for e in eps if e.episode_index in probe]
    if not have:
        return {"n_episodes": 0, "n_frames": 0}
    ab = np.concatenate([base[e.episode_index][0] for e in have])
    lb = np.concatenate([base[e.episode_index][1] for e in have])
    ap = np.concatenate([probe[e.episode_index][0] for e in have])
    lp = np.concatenate([probe[e.episode_index][1] for e in have])
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
               closed_loop_episodes: int | None = 4, max_steps: int = CLOSED_LOOP_STEPS, seed: int = 0,
               batch_size: int = 32, reference: bool = True, threads: int | None = None, predictor=None,
               verbose: bool = True, closed_loop_base: Mapping[int, Mapping[str, Any]] | None = None) -> ProbeResult:
    """Run the probes on the held-out groups of ``split`` and write ``probe.json`` / ``probe.md`` to ``out_dir``.

    ``reference``: also feed another episode's frame (``other_scene``: how much the scene's content matters), the
    yardstick the camera and colour probes are read against.
    Knobs for time: ``max_episodes`` per group (None: all), ``frame_stride`` (every k-th frame of each episode),
    ``closed_loop`` / ``closed_loop_probes`` / ``closed_loop_episodes`` per group (None: all) / ``max_steps``.
    ``threads``: torch intra-op threads while running (None: unchanged; the notebook passes 2, as for the evaluation:
    on 2 idle cores 2 threads beat 1 even at batches of 12 frames, 16.8 vs 21.5 ms per frame).
    ``closed_loop_base``: the evaluation's closed-loop records of this policy ({episode_index: {"success", "steps",
    ...}}, e.g. eval.json's per-episode rows of the fine-tuned policy), reused as the unperturbed closed loop for
    the episodes they cover instead of running those rollouts again — the same scene, prompt, policy and horizon
    (``max_steps`` must be the evaluation's), so the same rollout up to the float rounding of another batch.
    """
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
    predictor = predictor or VLAPolicy.from_model(model, processor, unnorm_key, center_crop, batch_size)
    stats = base_model(model).config.norm_stats[unnorm_key]["action"]
    dim_range = np.maximum(np.asarray(stats["q99"], np.float64) - np.asarray(stats["q01"], np.float64), 1e-8)
    names = feature_names(ds.meta.features.get("action"), len(dim_range))  # the dataset's own names (dict form too)

    with torch_threads(threads):
        t = time.perf_counter()
        eps = load_episode_groups(ds, by_group, frame_stride, sidecar, split)
        timings["load_s"] = time.perf_counter() - t

        # ---- inputs per condition (episode → images, instructions); skipped episodes are left out and counted
        paraphrases: dict[int, str] = {}
        skipped: dict[str, dict[str, int]] = {p: {} for p in probes}
        for g in groups:
            for k, e in enumerate(x for x in eps if x.group == g):
                alt = paraphrase_for(e.instruction, k + seed, world_mode)
                if alt is None:
                    if "paraphrase" in probes:
                        skipped["paraphrase"][g] = skipped["paraphrase"].get(g, 0) + 1
                else:
                    paraphrases[e.episode_index] = alt
                if e.other is None and "other_camera" in probes:
                    skipped["other_camera"][g] = skipped["other_camera"].get(g, 0) + 1

        # the reference's donor: the next evaluated episode (cyclic) with another scene
        donors = {e.episode_index: eps[(i + 1) % len(eps)] for i, e in enumerate(eps) if len(eps) > 1}

        def inputs(cond: str, e: EpisodeData):
            if cond == "base":
                return list(e.images), [e.instruction] * len(e.images)
            if cond == "paraphrase":
                if e.episode_index not in paraphrases:
                    return None
                return list(e.images), [paraphrases[e.episode_index]] * len(e.images)
            if cond == "color_shift":
                return [color_shift(im, hue_shift_deg) for im in e.images], [e.instruction] * len(e.images)
            if cond == "other_camera":
                return (list(e.other), [e.instruction] * len(e.images)) if e.other is not None else None
            if cond == REFERENCE:
                d = donors.get(e.episode_index)
                if d is None:
                    return None
                return ([d.images[min(t, len(d.images) - 1)] for t in range(len(e.images))],
                        [e.instruction] * len(e.images))
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
                owners += [e.episode_index] * len(got[0])
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
            reused = {int(k): v for k, v in (closed_loop_base or {}).items()}
            for cond in ("base", *[p for p in closed_loop_probes if p in probes]):
                for e in chosen:
                    inst, sd = e.meta["canonical_task"], int(e.meta["seed"])
                    if cond == "base" and e.episode_index in reused:
                        r = reused[e.episode_index]
                        cl.setdefault("base", {})[e.episode_index] = {"success": bool(r["success"]),
                                                                      "steps": int(r["steps"])}
                        continue
                    if cond == "base":
                        specs.append(ClosedLoopEpisode(inst, sd, e.instruction))
                    elif cond == "paraphrase" and e.episode_index in paraphrases:
                        specs.append(ClosedLoopEpisode(inst, sd, paraphrases[e.episode_index]))
                    elif cond == "color_shift":
                        specs.append(ClosedLoopEpisode(inst, sd, e.instruction,
                                                       transform=lambda im, d=hue_shift_deg: color_shift(im, d)))
                    elif cond == "other_camera":
                        specs.append(ClosedLoopEpisode(inst, sd, e.instruction, camera=OTHER_CAMERA))
                    else:
                        continue
                    owners.append((cond, e.episode_index))
            for (cond, ep), r in zip(owners, run_closed_loop(predictor, specs,
                                                                max_steps=max_steps, image_size=size)):
                cl.setdefault(cond, {})[ep] = {"success": r["success"], "steps": r["steps"]}
            timings["closed_loop_base_reused"] = sum(1 for ep in cl.get("base", {}) if ep in reused)
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
        l1 = np.concatenate([l1_per_frame(preds["base"][e.episode_index][0], e.actions) for e in ge])
        group_rows[g] = {"title": "all probed groups" if g == "all" else _group_title(g), "n_episodes": len(ge),
                         "n_frames": int(len(l1)), "l1_base": float(l1.mean()),
                         **prediction_spread([preds["base"][e.episode_index][0] for e in ge], [e.actions for e in ge],
                                             dim_range)}
    closed: dict[str, dict] = {}
    for g in [*groups, "all"]:
        ge = {e.episode_index for e in eps if g == "all" or e.group == g}
        closed[g] = {}
        for cond, res in cl.items():
            r = [v["success"] for ep, v in res.items() if ep in ge]
            if r:
                closed[g][cond] = {"n": len(r), "successes": int(sum(r)), "rate": float(np.mean(r))}
        if "base" in closed[g]:
            group_rows[g]["success_base"] = closed[g]["base"]
    episodes = []
    for e in eps:
        vn = verb_noun(e.instruction, world_mode)
        b = preds["base"][e.episode_index]
        episodes.append({
            "episode": e.episode_index, "group": e.group, "task": e.instruction, "verb": vn["verb"], "noun": vn["noun"],
            "n_frames": int(len(e.actions)), "l1": float(l1_per_frame(b[0], e.actions).mean()),
            "success": cl.get("base", {}).get(e.episode_index, {}).get("success"),
            "closed_loop_steps": cl.get("base", {}).get(e.episode_index, {}).get("steps"),
            "paraphrase": paraphrases.get(e.episode_index),
            **{f"success_{p}": cl[p][e.episode_index]["success"] for p in cl
               if p != "base" and e.episode_index in cl[p]},
        })
    config = {"unnorm_key": unnorm_key, "center_crop": bool(center_crop), "groups": groups, "probes": list(probes),
              "reference": REFERENCE if reference else None,
              "frame_stride": int(frame_stride), "max_episodes": max_episodes, "hue_shift_deg": float(hue_shift_deg),
              "closed_loop": bool(closed_loop and world_mode), "closed_loop_probes": [c for c in cl if c != "base"],
              "closed_loop_episodes": closed_loop_episodes, "max_steps": int(max_steps), "seed": int(seed),
              "dataset": "embedded world" if world_mode else "LeRobot dataset (Bridge rules)",
              "predictor": VLA_PREDICTOR_LABEL if isinstance(predictor, VLAPolicy) else type(predictor).__name__,
              "kl": "KL(base || probe) of the softmax over the 256 action "
              "tokens at the first action position, nats, mean over frames",
              "l1": "mean |pred - demo| over the action dimensions, de-normalized, mean over frames",
              "thresholds": {"kl_small": KL_SMALL, "l1_small": L1_SMALL, "l1_break_ratio": L1_BREAK_RATIO,
                             "collapse_spread": COLLAPSE_SPREAD}}
    result = ProbeResult(rows, group_rows, closed, episodes, {e.episode_index: e.images[0] for e in eps}, [], config,
                         timings)
    result.bullets = probe_bullets(result.summary())
    timings["total_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        result.paths.update(write_probe_report(result, out_dir))
    if verbose:
        print(f"probes on {len(eps)} episodes ({sum(len(e.actions) for e in eps)} frames, every "
              f"{frame_stride}. frame) in {timings['total_s']:.1f} s")
    return result


__all__ = ["ProbeResult", "pick_group_episodes", "run_probes"]
