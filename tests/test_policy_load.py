"""What load_policy checks right after loading: UNNORM_KEY typos ("did you mean"; a new dataset's key is allowed)
and that the policy reads its image (the silent-vision guard, openvla issue #346)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vla_bridge import preflight
from vla_bridge.config import resolve_run_config
from vla_bridge.hardware import Decision, HardwareInfo, PreflightError
from vla_bridge.models import openvla as ov
from vla_bridge.policy import PolicyLoadError, load_policy
from vla_bridge.models.tiny_vla import TinyVLAForActionPrediction, TinyVLAProcessor

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
    assert preflight.unnorm_key_typo(typo, ["bridge_orig", "fractal20220817_data", "kuka"]) == meant


@pytest.mark.parametrize("new", ["my_widowx", "bridge_v3", "demo_world", "bridge"])
def test_a_new_datasets_key_is_not_a_typo(new):
    assert preflight.unnorm_key_typo(new, ["bridge_orig", "fractal20220817_data", "kuka"]) is None
    assert preflight.unnorm_key_typo("bridge_orig", ["bridge_orig"]) is None     # an existing key is no typo either


def test_typo_stops_in_the_first_cell_when_the_checkpoint_is_local(checkpoint, tmp_path):
    with pytest.raises(PreflightError) as e:
        _cfg(checkpoint, tmp_path, "bridge_orgi")
    msg = str(e.value)
    assert "\n" not in msg and "UNNORM_KEY='bridge_orgi'" in msg and "did you mean 'bridge_orig'?" in msg
    assert preflight.model_norm_stats_keys(str(checkpoint)) == ["bridge_orig", "fractal20220817_data"]


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


# ---------------------------------------------------------------------------------------------------------------
# the silent-vision guard
# ---------------------------------------------------------------------------------------------------------------
def _load(checkpoint):
    return TinyVLAForActionPrediction.from_pretrained(str(checkpoint)).eval(), \
        TinyVLAProcessor.from_pretrained(str(checkpoint))


def _drop_image_in_generate(monkeypatch):
    """What transformers >= 4.50 does to OpenVLA (issue #346): generate()'s first step never reaches the vision
    path, so the prompt is scored without the image."""
    real = TinyVLAForActionPrediction.prepare_inputs_for_generation

    def blind(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out["pixel_values"] = None
        return out
    monkeypatch.setattr(TinyVLAForActionPrediction, "prepare_inputs_for_generation", blind)


def test_a_model_that_reads_its_image_passes(checkpoint):
    model, processor = _load(checkpoint)
    black, noise = (ov.first_action_token_probs(model, processor, im) for im in ov._probe_images(32))
    assert black.shape == (256,) and abs(float(black.sum()) - 1) < 1e-9
    tv = ov.check_reads_image(model, processor)
    assert tv == pytest.approx(0.5 * float((black - noise).abs().sum())) and tv > 100 * ov.VISION_CHECK_MIN_TV


def test_a_zeroed_projector_is_caught(checkpoint):
    model, processor = _load(checkpoint)
    with torch.no_grad():
        model.projector.fc2.weight.zero_()
        model.projector.fc2.bias.zero_()
    with pytest.raises(ov.SilentVisionError) as e:
        ov.check_reads_image(model, processor, "my-vla")
    msg = str(e.value)
    assert "\n" not in msg and "my-vla" in msg and "#346" in msg and "transformers 4.40.1" in msg


def test_generate_dropping_the_image_is_caught_with_the_version_and_pin(checkpoint, monkeypatch):
    model, processor = _load(checkpoint)
    _drop_image_in_generate(monkeypatch)
    monkeypatch.setattr(ov.transformers, "__version__", "4.50.0")   # the message names the running version
    with pytest.raises(ov.SilentVisionError) as e:
        ov.check_reads_image(model, processor)
    msg = str(e.value)
    assert "\n" not in msg and "transformers 4.50.0" in msg and "pip install transformers==4.40.1" in msg


def test_load_policy_runs_the_vision_check(checkpoint, tmp_path, monkeypatch):
    """Section 4 stops right after loading a blind policy, and says so for one that reads its image."""
    cfg = _cfg(checkpoint, tmp_path, "my_widowx")
    loaded = load_policy(cfg, STATS, progress=False)
    assert any(n.startswith("vision check: the first action token's distribution differs") for n in loaded.notes)
    _drop_image_in_generate(monkeypatch)
    with pytest.raises(ov.SilentVisionError, match="ignores its image"):
        load_policy(cfg, STATS, progress=False)
