"""Policies on the shared code path: ``tiny_vla`` (CPU / offline), ``openvla`` (OpenVLA-7B); Octo: ``vla_bridge.octo``.

Submodules are imported on demand (``from vla_bridge.models.tiny_vla import build_tiny_vla``) so that importing
the package stays cheap; the names below are also reachable lazily as ``vla_bridge.models.<name>``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build_tiny_vla": "tiny_vla",
    "build_tokenizer": "tiny_vla",
    "TinyVLAConfig": "tiny_vla",
    "TinyVLAForActionPrediction": "tiny_vla",
    "TinyVLAProcessor": "tiny_vla",
    "lora_target_modules": "lora",
    "linear_module_names": "lora",
    "trainable_parameters": "lora",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
