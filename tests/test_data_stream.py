"""Streaming: the version check, torchcodec, zero frames, the episode filter, file-relative video lookup, schema,
the sample counter, the training stream, DataLoader workers, figures and the loader benchmark."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import SMALL

from vla_bridge.data import build, counting, episodes, schema, source, stream, world
from vla_bridge.images import to_uint8_hwc

@pytest.fixture(scope="module")
def rows(small):
    return build.load_episode_sidecar(small.root)


def _write_info(root, version):
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": version, "fps": 5, "features": {}}))


# ------------------------------------------------------------------------------------------------ version check


@pytest.mark.parametrize("version", ["v2.0", "v2.1", "v1.6"])
def test_old_codebase_version_gives_our_error(tmp_path, version):
    _write_info(tmp_path, version)
    with pytest.raises(source.DatasetVersionError) as exc:
        stream.open_dataset(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and version in msg
    assert "nvidia/bridge_lerobot_v3" in msg and "convert_dataset_v21_to_v30" in msg
    if version == "v2.0":
        assert "convert_dataset_v20_to_v21" in msg and "0.3" in msg


def test_hub_v20_dataset_checked_before_lerobot(monkeypatch):
    """A hub id is judged by its info.json alone (one small download), before lerobot touches it."""
    monkeypatch.setattr(source, "_hub_info", lambda repo: ({"codebase_version": "v2.0"}, None, None))
    with pytest.raises(source.DatasetVersionError, match="IPEC-COMMUNITY/bridge_orig_lerobot is a LeRobot v2.0"):
        stream.open_dataset("IPEC-COMMUNITY/bridge_orig_lerobot")


def test_newer_and_missing_versions(tmp_path):
    with pytest.raises(source.DatasetVersionError, match="upgrade lerobot"):
        source.check_version({"codebase_version": "v4.0"})
    with pytest.raises(source.DatasetVersionError, match="not a LeRobot dataset"):
        source.check_version({})
    assert source.check_version({"codebase_version": "v3.0"}) == "v3.0"
    with pytest.raises(source.StreamError, match="no meta/info.json"):
        stream.open_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------ torchcodec / zero frames


def test_torchcodec_unavailable_gives_our_error(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # "import torchcodec.decoders" now fails
    with pytest.raises(source.StreamError) as exc:
        stream.open_dataset(small.root)
    msg = str(exc.value)
    assert "torchcodec" in msg and "ZERO frames" in msg and "ffmpeg" in msg.lower() and "\n" not in msg


def test_zero_frames_gives_ffmpeg_explanation(small, monkeypatch):
    """What a missing FFmpeg looks like inside lerobot: the decoder raises RuntimeError, lerobot swallows it, the
    stream ends with zero frames. We must turn that into the FFmpeg explanation with the real decoder error."""
    import lerobot.datasets.streaming_dataset as sd
    import lerobot.datasets.video_utils as vu

    def broken(*args, **kwargs):
        raise RuntimeError("Could not load libtorchcodec. Likely causes: FFmpeg is not installed")

    monkeypatch.setattr(sd, "decode_video_frames_torchcodec", broken)
    monkeypatch.setattr(vu, "decode_video_frames_torchcodec", broken)
    with pytest.raises(source.StreamError) as exc:
        stream.open_dataset(small.root)
    msg = str(exc.value)
    assert "ZERO frames" in msg and "FFmpeg" in msg and "Could not load libtorchcodec" in msg and "\n" not in msg


def test_zero_frames_from_an_empty_iterator(small, monkeypatch):
    ds = stream.open_dataset(small.root, probe=False)
    monkeypatch.setattr(type(ds).__mro__[1], "__iter__", lambda self: iter(()))
    with pytest.raises(source.StreamError, match="ZERO frames"):
        stream.probe_first_frames(ds, timeout_s=30)
    ts = stream.TrainingStream(small.root, ds=ds)
    with pytest.raises(source.StreamError, match="ZERO frames"):
        list(ts.epoch())


def test_first_frame_timeout(small, monkeypatch):
    import time

    ds = stream.open_dataset(small.root, probe=False)

    def slow(self):
        time.sleep(5)
        yield from ()

    monkeypatch.setattr(type(ds).__mro__[1], "__iter__", slow)
    with pytest.raises(source.StreamError, match="no frame arrived within 1 s"):
        stream.probe_first_frames(ds, timeout_s=1)


# ------------------------------------------------------------------------------------------------ the two lerobot fixes


def test_episode_filter_is_applied(small, rows):
    wanted = [r["episode_index"] for r in rows if r["split"] == "finetune"][:4]
    ds = stream.open_dataset(small.root, episodes=wanted, shuffle=False)
    seen = set()
    with stream.torch_threads(1):
        for fr in ds:
            seen.add((int(fr["episode_index"]), int(fr["frame_index"])))
    assert {e for e, _ in seen} == set(wanted)
    assert len(seen) == ds.num_frames == sum(rows[e]["length"] for e in wanted)
    assert ds.num_episodes == 4
    with pytest.raises(ValueError, match="not in the dataset"):
        stream.open_dataset(small.root, episodes=[10_000], probe=False)
    with pytest.raises(ValueError, match="no episodes"):
        stream.TrainingStream(small.root, episodes=[])


def test_frames_from_the_second_video_file_are_the_right_ones(small, rows):
    last = rows[-1]
    ds = stream.open_dataset(small.root, episodes=[last["episode_index"]], shuffle=False)
    assert ds._episode_table.at[last["episode_index"], "videos/observation.images.image_0/from_timestamp"] >= 0
    frames = episodes.collect_episodes(ds, [last["episode_index"]])[last["episode_index"]]
    ep = world.generate_episode(last["canonical_task"], last["seed"], split=last["split"], prompt=last["task"])
    assert len(frames) == len(ep)
    for fr, ref in zip(frames, ep.frames):
        img = to_uint8_hwc(fr["observation.images.image_0"]).astype(np.float64)
        assert np.abs(img - ref["observation.images.image_0"]).mean() < 8.0


def test_upstream_streaming_bug_is_still_there(small, rows):
    """Canary: lerobot 0.4.4's own class looks frames up at index / fps and fails past the first video file.
    If this starts failing after a lerobot upgrade, the workaround in BridgeStreamingDataset can go."""
    from lerobot.datasets.streaming_dataset import StreamingLeRobotDataset

    ds = StreamingLeRobotDataset(build.REPO_ID, root=small.root, buffer_size=1, shuffle=False)
    with pytest.raises(IndexError):
        with stream.torch_threads(1):
            for _ in ds:
                pass


def test_our_make_frame_yields_what_lerobots_yields(small, rows):
    """BridgeStreamingDataset.make_frame skips lerobot's per-frame metadata-row reads; on every camera and the
    second video file it must yield the same keys, values and dtypes as lerobot's own make_frame (which calls our
    file-relative _query_videos)."""
    from lerobot.datasets.streaming_dataset import StreamingLeRobotDataset
    from lerobot.datasets.utils import safe_shard

    eps = [rows[0]["episode_index"], rows[-1]["episode_index"]]
    ds = stream.open_dataset(small.root, episodes=eps, cameras="all", shuffle=False, probe=False)
    assert len(ds.meta.video_keys) >= 2 and ds.cameras == tuple(ds.meta.video_keys)

    def frames(make_frame):
        out = []
        for shard in range(ds.num_shards):
            it = ds._make_backtrackable_dataset(safe_shard(ds.hf_dataset, shard, ds.num_shards))
            while True:
                try:
                    out.extend(make_frame(ds, it))
                except (RuntimeError, StopIteration):
                    break
        return out

    with stream.torch_threads(1):
        ours, theirs = frames(type(ds).make_frame), frames(StreamingLeRobotDataset.make_frame)
    assert len(ours) == len(theirs) == sum(rows[e]["length"] for e in eps)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k in a:
            if hasattr(a[k], "dtype"):
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and (a[k] == b[k]).all(), k
            else:
                assert a[k] == b[k], k


# ------------------------------------------------------------------------------------------------ schema


def test_schema(small):
    ds = stream.open_dataset(small.root)
    s = schema.schema(ds)
    assert set(s["cameras"]) == set(world.IMAGE_KEYS)
    assert s["cameras"]["observation.images.image_0"]["shape"] == [128, 128, 3]
    assert s["vectors"]["action"] == {"dim": 7, "names": list(world.ACTION_NAMES)}
    assert s["vectors"]["observation.state"]["dim"] == 8
    assert s["fps"] == 5 and s["total_episodes"] == sum(SMALL.values())
    assert len(s["first_frames"]) == 3
    tasks = schema.task_table(ds.meta)
    f0 = ds.first_frames[0]
    assert s["first_frames"][0]["task"] == tasks[int(f0["task_index"])] == f0["task"]
    text = schema.format_schema(s)
    assert "observation.images.image_1" in text and "dx dy dz droll dpitch dyaw gripper" in text and "meta/tasks" in text


# ------------------------------------------------------------------------------------------------ counting


def test_sample_counter():
    c = counting.SampleCounter(strict=False)
    c.start_epoch(0, expected=3)
    for e, f in [(0, 0), (0, 1), (1, 0)]:
        c.add(e, f)
    c.start_epoch(1, expected=3)
    for e, f in [(0, 0), (1, 0)]:
        c.add(e, f)
    assert (c.frames, c.unique, c.repeats, c.repeats_in_epoch) == (5, 3, 2, 0)
    assert c.epochs[1].repeats_from_earlier_epochs == 2 and c.epochs[1].new == 0
    c.add(1, 0)  # twice within epoch 1
    assert c.repeats_in_epoch == 1 and c.as_dict()["repeats_within_an_epoch"] == 1
    assert "repeated within the epoch" in c.summary()
    strict = counting.SampleCounter()
    strict.add(0, 0)
    with pytest.raises(counting.RepeatedSampleError):
        strict.add(0, 0)


def test_training_stream_epochs_batches_and_resume(small, rows):
    train = [r["episode_index"] for r in rows if r["split"] == "finetune" and r["task"]]
    ts = stream.TrainingStream(small.root, episodes=train, image_size=96, seed=0, buffer_size=64)
    n = ts.epoch_frames
    batches = list(ts.batches(8, n_batches=(2 * n) // 8 + 2))
    item = batches[0][0]
    assert item["image"].shape == (96, 96, 3) and item["image"].dtype == np.uint8
    assert item["action"].shape == (7,) and isinstance(item["instruction"], str) and item["instruction"]
    c = ts.counter
    assert c.unique == n and c.repeats_in_epoch == 0
    assert [e.frames for e in c.epochs[:2]] == [n, n] and c.epochs[1].repeats_from_earlier_epochs == n
    assert c.repeats == c.frames - n

    # iterate(start) (training.FrameSource): same order as an uninterrupted run
    full = [(x["episode_index"], x["frame_index"]) for _, x in zip(range(n + 10), ts.iterate(0))]
    ts2 = stream.TrainingStream(small.root, ds=ts.ds, image_size=96, seed=0)
    resumed = [(x["episode_index"], x["frame_index"]) for _, x in zip(range(10), ts2.iterate(n))]
    assert resumed == full[n:n + 10]
    assert sorted(full[:n]) == sorted(set(full[:n])) and full[n:n + 10] != full[:10]  # epochs reshuffle
    assert [(x["episode_index"], x["frame_index"]) for _, x in zip(range(5), ts2.iterate(3))] == full[3:8]


def test_dataloader_workers_split_episodes(small, rows):
    train = [r["episode_index"] for r in rows if r["split"] == "finetune"]
    ts = stream.TrainingStream(small.root, episodes=train, image_size=64, buffer_size=32)
    counter = counting.SampleCounter()
    for batch in stream.dataloader(ts, num_workers=2, batch_size=16):
        for item in batch:
            counter.add(item["episode_index"], item["frame_index"])
    assert counter.frames == ts.epoch_frames == counter.unique  # every frame once: no worker duplicates, none lost


def test_policy_image_size():
    assert stream.policy_image_size("openvla") == 224 and stream.policy_image_size("tiny") == 128


# ------------------------------------------------------------------------------------------------ figures + bench


def test_data_figures(small, rows, tmp_path):
    from vla_bridge import plots

    train = [r["episode_index"] for r in rows if r["split"] == "finetune"]
    ds = stream.open_dataset(small.root, episodes=train, probe=False)
    out = plots.plot_data_figures(ds, train, tmp_path / "figures", n=3, seed=0)
    assert out["episodes"] == plots.pick_episodes(train, 3, 0) and len(out["episodes"]) == 3
    for key in ("episode_frames", "action_stream"):
        assert out[key].is_file() and out[key].stat().st_size > 10_000
        assert out[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_loader_small(small, capsys):
    from vla_bridge.__main__ import main

    assert main(["bench-loader", str(small.root), "--frames", "150", "--workers", "0", "--buffer-size", "32",
                 "--trainer-steps", "2", "--trainer-warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "bare stream" in out and "pipeline overhead" in out and "x bare" in out
    # the trainer row (the tiny VLA at 128 px) and the pipeline timed again at its size for the trainer ratio
    assert "trainer (tiny VLA + LoRA, in-memory frames)" in out and "resize 128" in out
    for name in ("overhead", "pipeline_vs_trainer"):
        assert f"RATIO bench-loader.{name} = " in out
    assert "workers_vs_bare" not in out  # no workers row, no ratio
