"""The shared training loop on the real embedded dataset with the tiny VLA: learning, resume parity, errors,
seeding, divergence, blown-up weights, kills inside the checkpoint writer and resumes with changed parameters."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla_bridge.checkpoints import LATEST, MAX_ABS_WEIGHT, META_FILE, STATE_FILE, TrainingError, resume_checkpoint
from vla_bridge.data.build import ensure_demo_dataset
from vla_bridge.data.splits import make_split
from vla_bridge.data.stats import compute_action_stats, norm_stats_entry
from vla_bridge.data.stream import TrainingStream
from vla_bridge.models.openvla import attach_lora, lora_config
from vla_bridge.models.tiny_vla import build_tiny_vla
from vla_bridge.train_log import read_log
from vla_bridge.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent

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


def _model(stats, rank=8, seed=0, alpha=16):
    model, processor = build_tiny_vla(norm_stats=stats, seed=seed, **SMALL)
    return attach_lora(model, rank, alpha, seed=seed), processor


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


# ----------------------------------------------------------------------------------------------- helpers


def _stream(demo):
    root, split, _ = demo
    return TrainingStream(root, episodes=split.train, image_size=64, seed=0)


def _adapter(ckpt: Path) -> dict:
    return load_file(str(ckpt / "adapter_model.safetensors"))


def _lora(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _log_without_time(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_log(path)]


def _complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).is_file() and (ckpt / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- 1. seeding


def test_same_seed_gives_bit_identical_adapters_and_logs(demo, tmp_path):
    """SEED fixes the LoRA init even when the global RNG was used differently before LoRA is attached."""
    torch.set_num_threads(1)
    _, _, stats = demo
    runs = []
    for i, noise in enumerate((123, 456)):
        base, processor = build_tiny_vla(norm_stats=stats, seed=0, **SMALL)
        torch.manual_seed(noise)
        torch.rand(int(noise))                      # whatever ran before (data, augmentation, other models)
        model = attach_lora(base, 8, 16, seed=0)
        init = _lora(model)
        res = train(model, processor, _stream(demo), stats, _cfg(tmp_path / str(i), max_steps=4, save_every=4))
        runs.append((init, _lora(model), _log_without_time(res.log_path), _adapter(res.last_checkpoint)))
    (init_a, end_a, log_a, file_a), (init_b, end_b, log_b, file_b) = runs
    for a, b in ((init_a, init_b), (end_a, end_b), (file_a, file_b)):
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert log_a == log_b and len(log_a) == 2


def test_every_lora_attachment_goes_through_the_seeded_helper():
    for rel in ("notebook.py", "vla_bridge/ablations.py", "vla_bridge/tools/bench_train.py"):
        text = (ROOT / rel).read_text()
        assert "get_peft_model(" not in text and "attach_lora(" in text, rel


# ----------------------------------------------------------------------------------------------- 3. divergence


def _scale_loss_after(model, calls: int, factor: float):
    """A forward hook that multiplies the loss by ``factor`` after the first ``calls`` forwards: a run that diverges."""
    seen = {"n": 0}

    def hook(module, args, out):
        seen["n"] += 1
        if seen["n"] > calls:
            out.loss = out.loss * factor
        return out

    return model.register_forward_hook(hook)


def test_divergence_stops_and_keeps_the_good_latest(demo, tmp_path):
    torch.set_num_threads(1)
    _, _, stats = demo
    model, processor = _model(stats)
    good = train(model, processor, _stream(demo), stats, _cfg(tmp_path, max_steps=4, save_every=4))
    latest = tmp_path / "checkpoints" / "t" / LATEST
    before = _adapter(latest)
    assert latest.resolve() == good.last_checkpoint.resolve()

    # a new run under the same name diverges; a checkpoint falls on a step whose loss is already 5× the start
    handle = _scale_loss_after(model, 2, 5.0)
    with pytest.raises(TrainingError) as exc:
        train(model, processor, _stream(demo), stats, _cfg(tmp_path, max_steps=20, save_every=3))
    handle.remove()
    msg = str(exc.value)
    assert "diverged" in msg and "step 3" in msg and "LEARNING_RATE" in msg and "\n" not in msg
    assert latest.resolve().name == "step_000004" and not (latest.parent / "step_000003").exists()
    after = _adapter(latest)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # no checkpoint in reach: the smoothed loss stops the run within a few steps
    handle = _scale_loss_after(model, 2, 5.0)
    with pytest.raises(TrainingError, match=r"stopped at step \d: diverged — the loss rose from"):
        train(model, processor, _stream(demo), stats, _cfg(tmp_path / "b", max_steps=20, save_every=1000))
    handle.remove()


# ----------------------------------------------------------------------------------------------- 4. bad weights


@pytest.mark.parametrize("lr", [math.inf, 1e30])
def test_blown_up_weights_are_never_checkpointed(demo, tmp_path, lr):
    torch.set_num_threads(1)
    _, _, stats = demo
    model, processor = _model(stats)
    train(model, processor, _stream(demo), stats, _cfg(tmp_path, max_steps=2, save_every=2))
    with pytest.raises(TrainingError, match="the weights hold NaN/inf|the run blew up|non-finite loss") as exc:
        train(model, processor, _stream(demo), stats, _cfg(tmp_path, max_steps=6, save_every=1, learning_rate=lr))
    assert "\n" not in str(exc.value)
    ck = tmp_path / "checkpoints" / "t"
    assert (ck / LATEST).resolve().name == "step_000002"
    for d in ck.glob("step_*"):
        w = _adapter(d)
        assert all(torch.isfinite(v).all() and float(v.abs().max()) <= MAX_ABS_WEIGHT for v in w.values()), d.name


# ----------------------------------------------------------------------------------------------- 5. kill anywhere


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing catches it."""


