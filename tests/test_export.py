"""Export: a tiny base + a trained-looking LoRA checkpoint on disk, merged by ``python -m vla_bridge export``,
reloaded here through the Auto classes and compared with the adapter; the statistics under the unnorm key are the
fine-tuned ones; bad input and a merge that does not fit give one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForVision2Seq, AutoProcessor

from vla_bridge.__main__ import main
from vla_bridge.config import resolve_run_config
from vla_bridge.export import (EXPORT_FILE, ExportError, action_tolerance, check_memory, default_out_dir,
                               export_policy, plan_memory)
from vla_bridge.hardware import Decision, HardwareInfo, PreflightError
from vla_bridge.models.openvla import (action_inputs, attach_lora, load_openvla,
                                       register_dataset_statistics)
from vla_bridge.models.tiny_vla import build_tiny_vla
from vla_bridge.paths import STATS_FILENAME

KEY = "demo_world"
MASK = [True] * 6 + [False]
BASE_STATS = {"action": {"q01": [-0.02] * 6 + [0.0], "q99": [0.02] * 6 + [1.0], "mask": MASK}}
FT_STATS = {"action": {"q01": [-0.05, -0.04, -0.03, -0.2, -0.1, -0.3, 0.0],
                       "q99": [0.06, 0.04, 0.05, 0.2, 0.1, 0.25, 1.0], "mask": MASK},
            "num_transitions": 123, "num_trajectories": 7}
SMALL = dict(image_size=32, vision_width=32, vision_depth=2, vision_heads=2, hidden_size=32, num_layers=1,
             num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """outputs/checkpoints/unit/{step_000003, latest} beside a saved tiny base, as training leaves them."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    base_dir = root / "tiny_base"
    model, processor = build_tiny_vla(norm_stats={KEY: BASE_STATS, "bridge_orig": BASE_STATS}, seed=0, **SMALL)
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    _, base = load_openvla(str(base_dir), precision="fp32", device="cpu", verbose=False)
    peft_model = attach_lora(base, rank=4, alpha=8, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # what training does to the adapter: B leaves zero, so merging changes the weights
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    ckpt = root / "outputs" / "checkpoints" / "unit" / "step_000003"
    peft_model.save_pretrained(str(ckpt))
    (ckpt / STATS_FILENAME).write_text(json.dumps({KEY: FT_STATS}))
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 3, "run": {"UNNORM_KEY": KEY}}))
    os.symlink("step_000003", ckpt.parent / "latest")
    rng = np.random.default_rng(0)
    frames = [(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "put the red block on the plate"),
              (np.full((32, 32, 3), 200, np.uint8), "move the blue cup to the left"),
              (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "wipe the table")]
    return root, base_dir, ckpt, frames


def _actions(model, processor, frames, key=KEY):
    with torch.no_grad():
        return np.stack([model.predict_action(**action_inputs(processor, text, image, model=model), unnorm_key=key,
                                              do_sample=False) for image, text in frames])


def _adapter(base_dir, ckpt, stats):
    processor, base = load_openvla(str(base_dir), precision="fp32", device="cpu", verbose=False)
    model = PeftModel.from_pretrained(base, str(ckpt)).eval()
    register_dataset_statistics(model, KEY, stats)
    return model, processor


def test_cli_exports_a_standalone_checkpoint_that_acts_like_the_adapter(run, capsys):
    root, base_dir, ckpt, frames = run
    out = root / "outputs" / "export" / "unit"
    assert main(["export", "--run", "unit", "--outputs-dir", str(root / "outputs"), "--frames", "3"]) == 0
    printed = capsys.readouterr().out
    assert "merge needs ≈" in printed and "parameters × 4 bytes (fp32)" in printed and "max |adapter" in printed
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", STATS_FILENAME, EXPORT_FILE} <= files
    assert not files & {"adapter_model.safetensors", "adapter_config.json"}
    assert not [p for p in out.parent.iterdir() if p.name != "unit"]  # no temporary or old directory left

    # reload as a deployment would: the Auto classes, no PEFT, no vla_bridge loader
    processor = AutoProcessor.from_pretrained(str(out))
    exported = AutoModelForVision2Seq.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    assert not [n for n, _ in exported.named_parameters() if "lora" in n]
    adapter, adapter_processor = _adapter(base_dir, ckpt, FT_STATS)
    a_adapter = _actions(adapter, adapter_processor, frames)
    a_export = _actions(exported, processor, frames)
    np.testing.assert_allclose(a_export, a_adapter, atol=1e-6, rtol=0)
    # the check is not vacuous: without the adapter the base acts differently on these frames
    with adapter.disable_adapter():
        a_base = _actions(adapter, adapter_processor, frames)
    assert np.abs(a_base - a_adapter).max() > 1e-3

    meta = json.loads((out / EXPORT_FILE).read_text())
    assert meta["unnorm_key"] == KEY and meta["step"] == 3 and meta["dtype"] == "fp32"
    assert meta["check"]["max_abs_diff"] <= 1e-5 and len(meta["check"]["frames"]) == 3
    assert meta["memory"]["n_parameters"] == sum(p.numel() for p in exported.parameters())
    assert meta["memory"]["model_bytes"] == 4 * meta["memory"]["n_parameters"]


