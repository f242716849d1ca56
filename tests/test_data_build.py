"""The embedded dataset: lerobot's writer, read back by lerobot (map-style and streaming), the cache, the sidecars."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from conftest import SMALL

from vla_bridge.data import build, world

def test_episode_counts_resolve():
    assert build.resolve_episode_counts(None) == build.DEFAULT_EPISODES
    scaled = build.resolve_episode_counts(60)
    assert sum(scaled.values()) == 60 and all(v >= 1 for v in scaled.values())
    assert build.resolve_episode_counts("pretrain=3,finetune=2")["finetune"] == 2
    with pytest.raises(ValueError, match="unknown split"):
        build.resolve_episode_counts({"nope": 1})
    with pytest.raises(ValueError):
        build.resolve_episode_counts(3)


def test_plan_matches_world_generator():
    plan = build.episode_plan({"pretrain": 3, "paraphrase": 2}, seed=0)
    eps = list(world.generate_episodes(3, 0, "pretrain")) + list(world.generate_episodes(2, 0, "paraphrase"))
    for (split, task, seed, prompt), ep in zip(plan, eps):
        assert (split, seed, task) == (ep.meta["split"], ep.meta["seed"], ep.meta["instruction"])
        if prompt is not None:
            assert prompt == ep.task


def test_layout_and_sidecars(small):
    root = small.root
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 5 and info["robot_type"] == "widowx"
    feats = info["features"]
    assert feats["observation.images.image_0"]["dtype"] == "video"
    assert feats["observation.images.image_1"]["shape"] == [128, 128, 3]
    assert feats["observation.state"]["names"] == list(world.STATE_NAMES)
    assert feats["action"]["names"] == list(world.ACTION_NAMES)
    assert feats["observation.images.image_0"]["info"]["video.codec"] == "h264"
    assert len(list((root / "videos" / "observation.images.image_0").rglob("*.mp4"))) >= 2  # multi-file layout

    rows = build.load_episode_sidecar(root)
    assert [r["episode_index"] for r in rows] == list(range(sum(SMALL.values())))
    assert {k for k in SMALL} == {r["split"] for r in rows}
    for key in ("split", "task", "canonical_task", "seed", "color", "family", "target"):
        assert key in rows[0]
    assert all(r["success"] for r in rows)
    binfo = build.load_build_info(root)
    assert binfo["key"] == root.name and binfo["params"]["episodes"] == SMALL
    assert binfo["total_frames"] == info["total_frames"] == sum(r["length"] for r in rows)


def test_stats_have_exact_quantiles(small):
    """lerobot 0.4.4 stores the mean of per-episode quantiles; the builder replaces them with exact ones."""
    stats = json.loads((small.root / "meta" / "stats.json").read_text())
    act = stats["action"]
    for k in ("q01", "q10", "q50", "q90", "q99", "mean", "std", "min", "max"):
        assert len(act[k]) == 7
    rows = build.load_episode_sidecar(small.root)
    actions = np.concatenate([world.generate_episode(r["canonical_task"], r["seed"], split=r["split"],
                                                     prompt=r["task"]).actions for r in rows])
    np.testing.assert_allclose(act["q01"], np.quantile(actions.astype(np.float64), 0.01, axis=0), atol=1e-6)
    np.testing.assert_allclose(act["q99"], np.quantile(actions.astype(np.float64), 0.99, axis=0), atol=1e-6)
    q01, q99 = np.array(act["q01"]), np.array(act["q99"])
    assert np.all(q01[[0, 1, 2, 5, 6]] < q99[[0, 1, 2, 5, 6]])
    assert np.all(q01[[3, 4]] == 0.0) and np.all(q99[[3, 4]] == 0.0)  # the expert never rolls or pitches
    assert act["q01"][6] == 0.0 and act["q99"][6] == 1.0  # gripper: 0 = closed, 1 = open
    assert len(stats["observation.state"]["q01"]) == 8


def test_read_back_by_lerobot_dataset(small):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(build.REPO_ID, root=small.root)
    rows = build.load_episode_sidecar(small.root)
    assert ds.num_frames == sum(r["length"] for r in rows) and ds.num_episodes == len(rows)
    assert set(ds.meta.tasks.index) == {r["task"] for r in rows}
    # an episode in the SECOND video file: decoded frames resemble the world's own rendering
    r = rows[-1]
    ep = world.generate_episode(r["canonical_task"], r["seed"], split=r["split"], prompt=r["task"])
    start = ds.meta.episodes[r["episode_index"]]["dataset_from_index"]
    assert ds.meta.episodes[r["episode_index"]]["videos/observation.images.image_0/file_index"] >= 1
    for fi in (0, len(ep) // 2, len(ep) - 1):
        item = ds[start + fi]
        assert item["observation.images.image_0"].shape == (3, 128, 128)
        assert item["task"] == r["task"]
        for key in world.IMAGE_KEYS:
            img = item[key].permute(1, 2, 0).numpy() * 255.0
            assert np.abs(img - ep.frames[fi][key].astype(np.float64)).mean() < 8.0
        np.testing.assert_allclose(item["action"].numpy(), ep.frames[fi]["action"], atol=1e-6)


def test_read_back_by_streaming_dataset(small):
    """lerobot's own StreamingLeRobotDataset from the local root (no episode filter, one shard)."""
    from lerobot.datasets.streaming_dataset import StreamingLeRobotDataset

    from vla_bridge.data.stream import torch_threads

    ds = StreamingLeRobotDataset(build.REPO_ID, root=small.root, buffer_size=8, shuffle=False)
    assert ds.num_frames == build.load_build_info(small.root)["total_frames"]
    with torch_threads(1):
        frames = [fr for _, fr in zip(range(20), ds)]
    assert len(frames) == 20
    assert frames[0]["observation.images.image_0"].shape == (3, 128, 128)
    assert all(isinstance(f["task"], str) for f in frames)


