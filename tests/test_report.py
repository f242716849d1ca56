"""The write-up's numbers: instruction overlap, CI comparisons, the holdout line and the reflection paragraph."""

from __future__ import annotations


from vla_bridge import report
from vla_bridge.data import splits
from vla_bridge.evaluation import POLICY_BASE, POLICY_FINETUNED, POLICY_MEAN, EvalReport


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


def _m(mean, lo, hi):
    return {"mean": mean, "ci": [lo, hi]}


def _report(ft_success, base_success) -> EvalReport:
    groups = []
    for g, title in (("finetune_eval", "fine-tuning tasks, fresh episodes"), ("heldout", "held-out task strings")):
        for p, s, l1 in ((POLICY_FINETUNED, ft_success, _m(0.02, 0.015, 0.025)),
                         (POLICY_BASE, base_success, _m(0.05, 0.04, 0.06)),
                         (POLICY_MEAN, _m(0.0, 0.0, 0.0), _m(0.08, 0.07, 0.09))):
            groups.append({"group": g, "title": title, "policy": p, "n_tasks": 2, "n_episodes": 12,
                           "success_rate": s, "mean_l1_action_error": l1})
    return EvalReport({"groups": groups, "rows": [], "success_definition": {"kind": "closed_loop"}}, "", None, None)


class _Train:
    steps, frames_seen = 300, 4800


class _Cfg:
    lora_rank = 32


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
    rows = [{"group": "all", "probe": "other_scene", "n_frames": 40, "kl": 0.004, "dl1_rel": 0.01},
            {"group": "all", "probe": "color_shift", "n_frames": 40, "kl": 0.002, "dl1_rel": 0.0}]


def test_reflection_uses_the_measured_numbers():
    r = _report(_m(0.75, 0.5, 0.92), _m(0.1, 0.0, 0.25))
    text = report.reflection(r, _Probes(), splits.instruction_overlap(_split()), _Train(), _Cfg(),
                             holdout={"skipped": "off"}, train_frames=1600)
    assert "300 optimizer steps" in text and "4,800 frames" in text and "3.0 passes" in text
    assert "75 % [50, 92]" in text and "10 % [0, 25]" in text and "the intervals do not overlap" in text
    assert "KL 0.00 nats" in text and "barely reads the scene's layout" in text
    assert "held-out task strings: 100 % of episodes name an object and 100 % a verb" in text
    looks = _Probes()
    looks.rows = [{"group": "all", "probe": "other_scene", "n_frames": 40, "kl": 0.8, "dl1_rel": 0.3}]
    assert "does read the scene" in report.reflection(r, looks, {"groups": {}}, _Train(), _Cfg())


def test_format_holdout():
    assert "skipped — no labels" in report.format_holdout({"skipped": "no labels"})
    h = {"family": "cup", "train_episodes_without": 80, "train_episodes_full": 100, "n_episodes": 8,
         "main_run": {"success_rate": 0.5, "mean_l1_action_error": 0.02},
         "object_holdout_run": {"success_rate": 0.125, "mean_l1_action_error": 0.03}, "note": "n"}
    text = report.format_holdout(h)
    assert "'cup'" in text and "80 of 100" in text and "success 50%" in text and "success 12%" in text


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
