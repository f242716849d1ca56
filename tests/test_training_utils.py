"""Schedule, smoothing/descent check and atomic directory writes (no model needed)."""

from __future__ import annotations

import pytest

import json
import math
import os

from vla_bridge.checkpoints import (LATEST, META_FILE, STATE_FILE, _atomic_dir_write, _publish_latest, clean_leftovers,
                                    resume_checkpoint)
from vla_bridge.train_log import loss_descent_check, smoothed
from vla_bridge.training import divergence, lr_lambda


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(warmup_steps=50, max_steps=1000)
    assert f(0) == pytest.approx(1 / 50)
    assert f(24) == pytest.approx(25 / 50)
    assert f(49) == pytest.approx(1.0)
    assert f(50) == pytest.approx(1.0)
    assert f(525) == pytest.approx(0.5, abs=1e-9)          # halfway through the cosine
    assert f(1000) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(50, 999))   # monotone decay after warmup
    g = lr_lambda(0, 10)
    assert g(0) == pytest.approx(1.0) and g(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_smoothing_and_descent_check():
    assert smoothed([1.0, 0.0], alpha=0.5) == [1.0, 0.5]
    falling = [{"step": 10 * (i + 1), "loss": 5.0 * 0.95**i} for i in range(60)]
    res = loss_descent_check(falling, within_steps=500)
    assert res["ok"] and res["steps"] == 500 and res["ratio"] < 0.7
    flat = [{"step": 10 * (i + 1), "loss": 2.0 + 0.01 * (i % 3)} for i in range(60)]
    assert not loss_descent_check(flat)["ok"]
    assert not loss_descent_check([{"step": 1, "loss": 1.0}])["ok"]


def test_atomic_dir_write_replaces_and_leaves_no_partial(tmp_path):
    final = tmp_path / "latest"

    def good(tmp):
        tmp.mkdir()
        (tmp / "a.txt").write_text("v1")

    _atomic_dir_write(final, good)
    assert (final / "a.txt").read_text() == "v1"

    def crash(tmp):
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        _atomic_dir_write(final, crash)
    assert (final / "a.txt").read_text() == "v1"  # the previous checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["latest"]

    def v2(tmp):
        tmp.mkdir()
        (tmp / "b.txt").write_text("v2")

    _atomic_dir_write(final, v2)
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def _fake_checkpoint(ck, step, saved_at, complete=True):
    d = ck / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_text("w")
    if complete:
        (d / STATE_FILE).write_text("s")
    (d / META_FILE).write_text(json.dumps({"step": step, "saved_at": saved_at}))
    return d


def test_resume_picks_the_newest_complete_checkpoint_and_leftovers_go(tmp_path):
    ck = tmp_path / "checkpoints" / "run"
    _fake_checkpoint(ck, 500, saved_at=100.0)           # an earlier run under the same name, more steps
    _fake_checkpoint(ck, 20, saved_at=200.0)
    _publish_latest(ck, ck / "step_000020")
    _fake_checkpoint(ck, 40, saved_at=300.0)            # renamed into place, killed before `latest` moved
    _fake_checkpoint(ck, 60, saved_at=400.0, complete=False)
    (ck / ".step_000080.tmp-123").mkdir()               # a killed writer's leftovers
    (ck / ".latest.old-123").mkdir()
    os.symlink("step_000020", ck / ".latest.tmp-123")
    assert os.readlink(ck / LATEST) == "step_000020"   # relative: the run folder can move
    assert resume_checkpoint(ck).name == "step_000040"
    assert clean_leftovers(ck) == [".latest.old-123", ".latest.tmp-123", ".step_000080.tmp-123"]
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000020", "step_000040", "step_000060",
                                                     "step_000500"]
    assert resume_checkpoint(tmp_path / "nothing") is None


def test_a_copied_latest_directory_becomes_the_symlink(tmp_path):
    ck = tmp_path / "run"
    d = _fake_checkpoint(ck, 10, saved_at=1.0)
    (ck / LATEST).mkdir()                               # the layout before the symlink
    (ck / LATEST / "adapter_model.safetensors").write_text("old")
    _publish_latest(ck, d)
    clean_leftovers(ck)
    assert (ck / LATEST).is_symlink() and (ck / LATEST / "adapter_model.safetensors").read_text() == "w"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_000010"]


def test_divergence_rule():
    ln_v = math.log(1086)
    assert divergence(6.99, 1.43, ln_v) and "uniform" in divergence(6.99, 1.43, ln_v)   # the LR=1e6 run
    assert divergence(4.5, 1.43, ln_v) and "3×" in divergence(4.5, 1.43, ln_v)
    assert divergence(1.2, 1.43, ln_v) is None and divergence(3.0, 1.43, ln_v) is None
    assert divergence(7.0, 7.2, ln_v) is None        # a run that starts at uniform (from scratch) is not diverging