def test_cache_reuse_and_rebuild(small, tmp_path_factory):
    t0 = time.perf_counter()
    again = build.ensure_demo_dataset(small.root.parent.parent, episodes=SMALL, video_file_size_mb=1)
    assert again.reused and again.root == small.root and time.perf_counter() - t0 < 1.0
    assert build.build_demo_dataset(small.root.parent.parent, episodes=SMALL, video_file_size_mb=1) == small.root

    tiny = {k: 1 for k in SMALL}
    other = build.ensure_demo_dataset(small.root.parent.parent, episodes=tiny)
    assert not other.reused and other.root != small.root and other.info["total_episodes"] == len(tiny)
    assert build.ensure_demo_dataset(small.root.parent.parent, episodes=tiny, seed=1).root != other.root
    assert not list(small.root.parent.glob(".building-*"))  # temp dirs renamed away


def test_interrupted_build_is_not_reused(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = build._verify

    def boom(*a, **k):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_verify", boom)
    tiny = {k: 1 for k in SMALL}
    with pytest.raises(KeyboardInterrupt):
        build.ensure_demo_dataset(tmp_path, episodes=tiny, workers=0)
    assert calls["n"] == 1
    assert not any((tmp_path / "demo_world").iterdir())  # nothing half-written is left, nothing to reuse
    monkeypatch.setattr(build, "_verify", real)
    done = build.ensure_demo_dataset(tmp_path, episodes=tiny, workers=0)
    assert not done.reused and (done.root / build.BUILD_SIDECAR).is_file()


def test_cli_demo_data(tmp_path, capsys):
    from vla_bridge.__main__ import main

    args = ["demo-data", "--out", str(tmp_path), "--episodes", "6", "--seed", "3", "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "built:" in first and "pretrain=1" in first
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out


def test_the_build_skips_lerobots_image_embedding_only_when_there_is_nothing_to_embed():
    """With the cameras in MP4s the frame table has no Image column, so embed_images is a no-op and is skipped; a
    feature set with an Image (or a sequence of them) still goes through lerobot's own embedding."""
    import datasets
    from lerobot.datasets.utils import get_hf_features_from_features

    ours = get_hf_features_from_features(build.features(64))
    assert not build._embeds_files(dict(ours))
    assert build._embeds_files({"cam": datasets.Image(), "x": datasets.Value("float32")})
    assert build._embeds_files({"cams": datasets.Sequence(datasets.Image())})
