"""The Octo path's main-environment side (always run, no .venv-octo needed): the actionable error when the Octo
environment is missing, and the evaluation with policies from elsewhere (what Octo's worker plugs into)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_bridge import evaluation as ev
from vla_bridge.evaluation.policies import ConstantPolicy, RandomPolicy
from vla_bridge import hardware
from vla_bridge import preflight
from vla_bridge.data import splits, stream
from vla_bridge.octo import client as octo
from vla_bridge.octo import protocol


def test_missing_octo_env_gives_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.delenv("VLA_BRIDGE_OCTO_PYTHON", raising=False)
    with pytest.raises(protocol.OctoEnvError, match=r"bash setup.sh --octo.*OCTO_SOURCE="):
        protocol.octo_interpreter(tmp_path)
    res = preflight.check_octo_env("octo", tmp_path)
    assert not res.ok and res.required and "bash setup.sh --octo" in res.fix
    assert preflight.check_octo_env("tiny", tmp_path).ok
    with pytest.raises(hardware.PreflightError, match="octo env"):
        preflight.raise_on_failure([res])


def test_octo_random_needs_no_hub():
    no = hardware.Decision("no", "offline")
    assert preflight.check_hub_for("embedded", "octo", "octo-random", no).ok
    assert not preflight.check_hub_for("embedded", "octo", "hf://rail-berkeley/octo-small-1.5", no).ok


def test_worker_train_args_carry_the_run_configuration(tmp_path):
    from vla_bridge.config import resolve_run_config

    cfg = resolve_run_config({"POLICY": "octo", "MODEL_ID": "octo-random", "MAX_STEPS": 7, "BATCH_SIZE": 3,
                              "OUTPUTS_DIR": str(tmp_path / "out")}, env={},
                             hw=hardware.detect_hardware(),
                             hub=hardware.Decision("no", "offline"))
    args = octo.worker_train_args(cfg, tmp_path / "shards")
    got = dict(zip(args[1::2], args[2::2]))
    assert args[0] == "train" and got["--init"] == "octo-random" and got["--max-steps"] == "7"
    assert got["--batch-size"] == "3" and got["--run"] == cfg.run_name
    assert got["--outputs"] == str((tmp_path / "out").resolve())


def test_run_evaluation_with_policy_objects_keeps_the_layout(small, tmp_path):
    """No VLA at all: the fine-tuned / base rows come from the given policies (as Octo's do), the mean-action
    baseline is still added, and eval.json / table.md have the usual layout."""
    ds = stream.open_dataset(str(small.root), seed=0)
    split = splits.make_split(ds)
    given = {"fine-tuned": RandomPolicy(seed=1), "base": ConstantPolicy(np.r_[np.zeros(6), 1.0], "base")}
    config = ev.EvalConfig(unnorm_key="demo_world", out_dir=tmp_path, run_name="given", episodes_per_task=1,
                           max_tasks_per_group=1, max_steps=5, progress=False)
    rep = ev.run_evaluation(None, None, ds, split, config, policy_objects=given,
                            model_info={"class": "OctoModel", "base_description": "before"})
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["evaluation"]["policies"] == [ev.POLICY_FINETUNED, ev.POLICY_BASE, ev.POLICY_MEAN]
    assert data["model"]["class"] == "OctoModel" and data["model"]["unnorm_key"] == "demo_world"
    assert data["baselines"][ev.POLICY_BASE]["description"] == "before"
    assert data["timing"]["generate_calls"] is None
    rows = rep.rows(ev.POLICY_FINETUNED)
    assert rows and all(r["n_episodes"] == 1 for r in rows)
    assert all(k in rows[0] for k in ("mean_l1_action_error", "replay_pose_drift_cm", "success_rate"))
    # the constant "base" and the random "fine-tuned" really were the ones evaluated
    l1 = {p: [r["l1"] for r in data["per_episode"] if r["policy"] == p] for p in data["evaluation"]["policies"]}
    assert l1[ev.POLICY_FINETUNED] != l1[ev.POLICY_BASE]
    assert (tmp_path / "table.md").read_text().startswith("### Evaluation: given")


class _FakeServer:
    """OctoServer's interface without a worker: chunks whose first action is 0.5 on every dimension."""

    weights = ["base", "finetuned"]
    horizon = 4

    def __init__(self):
        self.requests = []

    def predict(self, images, instructions, weights="finetuned"):
        self.requests.append((images.shape, weights))
        return np.full((len(instructions), self.horizon, 7), 0.5, np.float32)


def test_octo_policy_act_reports_progress_per_request():
    """Regression (issue 13): the evaluation always passes a progress callback, and act() raised NameError."""
    stats = {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "min": [-2.0] * 6 + [0.0],
                        "max": [2.0] * 6 + [1.0], "mask": [True] * 6 + [False]}}
    srv = _FakeServer()
    pol = octo.OctoPolicy(srv, stats, "finetuned", request_frames=2)
    frames = [np.zeros((128, 128, 3), np.uint8)] * 5
    seen = []
    acts = pol.act(frames, ["put the red block on the plate"] * 5, None, seen.append)
    assert seen == [2, 2, 1] and acts.shape == (5, 7)
    assert [s for s, _ in srv.requests] == [(2, 256, 256, 3), (2, 256, 256, 3), (1, 256, 256, 3)]
    assert np.allclose(acts[:, :6], 0.5) and np.allclose(acts[:, 6], 0.5)   # de-normalized; gripper passes through


