"""The write-up's numbers: instruction overlap, CI comparisons, the holdout line and the reflection paragraph."""

from __future__ import annotations

import math
import re
from typing import Mapping

from vla_bridge import report
from vla_bridge.data import splits
from vla_bridge.evaluation import POLICY_BASE, POLICY_FINETUNED, POLICY_MEAN, EvalReport, task_verdicts
from vla_bridge.evaluation.table import format_verdicts


def _split() -> splits.Split:
    tasks = {0: "put the red block on the plate", 1: "place the blue cup in the pot", 2: "",
             10: "put the red cup on the towel", 11: "place the green banana on the plate",
             12: "put the blue block in the pot"}
    return splits.Split(rule="embedded world catalog (test)", train=[0, 1, 2], eval={
        "heldout": [10], "heldout_family": [11]}, tasks=tasks, lengths={e: 10 for e in tasks},
        contrast={"finetune_eval": [12]})


def test_instruction_overlap_counts_verbs_nouns_and_strings():
    o = splits.instruction_overlap(_split())
    assert o["train_nouns"] == ["block", "cup"] and o["train_verbs"] == ["place", "put"]
    h, f, c = o["groups"]["heldout"], o["groups"]["heldout_family"], o["groups"]["finetune_eval"]
    assert (h["n_episodes"], h["verb_seen"], h["noun_seen"], h["string_seen"]) == (1, 1.0, 1.0, 0.0)
    assert f["noun_seen"] == 0.0 and f["unseen_nouns"] == ["banana"] and f["verb_seen"] == 1.0
    assert c["noun_seen"] == 1.0 and c["string_seen"] == 0.0   # "blue block in the pot" is a new string


def _m(mean, lo, hi, n=12):
    return {"mean": mean, "ci": [lo, hi], "n": n}


def _metrics(success, l1m, l1g, drift, grasp, n=12):
    return {"n_episodes": n, "success_rate": success, "l1_motion": l1m, "l1_gripper": l1g,
            "mean_l1_action_error": _m((6 * l1m["mean"] + l1g["mean"]) / 7, 0.0, 1.0, n),
            "replay_pose_drift_cm": drift, "grasp_rate": grasp}


def _report(ft_success, base_success) -> EvalReport:
    groups = []
    for g, title in (("finetune_eval", "fine-tuning tasks, fresh episodes"), ("heldout", "held-out task strings")):
        for p, s, l1 in ((POLICY_FINETUNED, ft_success, _m(0.02, 0.015, 0.025)),
                         (POLICY_BASE, base_success, _m(0.05, 0.04, 0.06)),
                         (POLICY_MEAN, _m(0.0, 0.0, 0.0), _m(0.08, 0.07, 0.09))):
            groups.append({"group": g, "title": title, "policy": p, "n_tasks": 2, "n_episodes": 12,
                           "success_rate": s, "mean_l1_action_error": l1})
    return EvalReport({"groups": groups, "rows": [], "success_definition": {"kind": "closed_loop"}}, "", None, None)


