# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (openvla-bridge)
#     language: python
#     name: openvla-bridge
# ---

# %% [markdown]
# # Fine-tuning a vision-language-action model on BridgeData V2, once, for real
#
# By the end of this notebook you will have walked the whole VLA loop yourself:
#
# 1. **Hardware and pre-flight** — what this machine can run, and the policy it picks for you: OpenVLA-7B in bf16,
#    OpenVLA-7B in 4-bit, Octo-Small, or — with no GPU or no Hugging Face hub — a *tiny* OpenVLA-shaped VLA on an
#    embedded demo world that shares every line after model loading with the 7B path.
# 2. **Data** — BridgeData V2 in LeRobot v3.0 format, streamed, never materialized.
# 3. **Action tokenization and LoRA fine-tuning** — OpenVLA's recipe: 256 bins per action dimension mapped onto the
#    rarest tokens of the LLM's vocabulary, LoRA on every linear layer.
# 4. **Evaluation and probes** — held-out tasks, baselines, intervals, where the policy generalizes and where it
#    breaks.
#
# Sections appear here as they become real; every number the notebook prints is computed in a cell you can read.
# Run it top to bottom in Jupyter Lab or VS Code, or headless with `bash setup.sh --run`.

# %% tags=["parameters"]
# Parameters (papermill overrides these; "auto" lets the hardware decide; env FORCE_PATH=openvla|octo|tiny wins).
POLICY = "auto"          # auto | openvla | openvla-4bit | octo | tiny
MODEL_ID = "auto"        # hub id (openvla/openvla-7b) or a local checkpoint directory
DATASET = "auto"         # auto | embedded | hub id (nvidia/bridge_lerobot_v3) | local LeRobot v3.0 root
UNNORM_KEY = "auto"      # norm_stats key; auto → bridge_orig on Bridge, demo_world on the embedded world
RUN_NAME = "auto"        # outputs/<kind>/<RUN_NAME>/; auto → <policy>-<dataset>
SEED = 0
MAX_STEPS = "auto"       # optimizer steps; auto → 1000 on GPU, a demo budget on CPU
BATCH_SIZE = "auto"      # auto → 4 (GPU, OpenVLA) / 16 (CPU, tiny)
GRAD_ACCUM = "auto"      # auto → 2 (GPU) / 1 (CPU)
LEARNING_RATE = 5e-4
WARMUP_STEPS = 50
LORA_RANK = 32
LORA_ALPHA = 16
LOG_EVERY = 10
SAVE_EVERY = 500
IMAGE_AUG = True         # OpenVLA-style 90 % random crop in training, 90 % center crop at evaluation
EVAL_EPISODES = "auto"   # episodes per task
ABLATION_RANKS = "auto"  # LoRA rank sweep; auto → [8, 16, 32, 64] on the tiny path, off for OpenVLA-7B
USE_WANDB = False
RESUME = False
HUB_TIMEOUT_S = 3.0
OUTPUTS_DIR = "outputs"
DATA_DIR = "data"

# %%
if __name__ == "notebook":  # imported as a module by a library probing for Jupyter's `notebook` package: not us
    raise ImportError("notebook.py is this project's walkthrough, not Jupyter's `notebook` package")

import os
import sys
from pathlib import Path

# Make `vla_bridge` importable when the kernel starts in the repository root without the editable install.
if not any((Path(p) / "vla_bridge").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path.cwd()))

from vla_bridge import hardware
from vla_bridge.config import DEFAULT_PARAMS, resolve_run_config, write_json

PARAMS = {name: globals()[name] for name in DEFAULT_PARAMS}

# %% [markdown]
# ## 1. Hardware: what can this machine run?
#
# OpenVLA-7B is a Llama-2-7B with a fused DINOv2 + SigLIP vision encoder: ~15 GB of bf16 weights before any
# activation or optimizer state. The decision table below is the one the upstream authors' numbers imply:
#
# | what this machine has | policy | why |
# |---|---|---|
# | CUDA GPU ≥ 22 GB | OpenVLA-7B, bf16, LoRA | weights + LoRA optimizer state + activations at batch 4 fit |
# | CUDA GPU 12–22 GB + bitsandbytes | OpenVLA-7B, 4-bit NF4, LoRA | NF4 weights are ~4.5 GB; compute stays bf16 |
# | smaller CUDA GPU | Octo-Small (27 M) | the brief's fallback, fine-tuned end to end |
# | no GPU, or no hub | tiny VLA on the embedded world | the same cells as the 7B path, in minutes on a CPU |
#
# `FORCE_PATH=openvla|octo|tiny` in the environment, or the `POLICY` parameter, overrides the table.

# %%
hw = hardware.detect_hardware()
print(f"CUDA available : {hw.cuda_available}")
print(f"device         : {hw.device_name}" + (f"  (×{hw.gpu_count})" if hw.gpu_count > 1 else ""))
if hw.cuda_available:
    print(f"VRAM           : {hw.total_vram_gb:.1f} GB total, {hw.free_vram_gb:.1f} GB free")
    print(f"bf16 support   : {hw.bf16_supported}")
print(f"CPU cores      : {hw.cpu_count}")
print(f"RAM            : {hw.ram_gb:.1f} GB")
print(f"Python         : {hw.python} on {hw.platform}")
print()

cfg = resolve_run_config(PARAMS, hw=hw)
print(cfg.summary())

# %% [markdown]
# ## 2. Install verification and pre-flight
#
# Three failures in this stack are *silent* or arrive deep inside a library, so we check for them up front:
#
# - **torchcodec without system FFmpeg.** LeRobot decodes video with torchcodec, which loads FFmpeg's shared
#   libraries at run time. Without them a `StreamingLeRobotDataset` yields zero frames and raises nothing.
# - **timm.** OpenVLA's remote code raises `NotImplementedError` on any timm outside 0.9.10–0.9.16.
# - **The hub.** Streaming Bridge and downloading 15 GB of weights need it; offline, everything must come from local
#   directories. The probe uses a short timeout and never reads or prints your token.
#
# The results are saved as JSON next to the run's logs, so a failed headless run can be diagnosed afterwards.

# %%
versions = hardware.package_versions()
for name, version in versions.items():
    print(f"{name:>13}: {version or 'not installed'}")
print()

checks = hardware.run_preflight(cfg.policy, cfg.dataset, cfg.model_id, hardware.Decision(cfg.hub, cfg.hub_reason),
                                cfg.outputs_dir)
print(hardware.format_checks(checks))

preflight_json = write_json(cfg.path("logs") / "preflight.json", {
    "hardware": hw.as_dict(),
    "run_config": cfg.as_dict(),
    "versions": versions,
    "checks": [c.as_dict() for c in checks],
})
print(f"\nsaved {preflight_json}")
hardware.raise_on_failure(checks)