def test_exported_statistics_are_the_fine_tuned_ones(run):
    root, base_dir, ckpt, frames = run
    out = root / "stats_check"
    res = export_policy(ckpt, out_dir=out, frames=frames[:2], verbose=False)
    assert res.unnorm_key == KEY and res.max_abs_diff <= 1e-5 and res.out_dir == out
    config = json.loads((out / "config.json").read_text())
    assert config["norm_stats"][KEY] == FT_STATS                   # replaced the base's entry under the key
    assert config["norm_stats"]["bridge_orig"] == BASE_STATS       # the base's other keys stay
    assert json.loads((out / STATS_FILENAME).read_text()) == {KEY: FT_STATS}
    exported = AutoModelForVision2Seq.from_pretrained(str(out))
    assert exported.get_action_stats(KEY)["q99"] == FT_STATS["action"]["q99"]
    # de-normalizing with the base's statistics would give other actions: the key's statistics matter
    adapter, processor = _adapter(base_dir, ckpt, BASE_STATS)
    assert np.abs(_actions(adapter, processor, frames[:2]) - res.actions_export).max() > 1e-3


def test_bf16_export_stays_within_one_action_bin(run):
    _, _, ckpt, frames = run
    res = export_policy(ckpt, out_dir=ckpt.parent.parent.parent / "bf16", dtype="bf16", frames=frames[:2],
                        verbose=False)
    assert res.dtype == "bf16" and res.memory.bytes_per_parameter == 2
    assert (np.abs(res.actions_adapter - res.actions_export) <= res.tolerance).all()
    one_bin = action_tolerance(FT_STATS, "bf16")
    assert one_bin[0] == pytest.approx((0.06 + 0.05) / 255, rel=1e-2) and one_bin[6] == pytest.approx(2 / 255, rel=1e-2)


def test_missing_adapter_dir_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "outputs" / "checkpoints" / "nope" / "latest")])
    msg = str(e.value.code)
    assert msg.startswith("error: adapter directory") and "does not exist" in msg and "\n" not in msg
    assert "section 7" in msg
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "half")])
    msg = str(e.value.code)
    assert "missing: adapter_model.safetensors, dataset_statistics.json" in msg and "\n" not in msg


def test_unknown_unnorm_key_is_a_one_line_error(run):
    _, _, ckpt, _ = run
    with pytest.raises(ExportError, match=r"UNNORM_KEY 'bridge_orgi' has no statistics .*available: \[demo_world\]"):
        export_policy(ckpt, unnorm_key="bridge_orgi", verbose=False)


def test_merge_that_does_not_fit_is_refused_with_the_figures(tmp_path):
    # a 7.54 B-parameter model (OpenVLA-7B's size) in bf16 against 12 GiB free: the rule, not an allocation
    plan = plan_memory(7_541_237_184, "bf16", 420 * 2**20, "cuda:0", tmp_path, free_bytes=12 * 2**30)
    assert plan.model_bytes == 2 * 7_541_237_184 and not plan.fits
    assert "7,541,237,184 parameters × 2 bytes (bf16) = 14.05 GiB" in plan.line()
    with pytest.raises(ExportError) as e:
        check_memory(plan)
    msg = str(e.value)
    assert "\n" not in msg and "14.46 GiB needed on cuda:0, 12.00 GiB free" in msg and "--device cpu" in msg
    check_memory(plan_memory(1000, "fp32", 0, "cpu", tmp_path, free_bytes=10**6))  # fits: no error


def test_default_out_dir_is_outputs_export_run(tmp_path):
    assert default_out_dir(tmp_path / "outputs" / "checkpoints" / "r1" / "latest") == Path("outputs/export/r1")
    assert default_out_dir(tmp_path / "my_adapter", "o") == Path("o/export/my_adapter")


@pytest.mark.parametrize("policy,export,expected", [("tiny", "auto", True), ("openvla", "auto", False),
                                                    ("openvla", True, True), ("tiny", False, False)])
def test_export_parameter_auto_is_on_for_tiny_and_opt_in_for_7b(policy, export, expected):
    gpu = HardwareInfo(cuda_available=True, device_name="A100", gpu_count=1, total_vram_gb=80.0, free_vram_gb=79.0,
                       bf16_supported=True, cpu_count=8, ram_gb=64.0, python="3.11", platform="linux")
    cfg = resolve_run_config({"POLICY": policy, "EXPORT": export}, env={}, hw=gpu, hub=Decision("yes", "test"),
                             bnb_available=False)
    assert cfg.policy == policy and cfg.export is expected
    with pytest.raises(PreflightError, match=r"EXPORT='yes' must be True or False or 'auto'"):
        resolve_run_config({"POLICY": policy, "EXPORT": "yes"}, env={}, hw=gpu, hub=Decision("yes", "test"))
