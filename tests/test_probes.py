"""Probes, rollout video and failure mining: metrics on hand-made numbers, the colour shift, generated bullets, the
files written, failure slicing, and one short end-to-end run on a small embedded dataset with a tiny VLA."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from vla_bridge import plots
from vla_bridge.data import episodes, tasks, world
from vla_bridge.data.schema import MAIN_CAMERA
from vla_bridge.evaluation import failures, metrics, perturbations, policies, probe_report, probes, video

KEY = "demo_world"
SMALL = dict(image_size=64, vision_width=96, vision_depth=2, hidden_size=128, num_layers=2, intermediate_size=256)


# ------------------------------------------------------------------------------------------------------ metrics


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 256))
    assert np.allclose(metrics.kl_divergence(p, p), 0.0, atol=1e-12)
    assert np.allclose(metrics.kl_divergence(p, p + 3.0), 0.0, atol=1e-9)  # softmax ignores a constant shift
    q = rng.normal(size=(5, 256))
    assert (metrics.kl_divergence(p, q) > 0).all()
    # hand-computed two-outcome case: p = (.5, .5), q = (.9, .1)
    kl = metrics.kl_divergence(np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]]))[0]
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))


def test_mean_abs_delta_and_l1_per_dimension():
    a = np.array([[0.0, 1.0, -1.0], [2.0, 1.0, 0.0]])
    b = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert metrics.mean_abs_delta(a, b) == pytest.approx([1.5, 0.0, 1.0])
    assert metrics.l1_per_frame(a, b) == pytest.approx([1.0, 2.0 / 3.0])


def test_weighted_bootstrap_ci_brackets_the_mean():
    lo, hi = metrics.weighted_bootstrap_ci([0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], seed=0)
    assert lo <= 0.25 <= hi
    assert metrics.weighted_bootstrap_ci([0.5]) is None


# ------------------------------------------------------------------------------------------------------ perturbations


def _patch_image() -> np.ndarray:
    img = np.zeros((32, 32, 3), np.uint8)
    img[:16, :16] = (205, 38, 38)     # red
    img[:16, 16:] = (40, 85, 215)     # blue
    img[16:, :16] = (128, 128, 128)   # grey
    img[16:, 16:] = (240, 200, 30)    # yellow
    return img


def test_color_shift_is_deterministic_changes_colours_and_keeps_greys():
    img = _patch_image()
    a, b = perturbations.color_shift(img), perturbations.color_shift(img.copy())
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - img.astype(int)).mean() > 20
    assert np.abs(a[20, 4].astype(int) - 128).max() <= 2             # grey stays grey
    r, g, bl = a[4, 4].astype(int)
    assert g > r and g > bl                                           # red rotated by 90° is yellow-green
    assert not np.array_equal(perturbations.color_shift(img, 90), perturbations.color_shift(img, 180))
    assert np.abs(perturbations.color_shift(img, 360).astype(int) - img.astype(int)).max() <= 3  # HSV round trip only


def test_missing_or_black_camera():
    assert episodes.is_missing_or_black(None)
    assert episodes.is_missing_or_black(np.zeros((8, 8, 3), np.uint8))
    assert episodes.is_missing_or_black(np.full((4, 8, 8, 3), 5, np.uint8))
    assert not episodes.is_missing_or_black(_patch_image())


def test_paraphrases_and_verb_noun():
    assert "place the red block on the plate" in tasks.bridge_paraphrases("put the red block on the plate")
    assert tasks.bridge_paraphrases("pick up the spoon")[0] == "grab the spoon"
    assert tasks.bridge_paraphrases("") == []
    world_alt = tasks.paraphrase_for("put the red block on the plate", 0, world_mode=True)
    assert world_alt != "put the red block on the plate"
    assert world.parse_task(world_alt)["family"] == "block"
    assert tasks.verb_noun("put the red block on the plate") == {"verb": "put", "noun": "block"}
    assert tasks.verb_noun("pick up the green spoon and put it in the pot") == {"verb": "pick up", "noun": "spoon"}
    assert tasks.verb_noun("open the drawer") == {"verb": "open", "noun": "drawer"}
    assert tasks.verb_noun("grab the purple banana and drop it on the towel", world_mode=True) == \
        {"verb": "grab", "noun": "banana"}


def test_world_projection_lands_on_the_rendered_object():
    env = world.TabletopEnv(image_size=128)
    env.reset("put the red block on the plate", 3)
    o = env.instructed_object
    img = env.render()[MAIN_CAMERA]
    u, v = video.world_to_image0(np.array([[o.x, o.y, 0.04]]), 128)[0]   # the block's top face
    patch = img[int(v) - 1:int(v) + 2, int(u) - 1:int(u) + 2].reshape(-1, 3).astype(int).mean(0)
    assert patch[0] > 150 and patch[1] < 90 and patch[2] < 90, patch    # red


# ------------------------------------------------------------------------------------------------------ bullets


def _row(group, probe, l1b, l1p, kl, n=120, eps=10, ci=None, skipped=0):
    delta = {"dx": 0.004, "dy": 0.002, "dz": 0.001, "droll": 0.01, "dpitch": 0.01, "dyaw": 0.02, "gripper": 0.3}
    rng = {k: v / (0.06 if k in ("dx", "dy", "dz") else (0.5 if k != "gripper" else 1.0)) for k, v in delta.items()}
    return {"group": group, "probe": probe, "n_episodes": eps, "n_frames": n, "n_skipped": skipped,
            "l1_base": l1b, "l1_probe": l1p, "dl1": l1p - l1b, "dl1_rel": (l1p - l1b) / l1b, "l1_ratio": l1p / l1b,
            "dl1_ci95": ci, "kl": kl, "kl_median": kl, "mean_abs_delta": delta, "mean_abs_delta_range": rng,
            "argmax_changed": min(1.0, kl)}


def _summary():
    rows = []
    for g, f in (("heldout", 1.0), ("unseen_color", 1.3), ("all", 1.1)):
        rows += [_row(g, "paraphrase", 0.10 * f, 0.102 * f, 0.03, ci=[-0.001, 0.004]),
                 _row(g, "color_shift", 0.10 * f, 0.13 * f * f, 0.4, ci=[0.01, 0.05]),
                 _row(g, "other_camera", 0.10 * f, 0.31 * f, 2.0, skipped=2 if g != "heldout" else 0)]
    rows.append(_row("all", perturbations.REFERENCE, 0.11, 0.30, 4.0))
    spread = {"pred_distinct_per_episode": 9.0, "demo_distinct_per_episode": 12.0, "pred_spread_ratio": 0.8}
    groups = {"heldout": {"title": "held-out task strings", "l1_base": 0.10, "n_episodes": 10, "n_frames": 120},
              "unseen_color": {"title": "unseen colour", "l1_base": 0.13, "n_episodes": 10, "n_frames": 120},
              "all": {"title": "all", "l1_base": 0.11, "n_episodes": 20, "n_frames": 240, **spread}}
    cl = {"all": {"base": {"n": 8, "successes": 4, "rate": 0.5}, "paraphrase": {"n": 8, "successes": 4, "rate": 0.5},
                  "other_camera": {"n": 8, "successes": 0, "rate": 0.0}}}
    return {"rows": rows, "groups": groups, "closed_loop": cl, "config": {"hue_shift_deg": 90}}


def test_bullets_are_generated_from_the_numbers():
    s = _summary()
    bullets = probe_report.probe_bullets(s)
    assert 5 <= len(bullets) <= 10
    text = "\n".join(bullets)
    assert "Paraphrased instructions barely move the policy: KL 0.03" in text and "+2%" in text
    assert "The other camera (image_1 for image_0) breaks the policy: open-loop L1 ×3.1" in text
    assert "costs accuracy" in text                                          # the hue rotation, +30 %
    assert "worst on unseen colour" in text
    assert "success 4/8 unperturbed" in text and "0/8 with the other camera" in text
    assert "2 episode(s) skipped (image_1 missing or black)" in text
    assert "Reference, another episode's scene in place of this one: KL 4.00 nats" in text
    assert "the other camera moves the first-token distribution 50% as far" in text
    assert "Caution" not in text

    changed = copy.deepcopy(s)
    for r in changed["rows"]:
        if r["probe"] == "paraphrase":
            r.update(kl=0.8, l1_probe=r["l1_base"] * 2.0, l1_ratio=2.0, dl1_rel=1.0,
                     dl1_ci95=[0.5 * r["l1_base"], 1.5 * r["l1_base"]])  # a doubled error: its CI excludes 0
        if r["probe"] == "other_camera":
            r.update(kl=0.02, l1_probe=r["l1_base"] * 1.01, l1_ratio=1.01, dl1_rel=0.01)
    changed["closed_loop"]["all"]["other_camera"]["successes"] = 4
    changed["groups"]["all"].update(pred_distinct_per_episode=1.0, pred_spread_ratio=0.01)
    next(r for r in changed["rows"] if r["probe"] == perturbations.REFERENCE)["kl"] = 0.01
    text2 = "\n".join(probe_report.probe_bullets(changed))
    assert text2 != text
    assert "Paraphrased instructions break the policy: open-loop L1 ×2.0" in text2
    assert "The other camera (image_1 for image_0) barely moves the policy: KL 0.02" in text2
    assert "4/8 with the other camera" in text2
    assert text2.startswith("Caution: the policy's actions hardly change within an episode (on average 1.0 distinct")
    next(r for r in changed["rows"] if r["probe"] == perturbations.REFERENCE).update(dl1_rel=0.02)
    text2 = "\n".join(probe_report.probe_bullets(changed))
    assert "the policy barely looks at the scene" in text2
    assert probe_report.probe_verdict(_row("all", "color_shift", 0.1, 0.101, 0.5)) == "shifts"
    assert probe_report.probe_verdict(_row("all", "color_shift", 0.1, 0.05, 0.5)) == "improves"


def test_nan_probe_numbers_are_not_reported_as_findings():
    s = copy.deepcopy(_summary())
    for r in s["rows"]:
        r.update(kl=float("nan"), dl1_rel=float("nan"), l1_probe=float("nan"), l1_ratio=float("nan"))
    text = "\n".join(probe_report.probe_bullets(s))
    assert "came out non-finite (NaN/inf)" in text and "barely" not in text and "KL nan" not in text


# ------------------------------------------------------------------------------------------------------ failures


def _table():
    return [
        {"episode": 1, "group": "heldout", "task": "put the red block on the plate", "verb": "put", "noun": "block",
         "l1": 0.10, "success": True},
        {"episode": 2, "group": "heldout", "task": "put the blue cup on the plate", "verb": "put", "noun": "cup",
         "l1": 0.30, "success": False},
        {"episode": 3, "group": "unseen_color", "task": "move the purple cup to the pot", "verb": "move",
         "noun": "cup", "l1": 0.20, "success": False},
        {"episode": 4, "group": "unseen_color", "task": "move the purple block to the pot", "verb": "move",
         "noun": "block", "l1": 0.50, "success": None},
    ]


def test_failure_ranking_and_slices_on_a_hand_made_table(tmp_path):
    rows = _table()
    ranked = failures.rank_failures(rows)
    assert [r["episode"] for r in ranked] == [2, 3, 4, 1]   # failures (by L1), unknown, successes
    by_verb = {s["verb"]: s for s in failures.slice_failures(rows, "verb")}
    assert by_verb["put"]["n"] == 2 and by_verb["put"]["mean_l1"] == pytest.approx(0.20)
    assert by_verb["put"]["successes"] == 1 and by_verb["put"]["n_closed_loop"] == 2
    assert by_verb["move"]["mean_l1"] == pytest.approx(0.35)
    assert by_verb["move"]["successes"] == 0 and by_verb["move"]["n_closed_loop"] == 1
    by_noun = failures.slice_failures(rows, "noun")
    assert [s["noun"] for s in by_noun] == ["block", "cup"] and by_noun[0]["mean_l1"] == pytest.approx(0.30)
    table = failures.format_slices(by_noun, "noun")
    assert "| block | 2 | 0.3000 | 1/1 |" in table and "| cup | 2 | 0.2500 | 0/2 |" in table

    images = {r["episode"]: np.full((32, 32, 3), 40 * r["episode"], np.uint8) for r in rows}
    rep = failures.mine_failures(rows, tmp_path, n_worst=3, images=images)
    assert rep.sheet_path.name == "worst_episodes.png" and rep.sheet_path.stat().st_size > 1000
    assert "| 1 | 2 | heldout | put the blue cup on the plate | 0.3000 | no |" in rep.text()


# ------------------------------------------------------------------------------------------------------ files


def test_video_strip_and_gif_fallback_are_written(tmp_path):
    frames = [plots.draw_rollout_frame(_patch_image(), np.array([[4.0, 4.0], [10.0, 12.0 + t]]), t % 2 == 0,
                                       scale=4, lines=["put the red block on the plate", f"step {t}"])
              for t in range(6)]
    assert frames[0].shape[1] == 128 and frames[0].shape[0] % 16 == 0
    mp4 = plots.save_video(frames, tmp_path / "v.mp4")
    assert mp4.suffix in (".mp4", ".gif") and mp4.stat().st_size > 0
    gif = plots.save_video(frames, tmp_path / "v.gif")
    assert gif.suffix == ".gif" and gif.stat().st_size > 0
    strip = plots.save_frame_strip(frames, tmp_path / "strip.png", n=3)
    from PIL import Image

    with Image.open(strip) as im:
        assert im.width == 3 * 128 + 2 * 4
    arrows = plots.draw_action_arrows(_patch_image(), [0.01, 0.0], [0.0, 0.01], ref=0.01, scale=4)
    assert arrows.shape[1] == 128 and arrows.dtype == np.uint8


# ------------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from vla_bridge.data.build import ensure_demo_dataset
    from vla_bridge.data.splits import make_split
    from vla_bridge.data.stats import compute_action_stats, norm_stats_entry
    from vla_bridge.data.stream import open_dataset
    from vla_bridge.models.tiny_vla import build_tiny_vla

    root = ensure_demo_dataset(tmp_path_factory.mktemp("data"), episodes={
        "pretrain": 0, "finetune": 3, "heldout": 2, "heldout_family": 1, "unseen_color": 1, "paraphrase": 0},
        image_size=64, progress=False).root
    ds = open_dataset(str(root), seed=0)
    split = make_split(ds)
    stats = {KEY: norm_stats_entry(compute_action_stats(ds, split.train))}
    torch.manual_seed(0)
    model, processor = build_tiny_vla(norm_stats=stats, seed=0, **SMALL)
    return ds, split, model, processor


def test_run_probes_video_and_failures_end_to_end(small_world, tmp_path):
    ds, split, model, processor = small_world
    res = probes.run_probes(model, processor, ds, split, unnorm_key=KEY, out_dir=tmp_path / "eval",
                            frame_stride=4, closed_loop_episodes=1, max_steps=6, verbose=False)
    assert set(res.config["groups"]) == {"heldout", "heldout_family", "unseen_color"}
    assert len(res.rows) == 4 * 4                                   # 3 groups + "all" × 3 probes + the reference
    assert {r["probe"] for r in res.rows} == {*perturbations.PROBES, perturbations.REFERENCE}
    for r in res.rows:
        assert r["n_frames"] > 0 and r["kl"] >= 0 and len(r["mean_abs_delta"]) == 7
    para = next(r for r in res.rows if r["group"] == "all" and r["probe"] == "paraphrase")
    assert para["n_episodes"] == 4 and para["l1_base"] > 0
    assert res.closed_loop["all"]["base"]["n"] == 3 and "other_camera" in res.closed_loop["all"]
    assert 5 <= len(res.bullets) <= 10
    md = (tmp_path / "eval" / "probe.md").read_text()
    assert res.bullets[0] in md and "| all | other_camera |" in md
    data = json.loads((tmp_path / "eval" / "probe.json").read_text())
    assert data["bullets"] == res.bullets and len(data["episodes"]) == 4

    # the evaluation's own rollouts stand in for the unperturbed closed loop of the episodes they cover
    first = {e["episode"]: e for e in data["episodes"] if e["success"] is not None}
    given = {ep: {"success": True, "steps": 2} for ep in list(first)[:2]}
    again = probes.run_probes(model, processor, ds, split, unnorm_key=KEY, out_dir=tmp_path / "eval2",
                              frame_stride=4, closed_loop_episodes=1, max_steps=6, verbose=False,
                              closed_loop_base=given)
    assert again.timings["closed_loop_base_reused"] == 2
    by_ep = {e["episode"]: e for e in json.loads((tmp_path / "eval2" / "probe.json").read_text())["episodes"]}
    assert all(by_ep[ep]["success"] is True and by_ep[ep]["closed_loop_steps"] == 2 for ep in given)
    assert again.closed_loop["all"]["base"]["n"] == 3 and again.closed_loop["all"]["base"]["successes"] >= 2

    rep = failures.mine_failures(res, tmp_path / "figures")
    assert rep.sheet_path.stat().st_size > 1000 and len(rep.ranked) == 4
    assert {s["noun"] for s in rep.slices["noun"]} <= set(world.ALL_FAMILIES)

    vid = video.rollout_video(model, processor, ds, split, unnorm_key=KEY, out_dir=tmp_path / "videos", max_steps=5,
                               scale=2)
    assert vid.kind == "closed_loop" and vid.n_frames == 6 and vid.path.stat().st_size > 0
    assert vid.strip_path.stat().st_size > 0
    ol = video.rollout_video(model, processor, ds, split, unnorm_key=KEY, out_dir=tmp_path / "videos",
                              kind="open_loop", scale=2)
    assert ol.kind == "open_loop" and ol.path.stat().st_size > 0 and ol.success is None


def test_prediction_spread_flags_a_constant_policy():
    demo = [np.array([[0.0, 1.0], [0.02, 0.0], [0.01, 1.0]])]
    const = metrics.prediction_spread([np.tile([0.01, 1.0], (3, 1))], demo, np.array([0.04, 1.0]))
    assert const["pred_distinct_per_episode"] == 1 and const["demo_distinct_per_episode"] == 3
    assert const["pred_spread_ratio"] == 0.0
    same = metrics.prediction_spread(demo, demo, np.array([0.04, 1.0]))
    assert same["pred_spread_ratio"] == pytest.approx(1.0)


def test_pick_group_episodes_covers_every_task_before_repeating():
    from vla_bridge.data.splits import Split

    split = Split(rule="t", train=[], eval={"heldout": [1, 2, 3, 4, 5, 6]},
                  tasks={1: "a", 2: "a", 3: "a", 4: "B.", 5: "b", 6: "c"})
    assert probes.pick_group_episodes(split, "heldout", 3) == [1, 4, 6]
    assert probes.pick_group_episodes(split, "heldout", 4) == [1, 2, 4, 6]
    assert probes.pick_group_episodes(split, "heldout", None) == [1, 2, 3, 4, 5, 6]


def test_bridge_mode_skips_black_cameras_and_films_open_loop(small_world, tmp_path, monkeypatch):
    """Without the world's sidecar the Bridge rules apply: template paraphrases, no closed loop, open-loop arrows;
    an episode whose image_1 is black is skipped and counted."""
    ds, split, model, processor = small_world
    monkeypatch.setattr(probes, "world_sidecar", lambda ds: None)
    monkeypatch.setattr(video, "world_sidecar", lambda ds: None)
    calls = {"n": 0}
    real = episodes.is_missing_or_black

    def first_is_black(image):
        calls["n"] += 1
        return True if calls["n"] == 1 else real(image)

    monkeypatch.setattr(episodes, "is_missing_or_black", first_is_black)
    res = probes.run_probes(model, processor, ds, split, unnorm_key=KEY, out_dir=tmp_path, frame_stride=6,
                            groups=["heldout", "unseen_color"], probes=("paraphrase", "other_camera"), verbose=False)
    cam = next(r for r in res.rows if r["group"] == "all" and r["probe"] == "other_camera")
    assert cam["n_skipped"] == 1 and cam["n_episodes"] == 2
    assert not res.closed_loop["all"] and res.config["closed_loop"] is False
    assert any("1 episode(s) skipped (image_1 missing or black)" in b for b in res.bullets)
    assert all(e["paraphrase"].startswith(("place", "put", "please", "go ahead", "bring")) for e in res.episodes)
    vid = video.rollout_video(model, processor, ds, split, unnorm_key=KEY, out_dir=tmp_path, scale=2)
    assert vid.kind == "open_loop" and vid.path.stat().st_size > 0


def test_failures_from_an_evaluation_report(tmp_path):
    from types import SimpleNamespace

    from vla_bridge.evaluation import POLICY_BASE, POLICY_FINETUNED

    recs = [
        {"episode_index": 7, "policy": POLICY_FINETUNED, "group": "heldout",
         "instruction": "put the red spoon in the pot", "n_frames": 20, "l1": 0.2, "success": False},
        {"episode_index": 8, "policy": POLICY_FINETUNED, "group": "unseen_color",
         "instruction": "move the purple cup to the towel", "n_frames": 20, "l1": 0.1, "success": True},
        {"episode_index": 9, "policy": POLICY_FINETUNED, "group": "finetune_eval",
         "instruction": "put the red block on the plate", "n_frames": 20, "l1": 0.9, "success": False},
        {"episode_index": 7, "policy": POLICY_BASE, "group": "heldout", "instruction": "put the red spoon in the pot",
         "n_frames": 20, "l1": 0.5, "success": False},
    ]
    eps = {e: SimpleNamespace(images=[np.full((16, 16, 3), 20 * e, np.uint8)]) for e in (7, 8, 9)}
    report = SimpleNamespace(data={"per_episode": recs, "success_definition": {"kind": "closed_loop"}}, episodes=eps)
    rep = failures.mine_failures(report, tmp_path)
    assert [r["episode"] for r in rep.ranked] == [7, 8]           # fine-tuned policy, held-out groups only
    assert rep.ranked[0]["noun"] == "spoon" and rep.ranked[0]["success_kind"] == "closed loop"
    assert rep.sheet_path.stat().st_size > 0


def test_probe_predictor_gives_predict_action_tokens_and_the_first_token_logits(small_world):
    import torch

    from vla_bridge.evaluation import per_frame_predict
    from vla_bridge.tokenization import ActionTokenizer

    ds, split, model, processor = small_world
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3)).astype(np.uint8) for _ in range(5)]
    instructions = ["put the red block on the plate"] * 3 + ["move the blue cup to the towel"] * 2
    pred = policies.VLAPolicy.from_model(model, processor, KEY, center_crop=True)
    acts, logits = pred.run(images, instructions)
    assert logits.shape == (5, 256)
    assert np.array_equal(acts, per_frame_predict(model, processor, images, instructions, KEY, True))
    inner = pred.predictor
    action_ids = list(ActionTokenizer(processor.tokenizer).action_token_ids)
    with torch.inference_mode():
        for i in (0, 4):
            ids = torch.tensor([inner.prompt_ids(instructions[i])])
            out = model(input_ids=ids, pixel_values=inner.pixel_values([images[i]]))
            assert np.allclose(out.logits[0, -1, action_ids].numpy(), logits[i], atol=1e-4)


def test_a_change_whose_interval_includes_zero_is_not_a_finding():
    """The issue's case: other-scene L1 +11 % with a 95 % CI of [-0.0129, +0.0228] does not show that the policy
    reads the scene, and a probe whose ΔL1 interval includes 0 is reported as no change detectable."""
    s = copy.deepcopy(_summary())
    ref = next(r for r in s["rows"] if r["group"] == "all" and r["probe"] == perturbations.REFERENCE)
    ref.update(kl=0.4, l1_probe=ref["l1_base"] * 1.11, l1_ratio=1.11, dl1_rel=0.11, dl1=0.11 * ref["l1_base"],
               dl1_ci95=[-0.0129, 0.0228])
    hue = next(r for r in s["rows"] if r["group"] == "all" and r["probe"] == "color_shift")
    hue.update(kl=0.3, l1_probe=hue["l1_base"] * 1.3, l1_ratio=1.3, dl1_rel=0.3, dl1=0.3 * hue["l1_base"],
               dl1_ci95=[0.004, 0.02])
    text = "\n".join(probe_report.probe_bullets(s))
    assert "cannot show that the policy's accuracy depends on the scene" in text
    assert "costs accuracy: L1 +30%" in text
    assert probe_report.probe_verdict(ref) == "undetected" and probe_report.probe_verdict(hue) == "degrades"
    hue.update(dl1_ci95=[-0.001, 0.02])
    assert probe_report.probe_verdict(hue) == "undetected"
    assert "no change is detectable at n=" in "\n".join(probe_report.probe_bullets(s))
