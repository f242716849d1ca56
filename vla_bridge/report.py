"""The write-up: the reflection paragraph and the object-holdout summary, assembled from measured numbers only.

Every figure in these texts is read from an object the notebook computed (the evaluation report, the probe result,
the instruction overlap, the training result, the ablation runs); nothing here is a constant about this run. Where a
number is missing (a step was skipped) the sentence says so instead of inventing one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .ablations import compare_runs, rank_findings
from .evaluation import (CONTRAST_GROUPS, KL_SMALL, MIN_VERDICT_EPISODES, POLICY_BASE, POLICY_FINETUNED, POLICY_MEAN,
                         compare_metric, format_metric, task_verdicts)
from .hardware import is_embedded

# Upstream's published figures (theirs, not measured here), quoted where the text compares with them.
OPENVLA_PRETRAIN_EPISODES = 970_000   # Kim et al., 2024, "OpenVLA": Open X-Embodiment episodes, Bridge V2 among them
OPENVLA_PRETRAIN_GPU_HOURS = 21_500   # 64 A100s for 14 days
OPENVLA_PRETRAIN_BATCH = 2048         # global batch of OpenVLA's pretraining
OPENVLA_FINETUNE_BATCH = 16           # vla-scripts/finetune.py default batch_size (grad_accumulation_steps 1)
UPSTREAM_FIGURES = (OPENVLA_PRETRAIN_EPISODES, OPENVLA_PRETRAIN_GPU_HOURS, OPENVLA_PRETRAIN_BATCH,
                    OPENVLA_FINETUNE_BATCH)
KIND = {"success_rate": "rate", "grasp_rate": "rate", "replay_pose_drift_cm": "cm"}
LABEL = {"success_rate": "success", "grasp_rate": "grasp rate", "l1_motion": "L1 motion",
         "l1_gripper": "L1 gripper", "replay_pose_drift_cm": "drift (cm)", "mean_l1_action_error": "L1 all dims"}


def _fmt(m: Mapping[str, Any] | None, metric: str) -> str:
    return format_metric(m, KIND.get(metric, "l1"), missing="n/a")


def _pct(m: Mapping[str, Any] | None) -> str:
    return format_metric(m, "rate", missing="n/a")


def _num(m: Mapping[str, Any] | None) -> str:
    return format_metric(m, "l1", missing="n/a")


def comparison(report, group: str, metric: str, baseline: str) -> dict[str, Any] | None:
    """Fine-tuned vs ``baseline`` on ``metric`` in ``group`` (:func:`evaluation.compare_metric`); None if not run."""
    try:
        ft, base = report.group(group, POLICY_FINETUNED)[metric], report.group(group, baseline)[metric]
    except KeyError:
        return None
    if not (ft and base and _finite(ft.get("mean")) and _finite(base.get("mean"))):
        return None  # a NaN is not a finding: the sentence says "not measured"
    return compare_metric(metric, ft, base)


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _verdict(c: Mapping[str, Any] | None, metric: str, n: int) -> str:
    """"a vs b (better; the intervals do not overlap)" or "a vs b (no difference detectable at n = …)"."""
    if c is None:
        return "not measured"
    a, b = c["finetuned"], c["baseline"]
    if not c["separated"] or a["mean"] == b["mean"]:
        return f"{_fmt(a, metric)} vs {_fmt(b, metric)} (no difference detectable at n = {n})"
    return f"{_fmt(a, metric)} vs {_fmt(b, metric)} ({'better' if c['better'] else 'worse'}; the intervals do not overlap)"


def _summary_line(name: str, m: Mapping[str, Any] | None) -> str:
    if not m or not m.get("n_episodes"):
        return f"  {name}: no episode of the family's tasks evaluated"
    return (f"  {name}: success {_fmt(m.get('success_rate'), 'success_rate')}, L1 motion "
            f"{_fmt(m.get('l1_motion'), 'l1')}, L1 gripper {_fmt(m.get('l1_gripper'), 'l1')} (n = {m['n_episodes']})")


def _holdout_diffs(holdout: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(metrics whose CIs separate between the without-run and its control, the others), as labels."""
    cmp = holdout.get("without_vs_control") or {}
    sep = [LABEL.get(m, m) for m, c in cmp.items() if c["separated"]]
    return sep, [LABEL.get(m, m) for m, c in cmp.items() if not c["separated"]]


