"""The real path on a Bridge-layout copy (written with lerobot's own writer, see vla_bridge/data/bridge_layout.py):
dict-form feature names, lerobot's aggregated quantiles in meta/stats.json, a main and a black side camera."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vla_bridge.data import bridge_layout, episodes, schema, splits, stats, stream

NAMES = list(bridge_layout.BRIDGE_ACTION_NAMES)


@pytest.fixture(scope="module")
def bridge(bridge_layout):
    ds = stream.open_dataset(bridge_layout, probe=False)
    return ds, splits.make_split(ds)


def _parquet_actions(root, episodes):
    df = pd.concat(pd.read_parquet(p, columns=["episode_index", "action"])
                   for p in sorted((root / "data").rglob("*.parquet")))
    df = df[df["episode_index"].isin(list(episodes))]
    return np.stack(df["action"].to_numpy()).astype(np.float64)


# ------------------------------------------------------------------------------------------- the fixture itself


def test_fixture_has_bridges_layout(bridge_layout, bridge):
    ds, split = bridge
    info = json.loads((bridge_layout / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["features"]["action"]["names"] == {"motors": NAMES}
    assert ds.meta.video_keys == [bridge_layout_key("image_0"), bridge_layout_key("image_1")]
    raw = json.loads((bridge_layout / "meta" / "stats.json").read_text())["action"]
    assert {"q01", "q99", "count"} <= set(raw) and raw["count"] == [info["total_frames"]]
    assert set(split.eval) >= {"heldout", "heldout_object"} and sum(split.blank_dropped.values()) == 2
    assert len(split.train) >= 10 and sum(len(v) for v in split.eval.values()) >= 8


def bridge_layout_key(cam: str) -> str:
    return f"observation.images.{cam}"


# ------------------------------------------------------------------------------------------- item 1: names


def test_feature_names_reads_every_form():
    assert schema.feature_names({"motors": ["x", "y"]}) == ["x", "y"]
    assert schema.feature_names({"dtype": "float32", "shape": [2], "names": {"motors": ["x", "y"]}}) == ["x", "y"]
    assert schema.feature_names({"arm": ["x", "y"], "gripper": ["g"]}, 3) == ["x", "y", "g"]
    assert schema.feature_names(["x", "y"], 3) == ["a0", "a1", "a2"]        # wrong count: positional names
    assert schema.feature_names({"dtype": "float32", "shape": [2], "names": None}) == ["a0", "a1"]
    assert schema.feature_names(None) == []


def test_stats_table_formats_with_dict_names(bridge):
    """Section 3c's call as the notebook makes it, on IPEC-style names (was: IndexError in format_stats_table)."""
    ds, split = bridge
    entry = stats.compute_action_stats(ds, episodes=split.train)
    for names in (ds.meta.features["action"].get("names"), ds.meta.features["action"]):
        table = stats.format_stats_table(entry, names)
        rows = {line.split()[0] for line in table.splitlines() if line and line.split()[0] in NAMES}
        assert rows == set(NAMES)
        assert "motors" not in table


def test_schema_unwraps_dict_names(bridge):
    ds, _ = bridge
    s = schema.schema(ds)
    assert s["vectors"]["action"]["names"] == NAMES and s["vectors"]["observation.state"]["dim"] == 8


# ------------------------------------------------------------------------------------------- item 2: statistics