def _mixed_report() -> EvalReport:
    """LoRA helps 'put the red block on the plate' (success and motion L1 separate from the base), hurts 'move the red
    block to the towel' (motion L1 worse, CIs apart) and changes nothing detectable on 'put the cup in the pot'."""
    rows = []
    tasks = {  # task: (group, fine-tuned, base)
        "put the red block on the plate": ("finetune_eval",
                                           _metrics(_m(0.75, 0.5, 1.0, 4), _m(0.010, 0.008, 0.012, 4),
                                                    _m(0.10, 0.05, 0.15, 4), _m(2.0, 1.0, 3.0, 4), _m(1.0, 1.0, 1.0, 4), 4),
                                           _metrics(_m(0.0, 0.0, 0.0, 4), _m(0.030, 0.025, 0.035, 4),
                                                    _m(0.12, 0.06, 0.18, 4), _m(4.0, 3.0, 5.0, 4), _m(0.5, 0.0, 1.0, 4), 4)),
        "move the red block to the towel": ("heldout",
                                            _metrics(_m(0.0, 0.0, 0.0, 4), _m(0.0415, 0.0383, 0.0453, 4),
                                                     _m(0.20, 0.10, 0.30, 4), _m(9.0, 7.0, 11.0, 4), _m(0.0, 0.0, 0.0, 4), 4),
                                            _metrics(_m(0.0, 0.0, 0.0, 4), _m(0.0240, 0.0167, 0.0307, 4),
                                                     _m(0.25, 0.10, 0.40, 4), _m(6.0, 4.0, 8.0, 4), _m(0.0, 0.0, 0.0, 4), 4)),
        "put the cup in the pot": ("heldout",
                                   _metrics(_m(0.25, 0.0, 0.5, 4), _m(0.020, 0.015, 0.025, 4), _m(0.30, 0.2, 0.4, 4),
                                            _m(5.0, 4.0, 6.0, 4), _m(0.25, 0.0, 0.5, 4), 4),
                                   _metrics(_m(0.25, 0.0, 0.5, 4), _m(0.021, 0.016, 0.026, 4), _m(0.31, 0.2, 0.4, 4),
                                            _m(5.1, 4.0, 6.2, 4), _m(0.25, 0.0, 0.5, 4), 4)),
    }
    mean_row = _metrics(_m(0.0, 0.0, 0.0, 4), _m(0.011, 0.010, 0.013, 4), _m(0.50, 0.45, 0.55, 4),
                        _m(3.3, 3.0, 3.6, 4), _m(0.0, 0.0, 0.0, 4), 4)
    for t, (g, ft, base) in tasks.items():
        for p, m in ((POLICY_FINETUNED, ft), (POLICY_BASE, base), (POLICY_MEAN, mean_row)):
            rows.append({"task_name": t, "group": g, "policy": p, **m})
    titles = {"finetune_eval": "fine-tuning tasks, fresh episodes", "heldout": "held-out task strings"}
    groups = []
    for g in ("finetune_eval", "heldout"):
        for p in (POLICY_FINETUNED, POLICY_BASE, POLICY_MEAN):
            r = next(r for r in rows if r["group"] == g and r["policy"] == p)
            groups.append({**{k: v for k, v in r.items() if k != "task_name"}, "title": titles[g],
                           "n_tasks": sum(1 for x in tasks.values() if x[0] == g)})
    data = {"groups": groups, "rows": rows, "success_definition": {"kind": "closed_loop"},
            "evaluation": {"replay_horizon": 16, "ci_level": 0.95, "n_boot": 1000}, "run_name": "t"}
    return EvalReport(data, "", None, None)


class _Train:
    steps, frames_seen = 300, 4800


class _Cfg:
    lora_rank = 32


class _TinyCfg:
    policy, dataset, lora_rank, lora_alpha, batch_size, grad_accum, model_id = "tiny", "embedded", 32, 16, 16, 1, "x"


class _OpenVLACfg(_TinyCfg):
    policy, dataset, batch_size, grad_accum = "openvla", "nvidia/bridge_lerobot_v3", 4, 2


def test_comparison_and_ci_separation():
    r = _report(_m(0.75, 0.5, 0.92), _m(0.1, 0.0, 0.25))
    c = report.comparison(r, "finetune_eval", "success_rate", POLICY_BASE)
    assert c["better"] and c["separated"]
    c = report.comparison(r, "heldout", "mean_l1_action_error", POLICY_MEAN)
    assert c["better"] and c["separated"]            # lower L1 is better
    r2 = _report(_m(0.2, 0.0, 0.4), _m(0.1, 0.0, 0.3))
    c2 = report.comparison(r2, "heldout", "success_rate", POLICY_BASE)
    assert c2["better"] and not c2["separated"]
    assert report.comparison(r2, "paraphrase", "success_rate", POLICY_BASE) is None


class _Probes:
    config = {"frame_stride": 2, "max_episodes": 6}
    rows = [{"group": "all", "probe": "other_scene", "n_frames": 40, "kl": 0.004, "dl1_rel": 0.01,
             "dl1_ci95": [-0.002, 0.003]},
            {"group": "all", "probe": "color_shift", "n_frames": 40, "kl": 0.002, "dl1_rel": 0.0}]


def test_reflection_uses_the_measured_numbers():
    r = _report(_m(0.75, 0.5, 0.92), _m(0.1, 0.0, 0.25))
    text = report.reflection(r, _Probes(), splits.instruction_overlap(_split()), _Train(), _Cfg(),
                             holdout={"skipped": "off"}, train_frames=1600)
    assert "300 optimizer steps" in text and "4,800 frames" in text and "3.0 passes" in text
    assert "75 % [50, 92]" in text and "10 % [0, 25]" in text and "the intervals do not overlap" in text
    assert "KL 0.00 nats" in text and "barely reads the scene's layout" in text
    assert "a subsample" in text and "every 2. frame of at most 6 episodes" in text
    assert "held-out task strings: 100 % of episodes name an object and 100 % a verb" in text