def format_holdout(holdout: Mapping[str, Any]) -> str:
    """The object-level holdout ablation against its same-budget control (or why it was skipped)."""
    if "skipped" in holdout:
        return f"object-level holdout: skipped — {holdout['skipped']}"
    head = (f"object-level holdout: family {holdout['family']!r} removed from fine-tuning "
            f"({holdout['train_episodes_without']} of {holdout['train_episodes_full']} episodes kept), "
            f"re-measured on {holdout['n_episodes']} fresh episodes of its tasks")
    if "control_run" not in holdout:
        return head + "\n  no same-budget control run in this result: nothing is compared"
    sep, same = _holdout_diffs(holdout)
    n = holdout["n_episodes"]
    verdict = (("removing the object changed " + ", ".join(sep) + " beyond the 95 % CIs") if sep else
               "removing the object made no difference detectable")
    if same:
        verdict += f"; {', '.join(same)}: no difference detectable at n = {n}"
    return "\n".join([
        head,
        _summary_line(f"without '{holdout['family']}' ({holdout['steps']} steps, r={holdout['rank']})",
                      holdout["object_holdout_run"]),
        _summary_line(f"control, same budget, saw it ({holdout['control_steps']} steps, r={holdout['rank']})",
                      holdout["control_run"]),
        f"  → {verdict}",
        _summary_line(f"main run, for reference only ({holdout['main_steps']} steps: a different budget)",
                      holdout.get("main_run")),
    ])


def _probe_row(probe_result, probe: str, group: str = "all") -> Mapping[str, Any] | None:
    """The probe's row for ``group`` when it measured finite numbers on some frames (a NaN is not a finding)."""
    for r in getattr(probe_result, "rows", []) or []:
        if (r.get("probe") == probe and r.get("group") == group and r.get("n_frames")
                and _finite(r.get("kl"), r.get("dl1_rel", 0.0))):
            return r
    return None


def _ci_excludes_zero(row: Mapping[str, Any]) -> bool | None:
    ci = row.get("dl1_ci95")
    if not ci or not _finite(*ci):
        return None
    return ci[0] > 0 or ci[1] < 0


def _probe_effect(row: Mapping[str, Any]) -> str:
    ci = row.get("dl1_ci95")
    ex = _ci_excludes_zero(row)
    ci_s = (f", 95 % CI of the change [{ci[0]:+.4f}, {ci[1]:+.4f}] "
            + ("excludes 0" if ex else "includes 0") if ex is not None else ", no interval (fewer than 2 episodes)")
    return f"L1 {100 * row['dl1_rel']:+.0f} %{ci_s}, KL {row['kl']:.2f} nats"


def _path(cfg, report) -> str:
    policy = getattr(cfg, "policy", None)
    if policy == "octo":
        return "octo"
    if policy == "tiny" or is_embedded(getattr(cfg, "dataset", None)):
        return "tiny"
    return "openvla" if policy else ("tiny" if report.data.get("success_definition", {}).get("kind") ==
                                     "closed_loop" else "openvla")


def _group_order(report) -> tuple[str | None, list[str]]:
    held = [g for g in dict.fromkeys(x["group"] for x in report.data["groups"]) if g not in CONTRAST_GROUPS]
    contrast = next((g for g in CONTRAST_GROUPS if any(x["group"] == g for x in report.data["groups"])), None)
    return contrast, held


def _scores(report, groups: Sequence[str], s_word: str) -> str:
    lines = []
    for g in groups:
        ft = report.group(g, POLICY_FINETUNED)
        n = ft["n_episodes"]
        bits = [f"{s_word} {_verdict(comparison(report, g, 'success_rate', POLICY_BASE), 'success_rate', n)} "
                "against the base model"]
        for metric in ("l1_motion", "l1_gripper"):
            c_mean = comparison(report, g, metric, POLICY_MEAN)
            if c_mean is not None:
                bits.append(f"{LABEL[metric]} {_verdict(c_mean, metric, n)} against the mean action")
        if "l1_motion" not in ft:  # an eval.json without the split: the 7-dimension mean
            bits.append("open-loop L1 " + _verdict(comparison(report, g, "mean_l1_action_error", POLICY_MEAN),
                                                   "mean_l1_action_error", n) + " against the mean action")
        c_drift = comparison(report, g, "replay_pose_drift_cm", POLICY_MEAN)
        if c_drift is not None:
            bits.append(f"drift {_verdict(c_drift, 'replay_pose_drift_cm', n)} cm against the mean action's")
        if _finite((ft.get("grasp_rate") or {}).get("mean")):
            bits.append(f"grasp rate {_pct(ft['grasp_rate'])}")
        lines.append(f"{ft['title']} (n = {n} episodes): " + "; ".join(bits))
    return "**What it scored.** " + ". ".join(lines) + "."


