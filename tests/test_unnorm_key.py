"""UNNORM_KEY: a typo of one of the model's keys stops with "did you mean"; a new dataset's key is allowed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from vla_bridge import hardware as hwm
from vla_bridge.config import resolve_run_config
from vla_bridge.hardware import Decision, HardwareInfo, PreflightError
from vla_bridge.models.policy import PolicyLoadError, load_policy

torch.set_num_threads(1)

STATS = {"action": {"q01": [-0.03, -0.04, -0.03, -0.08, -0.09, -0.2, 0.0],
                    "q99": [0.03, 0.04, 0.04, 0.08, 0.08, 0.2, 1.0], "mask": [True] * 6 + [False]}}
CPU = HardwareInfo(cuda_available=False, device_name="cpu", gpu_count=0, total_vram_gb=0.0, free_vram_gb=0.0,
                   bf16_supported=False, cpu_count=2, ram_gb=8.0, python="3.11", platform="Linux x86_64")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random VLA saved like a hub checkpoint, with OpenVLA's Bridge key (and a second one)."""
    from vla_bridge.models.tiny_vla import build_tiny_vla

    model, processor = build_tiny_vla(norm_stats={"bridge_orig": STATS, "fractal20220817_data": STATS},
                                      image_size=32, vision_width=32, vision_depth=2, vision_heads=2, hidden_size=32,
                                      num_layers=1, num_heads=2, intermediate_size=64)
    d = tmp_path_factory.mktemp("ckpt") / "vla"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _cfg(checkpoint, dataset_dir, unnorm_key):
    return resolve_run_config({"POLICY": "openvla", "MODEL_ID": str(checkpoint), "DATASET": str(dataset_dir),
                               "UNNORM_KEY": unnorm_key}, env={}, hw=CPU, hub=Decision("no", "test"))


@pytest.mark.parametrize("typo, meant", [("bridge_orgi", "bridge_orig"), ("Bridge_Orig", "bridge_orig"),
                                         ("bridge-orig", "bridge_orig"), ("fractal20220817", "fractal20220817_data")])
def test_typo_of_an_existing_key_is_named(typo, meant):
    assert hwm.unnorm_key_typo(typo, ["bridge_orig", "fractal20220817_data", "kuka"]) == meant


@pytest.mark.parametrize("new", ["my_widowx", "bridge_v3", "demo_world", "bridge"])
def test_a_new_datasets_key_is_not_a_typo(new):
    assert hwm.unnorm_key_typo(new, ["bridge_orig", "fractal20220817_data", "kuka"]) is None
    assert hwm.unnorm_key_typo("bridge_orig", ["bridge_orig"]) is None     # an existing key is no typo either


def test_typo_stops_in_the_first_cell_when_the_checkpoint_is_local(checkpoint, tmp_path):
    with pytest.raises(PreflightError) as e:
        _cfg(checkpoint, tmp_path, "bridge_orgi")
    msg = str(e.value)
    assert "\n" not in msg and "UNNORM_KEY='bridge_orgi'" in msg and "did you mean 'bridge_orig'?" in msg
    assert hwm.model_norm_stats_keys(str(checkpoint)) == ["bridge_orig", "fractal20220817_data"]


def test_typo_stops_after_loading_and_a_new_key_is_registered_as_new(checkpoint, tmp_path):
    """Where config.json could not be read up front (a hub id not yet downloaded), the loaded model's keys decide."""
    cfg = dataclasses.replace(_cfg(checkpoint, tmp_path, "my_widowx"), unnorm_key="bridge_orgi")
    with pytest.raises(PolicyLoadError) as e:
        load_policy(cfg, STATS, progress=False)
    assert "\n" not in str(e.value) and "did you mean 'bridge_orig'?" in str(e.value)

    loaded = load_policy(_cfg(checkpoint, tmp_path, "my_widowx"), STATS, progress=False)
    note = next(n for n in loaded.notes if "UNNORM_KEY" in n)
    assert "'my_widowx'" in note and "a NEW key" in note and "bridge_orig" in note
    assert loaded.model.config.norm_stats["my_widowx"]["action"]["q01"] == STATS["action"]["q01"]
    replaced = load_policy(_cfg(checkpoint, tmp_path, "bridge_orig"), STATS, progress=False)
    assert any("replacing the base model's entry" in n for n in replaced.notes)