def test_statistics_equal_numpy_over_the_training_episodes(bridge_layout, bridge, tmp_path):
    ds, split = bridge
    acts = _parquet_actions(bridge_layout, split.train)
    entry = stats.compute_action_stats(ds, episodes=split.train)  # section 3c's call
    a = entry["action"]
    np.testing.assert_allclose(a["q01"], np.quantile(acts, 0.01, axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a["q99"], np.quantile(acts, 0.99, axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a["mean"], acts.mean(0), atol=1e-9)
    np.testing.assert_allclose(a["std"], acts.std(0), atol=1e-9)
    np.testing.assert_allclose(a["min"], acts.min(0), atol=0)
    np.testing.assert_allclose(a["max"], acts.max(0), atol=0)
    assert a["mask"] == [True] * 6 + [False]
    assert entry["num_transitions"] == len(acts) and entry["num_trajectories"] == len(split.train)
    # ... and they are NOT lerobot's figures (mean of per-episode quantiles over all episodes, held-out included)
    lerobot = json.loads((bridge_layout / "meta" / "stats.json").read_text())["action"]
    assert not np.allclose(a["q99"][:6], lerobot["q99"][:6], rtol=0.05)
    assert not np.allclose(a["q01"][:6], lerobot["q01"][:6], rtol=0.05)
    assert entry["lerobot"]["action"]["q99"] == pytest.approx(lerobot["q99"])
    table = stats.format_stats_table(entry, ds.meta.features["action"])
    assert "for comparison only" in table and "not used for normalization" in table
    # what the notebook saves is the exact entry
    saved = stats.load_dataset_statistics(stats.save_dataset_statistics(tmp_path / "logs", {"bridge_orig": stats.norm_stats_entry(entry)}),
                                          "bridge_orig")
    assert saved["action"]["q99"] == pytest.approx(a["q99"]) and "lerobot" not in saved


def test_statistics_are_cached_by_dataset_and_split(bridge, tmp_path, monkeypatch):
    ds, split = bridge
    first = stats.compute_action_stats(ds, episodes=split.train, cache_dir=tmp_path)
    files = list(tmp_path.glob("action_stats-*.json"))
    assert len(files) == 1
    calls = []
    real = stats.stats_from_stream
    monkeypatch.setattr(stats, "stats_from_stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = stats.compute_action_stats(ds, episodes=split.train, cache_dir=tmp_path)
    assert calls == [] and again["action"] == first["action"] and "cached in" in again["source"]
    other = stats.compute_action_stats(ds, episodes=split.train[:-1], cache_dir=tmp_path)  # another split: recomputed
    assert calls == [1] and other["num_trajectories"] == len(split.train) - 1
    assert len(list(tmp_path.glob("action_stats-*.json"))) == 2
    assert stats.dataset_fingerprint(ds).startswith("local:")


# ------------------------------------------------------------------------------------------- item 3: cameras


def test_stream_decodes_only_the_cameras_asked_for(bridge):
    ds, split = bridge
    main, side = ds.meta.video_keys
    default = stream.open_dataset(ds.root, episodes=split.train[:2], probe=False, buffer_size=1)
    assert default.cameras == (main,)
    fr = next(iter(default))
    assert main in fr and side not in fr
    both = stream.open_dataset(ds.root, episodes=split.train[:2], probe=False, buffer_size=1, cameras="all")
    fr = next(iter(both))
    assert main in fr and side in fr and float(fr[side].max()) == 0.0   # the black side camera
    got = episodes.collect_episodes(default, split.train[:1], cameras=[main, side])
    assert all(side in f for f in next(iter(got.values())))
    with pytest.raises(ValueError, match="image_9"):
        stream.open_dataset(ds.root, probe=False, cameras=["observation.images.image_9"])


def test_bench_loader_warms_up_both_paths_and_decodes_one_camera(bridge_layout):
    """The loader benchmark on the two-camera copy: both rows after an untimed warm-up, the main camera only."""
    from vla_bridge.tools.bench import bench_loader, format_bench

    res = bench_loader(str(bridge_layout), frames=60, image_size=64, workers=0, buffer_size=16, warmup=30)
    assert res["warmup_frames"] == 30 and res["cameras"] == ["observation.images.image_0"]
    assert [r["frames"] for r in res["rows"]] == [60, 60]
    assert "after 30 warm-up frames" in format_bench(res) and "cameras decoded: image_0" in format_bench(res)


# ------------------------------------------------------------------------------------------- item 1: downstream


@pytest.fixture(scope="module")
def tiny_on_bridge(bridge):
    import torch
    from peft import get_peft_model

    from vla_bridge.models.lora import lora_target_modules
    from vla_bridge.models.openvla import lora_config
    from vla_bridge.models.tiny_vla import build_tiny_vla

    ds, split = bridge
    entry = stats.compute_action_stats(ds, episodes=split.train)
    torch.manual_seed(0)
    model, processor = build_tiny_vla(norm_stats={"bridge_orig": stats.norm_stats_entry(entry)}, seed=0, image_size=32,
                                      vision_width=48, vision_depth=2, hidden_size=64, num_layers=1,
                                      intermediate_size=128)
    model = get_peft_model(model, lora_config(4, 4, target_modules=lora_target_modules(model)))
    return model, processor, entry


def test_evaluation_and_probes_label_dimensions_with_the_datasets_names(bridge, tiny_on_bridge, tmp_path):
    """On a Bridge copy the per-dimension numbers are keyed by ITS names (was: {"motors": ...} in the evaluation,
    the demo world's dx … dyaw in the probes)."""
    from vla_bridge import evaluation as ev

    ds, split = bridge
    model, processor, entry = tiny_on_bridge
    config = ev.EvalConfig(unnorm_key="bridge_orig", out_dir=tmp_path / "eval", run_name="bridge",
                           episodes_per_task=1, max_tasks_per_group=1, closed_loop=False, center_crop=False,
                           contrast_tasks=0, progress=False, threads=1, n_boot=50)
    rep = ev.run_evaluation(model, processor, ds, split, config, action_stats=entry)
    rows = rep.rows(ev.POLICY_FINETUNED)
    assert rows and all(list(r["l1_per_dim"]) == NAMES for r in rows)
    res = ev.run_probes(model, processor, ds, split, unnorm_key="bridge_orig", out_dir=tmp_path / "probe",
                        max_episodes=1, frame_stride=4, closed_loop=False, verbose=False)
    assert res.rows and all(list(r["mean_abs_delta"]) == NAMES for r in res.rows if r.get("mean_abs_delta"))
