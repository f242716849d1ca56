"""The two ablations: a LoRA rank sweep and an object-level holdout, both re-measured with the shared evaluation.

Each ablation run starts from a fresh copy of the base model (loaded again from ``model_id``), wraps it with LoRA,
trains it with the shared loop on the shared stream, and is evaluated by :func:`vla_bridge.evaluation.run_evaluation`
on the held-out tasks and the contrast group (fresh episodes of fine-tuning tasks) — only the fine-tuned policy, a
smaller episode budget, the same metrics and CIs. On the tiny path this runs by default within the CPU budget; on
OpenVLA-7B each run costs roughly an A100-hour per 1k steps, so it is opt-in (``ABLATION_RANKS``).

- **Rank sweep**: ``ABLATION_RANKS`` (default 8, 16, 32, 64) at ``ablation_steps`` steps each, with the LoRA
  *scale* α/r held at the main run's (``LORA_ALPHA / LORA_RANK``, 16/32 = 0.5 by default): α = scale × r
  (:func:`alpha_for_rank`). PEFT multiplies the adapter's update by α/r, so with α fixed (as before) or upstream's
  α = min(r, 16) (OpenVLA's finetune.py: scale 1 for r ≤ 16, 0.5 at 32, 0.25 at 64) a rank sweep also sweeps the
  effective learning rate of the adapter, and a difference between ranks could be either. Constant α/r isolates
  capacity.
- **Object-level holdout**: the task-level split holds out object–target *pairs* whose objects were all trained
  on. Here one object family is removed from the fine-tuning data altogether, the model is trained again, and the
  fine-tuning tasks with that family are measured on fresh episodes — next to a **control run with the same step
  budget, rank, α and seed that did see the family** (the only difference is the missing object). The main run is
  shown for reference only: it trained longer (10× in the notebook), so its gap to either mixes the step budget in. The control is
  exactly the rank sweep's run at the main rank (same data, steps, rank, α, seed and schedule; training is
  deterministic from SEED), so when the sweep has that run its adapter is re-evaluated instead of trained again.

Differences count only where the 95 % CIs separate (:func:`vla_bridge.evaluation.ci_separated`); otherwise the text
says "no difference detectable at n = …".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from .checkpoints import load_checkpoint_weights
from .config import write_json
from .data.stream import TrainingStream
from .evaluation import (CONTRAST_GROUPS, POLICY_FINETUNED, EvalConfig, ci_separated, format_metric, run_evaluation,
                         summarize)
from .finetune import train_config
from .models.lora import trainable_parameters
from .models.openvla import attach_lora, load_openvla, model_image_size, register_dataset_statistics
from .progress import tqdm
from .training import train

# The metrics the ablations compare (eval.json keys), with their formatter kind.
ABLATION_METRICS = (("success_rate", "success", "rate"), ("l1_motion", "L1 motion", "l1"),
                    ("l1_gripper", "L1 gripper", "l1"), ("mean_l1_action_error", "L1 all dims", "l1"))


def alpha_for_rank(rank: int, main_rank: int, main_alpha: float) -> float:
    """LoRA α for ``rank`` that keeps the scale α/r of the main run (``main_alpha / main_rank``) constant."""
    return float(main_alpha) * int(rank) / int(main_rank)


@dataclasses.dataclass
class AblationRun:
    name: str
    rank: int
    alpha: float
    steps: int
    trainable: int
    train_seconds: float
    final_loss: float
    groups: dict[str, dict]        # group → {success_rate, mean_l1_action_error, n_episodes, ...} (fine-tuned)
    rows: list[dict]               # per-task rows (fine-tuned)
    per_episode: list[dict] = dataclasses.field(default_factory=list)  # eval.json's records (fine-tuned)
    train_episodes: int = 0
    checkpoint: str | None = None  # the trained adapter (the run's last checkpoint)
    trained_as: str | None = None  # set when this run's adapter is another run's (the same training, not repeated)

    @property
    def scale(self) -> float:
        """The LoRA scale PEFT applies to the adapter's update: α / r."""
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fresh_lora_model(model_id: str, precision: str, rank: int, alpha: int, unnorm_key: str, stats_entry, seed: int):
    processor, base = load_openvla(model_id, precision=precision, verbose=False)
    register_dataset_statistics(base, unnorm_key, stats_entry)
    return attach_lora(base, rank, alpha, seed), processor


