"""The ablations compare like with like: the rank sweep at a constant LoRA scale, the holdout against a control."""

from __future__ import annotations

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from vla_bridge import ablations
from vla_bridge.evaluation import POLICY_FINETUNED
from vla_bridge.models.openvla import lora_config


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.a(x))


def test_rank_sweep_keeps_the_lora_scale_constant():
    """PEFT scales the adapter's update by alpha / r: the sweep's alpha rule keeps it at the main run's 16/32 for
    every rank, where a fixed alpha (or upstream's min(r, 16)) would sweep it from 2 (or 1) down to 0.25."""
    scales = set()
    for r in (8, 16, 32, 64):
        alpha = ablations.alpha_for_rank(r, main_rank=32, main_alpha=16)
        model = get_peft_model(_Net(), lora_config(r, alpha, target_modules=["a", "b"]))
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(m.r["default"] == r for m in layers)
        scales |= {round(m.scaling["default"], 9) for m in layers}
    assert scales == {0.5}
    assert {round(min(r, 16) / r, 3) for r in (8, 16, 32, 64)} == {1.0, 0.5, 0.25}  # upstream's rule is not constant


def _rec(task, success, l1m, l1g, group="finetune_eval"):
    return {"policy": POLICY_FINETUNED, "group": group, "task_name": task, "success": success, "l1": l1m,
            "l1_motion": l1m, "l1_gripper": l1g}


def test_family_summary_and_run_comparison_use_cis():
    eps = ([_rec("put the spoon on the plate", 0.0, 0.05 + 0.001 * i, 0.3) for i in range(6)]
           + [_rec("put the cup in the pot", 1.0, 0.01, 0.0)]
           + [_rec("put the spoon in the pot", 0.0, 0.01, 0.0, group="heldout")])  # held-out group: not counted
    s = ablations.family_summary(eps, "spoon")
    assert s["n_episodes"] == 6 and s["tasks"] == ["put the spoon on the plate"]
    assert s["success_rate"]["mean"] == 0.0 and abs(s["l1_motion"]["mean"] - 0.0525) < 1e-9
    far = ablations.family_summary([_rec("put the spoon on the plate", 1.0, 0.01, 0.0) for _ in range(6)], "spoon")
    cmp = ablations.compare_runs(s, far)
    assert cmp["l1_motion"]["separated"] and cmp["l1_motion"]["diff"] > 0
    assert ablations.compare_runs(s, s)["l1_motion"]["separated"] is False


def _run(rank, l1_ci):
    g = {"n_episodes": 8, "success_rate": {"mean": 0.0, "ci": [0.0, 0.0]},
         "l1_motion": {"mean": sum(l1_ci) / 2, "ci": list(l1_ci)}, "l1_gripper": {"mean": 0.3, "ci": [0.2, 0.4]}}
    return ablations.AblationRun(name=f"rank{rank}", rank=rank, alpha=rank / 2, steps=75, trainable=rank * 100,
                                 train_seconds=1.0, final_loss=1.0, groups={"heldout": g}, rows=[])


def test_rank_table_reports_only_separated_differences():
    runs = [_run(8, (0.0239, 0.0396)), _run(16, (0.0437, 0.0547)), _run(32, (0.040, 0.050))]
    found = ablations.rank_findings(runs)
    assert [(f["a"], f["b"], f["metric"]) for f in found] == [(8, 16, "l1_motion"), (8, 32, "l1_motion")]
    table = ablations.format_rank_table(runs)
    assert "| 8 | 4 | 0.5 |" in table and "| 64 |" not in table
    assert "no difference detectable at n = 8" in table
    assert all(r.scale == 0.5 for r in runs)


def test_the_holdout_control_reuses_the_sweeps_identical_run(tmp_path, monkeypatch):
    """The control (main rank and alpha, the full split, the same steps and seed) is the rank sweep's run at the main
    rank: its adapter is re-evaluated instead of trained again; without such a run the control is trained."""
    import types

    calls = []

    configs = []

    def fake_train(name, rank, alpha, cfg, model_id, precision, stats, source, train_eps, ds, split, steps, ec):
        calls.append(("train", name, len(train_eps)))
        configs.append(ec)
        ckpt = tmp_path / name
        ckpt.mkdir(exist_ok=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
        return ablations.AblationRun(name=name, rank=rank, alpha=float(alpha), steps=steps, trainable=1,
                                     train_seconds=1.0, final_loss=1.0, groups={}, rows=[],
                                     train_episodes=len(train_eps), checkpoint=str(ckpt))

    def fake_reevaluate(name, run, cfg, model_id, precision, stats, ds, split, ec):
        calls.append(("reevaluate", name, run.name))
        configs.append(ec)
        return ablations.dataclasses.replace(run, name=name, trained_as=run.name)

    monkeypatch.setattr(ablations, "_train_and_eval", fake_train)
    monkeypatch.setattr(ablations, "_reevaluate", fake_reevaluate)
    monkeypatch.setattr(ablations, "write_json", lambda *a, **k: None)
    task = {"spoon": "put the spoon on the plate", "cup": "put the cup in the pot"}
    sidecar = [{"episode_index": i, "family": f, "canonical_task": task[f]}
               for i, f in enumerate(["spoon", "spoon", "cup", "cup", "cup", "cup", "spoon", "cup"])]
    split = types.SimpleNamespace(train=list(range(6)), contrast={"finetune_eval": [6, 7]})
    cfg = types.SimpleNamespace(lora_rank=32, lora_alpha=16, max_steps=300, path=lambda kind: tmp_path)
    sweep = [fake_train(f"rank{r}", r, ablations.alpha_for_rank(r, 32, 16), cfg, "m", "fp32", {}, "src",
                        split.train, None, split, 75, None) for r in (8, 32)]
    calls.clear()
    configs.clear()
    out = ablations.object_holdout(cfg, "m", "fp32", {}, "src", None, split, sidecar, 75, [], sweep=sweep)
    assert calls == [("train", "without-spoon", 4), ("reevaluate", "control-with-spoon", "rank32")]
    # both evaluate only the held-out family's contrast task (the only episodes the comparison reads)
    assert [c.only_tasks for c in configs] == [["put the spoon on the plate"]] * 2
    assert out["control_trained_as"] == "rank32" and "re-evaluated" in out["note"]
    calls.clear()
    ablations.object_holdout(cfg, "m", "fp32", {}, "src", None, split, sidecar, 50, [], sweep=sweep)  # other steps
    assert [c[0] for c in calls] == ["train", "train"]