FS_STEPS = [(Path, "mkdir"), (Path, "rename"), (Path, "write_text"), (Path, "unlink"), (os, "replace"),
            (os, "symlink"), (shutil, "rmtree"), (torch, "save")]


def test_kill_at_every_filesystem_step_of_the_writer_then_resume(demo, tmp_path, monkeypatch):
    """Kill the step-4 save after its k-th filesystem step, for every k; RESUME continues from the newest complete
    checkpoint and ends where an uninterrupted run ends."""
    torch.set_num_threads(1)
    _, _, stats = demo
    model, processor = _model(stats)
    full = train(model, processor, _stream(demo), stats, _cfg(tmp_path / "full", max_steps=4, save_every=2))
    want = _lora(model)

    state = {"armed": False, "n": 0, "kill_at": 0}

    def killing(fn):
        def wrapper(*a, **kw):
            out = fn(*a, **kw)
            if state["armed"]:
                state["n"] += 1
                if state["n"] == state["kill_at"]:
                    state["armed"] = False
                    raise Killed(state["n"])
            return out
        return wrapper

    for owner, name in FS_STEPS:
        monkeypatch.setattr(owner, name, killing(getattr(owner, name)))
    peft_cls = type(model)
    monkeypatch.setattr(peft_cls, "save_pretrained", killing(peft_cls.save_pretrained))

    def arm(row):
        if row["step"] == 4:  # on_log runs just before the step-4 checkpoint is written
            state.update(armed=True, n=0)

    outcomes = []
    for k in range(1, 40):
        out = tmp_path / f"k{k}"
        state.update(kill_at=k, armed=False)
        m, p = _model(stats)
        try:
            train(m, p, _stream(demo), stats, _cfg(out, max_steps=4, save_every=2), on_log=arm)
        except Killed:
            pass
        else:
            break  # the writer has fewer than k steps: every one of them was tried
        state["armed"] = False
        ck = out / "checkpoints" / "t"
        newest = "step_000004" if _complete(ck / "step_000004") else "step_000002"
        latest = ck / LATEST
        assert not latest.exists() or _complete(latest), k  # whatever `latest` shows is complete
        assert resume_checkpoint(ck).name == newest, k
        m, p = _model(stats)
        res = train(m, p, _stream(demo), stats, _cfg(out, max_steps=4, save_every=2, resume=True))
        assert res.resumed_from.name == newest and res.steps == 4, k
        got = _lora(m)
        assert max(float((want[n] - got[n]).abs().max()) for n in want) < 1e-5, k
        assert latest.resolve().name == "step_000004" and _complete(latest), k
        assert not [q.name for q in ck.iterdir() if re.fullmatch(r"\..*\.(tmp|old)-\d+", q.name)], k
        assert _log_without_time(res.log_path) == _log_without_time(full.log_path), k
        outcomes.append(newest)
    assert len(outcomes) >= 8 and {"step_000002", "step_000004"} <= set(outcomes), outcomes


# ----------------------------------------------------------------------------------------------- 6. resume checks


def test_resume_refuses_parameters_that_change_the_run(demo, tmp_path):
    torch.set_num_threads(1)
    _, _, stats = demo
    model, processor = _model(stats)
    train(model, processor, _stream(demo), stats, _cfg(tmp_path, max_steps=2, save_every=2))
    ckpt = tmp_path / "checkpoints" / "t" / "step_000002"
    saved = json.loads((ckpt / META_FILE).read_text())["run"]
    assert saved["LORA_RANK"] == 8 and saved["LORA_ALPHA"] == 16 and saved["LEARNING_RATE"] == 2e-3

    def resume(model_kw=None, **cfg_kw):
        m, p = _model(stats, **(model_kw or {}))
        return train(m, p, _stream(demo), stats, _cfg(tmp_path, max_steps=2, save_every=2, resume=True, **cfg_kw))

    for model_kw, cfg_kw, old, new in (({"rank": 16}, {}, "LORA_RANK=8", "LORA_RANK=16"),
                                       ({"alpha": 32}, {}, "LORA_ALPHA=16", "LORA_ALPHA=32"),
                                       (None, {"learning_rate": 1e-3}, "LEARNING_RATE=0.002", "LEARNING_RATE=0.001"),
                                       (None, {"batch_size": 4}, "BATCH_SIZE=8", "BATCH_SIZE=4")):
        with pytest.raises(TrainingError) as exc:
            resume(model_kw, **cfg_kw)
        msg = str(exc.value)
        assert msg.startswith("RESUME refused:") and "\n" not in msg and len(msg) < 400, msg
        assert f"was trained with {old}; this run asks for {new}" in msg, msg
    res = resume(log_every=1, progress=True)     # harmless changes are accepted
    assert res.resumed_from.name == "step_000002" and res.steps == 2