def _task_text(report) -> tuple[str | None, list[dict]]:
    verdicts = task_verdicts(report.data) if report.data.get("rows") else []
    if not verdicts:
        return None, []
    rows = {(r["group"], r["task_name"], r["policy"]): r for r in report.data["rows"]}

    def detail(v, which):
        ft, base = rows[(v["group"], v["task_name"], POLICY_FINETUNED)], rows[(v["group"], v["task_name"], POLICY_BASE)]
        return ", ".join(f"{LABEL.get(m, m)} {_fmt(ft[m], m)} vs {_fmt(base[m], m)}" for m in v[which])

    parts = []
    for word, which in (("helped", "better"), ("hurt", "worse")):
        got = [v for v in verdicts if v["verdict"] == word]
        if got:
            parts.append(f"LoRA {word} on " + "; ".join(f"'{v['task_name']}' ({detail(v, which)})" for v in got))
    mixed = [v for v in verdicts if v["verdict"] == "mixed"]
    if mixed:
        parts.append("it was mixed on " + "; ".join(
            f"'{v['task_name']}' (better: {detail(v, 'better')}; worse: {detail(v, 'worse')})" for v in mixed))
    same = [v for v in verdicts if v["verdict"] == "same"]
    if same:
        ns = sorted({v["n_episodes"] for v in same})
        parts.append(f"no difference from the base was detectable on {len(same)} task(s) ("
                     + ", ".join(f"'{v['task_name']}'" for v in same) + f") at n = {'/'.join(map(str, ns))} each")
    few = [v for v in verdicts if v["verdict"] == "too_few"]
    if few:
        groups = sorted({v["group"] for v in few})
        parts.append(f"{len(few)} task(s) in {', '.join(groups)} have fewer than {MIN_VERDICT_EPISODES} episodes "
                     "each, too few for an interval, so they get no verdict")
    sat = [v for v in verdicts if v["saturated"]]
    if sat:
        parts.append("the base was already saturated on success for " + ", ".join(f"'{v['task_name']}'" for v in sat))
    return ("**Per task, against the base model** (a metric counts only where the 95 % CIs separate). "
            + "; ".join(parts) + "."), verdicts


def _probe_text(probe_result) -> str | None:
    ref, col, par = (_probe_row(probe_result, p) for p in ("other_scene", "color_shift", "paraphrase"))
    rows = getattr(probe_result, "rows", []) or []
    if ref is None:
        if any(r.get("probe") == "other_scene" and r.get("n_frames") for r in rows):
            return ("**What it relies on.** The scene-swap probe gave non-finite numbers (NaN): the policy's outputs "
                    "are broken, and nothing is concluded from them.")
        return None
    c = getattr(probe_result, "config", {}) or {}
    sub = (f" (probe L1 is measured on every {c['frame_stride']}. frame of at most {c['max_episodes']} episodes per "
           "group — a subsample, so it is not the evaluation table's L1)" if c.get("frame_stride") else "")
    reads = _ci_excludes_zero(ref)
    txt = (f"Swapping in another scene's image (same instruction) gives {_probe_effect(ref)} over {ref['n_frames']} "
           f"frames{sub}: ")
    if reads:
        txt += "the scene changes its error beyond the interval, so the policy does read the scene."
    elif ref["kl"] < KL_SMALL:
        txt += ("no effect on its error is detectable and its first-token distribution barely moves: the policy "
                "barely reads the scene's layout, so its closed-loop behaviour cannot adapt to it.")
    else:
        txt += ("its first-token distribution moves, but no effect on its error is detectable at this n, so this run "
                "cannot say that it reads the scene.")
    extra = [f"a hue shift of the whole image gives {_probe_effect(col)}" if col else None,
             f"a paraphrase of the instruction gives {_probe_effect(par)}" if par else None]
    extra = [e for e in extra if e]
    if extra:
        txt += " For comparison, " + "; ".join(extra) + "."
    if col is not None and _ci_excludes_zero(col) and not reads:
        txt += " A global colour change is detectable where the scene swap is not: colour statistics reach the policy."
    return "**What it relies on.** " + txt