def test_reads_the_scene_only_when_the_other_scene_ci_excludes_zero():
    """The issue's case: other scene +11 % with CI [-0.0129, +0.0228] (includes 0), hue shift +30 % (excludes 0)."""
    r = _report(_m(0.75, 0.5, 0.92), _m(0.1, 0.0, 0.25))
    p = _Probes()
    p.rows = [{"group": "all", "probe": "other_scene", "n_frames": 40, "kl": 0.8, "dl1_rel": 0.11,
               "dl1_ci95": [-0.0129, 0.0228]},
              {"group": "all", "probe": "color_shift", "n_frames": 40, "kl": 0.5, "dl1_rel": 0.30,
               "dl1_ci95": [0.004, 0.02]}]
    text = report.reflection(r, p, {"groups": {}}, _Train(), _TinyCfg())
    assert "does read the scene" not in text and "cannot say that it reads the scene" in text
    assert "[-0.0129, +0.0228] includes 0" in text and "colour statistics reach the policy" in text
    p.rows[0]["dl1_ci95"] = [0.001, 0.02]
    assert "does read the scene" in report.reflection(r, p, {"groups": {}}, _Train(), _TinyCfg())
    p.rows[0]["dl1_ci95"] = None  # no interval: nothing concluded
    assert "does read the scene" not in report.reflection(r, p, {"groups": {}}, _Train(), _TinyCfg())


def test_task_verdicts_helped_hurt_same_and_the_text_says_so():
    r = _mixed_report()
    v = {x["task_name"]: x for x in task_verdicts(r.data)}
    assert v["put the red block on the plate"]["verdict"] == "helped"
    assert "success_rate" in v["put the red block on the plate"]["better"]
    assert v["move the red block to the towel"]["verdict"] == "hurt"
    assert v["move the red block to the towel"]["worse"] == ["l1_motion"]
    assert v["put the cup in the pot"]["verdict"] == "same"
    table = format_verdicts(r.data)
    assert "hurt: L1 motion worse" in table and "same: no difference detectable at n = 4" in table
    text = report.reflection(r, None, {"groups": {}}, _Train(), _TinyCfg())
    assert "LoRA helped on 'put the red block on the plate'" in text
    assert "LoRA hurt on 'move the red block to the towel' (L1 motion 0.0415 [0.0383, 0.0453] vs 0.0240" in text
    assert "no difference from the base was detectable on 1 task(s) ('put the cup in the pot') at n = 4" in text
    # motion and gripper apart, drift beside the mean action's, the grasp rate shown
    assert "L1 motion" in text and "L1 gripper" in text and "against the mean action's" in text
    assert "grasp rate" in text


def test_tiny_and_openvla_texts_differ_and_give_the_four_reasons():
    r = _mixed_report()
    tiny = report.reflection(r, None, {"groups": {}}, _Train(), _TinyCfg(), loss_check={"ratio": 0.8})
    big = report.reflection(r, None, {"groups": {}}, _Train(), _OpenVLACfg())
    assert "970,000" not in tiny and "the tiny path" in tiny and "say nothing about OpenVLA-7B" in tiny
    assert "970,000" in big and "upstream's figures" in big and "ranked 2nd, 4th and 6th" in big
    for t in (tiny, big):
        for reason in ("(1) **Short compute**", "(2) **The base already trained on this data**",
                       "(3) **The small batch**", "(4) **One action per frame"):
            assert reason in t
        assert "in that order" not in t
    assert "16 × 1 = 16 examples per step" in tiny and "4 × 2 = 8 examples per step" in big
    assert "0.80× its first tenth" in tiny


def _holdout():
    def fam(s, l1m, l1g, n=8):
        return {"n_episodes": n, "tasks": ["put the spoon on the plate"], "success_rate": s, "l1_motion": l1m,
                "l1_gripper": l1g, "mean_l1_action_error": l1m}
    return {"family": "spoon", "train_episodes_full": 100, "train_episodes_without": 80, "n_episodes": 8,
            "tasks": ["put the spoon on the plate"], "steps": 75, "control_steps": 75, "main_steps": 300, "rank": 32,
            "alpha": 16.0,
            "object_holdout_run": fam(_m(0.0, 0.0, 0.0, 8), _m(0.0501, 0.045, 0.055, 8), _m(0.3, 0.2, 0.4, 8)),
            "control_run": fam(_m(0.0, 0.0, 0.0, 8), _m(0.0514, 0.046, 0.056, 8), _m(0.3, 0.2, 0.4, 8)),
            "main_run": fam(_m(0.125, 0.0, 0.375, 8), _m(0.0424, 0.040, 0.045, 8), _m(0.2, 0.1, 0.3, 8)),
            "without_vs_control": {"success_rate": {"diff": 0.0, "separated": False},
                                   "l1_motion": {"diff": -0.0013, "separated": False}}}