def _evaluate(name: str, model, processor, cfg, ds, split, eval_config: EvalConfig) -> dict:
    config = dataclasses.replace(eval_config, policies=[POLICY_FINETUNED], progress=False,
                                 out_dir=Path(cfg.path("eval")) / "ablations" / name)
    report = run_evaluation(model, processor, ds, split, config, cfg=cfg)
    return {"groups": {g["group"]: g for g in report.data["groups"] if g["policy"] == POLICY_FINETUNED},
            "per_episode": [r for r in report.data["per_episode"] if r["policy"] == POLICY_FINETUNED],
            "rows": report.rows(POLICY_FINETUNED)}


def _train_and_eval(name: str, rank: int, alpha: float, cfg, model_id: str, precision: str, stats_entry, data_source,
                    train_episodes: Sequence[int], ds, split, steps: int, eval_config: EvalConfig) -> AblationRun:
    model, processor = _fresh_lora_model(model_id, precision, rank, alpha, cfg.unnorm_key, stats_entry, cfg.seed)
    trainable, _, _ = trainable_parameters(model)
    tcfg = train_config(cfg, run_name=f"{cfg.run_name}-ablation-{name}", max_steps=steps,
                        warmup_steps=min(cfg.warmup_steps, max(1, steps // 5)), save_every=10**9, use_wandb=False,
                        resume=False, progress=False)
    stream = TrainingStream(data_source, episodes=list(train_episodes), image_size=model_image_size(processor),
                            seed=cfg.seed)
    result = train(model, processor, stream, {cfg.unnorm_key: stats_entry}, tcfg)
    return AblationRun(name=name, rank=rank, alpha=float(alpha), steps=result.steps, trainable=trainable,
                       train_seconds=result.seconds,
                       final_loss=result.history[-1]["loss"] if result.history else float("nan"),
                       train_episodes=len(train_episodes), checkpoint=str(result.last_checkpoint),
                       **_evaluate(name, model, processor, cfg, ds, split, eval_config))


def _reevaluate(name: str, run: AblationRun, cfg, model_id: str, precision: str, stats_entry, ds, split,
                eval_config: EvalConfig) -> AblationRun:
    """``run``'s trained adapter, evaluated again under ``name`` with ``eval_config`` (no training)."""
    model, processor = _fresh_lora_model(model_id, precision, run.rank, run.alpha, cfg.unnorm_key, stats_entry,
                                         cfg.seed)
    load_checkpoint_weights(model, Path(run.checkpoint))
    return dataclasses.replace(run, name=name, trained_as=run.name,
                               **_evaluate(name, model, processor, cfg, ds, split, eval_config))


def same_training(run: AblationRun, rank: int, alpha: float, steps: int, train_episodes: int) -> bool:
    """Whether ``run`` trained exactly what a run of ``rank``, ``alpha`` and ``steps`` on ``train_episodes``
    episodes would (same seed, schedule and stream by construction of the ablations)."""
    return (run.rank == int(rank) and run.alpha == float(alpha) and run.steps == int(steps)
            and run.train_episodes == int(train_episodes) and run.trained_as is None and bool(run.checkpoint)
            and (Path(run.checkpoint) / "adapter_model.safetensors").is_file())


def rank_sweep(cfg, model_id: str, precision: str, stats_entry, data_source, ds, split, ranks: Sequence[int],
               steps: int, eval_config: EvalConfig | None = None, progress: bool = True) -> list[AblationRun]:
    """Train and evaluate one LoRA run per rank (same data, seed, steps, schedule and LoRA scale α/r); each is
    evaluated with ``eval_config`` (the fine-tuned policy only)."""
    runs = []
    for r in tqdm(list(ranks), desc="LoRA rank sweep", disable=not progress):
        alpha = alpha_for_rank(r, cfg.lora_rank, cfg.lora_alpha)
        runs.append(_train_and_eval(f"rank{r}", int(r), alpha, cfg, model_id, precision, stats_entry, data_source,
                                    split.train, ds, split, steps, eval_config or EvalConfig()))
    write_json(Path(cfg.path("eval")) / "ablation_ranks.json",
               {"steps": steps, "scale": cfg.lora_alpha / cfg.lora_rank, "alpha_rule": "alpha = scale * rank",
                "runs": [{**r.as_dict(), "scale": r.scale} for r in runs]})
    return runs


def pick_holdout_family(split, sidecar: Sequence[dict] | None) -> str | None:
    """The family whose fine-tuning episodes are fewest but ≥ 1 contrast task exists for it (deterministic)."""
    if not sidecar:
        return None
    by_index = {int(r["episode_index"]): r for r in sidecar}
    contrast = [e for eps in (getattr(split, "contrast", {}) or {}).values() for e in eps]
    fams_contrast = {by_index[e]["family"] for e in contrast if e in by_index}
    counts: dict[str, int] = {}
    for e in split.train:
        f = by_index.get(int(e), {}).get("family")
        if f in fams_contrast:
            counts[f] = counts.get(f, 0) + 1
    return min(counts, key=lambda f: (counts[f], f)) if counts else None


def family_summary(per_episode: Sequence[dict], family: str, seed: int = 0) -> dict:
    """Per metric of :data:`ABLATION_METRICS`, the summary (mean, bootstrap CI, n) over the fine-tuned policy's
    episodes of contrast-group tasks that name ``family`` (eval.json ``per_episode`` records)."""
    recs = [r for r in per_episode if r.get("policy", POLICY_FINETUNED) == POLICY_FINETUNED
            and r["group"] in CONTRAST_GROUPS and f" {family} " in f" {r['task_name']} "]
    key = {"success_rate": "success", "mean_l1_action_error": "l1"}
    out = {"n_episodes": len(recs), "tasks": sorted({r["task_name"] for r in recs})}
    for i, (m, _, _) in enumerate(ABLATION_METRICS):
        vals = [float(r[key.get(m, m)]) for r in recs if key.get(m, m) in r]
        out[m] = summarize(vals, seed=seed + i) if vals else None
    return out


def compare_runs(a: dict, b: dict) -> dict[str, dict]:
    """Per metric: ``a`` against ``b`` — the difference of means and whether the 95 % CIs separate."""
    out = {}
    for m, _, _ in ABLATION_METRICS:
        x, y = a.get(m), b.get(m)
        if not (x and y and _finite(x["mean"]) and _finite(y["mean"])):
            continue
        out[m] = {"diff": x["mean"] - y["mean"], "separated": ci_separated(x, y)}
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


def object_holdout(cfg, model_id: str, precision: str, stats_entry, data_source, ds, split, sidecar, steps: int,
                   main_per_episode: Sequence[dict], eval_config: EvalConfig | None = None,
                   sweep: Sequence[AblationRun] = ()) -> dict:
    """Retrain without one object family; compare its tasks with a same-budget control run that saw it.

    Two runs of ``steps`` steps at the main run's rank and α, same seed and schedule: **without** the family's
    fine-tuning episodes, and the **control** on the full fine-tuning split. Both are evaluated on fresh episodes of
    the family's fine-tuning tasks; the comparison is without vs control. When ``sweep`` (the rank sweep's runs)
    holds the control's exact training (:func:`same_training`), its adapter is re-evaluated rather than trained a
    second time. ``main_per_episode`` (the main evaluation's ``per_episode`` records) gives the main run's numbers on
    the same tasks, for reference only: a different step budget (``cfg.max_steps``)."""
    family = pick_holdout_family(split, sidecar)
    if family is None:
        return {"skipped": "no per-episode object labels (the embedded world's sidecar) to hold an object out by"}
    by_index = {int(r["episode_index"]): r for r in sidecar}
    kept = [e for e in split.train if by_index.get(int(e), {}).get("family") != family]
    alpha = float(cfg.lora_alpha)
    # only the family's contrast tasks are compared (family_summary): evaluate those and nothing else
    contrast = [int(e) for eps in (getattr(split, "contrast", {}) or {}).values() for e in eps]
    family_tasks = sorted({by_index[e]["canonical_task"] for e in contrast
                           if e in by_index and by_index[e]["family"] == family})
    eval_config = dataclasses.replace(eval_config or EvalConfig(), only_tasks=family_tasks)
    without = _train_and_eval(f"without-{family}", cfg.lora_rank, alpha, cfg, model_id, precision, stats_entry,
                              data_source, kept, ds, split, steps, eval_config)
    twin = next((r for r in sweep if same_training(r, cfg.lora_rank, alpha, steps, len(split.train))), None)
    if twin is not None:
        control = _reevaluate(f"control-with-{family}", twin, cfg, model_id, precision, stats_entry, ds, split,
                              eval_config)
    else:
        control = _train_and_eval(f"control-with-{family}", cfg.lora_rank, alpha, cfg, model_id, precision,
                                  stats_entry, data_source, split.train, ds, split, steps, eval_config)
    runs = {"object_holdout_run": family_summary(without.per_episode, family),
            "control_run": family_summary(control.per_episode, family),
            "main_run": family_summary(main_per_episode, family)}
    out = {
        "family": family, "train_episodes_full": len(split.train), "train_episodes_without": len(kept),
        "tasks": runs["object_holdout_run"]["tasks"], "n_episodes": runs["object_holdout_run"]["n_episodes"],
        "steps": without.steps, "control_steps": control.steps, "main_steps": int(cfg.max_steps),
        "rank": without.rank, "alpha": alpha, **runs,
        "without_vs_control": compare_runs(runs["object_holdout_run"], runs["control_run"]),
        "note": (f"both ablation runs trained {without.steps} steps at r={without.rank}, alpha={alpha:g}; the control "
                 f"saw the '{family}' episodes, the other did not (its base did see {family}s in pretraining); the "
                 f"main run ({cfg.max_steps} steps) is a different budget, shown for reference"
                 + (f"; the control is the rank sweep's r={twin.rank} run (the same training), re-evaluated"
                    if twin is not None else "")),
        "control_trained_as": control.trained_as,
        "runs": {"without": without.as_dict(), "control": control.as_dict()},
    }
    write_json(Path(cfg.path("eval")) / "ablation_object_holdout.json", out)
    return out


def rank_findings(runs: Sequence[AblationRun]) -> list[dict]:
    """Every pair of ranks, per group and metric, whose 95 % CIs separate (the only differences to conclude from)."""
    out = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            for g in a.groups:
                if g not in b.groups:
                    continue
                for m, label, kind in ABLATION_METRICS:
                    x, y = a.groups[g].get(m), b.groups[g].get(m)
                    if x and y and _finite(x["mean"]) and _finite(y["mean"]) and ci_separated(x, y):
                        out.append({"group": g, "metric": m, "label": label, "kind": kind, "a": a.rank,
                                    "b": b.rank, "a_value": x, "b_value": y})
    return out


def format_rank_table(runs: Sequence[AblationRun]) -> str:
    """Markdown: per rank its α and scale α/r (constant by construction), trainable parameters, final loss and, per
    group, success, L1 motion and L1 gripper with 95 % CIs; then the pairs whose CIs separate."""
    groups = list(dict.fromkeys(g for r in runs for g in r.groups))
    cols = [(m, label, kind) for m, label, kind in ABLATION_METRICS if m != "mean_l1_action_error"]
    head = "| rank | alpha | alpha/r | trainable | final loss | " + " | ".join(
        f"{g}: {label}" for g in groups for _, label, _ in cols) + " |"
    lines = [head, "|" + "---|" * (5 + len(cols) * len(groups))]
    for r in runs:
        cells = []
        for g in groups:
            m = r.groups.get(g)
            for key, _, kind in cols:
                cells.append("–" if m is None else format_metric(m.get(key), kind)
                             + (f" (n={m['n_episodes']})" if key == "success_rate" else ""))
        lines.append(f"| {r.rank} | {r.alpha:g} | {r.scale:g} | {r.trainable:,} | {r.final_loss:.3f} | "
                     + " | ".join(cells) + " |")
    found = rank_findings(runs)
    n = sorted({m["n_episodes"] for r in runs for m in r.groups.values()})
    lines.append("")
    if found:
        lines.append("Differences whose 95 % CIs separate: " + "; ".join(
            f"{f['group']} {f['label']}: r={f['a']} {format_metric(f['a_value'], f['kind'])} vs r={f['b']} "
            f"{format_metric(f['b_value'], f['kind'])}" for f in found) + ". Every other pair: no difference "
            f"detectable at n = {'/'.join(map(str, n))} episodes per group.")
    else:
        lines.append(f"No two ranks differ beyond their 95 % CIs on any metric: no difference detectable at "
                     f"n = {'/'.join(map(str, n))} episodes per group (which is not the same as no difference).")
    return "\n".join(lines)


def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
