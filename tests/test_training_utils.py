"""Schedule, smoothing/descent check and atomic directory writes (no model needed)."""

from __future__ import annotations

import math

import pytest

from vla_bridge.training import _atomic_dir_write, loss_descent_check, lr_lambda, smoothed


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
