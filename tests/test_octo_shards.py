"""The Octo data hand-off (main environment, always run): chunking and the shard round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla_bridge import tokenization as tok
from vla_bridge.data import splits, stream
from vla_bridge.octo import shards as octo_shards
from vla_bridge.data import stats as dstats


def test_chunk_actions_window1_horizon4_repeats_last_and_masks_past_the_end():
    a = np.arange(5 * 2, dtype=np.float64).reshape(5, 2)   # T=5, D=2; row t = [2t, 2t+1]
    win, chunks, mask = octo_shards.chunk_actions(a, window=1, horizon=4)
    assert win.shape == (5, 1) and chunks.shape == (5, 1, 4, 2) and mask.shape == (5, 1, 4)
    assert win[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(chunks[1, 0], a[1:5])                 # frame 1: actions 1..4
    np.testing.assert_array_equal(chunks[3, 0], a[[3, 4, 4, 4]])        # past the end: last action repeated ...
    assert mask[3, 0].tolist() == [True, True, False, False]            # ... and masked out of the loss
    assert mask[4, 0].tolist() == [True, False, False, False]


def test_chunk_actions_window2_pads_before_the_episode():
    a = np.arange(4, dtype=np.float64)[:, None]
    win, chunks, mask = octo_shards.chunk_actions(a, window=2, horizon=2)
    assert win.tolist() == [[-1, 0], [0, 1], [1, 2], [2, 3]]
    assert not mask[0, 0].any() and (chunks[0, 0] == 0).all()           # the step before frame 0 is padding
    np.testing.assert_array_equal(chunks[2, :, :, 0], [[1, 2], [2, 3]])  # window steps 1 and 2, two actions each
    assert mask[3].tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError):
        octo_shards.chunk_actions(np.zeros((0, 7)))


def test_shards_round_trip_the_training_split(small, tmp_path):
    ds = stream.open_dataset(str(small.root), seed=0)
    split = splits.make_split(ds)
    stats = dstats.compute_action_stats(ds, episodes=split.train)
    train = sorted(split.train)[:5]
    out = octo_shards.write_octo_shards(ds, train, stats, "demo_world", tmp_path / "shards", episodes_per_shard=2,
                                        progress=False)
    assert not out.reused and len(out.manifest["shards"]) == 3
    back = octo_shards.read_octo_shards(out.dir)
    n = out.n_samples
    assert back["images"].shape == (n, 256, 256, 3) and back["images"].dtype == np.uint8
    assert back["actions"].shape == (n, 1, 4, 7) and back["action_pad_mask"].shape == (n, 1, 4)
    assert sorted(set(back["episode_index"].tolist())) == train
    # window indices point at the sample's own frame (window 1) across shard boundaries
    np.testing.assert_array_equal(back["window_index"][:, 0], np.arange(n))
    # the targets are the project's normalization of the raw actions, gripper passed through
    q = tok.action_stats(stats)
    first = back["actions"][:, 0, 0]
    np.testing.assert_allclose(first, tok.normalize_actions(back["raw_actions"].astype(np.float64), q["q01"],
                                                            q["q99"], q["mask"]), atol=1e-6)
    np.testing.assert_allclose(first[:, 6], back["raw_actions"][:, 6])
    assert np.abs(first[:, :6]).max() <= 1.0
    # and they decode back to the raw actions inside the q01/q99 range
    inside = np.all((back["raw_actions"][:, :6] >= q["q01"][:6]) & (back["raw_actions"][:, :6] <= q["q99"][:6]), 1)
    np.testing.assert_allclose(tok.unnormalize_actions(first[inside], q["q01"], q["q99"], q["mask"]),
                               back["raw_actions"][inside], atol=1e-5)
    # instructions are the dataset's task strings; statistics saved in OpenVLA's layout under the key
    ep_task = {int(e): t for e, t in split.tasks.items()} if isinstance(split.tasks, dict) else {}
    if ep_task:
        assert back["instructions"][0] == ep_task[int(back["episode_index"][0])]
    assert back["statistics"]["demo_world"]["action"]["q01"] == pytest.approx(q["q01"])
    assert json.loads((out.dir / "manifest.json").read_text())["episodes"] == train
    # same inputs → reused; other episodes → another key
    again = octo_shards.write_octo_shards(ds, train, stats, "demo_world", tmp_path / "shards", progress=False)
    assert again.reused and again.dir == out.dir
    other = octo_shards.shard_key("x", train[:-1], stats, 1, 4, 256)
    assert other != octo_shards.shard_key("x", train, stats, 1, 4, 256)
