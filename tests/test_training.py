"""The shared training loop on the real embedded dataset with the tiny VLA: learning, resume parity, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import get_peft_model

from vla_bridge.data.build import ensure_demo_dataset
from vla_bridge.data.splits import make_split
from vla_bridge.data.stats import compute_action_stats, norm_stats_entry
from vla_bridge.data.stream import TrainingStream
from vla_bridge.models.openvla import lora_config
from vla_bridge.models.tiny_vla import build_tiny_vla
from vla_bridge.training import STATE_FILE, TrainConfig, TrainingError, read_log, train

KEY = "demo_world"
SMALL = dict(image_size=64, vision_width=96, vision_depth=2, hidden_size=128, num_layers=2, intermediate_size=256)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = ensure_demo_dataset(tmp_path_factory.mktemp("data"), episodes={"pretrain": 0, "finetune": 12},
                               image_size=64).root
    split = make_split(root)
    stream = TrainingStream(root, episodes=split.train, image_size=64, seed=0)
    stats = {KEY: norm_stats_entry(compute_action_stats(stream.ds, split.train, source="stream"))}
    return root, split, stats


def _model(stats, rank=8, seed=0):
    torch.manual_seed(seed)
    model, processor = build_tiny_vla(norm_stats=stats, seed=seed, **SMALL)
    return get_peft_model(model, lora_config(rank, 16, model=model)), processor


def _cfg(tmp_path, **kw):
    base = dict(run_name="t", outputs_dir=str(tmp_path), batch_size=8, grad_accum=1, learning_rate=2e-3,
                warmup_steps=2, log_every=2, save_every=1000, seed=0, image_aug=True, unnorm_key=KEY, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_short_run_lowers_loss_and_raises_accuracy(demo, tmp_path):
    torch.set_num_threads(1)
    root, split, stats = demo
    model, processor = _model(stats, rank=16)
    res = train(model, processor, TrainingStream(root, episodes=split.train, image_size=64, seed=0), stats,
                _cfg(tmp_path, max_steps=40, log_every=4))
    log = read_log(res.log_path)
    assert res.steps == 40 and len(log) == 10
    first, last = log[0], log[-1]
    assert last["loss"] < 0.7 * first["loss"], (first, last)
    assert last["action_accuracy"] > first["action_accuracy"]
    assert {"step", "loss", "action_accuracy", "l1", "lr"} <= set(first)
    latest = tmp_path / "checkpoints" / "t" / "latest"
    assert sorted(p.name for p in latest.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", STATE_FILE, "dataset_statistics.json", "README.md"]
    ) or {"adapter_model.safetensors", "adapter_config.json", STATE_FILE, "dataset_statistics.json"} <= {
        p.name for p in latest.iterdir()}
    saved = json.loads((latest / "dataset_statistics.json").read_text())
    assert saved[KEY]["action"]["q01"] == pytest.approx(stats[KEY]["action"]["q01"])
    assert (tmp_path / "checkpoints" / "t" / "step_000040").is_dir()


def test_interrupted_and_resumed_matches_uninterrupted(demo, tmp_path):
    torch.set_num_threads(1)
    root, split, stats = demo

    def run(out, **kw):
        model, processor = _model(stats, seed=0)
        stream = TrainingStream(root, episodes=split.train, image_size=64, seed=0)
        return model, train(model, processor, stream, stats, _cfg(out, max_steps=8, save_every=4, **kw))

    full_model, full = run(tmp_path / "a")
    _, first = run(tmp_path / "b", stop_after=4)          # "killed" right after the step-4 checkpoint
    assert first.steps == 4 and first.stopped_reason == "stop_after=4"
    resumed_model, resumed = run(tmp_path / "b", resume=True)
    assert resumed.steps == full.steps == 8 and resumed.frames_seen == full.frames_seen
    a = {k: v for k, v in full_model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed_model.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    assert [r["step"] for r in read_log(resumed.log_path)] == [r["step"] for r in read_log(full.log_path)]
    la, lb = read_log(full.log_path), read_log(resumed.log_path)
    assert la[-1]["loss"] == pytest.approx(lb[-1]["loss"], rel=1e-4)


def test_wrong_unnorm_key_is_a_clear_error(demo, tmp_path):
    root, split, stats = demo
    model, processor = _model(stats)
    with pytest.raises(TrainingError, match=r"unnorm_key 'bridge_orig' not in the dataset statistics \['demo_world'\]"):
        train(model, processor, TrainingStream(root, episodes=split.train, image_size=64), stats,
              _cfg(tmp_path, max_steps=1, unnorm_key="bridge_orig"))
    with pytest.raises(ValueError, match="demo_world"):
        base = model.get_base_model()
        inputs = processor("In: What action should the robot take to x?\nOut:", np.zeros((64, 64, 3), np.uint8))
        base.predict_action(**inputs, unnorm_key="bridge_orig")


@pytest.mark.parametrize("rank", [0, -3])
def test_nonpositive_rank_is_a_clear_error(rank):
    with pytest.raises(ValueError, match="rank"):
        lora_config(rank, 16)


def test_empty_training_split_is_a_clear_error(demo):
    root, _, _ = demo
    with pytest.raises(ValueError, match="no episodes"):
        TrainingStream(root, episodes=[], image_size=64)


def test_resume_without_checkpoint_is_a_clear_error(demo, tmp_path):
    root, split, stats = demo
    model, processor = _model(stats)
    with pytest.raises(TrainingError, match="RESUME=True but"):
        train(model, processor, TrainingStream(root, episodes=split.train, image_size=64), stats,
              _cfg(tmp_path, max_steps=2, resume=True))
