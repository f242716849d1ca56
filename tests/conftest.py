"""Shared fixtures: one small embedded dataset, built once per test session."""

from __future__ import annotations

import pytest

from vla_bridge.data import build

# 56 episodes with a 1 MB video-file cap: each camera's video spans two MP4 files, which is the layout that breaks
# lerobot 0.4.4's streaming lookup (and that Bridge has everywhere).
SMALL = {"pretrain": 20, "finetune": 16, "heldout": 5, "heldout_family": 5, "unseen_color": 5, "paraphrase": 5}


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """The small embedded dataset (a DemoBuild); later calls with the same key reuse it from disk."""
    return build.ensure_demo_dataset(tmp_path_factory.getbasetemp() / "vla_data", episodes=SMALL, video_file_size_mb=1)


@pytest.fixture(scope="session")
def bridge_layout(tmp_path_factory):
    """A small LeRobot v3.0 dataset with Bridge's layout (dict-form names, lerobot's own stats.json with quantiles,
    a main and a black side camera), written with lerobot's writer (vla_bridge/data/bridge_layout.py)."""
    from vla_bridge.data.bridge_layout import write_bridge_layout

    return write_bridge_layout(tmp_path_factory.getbasetemp() / "bridge_layout", image_size=32)