def _rank_text(rank_runs, s_word: str) -> str | None:
    if not rank_runs:
        return None
    scales = sorted({round(r.alpha / r.rank, 6) for r in rank_runs if getattr(r, "alpha", None)})
    scale = (f" at a constant LoRA scale α/r = {scales[0]:g}" if len(scales) == 1 else
             " (the LoRA scale α/r differs across these runs: any difference mixes capacity with step size)")
    found = rank_findings(rank_runs)
    n = sorted({m["n_episodes"] for r in rank_runs for m in r.groups.values()})
    ranks = ", ".join(str(r.rank) for r in rank_runs)
    if not found:
        return (f"**Rank.** Ranks {ranks}{scale}, {rank_runs[0].steps} steps each: no two differ beyond their 95 % "
                f"CIs on {s_word} or L1 — no difference detectable at n = {'/'.join(map(str, n))} episodes per group, "
                "so this sweep does not show whether capacity matters.")
    return (f"**Rank.** Ranks {ranks}{scale}, {rank_runs[0].steps} steps each. Differences beyond the CIs: "
            + "; ".join(f"{f['group']} {f['label']} r={f['a']} {format_metric(f['a_value'], f['kind'])} vs r={f['b']} "
                        f"{format_metric(f['b_value'], f['kind'])}" for f in found)
            + f"; every other pair: no difference detectable at n = {'/'.join(map(str, n))}.")


def _holdout_text(holdout) -> str | None:
    if not holdout or "skipped" in holdout:
        return None
    fam = holdout["family"]
    if not holdout.get("n_episodes"):
        return (f"**Object-level holdout.** The run without '{fam}' trained, but no evaluated episode carries that "
                "family, so it measured nothing.")
    if "control_run" not in holdout:
        return (f"**Object-level holdout.** The run without '{fam}' has no same-budget control run here; compared with "
                "the main run it would mix in the step budget, so nothing is concluded.")
    sep, same = _holdout_diffs(holdout)
    a, b = holdout["object_holdout_run"], holdout["control_run"]
    if not (_finite((a.get("success_rate") or {}).get("mean")) and _finite((b.get("success_rate") or {}).get("mean"))):
        return f"**Object-level holdout.** The run without '{fam}' gave non-finite numbers, so it is not reported."
    n = holdout["n_episodes"]
    nums = "; ".join(f"{LABEL[m]} {_fmt(a.get(m), m)} without vs {_fmt(b.get(m), m)} with" for m in
                     ("success_rate", "l1_motion", "l1_gripper") if a.get(m) and b.get(m))
    concl = (f"removing the object changed {', '.join(sep)} beyond the CIs" if sep else
             f"no difference from removing the object is detectable at n = {n}")
    return (f"**Object-level holdout.** Without any '{fam}' episode in fine-tuning vs a control run with the same "
            f"budget ({holdout['steps']} steps, r={holdout['rank']}) that saw them, on {n} fresh episodes of its tasks: "
            f"{nums}; {concl}.")


