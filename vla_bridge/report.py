"""The write-up: the reflection paragraph and the object-holdout summary, assembled from measured numbers only.

Every figure in these texts is read from an object the notebook computed (the evaluation report, the probe result,
the instruction overlap, the training result, the ablation runs); nothing here is a constant about this run. Where a
number is missing (a step was skipped) the sentence says so instead of inventing one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .evaluation import (CONTRAST_GROUPS, POLICY_BASE, POLICY_FINETUNED, POLICY_MEAN, ci_separated, compare_metric,
                         format_metric)

# Scale of OpenVLA-7B's own training, for the comparison the reflection makes (Kim et al., 2024, "OpenVLA").
OPENVLA_PRETRAIN_EPISODES = 970_000
OPENVLA_PRETRAIN_GPU_HOURS = 21_500   # 64 A100s for 14 days


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
    if not (_finite(ft.get("mean")) and _finite(base.get("mean"))):
        return None  # a NaN is not a finding: the sentence says "not measured"
    return compare_metric(metric, ft, base)


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _verdict(c: Mapping[str, Any] | None, fmt) -> str:
    if c is None:
        return "not measured"
    how = "better" if c["better"] else "not better"
    sep = "the intervals do not overlap" if c["separated"] else "the intervals overlap"
    return f"{fmt(c['finetuned'])} vs {fmt(c['baseline'])} ({how}; {sep})"


def format_holdout(holdout: Mapping[str, Any]) -> str:
    """Two lines on the object-level holdout ablation (or why it was skipped)."""
    if "skipped" in holdout:
        return f"object-level holdout: skipped — {holdout['skipped']}"
    a, b = holdout["main_run"], holdout["object_holdout_run"]
    return (f"object-level holdout: family {holdout['family']!r} removed from fine-tuning "
            f"({holdout['train_episodes_without']} of {holdout['train_episodes_full']} episodes kept), "
            f"re-measured on {holdout['n_episodes']} fresh episodes of its tasks\n"
            f"  main run (trained on it): success {a['success_rate']:.0%}, L1 {a['mean_l1_action_error']:.4f} | "
            f"without it: success {b['success_rate']:.0%}, L1 {b['mean_l1_action_error']:.4f}  ({holdout['note']})")


def _probe_row(probe_result, probe: str, group: str = "all") -> Mapping[str, Any] | None:
    """The probe's row for ``group`` when it measured finite numbers on some frames (a NaN is not a finding)."""
    for r in getattr(probe_result, "rows", []) or []:
        if (r.get("probe") == probe and r.get("group") == group and r.get("n_frames")
                and _finite(r.get("kl"), r.get("dl1_rel", 0.0))):
            return r
    return None


