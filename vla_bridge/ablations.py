"""The two ablations: a LoRA rank sweep and an object-level holdout, both re-measured with the shared evaluation.

Each ablation run starts from a fresh copy of the base model (loaded again from ``model_id``), wraps it with LoRA,
trains it with the shared loop on the shared stream, and is evaluated by :func:`vla_bridge.evaluation.run_evaluation`
on the held-out tasks and the contrast group (fresh episodes of fine-tuning tasks) — only the fine-tuned policy, a
smaller episode budget, the same metrics and CIs. On the tiny path this runs by default within the CPU budget; on
OpenVLA-7B each run costs roughly an A100-hour per 1k steps, so it is opt-in (``ABLATION_RANKS``).

- **Rank sweep**: ``ABLATION_RANKS`` (default 8, 16, 32, 64) at ``ablation_steps`` steps each.
- **Object-level holdout**: the task-level split holds out object–target *pairs* whose objects were all trained
  on. Here one object family is removed from the fine-tuning data altogether, the model is trained again, and the
  fine-tuning tasks with that family are measured on fresh episodes — next to the same tasks under the main run,
  which trained on them. The gap is what an object-level holdout costs on top of a task-level one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from .config import write_json


@dataclasses.dataclass
class AblationRun:
    name: str
    rank: int
    steps: int
    trainable: int
    train_seconds: float
    final_loss: float
    groups: dict[str, dict]        # group → {success_rate, mean_l1_action_error, n_episodes, ...} (fine-tuned)
    rows: list[dict]               # per-task rows (fine-tuned)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fresh_lora_model(model_id: str, precision: str, rank: int, alpha: int, unnorm_key: str, stats_entry, seed: int):
    from .models.openvla import attach_lora, load_openvla, register_dataset_statistics

    processor, base = load_openvla(model_id, precision=precision, verbose=False)
    register_dataset_statistics(base, unnorm_key, stats_entry)
    return attach_lora(base, rank, alpha, seed), processor


def _train_and_eval(name: str, rank: int, cfg, model_id: str, precision: str, stats_entry, data_source,
                    train_episodes: Sequence[int], ds, split, steps: int, eval_kwargs: dict) -> AblationRun:
    from .data.stream import TrainingStream
    from .evaluation import POLICY_FINETUNED, run_evaluation
    from .models.lora import trainable_parameters
    from .models.openvla import model_image_size
    from .training import TrainConfig, train

    model, processor = _fresh_lora_model(model_id, precision, rank, cfg.lora_alpha, cfg.unnorm_key, stats_entry,
                                         cfg.seed)
    trainable, _, _ = trainable_parameters(model)
    tcfg = TrainConfig(run_name=f"{cfg.run_name}-ablation-{name}", outputs_dir=cfg.outputs_dir, max_steps=steps,
                       batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, learning_rate=cfg.learning_rate,
                       warmup_steps=min(cfg.warmup_steps, max(1, steps // 5)), log_every=cfg.log_every,
                       save_every=10**9, seed=cfg.seed, image_aug=cfg.image_aug, unnorm_key=cfg.unnorm_key,
                       progress=False)
    stream = TrainingStream(data_source, episodes=list(train_episodes), image_size=model_image_size(processor),
                            seed=cfg.seed)
    result = train(model, processor, stream, {cfg.unnorm_key: stats_entry}, tcfg)
    report = run_evaluation(model, processor, ds, split, cfg=cfg, policies=[POLICY_FINETUNED], progress=False,
                            out_dir=Path(cfg.path("eval")) / "ablations" / name, **eval_kwargs)
    groups = {g["group"]: g for g in report.data["groups"] if g["policy"] == POLICY_FINETUNED}
    return AblationRun(name=name, rank=rank, steps=result.steps, trainable=trainable, train_seconds=result.seconds,
                       final_loss=result.history[-1]["loss"] if result.history else float("nan"), groups=groups,
                       rows=report.rows(POLICY_FINETUNED))


def rank_sweep(cfg, model_id: str, precision: str, stats_entry, data_source, ds, split, ranks: Sequence[int],
               steps: int, eval_kwargs: dict | None = None, progress: bool = True) -> list[AblationRun]:
    """Train and evaluate one LoRA run per rank (same data, seed, steps and schedule)."""
    from tqdm.auto import tqdm

    runs = []
    for r in tqdm(list(ranks), desc="LoRA rank sweep", disable=not progress):
        runs.append(_train_and_eval(f"rank{r}", int(r), cfg, model_id, precision, stats_entry, data_source,
                                    split.train, ds, split, steps, dict(eval_kwargs or {})))
    write_json(Path(cfg.path("eval")) / "ablation_ranks.json", {"steps": steps, "runs": [r.as_dict() for r in runs]})
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


def object_holdout(cfg, model_id: str, precision: str, stats_entry, data_source, ds, split, sidecar, steps: int,
                   main_rows: Sequence[dict], eval_kwargs: dict | None = None) -> dict:
    """Retrain without one object family in the fine-tuning data; compare its tasks with the main run's rows."""
    from .evaluation import CONTRAST_GROUPS

    family = pick_holdout_family(split, sidecar)
    if family is None:
        return {"skipped": "no per-episode object labels (the embedded world's sidecar) to hold an object out by"}
    by_index = {int(r["episode_index"]): r for r in sidecar}
    kept = [e for e in split.train if by_index.get(int(e), {}).get("family") != family]
    run = _train_and_eval(f"without-{family}", cfg.lora_rank, cfg, model_id, precision, stats_entry, data_source,
                          kept, ds, split, steps, dict(eval_kwargs or {}))

    def fam_rows(rows):
        return [r for r in rows if r["group"] in CONTRAST_GROUPS and f" {family} " in f" {r['task_name']} "]

    def mean_of(rows, key):
        vals = [r[key]["mean"] for r in rows]
        return sum(vals) / len(vals) if vals else float("nan")

    with_rows, without_rows = fam_rows(main_rows), fam_rows(run.rows)
    out = {
        "family": family, "train_episodes_full": len(split.train), "train_episodes_without": len(kept),
        "tasks": sorted({r["task_name"] for r in without_rows}),
        "n_episodes": sum(r["n_episodes"] for r in without_rows),
        "main_run": {"success_rate": mean_of(with_rows, "success_rate"),
                     "mean_l1_action_error": mean_of(with_rows, "mean_l1_action_error")},
        "object_holdout_run": {"success_rate": mean_of(without_rows, "success_rate"),
                               "mean_l1_action_error": mean_of(without_rows, "mean_l1_action_error")},
        "steps": run.steps, "rank": run.rank, "note": (
            f"the main run fine-tuned on every fine-tuning family; the object-holdout run trained {run.steps} steps "
            f"without any '{family}' episode (its base model did see {family}s in pretraining)"),
        "run": run.as_dict(),
    }
    write_json(Path(cfg.path("eval")) / "ablation_object_holdout.json", out)
    return out


def format_rank_table(runs: Sequence[AblationRun]) -> str:
    groups = list(dict.fromkeys(g for r in runs for g in r.groups))
    head = "| rank | trainable | final loss | " + " | ".join(
        f"{g}: success | {g}: L1" for g in groups) + " |"
    sep = "|" + "---|" * (3 + 2 * len(groups))
    lines = [head, sep]
    for r in runs:
        cells = []
        for g in groups:
            m = r.groups.get(g)
            if m is None:
                cells += ["–", "–"]
                continue
            s, l1 = m["success_rate"], m["mean_l1_action_error"]
            cells.append(f"{s['mean']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] (n={m['n_episodes']})")
            cells.append(f"{l1['mean']:.4f} [{l1['ci'][0]:.4f}, {l1['ci'][1]:.4f}]")
        lines.append(f"| {r.rank} | {r.trainable:,} | {r.final_loss:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
