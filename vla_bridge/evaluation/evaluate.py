"""Held-out evaluation: which tasks, which policies, open-loop L1, replay drift, success, baselines, bootstrap CIs.

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
    envs and each step's policy calls are batched across them. An episode that provably cannot succeed in the steps
    it has left is stopped there (``rollout.run_closed_loop``'s ``stop_hopeless``: the same success, fewer policy
    calls; per episode ``closed_loop_steps`` is then the steps run and ``closed_loop_stopped_early`` is true).
  - **Bridge: a documented proxy** (a real success rate needs a WidowX): an episode counts as a success when the
    replay drift is below ``DRIFT_THRESHOLD_CM`` (5 cm) AND the gripper close/open events of the open-loop
    predictions match the demonstration's — same events in the same order, each within ±``GRIPPER_TOLERANCE_STEPS``
    (2) steps (the gripper command is binarized at 0.5; the initial state's gripper is the starting point). On the
    embedded world the proxy is computed too (``proxy_success_rate`` in eval.json), so the two can be compared.

The metrics live in :mod:`.metrics`, the batched predictor in :mod:`.inference`, the policies in :mod:`.policies`,
the closed loop in :mod:`.rollout`, table.md in :mod:`.table`; this module selects the tasks and runs them.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config import write_json
from ..data import world
from ..data.build import load_build_info, load_episode_sidecar
from ..data.episodes import load_episodes
from ..data.schema import MAIN_CAMERA, feature_names
from ..data.splits import GROUP_TITLES as _SPLIT_GROUP_TITLES
from ..data.stats import stats_from_stream
from ..data.tasks import normalize_task
from ..jsonio import to_jsonable
from ..models.lora import trainable_parameters
from ..models.openvla import base_model
from ..progress import tqdm
from ..tokenization import action_stats as _action_stats
from .inference import BatchedActionPredictor
from .metrics import (CI_LEVEL, DRIFT_THRESHOLD_CM, GRIPPER_THRESHOLD, GRIPPER_TOLERANCE_STEPS, N_BOOT,
                      REPLAY_HORIZON, l1_action_error, proxy_success, replay_drift_cm, split_l1, summarize)
from .policies import (DEFAULT_POLICIES, POLICY_BASE, POLICY_FINETUNED, POLICY_MEAN, ConstantPolicy, VLAPolicy,
                       _POLICY_ALIASES, resolve_policies)
from .rollout import CLOSED_LOOP_STEPS, ClosedLoopEpisode, run_closed_loop
from .table import EvalReport, format_table

SCHEMA_VERSION = 1

# Evaluation groups and their titles; "train_seen" is the fallback contrast group for datasets without fresh
# episodes of training tasks (Bridge): episodes of the most frequent training tasks that training DID see.
GROUP_TITLES = {**_SPLIT_GROUP_TITLES, "train_seen": "fine-tuning tasks, episodes seen in training"}
CONTRAST_GROUPS = ("finetune_eval", "train_seen")

CLOSED_LOOP_DEFINITION = (
    "closed-loop success on the embedded world: TabletopEnv().reset(instruction, seed, prompt=task) rebuilds the "
    "episode's initial scene from meta/vla_bridge_episodes.jsonl, the policy acts from the rendered main camera "
    "(image_0) for at most {max_steps} steps at 5 Hz, success = the instructed object released inside the instructed "
    "target (the world's own check, sticky); an episode that provably cannot succeed in the steps it has left "
    "(world.reach.min_steps_to_success) is stopped there, which changes no success")
PROXY_DEFINITION = (
    "proxy success (no robot to run the policy on): replay drift over the first {horizon} steps < {threshold:g} cm AND "
    "the gripper close/open events of the open-loop predictions (command binarized at {grip:g}) equal the "
    "demonstration's in kind and order, each within ±{tol} steps")


@dataclasses.dataclass
class EvalTask:
    group: str
    task_name: str
    episodes: list[int]

    @property
    def is_contrast(self) -> bool:
        return self.group in CONTRAST_GROUPS


def select_eval_tasks(split: Any, sidecar: Sequence[Mapping[str, Any]] | None = None,
                      groups: Sequence[str] | None = None, episodes_per_task: int = 8,
                      max_tasks_per_group: int | None = None, contrast_tasks: int = 3,
                      only_tasks: Sequence[str] | None = None) -> list[EvalTask]:
    """The evaluated (group, task, episodes): per group, episodes are grouped by task — the canonical task on the
    embedded world (so a group's paraphrases count as their task), the normalized task string elsewhere — and each
    task keeps its first ``episodes_per_task`` episodes; tasks are ranked by episode count (then name) and cut to
    ``max_tasks_per_group``. Groups: ``groups`` (default: every held-out group, paraphrases included, plus the
    contrast group). Contrast: ``split.contrast`` ("finetune_eval": fresh episodes of
    fine-tuning tasks) when the dataset has it, else "train_seen": the ``contrast_tasks`` most frequent training tasks'
    episodes, which training did see (stated in the group's title). ``only_tasks``: keep only these task names
    (before the ``max_tasks_per_group`` cut), e.g. the object holdout's family."""
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
            name = row["canonical_task"] if row is not None else normalize_task(split.tasks.get(int(e), ""))
            if not name:
                continue
            if only_tasks is None or name in only_tasks:
                per_task.setdefault(name, []).append(int(e))
        ranked = sorted(per_task, key=lambda t: (-len(per_task[t]), t))
        limit = max_tasks_per_group
        if g == "train_seen":
            limit = min(limit or contrast_tasks, contrast_tasks)
        for t in ranked[:limit] if limit else ranked:
            out.append(EvalTask(g, t, per_task[t][: int(episodes_per_task)]))
    return out


def training_mean_action(ds: Any, train_episodes: Sequence[int]) -> np.ndarray:
    """The mean action of the training split's frames (one pass over the parquet columns, no video decoded)."""
    return np.asarray(stats_from_stream(ds, list(train_episodes))["action"]["mean"], np.float64)


def _model_info(model: Any, processor: Any, cfg: Any, train_result: Any) -> dict:
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


@dataclasses.dataclass
class EvalConfig:
    """What :func:`run_evaluation` evaluates and how; None = the run config's value (``cfg``) or the default.

    ``unnorm_key``, ``out_dir`` (default ``cfg.path("eval")``), ``run_name``: where and under which statistics.
    Knobs for the time budget: ``episodes_per_task`` (default ``cfg.eval_episodes``, else 8),
    ``max_tasks_per_group``, ``groups``, ``only_tasks`` (see :func:`select_eval_tasks`), ``contrast_tasks``,
    ``policies`` (subset of "fine-tuned", "base", "mean-action"), ``closed_loop`` ("auto": on the embedded world;
    False: skip it and report the proxy), ``max_steps`` (closed loop, default ``rollout.CLOSED_LOOP_STEPS`` = 40),
    ``max_batch_size`` (frames per decode call; "auto": sized from free VRAM by ``inference.eval_batch_size``, 64 on
    a CPU), ``threads`` (torch threads; None: unchanged). ``center_crop`` (default ``cfg.image_aug``), ``seed``
    (default ``cfg.seed``), ``n_boot`` (bootstrap resamples). ``mean_action``: the mean-action baseline's action
    (default: from the training split). ``progress`` bars, ``write`` eval.json / table.md, ``keep_frames`` (every
    decoded image in ``report.episodes``; else only each episode's first frame)."""

    unnorm_key: str | None = None
    out_dir: str | Path | None = None
    run_name: str | None = None
    episodes_per_task: int | None = None
    max_tasks_per_group: int | None = None
    groups: Sequence[str] | None = None
    policies: Sequence[str] = DEFAULT_POLICIES
    closed_loop: bool | str = "auto"
    max_steps: int | None = None
    center_crop: bool | None = None
    mean_action: Sequence[float] | None = None
    seed: int | None = None
    n_boot: int = N_BOOT
    max_batch_size: int | str | None = "auto"
    threads: int | None = None
    contrast_tasks: int = 3
    only_tasks: Sequence[str] | None = None
    progress: bool = True
    write: bool = True
    keep_frames: bool = False


def check_statistics_agree(action_stats: Mapping[str, Any], model: Any, unnorm_key: str) -> None:
    """The statistics handed to the evaluation must be the ones that de-normalize the model's predictions
    (``config.norm_stats[unnorm_key]``, what ``predict_action`` reads): a ValueError with the fix when they are not."""
    carried = (getattr(base_model(model).config, "norm_stats", None) or {}).get(unnorm_key)
    if carried is None:
        raise ValueError(f"the model carries no norm_stats[{unnorm_key!r}]: register the training statistics "
                         f"(models.openvla.register_dataset_statistics) before evaluating")
    given, used = _action_stats(action_stats), _action_stats(carried)
    if any(not np.allclose(np.asarray(given[k], float), np.asarray(used[k], float)) for k in ("q01", "q99")):
        raise ValueError(f"action_stats differ from the model's norm_stats[{unnorm_key!r}] (q01/q99), which "
                         f"de-normalize its predictions: pass the statistics the model was trained with")


def run_evaluation(model: Any, processor: Any, ds: Any, split: Any, config: EvalConfig | None = None, *,
                   cfg: Any = None, action_stats: Mapping[str, Any] | None = None, train_result: Any = None,
                   policy_objects: Mapping[str, Any] | None = None,
                   model_info: Mapping[str, Any] | None = None) -> EvalReport:
    """Evaluate the fine-tuned model, the base model before LoRA and the mean-action baseline on every selected task.

    ``model``/``processor``: the PEFT-wrapped fine-tuned VLA and its processor. ``ds``: the opened stream
    (``stream.open_dataset``; the episodes are decoded from it). ``split``: ``splits.make_split(ds)``.
    ``config``: an :class:`EvalConfig` (what to evaluate, the time-budget knobs); its unset fields come from ``cfg``
    (a RunConfig: ``unnorm_key``, ``eval_episodes``, ``seed``, ``image_aug``, ``path("eval")``, ``run_name``,
    ``dataset``), which is also recorded in eval.json, as is ``train_result`` (the training run).

    The mean-action baseline is ``config.mean_action`` if given, else the mean over the training split's frames:
    one pass over the parquet columns for a local dataset; for a hub stream the ``action_stats`` entry's mean when
    given (the notebook's statistics: whole dataset when meta/stats.json has them), else that streaming pass.
    Without ``config.keep_frames``, ``report.episodes`` keeps only each episode's first frame (for failure mining's
    contact sheet) and the actions/states: ~50 KB per 128 px frame otherwise stay in memory.

    ``policy_objects`` (a policy name → :class:`Policy` mapping, e.g. Octo's, which runs in its own environment)
    replaces the VLA's batched predictor and the base-model switch: ``model``/``processor`` are then unused and
    ``model_info`` describes the model in eval.json (the "base (before LoRA)" row is whatever policy is given under
    that name: for Octo, the weights before fine-tuning). Metrics, closed loop and the table are the same code.

    Writes ``<out_dir>/eval.json`` and ``<out_dir>/table.md`` (unless ``config.write`` is False) and returns an
    :class:`EvalReport` (its ``markdown`` is the table; it renders itself in a notebook).
    """
    c = config or EvalConfig()
    unnorm_key, out_dir, run_name, episodes_per_task = c.unnorm_key, c.out_dir, c.run_name, c.episodes_per_task
    max_tasks_per_group, groups, policies, closed_loop = c.max_tasks_per_group, c.groups, c.policies, c.closed_loop
    max_steps, center_crop, mean_action, seed, n_boot = c.max_steps, c.center_crop, c.mean_action, c.seed, c.n_boot
    max_batch_size, threads, contrast_tasks, progress = c.max_batch_size, c.threads, c.contrast_tasks, c.progress
    write, keep_frames = c.write, c.keep_frames

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
    policies = resolve_policies(policies)
    if policy_objects is None and action_stats is not None:
        check_statistics_agree(action_stats, model, unnorm_key)

    root = getattr(getattr(ds, "meta", None), "root", None)
    sidecar = load_episode_sidecar(root) if root is not None else None
    embedded = sidecar is not None
    if closed_loop == "auto":
        closed_loop = embedded
    if closed_loop and not embedded:
        raise ValueError("closed-loop success needs the embedded world (its episodes' scenes); on Bridge the success "
                         "column is the proxy: pass closed_loop=False or 'auto'")
    max_steps = int(max_steps or CLOSED_LOOP_STEPS)
    if policy_objects is None and POLICY_BASE in policies and not hasattr(model, "disable_adapter"):
        warnings.warn("the model is not PEFT-wrapped: the base-model baseline is skipped", stacklevel=2)
        policies.remove(POLICY_BASE)

    tasks = select_eval_tasks(split, sidecar, groups, episodes_per_task, max_tasks_per_group, contrast_tasks,
                              c.only_tasks)
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
    closed_loop_frames: dict[str, dict[str, int]] = {}
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
            closed_loop_frames[p] = {"steps_run": int(sum(r["steps"] for r in res)),
                                     "stopped_early": int(sum(r["stopped_early"] for r in res)),
                                     "steps_if_never_stopped": int(sum(max_steps if r["stopped_early"] else r["steps"]
                                                                       for r in res))}
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
                           final_distance_cm=c["final_distance_cm"], closed_loop_stopped_early=c["stopped_early"])
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
    timing["closed_loop_steps_per_policy"] = closed_loop_frames   # policy frames run; the early stop's saving
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
    payload = to_jsonable(payload, finite_only=True)
    markdown = format_table(payload)
    json_path = table_path = None
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = write_json(out_dir / "eval.json", payload)
        table_path = out_dir / "table.md"
        table_path.write_text(markdown)
    if not keep_frames:  # the first frame stays: failure mining's contact sheet shows it (one image per episode)
        data = {e: dataclasses.replace(d, images=list(d.images[:1])) for e, d in data.items()}
    return EvalReport(payload, markdown, json_path, table_path, predictions, data)


__all__ = ["SCHEMA_VERSION", "GROUP_TITLES", "CONTRAST_GROUPS", "CLOSED_LOOP_DEFINITION", "PROXY_DEFINITION",
           "EvalTask", "select_eval_tasks", "training_mean_action", "EvalConfig", "run_evaluation"]