def test_format_holdout_shows_the_same_budget_control():
    assert "skipped — no labels" in report.format_holdout({"skipped": "no labels"})
    text = report.format_holdout(_holdout())
    assert "'spoon'" in text and "80 of 100" in text
    assert "control, same budget, saw it (75 steps, r=32)" in text and "0.0514" in text and "0.0501" in text
    assert "removing the object made no difference detectable" in text and "n = 8" in text
    assert "for reference only (300 steps: a different budget)" in text
    refl = report.reflection(_mixed_report(), None, {"groups": {}}, _Train(), _TinyCfg(), holdout=_holdout())
    assert "no difference from removing the object is detectable at n = 8" in refl
    assert "Same rank and data at 75 vs 300 steps" in refl


def test_nan_metrics_are_not_reported_as_findings():
    nan = float("nan")
    r = _report(_m(nan, nan, nan), _m(0.1, 0.0, 0.25))
    assert report.comparison(r, "finetune_eval", "success_rate", POLICY_BASE) is None
    broken = _Probes()
    broken.rows = [{"group": "all", "probe": "other_scene", "n_frames": 40, "kl": nan, "dl1_rel": nan},
                   {"group": "all", "probe": "color_shift", "n_frames": 40, "kl": nan, "dl1_rel": nan}]
    holdout = {"family": "cup", "n_episodes": 8, "main_run": {"success_rate": 0.5, "mean_l1_action_error": 0.02},
               "object_holdout_run": {"success_rate": nan, "mean_l1_action_error": nan}}
    text = report.reflection(r, broken, {"groups": {}}, _Train(), _Cfg(), holdout=holdout)
    assert "nan" not in text.lower().replace("(nan)", "")
    assert "barely reads the scene" not in text and "non-finite numbers (NaN)" in text
    assert "closed-loop success not measured against the base model" in text
    assert "no same-budget control run" in text


def _numbers_in(obj, out: set[str]) -> None:
    """Every number in a JSON-like object, written the ways the texts write numbers."""
    if isinstance(obj, Mapping):
        for v in obj.values():
            _numbers_in(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _numbers_in(v, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        for f in ("{:.4f}", "{:+.4f}", "{:.2f}", "{:.1f}", "{:.0f}", "{:g}", "{:,}" if float(obj).is_integer() else "{}"):
            out.add(f.format(int(obj) if f == "{:,}" else obj).lstrip("+"))
        out.add(f"{100 * obj:.0f}")
        out.add(f"{100 * obj:+.0f}".lstrip("+"))


def test_every_number_in_the_reflection_traces_to_the_jsons():
    """§12's numbers: each appears in eval.json, probe.json, the ablation JSON, the run's config/training, or is
    one of upstream's published figures (report.UPSTREAM_FIGURES)."""
    r, h = _mixed_report(), _holdout()
    p = _Probes()
    text = report.reflection(r, p, {"groups": {}}, _Train(), _TinyCfg(), holdout=h, train_frames=1600,
                             loss_check={"ratio": 0.8})
    allowed: set[str] = set()
    cfg = {k: getattr(_TinyCfg, k) for k in ("lora_rank", "lora_alpha", "batch_size", "grad_accum")}
    for src in (r.data, {"rows": p.rows, "config": p.config}, h, cfg,
                {"steps": 300, "frames": 4800, "train_frames": 1600, "passes": 4800 / 1600, "ratio": 0.8,
                 "effective_batch": 16}, list(report.UPSTREAM_FIGURES)):
        _numbers_in(src, allowed)
    allowed |= {"1", "2", "3", "4", "95", "2nd", "4th", "6th", "7"}  # reason numbers, "95 % CIs"
    found = re.findall(r"(?<![\w.])[+-]?\d+(?:,\d{3})*(?:\.\d+)?", text)
    untraced = sorted({x.lstrip("+").lstrip("-") for x in found} - {a.lstrip("-") for a in allowed})
    assert not untraced, untraced


def test_a_task_with_one_episode_gets_no_verdict():
    """One episode resamples to a zero-width "interval" (0.2640 [0.2640, 0.2640]) that separates from anything:
    the paraphrase group has one episode per task, and it must not read as helped or hurt."""
    r = _mixed_report()
    ft, base = (next(x for x in r.data["rows"] if x["task_name"] == "move the red block to the towel"
                     and x["policy"] == p) for p in (POLICY_FINETUNED, POLICY_BASE))
    for row, v in ((ft, 0.2640), (base, 0.2116)):
        row["n_episodes"] = 1
        row["l1_motion"] = {"mean": v, "ci": [v, v], "n": 1}
    verdict = {x["task_name"]: x for x in task_verdicts(r.data)}["move the red block to the towel"]
    assert verdict["verdict"] == "too_few" and not verdict["worse"]
    assert "no verdict: n = 1 is too few episodes for an interval" in format_verdicts(r.data)
    text = report.reflection(r, None, {"groups": {}}, _Train(), _TinyCfg())
    assert "LoRA hurt" not in text and "1 task(s) in heldout have fewer than 3 episodes" in text
