"""The shipped tiny base (assets/tiny_vla_base): the right recipe, guarded by its versions, and still the same model.

The golden fixture (tests/fixtures/tiny_base_golden.json) holds what the shipped weights produced on a fixed scene
when they were shipped: the scene's pixel hash, the first action token's top logits and the 7 greedy action tokens.
A change to the world's rendering, the tiny VLA's code, its tokenizer or its image processing that forgot to bump
WORLD_VERSION / TINY_BASE_VERSION fails here; the fix is to bump the constant and run
`python -m vla_bridge pretrain-tiny --ship` (then `UPDATE_GOLDEN=1 pytest tests/test_tiny_base.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_bridge import pretrain
from vla_bridge.data import world as W
from vla_bridge.models.openvla import action_inputs, load_openvla

GOLDEN = Path(__file__).parent / "fixtures" / "tiny_base_golden.json"
SCENE = (W.SPLITS.finetune[0], 1234)      # (instruction, seed): a fine-tuning task the base never trained on


def test_the_shipped_base_is_the_default_recipe_at_this_codes_versions():
    info = pretrain.read_base_info(pretrain.SHIPPED_BASE)
    assert info is not None, f"no shipped base: run `{pretrain.SHIP_COMMAND}`"
    assert info["params"] == dataclasses.asdict(pretrain.PretrainParams()) and info["unnorm_key"] == "demo_world"
    assert (info["world_version"], info["base_version"]) == (W.WORLD_VERSION, pretrain.TINY_BASE_VERSION)
    assert (pretrain.SHIPPED_BASE / "model.safetensors").stat().st_size > 1e6


def _golden_now() -> dict:
    env = W.TabletopEnv(image_size=128, render=True)
    obs = env.reset(SCENE[0], SCENE[1], prompt=SCENE[0])
    image = obs[W.IMAGE_KEYS[0]]
    processor, model = load_openvla(str(pretrain.SHIPPED_BASE), precision="fp32", verbose=False)
    model.eval()
    inputs = action_inputs(processor, SCENE[0], image, model=model)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        action = model.predict_action(**inputs, unnorm_key="demo_world", do_sample=False)
    top = torch.topk(logits, 8)
    return {"scene": list(SCENE), "pixels_sha256": hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(),
            "top_ids": top.indices.tolist(), "top_logits": [round(float(v), 5) for v in top.values],
            "action": [round(float(v), 6) for v in np.asarray(action)]}


def test_the_shipped_base_still_computes_what_it_computed_when_shipped():
    now = _golden_now()
    if os.environ.get("UPDATE_GOLDEN") == "1" or not GOLDEN.is_file():
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"{GOLDEN} is missing: run UPDATE_GOLDEN=1 pytest {__file__}")
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(now, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert now["pixels_sha256"] == golden["pixels_sha256"], (
        "the world renders this scene differently than when the base was shipped: bump WORLD_VERSION and run "
        f"`{pretrain.SHIP_COMMAND}`")
    assert now["top_ids"] == golden["top_ids"] and np.allclose(now["top_logits"], golden["top_logits"], atol=1e-4), (
        "the shipped weights compute other logits than when they were shipped (model code, tokenizer or image "
        f"processing changed): bump TINY_BASE_VERSION and run `{pretrain.SHIP_COMMAND}`")
    assert np.allclose(now["action"], golden["action"], atol=1e-6)


def test_the_default_run_loads_the_shipped_base_without_pretraining(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("pretrained although the shipped base fits")

    monkeypatch.setattr(pretrain, "pretrain_base", no_training)
    path, info = pretrain.ensure_tiny_base(tmp_path / "tiny_vla_base", "demo_world", progress=False)
    assert path == pretrain.SHIPPED_BASE and info["shipped"] and info["reused"]
    assert "loaded the shipped base (assets/tiny_vla_base/" in pretrain.describe_base(info)
    assert not (tmp_path / "tiny_vla_base").exists()       # nothing copied, nothing written


class _Trained(Exception):
    pass


def _stop_at_training(*a, **k):
    raise _Trained


def test_another_recipe_or_a_stale_shipped_base_is_pretrained_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "pretrain_base", _stop_at_training)
    monkeypatch.setattr(W.labels, "labelled_frames", lambda *a, **k: (_ for _ in ()).throw(_Trained()))
    monkeypatch.setattr(pretrain, "labelled_frames", lambda *a, **k: (_ for _ in ()).throw(_Trained()))
    with pytest.raises(_Trained):   # other PRETRAIN_STEPS: not the shipped recipe
        pretrain.ensure_tiny_base(tmp_path / "a", "demo_world", pretrain.PretrainParams(steps=50), progress=False)
    path, why = pretrain.shipped_base(pretrain.PretrainParams(steps=50), "demo_world")
    assert path is None and "asks for another" in why
    path, why = pretrain.shipped_base(pretrain.PretrainParams(), "bridge_orig")
    assert path is None
    monkeypatch.setattr(pretrain, "TINY_BASE_VERSION", "0-test")
    path, why = pretrain.shipped_base(pretrain.PretrainParams(), "demo_world")
    assert path is None and "base recipe 0-test" in why and pretrain.SHIP_COMMAND in why
    with pytest.raises(_Trained):
        pretrain.ensure_tiny_base(tmp_path / "b", "demo_world", progress=False)