def _reasons(path, report, cfg, train_result, holdout, verdicts, contrast, held, s_word, loss_check) -> str:
    """The four reasons a short LoRA run is not state of the art, each with this run's number where one exists."""
    steps, frames = getattr(train_result, "steps", 0), getattr(train_result, "frames_seen", 0)
    bs = getattr(cfg, "batch_size", None)
    ga = getattr(cfg, "grad_accum", 1) or 1
    out = []
    # (1) compute
    r1 = f"(1) **Short compute**: {steps} steps, {frames:,} frames"
    if loss_check and _finite(loss_check.get("ratio")):
        r1 += (f"; the loss's last tenth is {loss_check['ratio']:.2f}× its first tenth, so it was "
               + ("still falling" if loss_check["ratio"] < 1 else "not falling"))
    if holdout and "control_run" in holdout and holdout.get("main_run", {}).get("n_episodes"):
        main, ctl = holdout["main_run"], holdout["control_run"]
        cmp = compare_runs(main, ctl)
        sep = [m for m, c in cmp.items() if c["separated"] and m != "mean_l1_action_error"]
        r1 += (f". Same rank and data at {holdout['control_steps']} vs {holdout['main_steps']} steps: "
               + "; ".join(f"{LABEL[m]} {_fmt(ctl.get(m), m)} vs {_fmt(main.get(m), m)}"
                           for m in ("success_rate", "l1_motion") if ctl.get(m) and main.get(m))
               + (" — more steps helped beyond the CIs on " + ", ".join(LABEL[m] for m in sep)
                  if sep and all(c["diff"] * (1 if m.endswith("_rate") else -1) > 0 for m, c in cmp.items()
                                 if m in sep) else
                  " — more steps changed " + ", ".join(LABEL[m] for m in sep) + " beyond the CIs" if sep else
                  f" — no effect of the extra steps detectable at n = {main['n_episodes']}"))
    out.append(r1 + ".")
    # (2) the base already knows the data
    n_tasks = sum(v["verdict"] != "too_few" for v in verdicts)
    same = sum(v["verdict"] == "same" for v in verdicts)
    helped = sum(v["verdict"] in ("helped", "mixed") for v in verdicts)
    what = ("OpenVLA-7B's pretraining mixture contains BridgeData V2, and the held-out strings (ranked 2nd, 4th and "
            "6th by episode count) are among the tasks it saw most" if path == "openvla" else
            "the tiny base was pretrained on the same world's pretraining tasks with the same cameras and action space")
    r2 = f"(2) **The base already trained on this data**: {what}."
    if n_tasks:
        r2 += (f" Here LoRA beat the base beyond the CIs on {helped} of {n_tasks} tasks and matched it within them "
               f"on {same}" + (": consistent with a base that leaves the adapter little to add."
                               if helped == 0 else "."))
    out.append(r2)
    # (3) the small batch
    if bs:
        out.append(f"(3) **The small batch**: {bs} × {ga} = {bs * ga} examples per step, against upstream's "
                   f"fine-tuning default of {OPENVLA_FINETUNE_BATCH} and pretraining's {OPENVLA_PRETRAIN_BATCH:,} "
                   "(their figures); this run did not vary the batch, so no number here confirms or refutes it.")
    # (4) one action per frame, no chunking: errors compound
    g = held[0] if held else contrast
    r4 = "(4) **One action per frame, no chunking or history**, so small errors compound over an episode"
    if g is not None:
        c = comparison(report, g, "replay_pose_drift_cm", POLICY_MEAN)
        ft = report.group(g, POLICY_FINETUNED)
        if c is not None:
            worse = c["separated"] and not c["better"]
            r4 += (f": on {ft['title']} the predicted motion drifts {_fmt(c['finetuned'], 'replay_pose_drift_cm')} cm "
                   f"from the demonstration in {report.data.get('evaluation', {}).get('replay_horizon', 16)} steps, "
                   f"against the mean action's {_fmt(c['baseline'], 'replay_pose_drift_cm')} cm"
                   + (" — more than a constant action: confirmed" if worse else
                      " — less than a constant action" if c["separated"] else
                      f" — no difference detectable at n = {ft['n_episodes']}"))
            sr = ft.get("success_rate") or {}
            if _finite(sr.get("mean")):
                r4 += f"; {s_word} {_pct(sr)}"
    out.append(r4 + ".")
    return ("**Why this is not a state-of-the-art policy.** Four reasons, each held against this run's numbers: "
            + " ".join(out))


