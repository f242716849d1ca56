"""Every figure the notebook writes is read back from its pixels: a sheet of empty panels, or a plot with no line,
is caught by ``plots.check_figure`` (and by ``python -m vla_bridge check-figures`` after the CI notebook run)."""

from __future__ import annotations

import numpy as np

from vla_bridge import __main__ as cli
from vla_bridge import plots

ROWS = [{"episode": e, "group": "heldout", "task": "put the red spoon in the pot", "l1": 0.1 * e, "success": False}
        for e in range(1, 7)]


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_a_contact_sheet_of_empty_panels_is_caught(tmp_path):
    empty = plots.plot_worst_episodes(ROWS, [None] * len(ROWS), tmp_path / "a")
    full = plots.plot_worst_episodes(ROWS, _frames(len(ROWS)), tmp_path / "b")
    assert plots.colour_fraction(empty) < 0.01 < 0.3 < plots.colour_fraction(full)
    assert "its panels hold no images" in plots.check_figure(empty)
    assert plots.check_figure(full) is None


def test_a_loss_curve_without_a_line_is_caught(tmp_path):
    log = [{"step": s, "loss": 2.0 / s, "action_accuracy": min(1.0, 0.1 * s), "lr": 1e-3} for s in range(1, 30)]
    curve = plots.plot_loss_curve(log, tmp_path / "loss_curve.png")
    assert plots.check_figure(curve) is None
    plt = plots._plt()
    fig, ax = plt.subplots()
    ax.set_title("loss")  # axes and a title, nothing plotted
    fig.savefig(tmp_path / "blank_curve.png")
    plt.close(fig)
    assert "no line or bar is drawn" in plots.check_figure(tmp_path / "blank_curve.png")


def test_check_figures_cli_fails_on_an_empty_sheet(tmp_path, capsys):
    plots.plot_worst_episodes(ROWS, _frames(len(ROWS)), tmp_path / "ok")
    assert cli.main(["check-figures", str(tmp_path / "ok")]) == 0
    assert "1 of 1 figures show content" in capsys.readouterr().out
    plots.plot_worst_episodes(ROWS, [None] * len(ROWS), tmp_path / "bad")
    assert cli.main(["check-figures", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("check-figures:") == 1 and "bad/worst_episodes.png" in err
    assert cli.main(["check-figures", str(tmp_path / "nothing")]) == 1


def test_action_axes_have_units_under_the_datasets_own_names():
    assert [plots._unit(n) for n in ("x", "y", "z", "roll", "pitch", "yaw", "gripper")] == \
        ["m", "m", "m", "rad", "rad", "rad", "1 = open"]
    assert plots._unit("dx") == "m" and plots._unit("Delta_Yaw") == "rad" and plots._unit("motor_3") == ""


def test_the_rank_sweep_shows_motion_and_gripper_apart(tmp_path):
    from PIL import Image

    from vla_bridge.ablations import AblationRun

    def summary(mean):
        return {"mean": mean, "ci": [0.8 * mean, 1.2 * mean], "n": 8}

    def run(rank, split):
        g = {"n_episodes": 8, "success_rate": summary(0.1), "mean_l1_action_error": summary(0.04)}
        if split:
            g.update(l1_motion=summary(0.01 * rank / 8), l1_gripper=summary(0.2))
        return AblationRun(f"r{rank}", rank, rank / 2, 75, 1000, 1.0, 1.0, {"heldout": g}, [])

    split = plots.plot_rank_sweep([run(r, True) for r in (8, 16, 32)], tmp_path / "split.png")
    legacy = plots.plot_rank_sweep([run(r, False) for r in (8, 16, 32)], tmp_path / "legacy.png")
    assert Image.open(split).width == 1815 and Image.open(legacy).width == 1210   # 3 panels vs 2 (5.5 in each)
    assert plots.check_figure(split) is None and plots.check_figure(legacy) is None
