"""Action statistics in OpenVLA's norm_stats layout: sources, values, mask, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL

from vla_bridge.data import splits, stats, stream

@pytest.fixture(scope="module")
def train_ds(small):
    split = splits.make_split(small.root)
    return stream.open_dataset(small.root, episodes=split.train, probe=False), split


def _check_entry(entry):
    a = entry["action"]
    for k in stats.STAT_FIELDS:
        assert len(a[k]) == 7 and all(isinstance(x, float) for x in a[k])
    assert a["mask"] == [True] * 6 + [False]
    assert all(lo <= hi for lo, hi in zip(a["q01"], a["q99"]))
    assert all(mn <= q1 and q9 <= mx for mn, q1, q9, mx in zip(a["min"], a["q01"], a["q99"], a["max"]))
    assert a["q01"][6] == 0.0 and a["q99"][6] == 1.0  # the gripper keeps its 0/1 command
    assert len(entry["proprio"]["q01"]) == 8 and "mask" not in entry["proprio"]
    assert entry["num_transitions"] > 0 and entry["num_trajectories"] > 0


def test_meta_source(train_ds):
    ds, _ = train_ds
    entry = stats.compute_action_stats(ds, source="meta")
    _check_entry(entry)
    assert entry["source"].startswith("meta/stats.json") and entry["quantiles_exact"]
    assert entry["num_trajectories"] == sum(SMALL.values())


def test_stream_source_matches_the_training_frames(train_ds, small):
    ds, split = train_ds
    entry = stats.compute_action_stats(ds, episodes=split.train, source="stream")
    _check_entry(entry)
    assert entry["num_trajectories"] == len(split.train) and entry["num_transitions"] == split.frames(split.train)
    acts = []
    with stream.torch_threads(1):
        for fr in stream.TrainingStream(small.root, ds=ds).epoch():
            acts.append(fr["action"])
    acts = np.asarray(acts, dtype=np.float64)
    np.testing.assert_allclose(entry["action"]["q99"], np.quantile(acts, 0.99, axis=0), atol=1e-6)
    np.testing.assert_allclose(entry["action"]["mean"], acts.mean(0), atol=1e-6)


def test_auto_is_the_training_split_with_meta_only_for_comparison(train_ds):
    """The embedded build's meta/stats.json is exact but over ALL episodes (held-out included): "auto" does not use it
    for normalization, only prints it beside."""
    ds, split = train_ds
    entry = stats.compute_action_stats(ds, episodes=split.train)
    assert entry["source"].startswith("exact over") and entry["num_trajectories"] == len(split.train)
    assert entry["lerobot"]["num_trajectories"] == sum(SMALL.values()) and entry["lerobot"]["quantiles_exact"]
    with pytest.raises(ValueError, match="source='stream'"):
        stats.compute_action_stats(ds.meta.root / "nowhere", source="meta")


def test_save_and_load_openvla_layout(train_ds, tmp_path):
    ds, _ = train_ds
    entry = stats.compute_action_stats(ds)
    path = stats.save_dataset_statistics(tmp_path / "logs", {"demo_world": stats.norm_stats_entry(entry)})
    assert path.name == "dataset_statistics.json"
    raw = json.loads(path.read_text())
    assert list(raw) == ["demo_world"]
    assert set(raw["demo_world"]) == {"action", "proprio", "num_transitions", "num_trajectories"}
    assert set(raw["demo_world"]["action"]) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    loaded = stats.load_dataset_statistics(path, "demo_world")
    assert loaded["action"]["q01"] == pytest.approx(entry["action"]["q01"])
    assert stats.load_dataset_statistics(tmp_path / "logs")["demo_world"] == loaded
    with pytest.raises(KeyError, match="available: \\['demo_world'\\]"):
        stats.load_dataset_statistics(path, "bridge_orig")
    table = stats.format_stats_table(entry, ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"])
    assert "gripper" in table and "passes through" in table and "exact" in table


def test_normalization_roundtrip_with_tokenization(train_ds):
    """The saved entry plugs into the project's BOUNDS_Q99 normalizer: q01 → -1, q99 → +1, gripper untouched."""
    tok = pytest.importorskip("vla_bridge.tokenization")
    ds, _ = train_ds
    entry = stats.norm_stats_entry(stats.compute_action_stats(ds))
    a = entry["action"]
    x = np.array([a["q01"], a["q99"]], dtype=np.float64)
    x[:, 6] = [0.0, 1.0]
    y = tok.normalize_with_stats(x, entry)
    varies = np.asarray(a["q99"][:6]) > np.asarray(a["q01"][:6])
    assert varies[[0, 1, 2, 5]].all() and not varies[[3, 4]].any()  # the world's expert never rolls or pitches
    np.testing.assert_allclose(y[:, :6][:, varies], [[-1] * varies.sum(), [1] * varies.sum()], atol=1e-6)
    # a constant dimension (q01 == q99) goes to -1 through upstream's 1e-8 and decodes back to the constant
    np.testing.assert_allclose(y[:, :6][:, ~varies], -1.0)
    np.testing.assert_allclose(tok.unnormalize_with_stats(y, entry)[:, :6][:, ~varies], 0.0, atol=1e-9)
    np.testing.assert_allclose(y[:, 6], [0.0, 1.0])
