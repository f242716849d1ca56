"""The one policy-specific step: load the base VLA for the resolved run. Everything after it is shared.

- ``openvla`` / ``openvla-4bit``: OpenVLA-7B (or any OpenVLA-layout checkpoint directory) through
  :func:`vla_bridge.models.openvla.load_openvla` in bf16 or NF4.
- ``tiny``: the tiny VLA's pretrained base from ``data/tiny_vla_base`` (built on first use from the embedded
  world's pretraining split, see :mod:`vla_bridge.pretrain`), loaded through the same ``load_openvla`` call.
- ``octo``: a JAX model that lives in its own environment; it does not come through here.

Then the fine-tuning dataset's statistics are registered under ``UNNORM_KEY`` so that the model de-normalizes
with the statistics training normalizes with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from .config import EMBEDDED_UNNORM_KEY
from .hardware import PreflightError
from .models.openvla import available_unnorm_keys, check_reads_image, load_openvla, register_dataset_statistics
from .preflight import check_tiny_base, check_unnorm_key_name
from . import pretrain


class PolicyLoadError(RuntimeError):
    """The chosen policy cannot be loaded here; the message says what to change."""


@dataclasses.dataclass
class LoadedPolicy:
    model: Any
    processor: Any
    policy: str
    model_id: str
    base_unnorm_keys: list[str]
    notes: list[str]
    precision: str = "fp32"   # how load_openvla loaded it (fp32 | bf16 | 4bit); the ablations reload the same way


def load_policy(cfg, stats_entry: Mapping[str, Any], progress: bool = True) -> LoadedPolicy:
    """Load the base model for ``cfg.policy`` and register ``stats_entry`` under ``cfg.unnorm_key``."""
    notes: list[str] = []
    if cfg.policy == "octo":
        raise PolicyLoadError("POLICY=octo runs in its own JAX environment through vla_bridge.octo.client "
                              "(the notebook's Octo cells), not through load_policy")
    model_id = cfg.model_id
    if cfg.policy == "tiny":
        default_dir = Path(cfg.data_dir) / "tiny_vla_base"
        if Path(model_id) == default_dir:
            # pretrained on the embedded world under its own key and seed: UNNORM_KEY and SEED (the fine-tuning's)
            # must not select, re-pretrain and overwrite another base
            path, info = pretrain.ensure_tiny_base(default_dir, EMBEDDED_UNNORM_KEY, pretrain.PretrainParams(steps=cfg.pretrain_steps),
                                          progress=progress)
            notes.append(pretrain.describe_base(info))
            model_id = str(path)
        scope = check_tiny_base(cfg.policy, cfg.dataset)
        if not scope.ok:
            notes.append(f"note: {scope.detail}")
        precision = "fp32"
    elif cfg.policy == "openvla-4bit":
        precision = "4bit"
    else:
        precision = "bf16" if cfg.device == "cuda" else "fp32"

    processor, model = load_openvla(model_id, precision=precision)
    base_keys = list(available_unnorm_keys(model))
    existed = cfg.unnorm_key in base_keys
    try:
        check_unnorm_key_name(cfg.unnorm_key, base_keys)
    except PreflightError as exc:
        raise PolicyLoadError(str(exc)) from None
    register_dataset_statistics(model, cfg.unnorm_key, stats_entry)
    shown = ', '.join(base_keys[:8]) + (f' … ({len(base_keys)} in all)' if len(base_keys) > 8 else '') or 'none'
    notes.append(f"registered the fine-tuning dataset's statistics under UNNORM_KEY={cfg.unnorm_key!r} "
                 + ("(replacing the base model's entry" if existed else
                    "(a NEW key, not among the base model's: this dataset's own statistics") + f"; base keys: {shown})")
    tv = check_reads_image(model, processor, model_id)   # one-token generate() on two images; raises when blind
    notes.append(f"vision check: the first action token's distribution differs between a black and a noise image "
                 f"(total variation {tv:.3f}), so the model reads its image")
    return LoadedPolicy(model, processor, cfg.policy, model_id, base_keys, notes, precision)
