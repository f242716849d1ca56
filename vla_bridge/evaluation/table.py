"""The evaluation's text: table.md (group summary, per-task rows, per-task verdicts against the base), the one
metric formatter, and :class:`EvalReport`, what ``run_evaluation`` returns (eval.json's data + table.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .metrics import compare_metric
from .policies import POLICY_BASE, POLICY_FINETUNED, POLICY_MEAN


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

    def closed_loop_records(self, policy: str = POLICY_FINETUNED, max_steps: int | None = None) -> dict[int, dict]:
        """{episode_index: {"success", "steps"}} of ``policy``'s closed-loop rollouts (empty without a closed loop,
        or when ``max_steps`` is given and is not the evaluation's horizon): what the probes reuse as their
        unperturbed closed loop."""
        horizon = (self.data.get("success_definition") or {}).get("max_steps")
        if horizon is None or (max_steps is not None and int(max_steps) != int(horizon)):
            return {}
        return {int(r["episode_index"]): {"success": bool(r["success"]), "steps": int(r["closed_loop_steps"])}
                for r in self.data["per_episode"] if r["policy"] == policy and "closed_loop_steps" in r}

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


__all__ = ["EvalReport", "format_metric", "VERDICT_METRICS", "SATURATED_SUCCESS", "MIN_VERDICT_EPISODES",
           "task_verdicts", "format_verdicts", "format_table"]