def test_missing_model_directory_is_reported_as_such_not_as_the_hub(tmp_path, monkeypatch):
    """Issue 13: MODEL_ID=/nonexistent on POLICY=octo was reported as "hub unreachable" (and with the hub up it
    failed only inside the worker, after the shards were written)."""
    monkeypatch.chdir(tmp_path)   # the relative MODEL_IDs below name nothing here (a checkout may hold data/tiny_vla_base)
    down = hardware.Decision("no", "offline")
    missing = str(tmp_path / "nonexistent")
    checks = preflight.run_preflight("octo", "embedded", missing, down, tmp_path)
    failed = [c for c in checks if c.required and not c.ok and c.name != "octo env"]
    assert [c.name for c in failed] == ["model"] and "no such directory" in failed[0].detail
    with pytest.raises(hardware.PreflightError, match="no such directory"):
        preflight.raise_on_failure(failed)
    up = hardware.Decision("yes", "reachable")
    assert not preflight.check_model_id("octo", missing).ok and not preflight.check_model_id("openvla", missing).ok
    assert preflight.check_hub_for("embedded", "octo", missing, up).ok
    for policy, model_id, kind in (("octo", "octo-random", "random"), ("octo", "hf://rail-berkeley/octo-small-1.5",
                                   "hub"), ("octo", "rail-berkeley/octo-small-1.5", "missing"),
                                   ("octo", str(tmp_path), "local"), ("openvla", "openvla/openvla-7b", "hub"),
                                   ("openvla", "./ckpt/openvla", "missing"), ("tiny", "data/tiny_vla_base", "built")):
        assert preflight.model_id_kind(policy, model_id) == kind, (policy, model_id)
        assert preflight.check_model_id(policy, model_id).ok == (kind != "missing")


def test_resume_on_octo_is_refused_before_any_work(tmp_path):
    from vla_bridge.config import resolve_run_config

    params = {"POLICY": "octo", "MODEL_ID": "octo-random", "RESUME": True, "OUTPUTS_DIR": str(tmp_path)}
    with pytest.raises(hardware.PreflightError, match=r"RESUME=True is not supported on POLICY=octo.*RUN_NAME"):
        resolve_run_config(params, env={}, hw=hardware.detect_hardware(), hub=hardware.Decision("no", "offline"))
    params["RESUME"] = False
    assert resolve_run_config(params, env={}, hw=hardware.detect_hardware(),
                              hub=hardware.Decision("no", "offline")).policy == "octo"


def test_auto_policy_reason_states_the_threshold_in_gib():
    """A card sold as "12 GB" that reports 11.7 GiB gets Octo: the reason says so in the unit it was compared in."""
    hw = hardware.HardwareInfo(cuda_available=True, device_name="RTX 3060", gpu_count=1, total_vram_gb=11.7,
                               free_vram_gb=11.0, bf16_supported=True, cpu_count=8, ram_gb=32.0, python="3.11",
                               platform="Linux x86_64")
    d = hardware.choose_policy(hw, hub_ok=True, bnb_available=True)
    assert d.value == "octo" and "11.7 GiB" in d.reason and "< 12.0 GiB" in d.reason