def reflection(report, probe_result, overlap: Mapping[str, Any], train_result, cfg, rank_runs: Sequence[Any] = (),
               holdout: Mapping[str, Any] | None = None, train_frames: int | None = None,
               loss_check: Mapping[str, Any] | None = None) -> str:
    """The closing write-up, every sentence from this run's numbers (eval, probes, ablations, training) or this
    path's facts; separate texts for the tiny path, OpenVLA-on-Bridge and Octo-Small. A number that is NaN or not
    measured is said to be so, never reported as a finding; a difference counts only where the 95 % CIs separate."""
    path = _path(cfg, report)
    contrast, held = _group_order(report)
    success_kind = report.data.get("success_definition", {}).get("kind", "closed_loop")
    s_word = "closed-loop success" if success_kind == "closed_loop" else "proxy success"
    parts: list[str] = []
    steps, frames = getattr(train_result, "steps", 0), getattr(train_result, "frames_seen", 0)
    epochs = f" ≈ {frames / train_frames:.1f} passes over the {train_frames:,} training frames" if train_frames else ""
    rank, alpha = getattr(cfg, "lora_rank", None), getattr(cfg, "lora_alpha", None)
    lora = f"LoRA (rank {rank}" + (f", α {alpha}" if alpha else "") + ")"
    if path == "octo":
        parts.append(
            f"**What was trained.** {steps} optimizer steps of full fine-tuning of Octo-Small (diffusion action head, "
            f"frozen T5 language encoder) from {cfg.model_id} saw {frames:,} frames{epochs}. Octo-Small itself was "
            "pretrained on about 800 k Open X-Embodiment episodes (their figure); a short fine-tune adapts it to a "
            "dataset's action statistics and phrasing, it does not add competence the pretraining lacked (and from "
            "random weights, `octo-random`, there is none to adapt: that run only checks the pipeline).")
        if (getattr(train_result, "info", None) or {}).get("worker") == "standin":
            parts.append("**This run used the stand-in worker** (`VLA_BRIDGE_OCTO_WORKER=standin`): a linear map from "
                         "the image's mean colour fitted with numpy, not Octo-Small. It checks the hand-off, the "
                         "serving protocol and the evaluation; its numbers say nothing about Octo.")
    elif path == "tiny":
        parts.append(
            f"**What was trained (the tiny path).** {steps} optimizer steps of {lora} on the tiny VLA saw "
            f"{frames:,} frames{epochs}, on the embedded demo world. Its base was pretrained on the world's "
            "pretraining tasks, the way OpenVLA-7B arrives pretrained; the numbers below are this tiny model's on this "
            "world and say nothing about OpenVLA-7B on Bridge.")
    else:
        parts.append(
            f"**What was trained (OpenVLA-7B on Bridge).** {steps} optimizer steps of {lora} saw {frames:,} "
            f"frames{epochs}. OpenVLA-7B itself was trained on about {OPENVLA_PRETRAIN_EPISODES:,} robot episodes "
            f"(BridgeData V2 among them) for about {OPENVLA_PRETRAIN_GPU_HOURS:,} A100-hours (upstream's figures); "
            "success here is the replay proxy, not a robot's.")
    parts.append(_scores(report, ([contrast] if contrast else []) + held, s_word))
    task_txt, verdicts = _task_text(report)
    for t in (task_txt, _probe_text(probe_result)):
        if t:
            parts.append(t)
    ov = []
    for g in held:
        o = overlap.get("groups", {}).get(g)
        if o and o["n_episodes"]:
            new = f" (unseen: {', '.join(o['unseen_nouns'])})" if o["unseen_nouns"] else ""
            ov.append(f"{report.group(g, POLICY_FINETUNED)['title']}: {100 * o['noun_seen']:.0f} % of episodes name "
                      f"an object and {100 * o['verb_seen']:.0f} % a verb seen in training{new}")
    if ov:
        parts.append("**How new the held-out tasks are.** " + "; ".join(ov) + ".")
    for t in (_rank_text(rank_runs, s_word), _holdout_text(holdout)):
        if t:
            parts.append(t)
    if path == "octo":
        parts.append(
            "**Why this is not a state-of-the-art policy.** A short fine-tune on one thin slice of data cannot reach "
            "state-of-the-art success; Octo predicts 4-step action chunks but we execute only the first and re-plan, "
            "so errors still compound over a closed-loop episode in a way open-loop L1 never shows; and the "
            "intervals above are wide at these episode counts.")
        return "\n\n".join(parts)
    parts.append(_reasons(path, report, cfg, train_result, holdout, verdicts, contrast, held, s_word, loss_check))
    return "\n\n".join(parts)