def reflection(report, probe_result, overlap: Mapping[str, Any], train_result, cfg, rank_runs: Sequence[Any] = (),
               holdout: Mapping[str, Any] | None = None, train_frames: int | None = None) -> str:
    """The brief's closing paragraph (why a short LoRA run is not a state-of-the-art policy), with this run's numbers."""
    held = [g for g in dict.fromkeys(x["group"] for x in report.data["groups"]) if g not in CONTRAST_GROUPS]
    contrast = next((g for g in CONTRAST_GROUPS if any(x["group"] == g for x in report.data["groups"])), None)
    success_kind = report.data.get("success_definition", {}).get("kind", "closed_loop")
    s_word = "closed-loop success" if success_kind == "closed_loop" else "proxy success"
    parts: list[str] = []

    steps, frames = getattr(train_result, "steps", 0), getattr(train_result, "frames_seen", 0)
    epochs = f" ≈ {frames / train_frames:.1f} passes over the {train_frames:,} training frames" if train_frames else ""
    if getattr(cfg, "policy", None) == "octo":
        parts.append(
            f"**What was trained.** {steps} optimizer steps of full fine-tuning of Octo-Small (diffusion action head, "
            f"frozen T5 language encoder) from {cfg.model_id} saw {frames:,} frames{epochs}. Octo-Small itself was "
            "pretrained on about 800 k Open X-Embodiment episodes; a short fine-tune adapts it to a dataset's action "
            "statistics and phrasing, it does not add competence the pretraining lacked (and from random weights, "
            "`octo-random`, there is none to adapt: that run only checks the pipeline).")
        if (getattr(train_result, "info", None) or {}).get("worker") == "standin":
            parts.append("**This run used the stand-in worker** (`VLA_BRIDGE_OCTO_WORKER=standin`): a linear map from "
                         "the image's mean colour fitted with numpy, not Octo-Small. It checks the hand-off, the "
                         "serving protocol and the evaluation; its numbers say nothing about Octo.")
    else:
        parts.append(
            f"**What was trained.** {steps} optimizer steps of LoRA (rank {cfg.lora_rank}) saw {frames:,} frames"
            f"{epochs}. OpenVLA-7B itself was trained on about {OPENVLA_PRETRAIN_EPISODES:,} robot episodes for about "
            f"{OPENVLA_PRETRAIN_GPU_HOURS:,} A100-hours before any fine-tuning; an adapter trained for minutes can "
            "shift that policy towards a new dataset's action statistics and phrasing, but it cannot add the visual "
            "and physical competence that scale bought.")

    lines = []
    for g in ([contrast] if contrast else []) + held:
        ft = report.group(g, POLICY_FINETUNED)
        s_base = comparison(report, g, "success_rate", POLICY_BASE)
        l1_mean = comparison(report, g, "mean_l1_action_error", POLICY_MEAN)
        lines.append(f"{ft['title']} (n = {ft['n_episodes']} episodes): {s_word} {_verdict(s_base, _pct)} against "
                     f"the base model; open-loop L1 {_verdict(l1_mean, _num)} against the mean action")
    parts.append("**What it scored.** " + "; ".join(lines) + ".")

    ref = _probe_row(probe_result, "other_scene")
    col = _probe_row(probe_result, "color_shift")
    par = _probe_row(probe_result, "paraphrase")
    if ref is not None:
        looks = ref["kl"] >= 0.10 or abs(ref.get("dl1_rel", 0.0)) >= 0.10
        txt = (f"Swapping in another scene's image moves the first action token's distribution by KL "
               f"{ref['kl']:.2f} nats and changes L1 by {100 * ref['dl1_rel']:+.0f} % over {ref['n_frames']} frames: "
               + ("the policy does read the scene." if looks else
                  "the policy barely reads the scene's layout — where the objects and targets are — so its "
                  "closed-loop behaviour cannot adapt to them; it acts from the instruction and the action "
                  "statistics."))
        extra = []
        if col is not None:
            extra.append(f"a hue shift of the whole image gives KL {col['kl']:.2f}"
                         + (" (so global colour statistics do reach it, the layout does not)"
                            if col["kl"] >= 0.10 and not looks else ""))
        if par is not None:
            extra.append(f"a paraphrase of the instruction gives KL {par['kl']:.2f}")
        if extra:
            txt += " For comparison, " + "; ".join(extra) + "."
        parts.append("**What it relies on.** " + txt)
    elif any(r.get("probe") == "other_scene" and r.get("n_frames") for r in getattr(probe_result, "rows", []) or []):
        parts.append("**What it relies on.** The scene-swap probe gave non-finite numbers (NaN): the policy's "
                     "outputs are broken, and nothing is concluded from them.")

    ov = []
    for g in held:
        o = overlap.get("groups", {}).get(g)
        if o and o["n_episodes"]:
            new = f" (unseen: {', '.join(o['unseen_nouns'])})" if o["unseen_nouns"] else ""
            ov.append(f"{report.group(g, POLICY_FINETUNED)['title']}: {100 * o['noun_seen']:.0f} % of episodes name "
                      f"an object and {100 * o['verb_seen']:.0f} % a verb seen in training{new}")
    if ov:
        parts.append("**How new the held-out tasks are.** " + "; ".join(ov) + ". Recombining trained words is the "
                     "easy end of generalization; a held-out object family or colour is the hard end, and the rows "
                     "above show the difference.")

    if rank_runs:
        grp = contrast or (held[0] if held else None)
        pts = [f"r={r.rank}: {_pct(r.groups.get(grp, {}).get('success_rate'))}" for r in rank_runs if grp in r.groups]
        sep = [r.groups[grp]["success_rate"] for r in rank_runs if grp in r.groups]
        any_sep = any(ci_separated(a, b) for i, a in enumerate(sep) for b in sep[i + 1:])
        parts.append(f"**Rank.** {s_word} on {grp} across ranks — " + ", ".join(pts) + ". "
                     + ("Some ranks differ beyond their intervals." if any_sep else
                        "No two ranks differ beyond their intervals at this budget: capacity is not the bottleneck."))
    if holdout and "skipped" not in holdout and not holdout.get("n_episodes"):
        parts.append(f"**Object-level holdout.** The run without '{holdout['family']}' trained, but no evaluated "
                     "episode carries that family, so it measured nothing.")
    elif holdout and "skipped" not in holdout and not _finite(*holdout["main_run"].values(),
                                                             *holdout["object_holdout_run"].values()):
        parts.append(f"**Object-level holdout.** The run without '{holdout['family']}' gave non-finite numbers, so "
                     "it is not reported.")
    elif holdout and "skipped" not in holdout:
        a, b = holdout["main_run"], holdout["object_holdout_run"]
        parts.append(f"**Object-level holdout.** Without any '{holdout['family']}' episode in fine-tuning, its tasks "
                     f"score {b['success_rate']:.0%} {s_word} and L1 {b['mean_l1_action_error']:.4f}, against "
                     f"{a['success_rate']:.0%} and {a['mean_l1_action_error']:.4f} when trained on "
                     f"(n = {holdout['n_episodes']} episodes).")

    if getattr(cfg, "policy", None) == "octo":
        parts.append(
            "**Why this is not a state-of-the-art policy.** A short fine-tune on one thin slice of data — a handful "
            "of tasks and scenes, one camera, no proprioception — cannot reach state-of-the-art success: behaviour "
            "outside those scenes is extrapolation; Octo predicts 4-step action chunks but we execute only the first "
            "and re-plan, so errors still compound over a closed-loop episode in a way open-loop L1 never shows; the "
            "diffusion loss says how well noise is removed, not whether the gripper closes at the right moment; and "
            "the intervals above are wide at these episode counts. More steps from the pretrained weights, more "
            "diverse data and many more evaluation episodes are what would move these numbers.")
        return "\n\n".join(parts)
    parts.append(
        "**Why this is not a state-of-the-art policy.** A few minutes of LoRA on one dataset cannot reach "
        "state-of-the-art success: (1) the data is a thin slice — a handful of tasks and scenes, one camera, no "
        "proprioception, so behaviour outside those scenes is extrapolation; (2) OpenVLA predicts one action per "
        "frame from one image with no action chunking or history, so small errors compound over a closed-loop "
        "episode in a way open-loop L1 never shows; (3) cross-entropy on 256 bins rewards the exact bin, not the "
        "distance, and the token accuracy the loss curve reports says little about success; (4) the evaluation "
        "intervals above are wide at these episode counts — differences inside them are not findings. "
        "More steps, more diverse data, action chunking and evaluation on many more episodes are what would move "
        "these numbers, in that order.")
    return "\n\n".join(parts)
