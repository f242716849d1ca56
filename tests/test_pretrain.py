"""The tiny base's pretraining: world labels, the two stages, the cached base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vla_bridge import hardware as hwm
from vla_bridge import preflight
from vla_bridge import pretrain
from vla_bridge.data import world as W
from vla_bridge.data.world import labels as WL


def test_scene_labels_agree_with_the_world():
    env = W.TabletopEnv()
    env.reset(W.SPLITS.pretrain[0], 3)
    expert = W.Expert(env)
    seen_holding = False
    while env.t < env.max_steps and not expert.finished:
        lab = WL.scene_labels(env)
        assert lab["gripper"].sum() == 1
        r, c = np.argwhere(lab["gripper"] == 1)[0]
        if env.pos[2] < 0.03:  # near the table the fingertip's patch sees the table within a patch of it
            assert np.abs(lab["offset"][r, c]).max() * WL.UNIT < 0.07
        o, t = env.instructed_object, env.instructed_target
        np.testing.assert_allclose(lab["privileged"][[0, 1]], [(o.x - env.pos[0]) / WL.UNIT,
                                                             (o.y - env.pos[1]) / WL.UNIT], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lab["privileged"][[3, 4]], [(t.x - env.pos[0]) / WL.UNIT,
                                                             (t.y - env.pos[1]) / WL.UNIT], rtol=1e-5, atol=1e-5)
        assert lab["privileged"][7] == float(env.held == env.obj_index) == lab["state"][2]
        seen_holding |= bool(lab["state"][2])
        if env.t == 0:  # every object's colour and family on at least one patch, both targets on theirs
            for ob in env.objects:
                both = (lab["color"] == WL.COLOR_IDS[ob.color]) & (lab["family"] == WL.FAMILY_IDS[ob.family])
                assert both.any(), ob
            assert {WL.TARGET_IDS[tg.kind] for tg in env.targets} <= set(np.unique(lab["target"]).tolist())
        env.step(expert.act())
    assert seen_holding


def test_labelled_frames_are_deterministic_and_complete():
    a = WL.labelled_frames(2, 5, "pretrain", image_size=64)
    b = WL.labelled_frames(2, 5, "pretrain", image_size=64)
    n = len(a["action"])
    assert n > 20 and a["image"].shape == (n, 64, 64, 3) and a["offset"].shape == (n, WL.GRID, WL.GRID, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert set(a["instruction"]) <= set(W.SPLITS.pretrain) and set(a["episode"]) == {0, 1}
    with pytest.raises(ValueError, match="n_episodes"):
        WL.labelled_frames(0, 5)


def _small_params(**kw) -> pretrain.PretrainParams:
    base = dict(episodes=3, vision_steps=4, steps=4, vision_batch_size=8, batch_size=4, warmup_steps=1, threads=1)
    base.update(kw)
    return pretrain.PretrainParams(**base)


def test_vision_stage_learns_the_patch_labels():
    """30 steps of the vision stage alone lower the per-patch loss (a check the labels are learnable at all)."""
    from vla_bridge.data.stats import norm_stats_entry, stats_from_arrays
    from vla_bridge.models.tiny_vla import build_tiny_vla

    torch.set_num_threads(1)
    frames = WL.labelled_frames(4, 1, "pretrain")
    stats = norm_stats_entry(stats_from_arrays(frames["action"]))
    model, processor = build_tiny_vla(norm_stats={"demo_world": stats})
    log = pretrain.pretrain_base(model, processor, frames, stats, _small_params(vision_steps=30, steps=1),
                                 progress=False)
    vision = [r["aux_loss"] for r in log if r["stage"] == "vision"]
    assert vision[-1] < 0.6 * vision[0], vision
    assert [r["stage"] for r in log][-1] == "action" and np.isfinite(log[-1]["loss"])


def test_ensure_tiny_base_builds_saves_and_reuses(tmp_path):
    from vla_bridge.models.tiny_vla import TinyVLAForActionPrediction

    out = tmp_path / "tiny_vla_base"
    params = _small_params()
    path, info = pretrain.ensure_tiny_base(out, "demo_world", params, progress=False)
    assert not info["reused"] and info["frames"] > 0 and info["world_version"] == W.WORLD_VERSION
    marker = json.loads((path / pretrain.BASE_MARKER).read_text())
    assert marker["key"] == pretrain.base_cache_key(params, "demo_world")
    assert "tiny base: pretrained it in" in pretrain.describe_base(info)
    model = TinyVLAForActionPrediction.from_pretrained(str(path))
    assert model.config.vision_stem == "conv" and "demo_world" in model.config.norm_stats
    q01, q99 = (np.asarray(model.config.norm_stats["demo_world"]["action"][k]) for k in ("q01", "q99"))
    assert np.all(q01[3:5] == 0) and np.all(q99[3:5] == 0)      # the expert never tilts the wrist
    names = set(model.state_dict())
    assert not any("privileged" in n or n.startswith("heads") for n in names)   # aux heads are not saved
    _, again = pretrain.ensure_tiny_base(out, "demo_world", params, progress=False)
    assert again["reused"] and again["key"] == info["key"]
    _, other = pretrain.ensure_tiny_base(out, "demo_world", _small_params(steps=5), progress=False)
    assert not other["reused"] and other["key"] != info["key"]
    with pytest.raises(ValueError, match="episodes > 0"):
        pretrain.ensure_tiny_base(tmp_path / "x", "demo_world", _small_params(steps=0), progress=False)


def test_dart_perturbation_keeps_clean_labels():
    clean = WL.labelled_frames(3, 7, "pretrain", image_size=64)
    noisy = WL.labelled_frames(3, 7, "pretrain", image_size=64, perturb=0.005)
    again = WL.labelled_frames(3, 7, "pretrain", image_size=64, perturb=0.005)
    assert all(np.array_equal(noisy[k], again[k]) for k in noisy)              # deterministic
    n = min(len(clean["action"]), len(noisy["action"]))
    assert not np.array_equal(clean["privileged"][:n], noisy["privileged"][:n])  # it visits other states
    # the recorded actions are the expert's commands at the visited states: per-axis speed limit, no noise
    assert np.all(np.abs(noisy["action"][:, :3]) <= W.EXPERT_MAX_STEP + 1e-7)
    saturated = np.isclose(np.abs(noisy["action"][:, :2]), W.EXPERT_MAX_STEP)
    assert saturated.mean() > 0.2


def test_a_base_from_another_run_is_never_overwritten(tmp_path):
    """Another run's base (other PRETRAIN_STEPS, older code) or a checkpoint put there by hand stays as it is; this
    run's base is built beside it under its own key, and each is reused by the run it belongs to."""
    out = tmp_path / "tiny_vla_base"
    a_path, a = pretrain.ensure_tiny_base(out, "demo_world", _small_params(), progress=False)
    weights = (out / "model.safetensors").read_bytes()
    b_path, b = pretrain.ensure_tiny_base(out, "demo_world", _small_params(steps=5), progress=False)
    assert a_path == out and b_path == tmp_path / f"tiny_vla_base-{b['key']}" and not b["reused"]
    assert pretrain.read_base_info(out)["key"] == a["key"] and (out / "model.safetensors").read_bytes() == weights
    assert f"{out} holds a base with key {a['key']}" in pretrain.describe_base(b) and "left untouched" in \
        pretrain.describe_base(b)
    b_again_path, b_again = pretrain.ensure_tiny_base(out, "demo_world", _small_params(steps=5), progress=False)
    assert b_again_path == b_path and b_again["reused"] and b_again["key"] == b["key"]
    again_path, again = pretrain.ensure_tiny_base(out, "demo_world", _small_params(), progress=False)
    assert again_path == out and again["reused"]
    # a checkpoint directory without our marker (a shipped or hand-copied base) is not overwritten either
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "config.json").write_text("{}")
    path, info = pretrain.ensure_tiny_base(shipped, "demo_world", _small_params(), progress=False)
    assert path != shipped and (shipped / "config.json").read_text() == "{}" and "not built here" in info["kept"]


def test_tiny_base_on_another_dataset_says_what_it_is():
    r = preflight.check_tiny_base("tiny", "/data/my_bridge_copy")
    assert not r.ok and not r.required   # a warning: allowed, but said
    assert "pretrained on the embedded demo world, not on /data/my_bridge_copy" in r.detail
    assert "warn" in preflight.format_checks([r])
    assert preflight.check_tiny_base("tiny", "embedded").ok and preflight.check_tiny_base("openvla", "/data/x").ok
    assert any(c.name == "tiny base" and not c.ok for c in preflight.run_preflight(
        "tiny", "/data/my_bridge_copy", "data/tiny_vla_base", hwm.Decision("yes", "test"), "outputs"))
