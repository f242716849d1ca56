"""Which linear layers get LoRA adapters - one rule for OpenVLA-7B and the tiny VLA.

OpenVLA's finetune.py uses ``LoraConfig(target_modules="all-linear")``. PEFT expands "all-linear" to the set of
*last name components* of every nn.Linear (qkv, proj, fc1, ..., q_proj, ..., lm_head) and then tries to drop the
output head by removing the head's *full* module name. In a plain LlamaForCausalLM that name is "lm_head" and the
removal works; in a Prismatic/OpenVLA model the head is nested as "language_model.lm_head", so the removal misses
and "lm_head" stays in the set: with peft 0.11.1 (OpenVLA's pin) and 0.13.2 (ours) the head gets a LoRA adapter too.

`lora_target_modules(model)` returns the explicit suffix list "all-linear" produces, without "lm_head" by default
(``include_lm_head=True`` reproduces what "all-linear" really wraps). Pass the list as ``target_modules``; since
the names are suffixes, they match the same modules in both models (and work on quantized 4-bit models, whose
bitsandbytes Linear4bit layers subclass nn.Linear).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn


def base_model(model: nn.Module) -> nn.Module:
    """The underlying VLA: strips DDP (``.module``), torch.compile (``._orig_mod``) and PEFT wrappers."""
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(model, attr, None), nn.Module):
            model = getattr(model, attr)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def linear_module_names(model: nn.Module) -> List[str]:
    """Full names of all nn.Linear modules (PEFT LoRA layers excluded), sorted."""
    names = set()
    for name, module in base_model(model).named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name:
            continue
        # After get_peft_model the original layer lives at "<name>.base_layer" inside the LoRA wrapper.
        names.add(name[: -len(".base_layer")] if name.endswith(".base_layer") else name)
    return sorted(names)


def lora_target_modules(model: nn.Module, include_lm_head: bool = False) -> List[str]:
    """Sorted last-name-components of the model's linear layers (what PEFT's "all-linear" computes), minus
    "lm_head" unless `include_lm_head`."""
    suffixes = {name.rsplit(".", 1)[-1] for name in linear_module_names(model)}
    if not include_lm_head:
        suffixes.discard("lm_head")
    return sorted(suffixes)


def trainable_parameters(model: nn.Module) -> Tuple[int, int, float]:
    """(trainable, total, trainable share in %) - the numbers of PEFT's print_trainable_parameters."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total, (100.0 * trainable / total if total else 0.0)


def trainable_summary(model: nn.Module) -> str:
    trainable, total, share = trainable_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


def lora_modules_by_part(model: nn.Module) -> Dict[str, int]:
    """How many LoRA-wrapped layers each top-level part has (vision_backbone / projector / language_model)."""
    counts: Dict[str, int] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "lora_A"), nn.ModuleDict):
            parts = name.split(".")
            # strip PEFT's "base_model.model." prefix
            while parts and parts[0] in ("base_model", "model") and len(parts) > 1:
                parts = parts[1:]
            counts[parts[0]] = counts.get(parts[0], 0) + 1
    return counts


def _mergeable_lora_layers(model: nn.Module) -> List[nn.Module] | None:
    """The LoRA layers :func:`merged_adapter` would merge, or None when merging is not exact and cheap here: a
    layer whose adapters are disabled (``with model.disable_adapter():``) or already merged, a DoRA adapter, or a
    base weight that is not a float32 CPU tensor (a GPU's memory, bf16 rounding, a quantized 4-bit layer)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict)
              and hasattr(m, "get_base_layer")]
    if not layers:
        return None
    for m in layers:
        w = getattr(m.get_base_layer(), "weight", None)
        if (getattr(m, "disable_adapters", False) or getattr(m, "merged", False)
                or any(getattr(m, "use_dora", {}).get(a, False) for a in m.active_adapters)
                or not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or w.device.type != "cpu"):
            return None
    return layers


def can_merge_adapter(model: nn.Module) -> bool:
    """Whether :func:`merged_adapter` merges ``model``'s LoRA adapter (else it leaves the model as it is)."""
    return _mergeable_lora_layers(model) is not None


@contextlib.contextmanager
def merged_adapter(model: nn.Module) -> Iterator[bool]:
    """Inside the block the active LoRA adapter is merged into the base weights (W + s·BA, PEFT's own ``merge``):
    the same function as the adapter applied on the side, one matrix product per layer instead of three. That is
    how OpenVLA deploys a fine-tuned adapter (finetune.py merges it before saving) and, on a CPU, ~15-20 % faster
    per frame for the tiny VLA. On exit every base weight is the ORIGINAL tensor again — not ``unmerge()``'s
    W + s·BA - s·BA, which rounds — so the base model (``disable_adapter()``) and further training see exactly the
    weights they had. Yields whether it merged: only float32 CPU weights (:func:`can_merge_adapter`); on a GPU the
    merged copy would double the adapted weights' memory for a few per cent, so the model is left unmerged there."""
    layers = _mergeable_lora_layers(model)
    if layers is None:
        yield False
        return
    originals = [(m, m.get_base_layer().weight.data) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.merge(safe_merge=True)   # writes a NEW weight tensor; the original stays untouched in `originals`
        yield True
    finally:
        for m, w in originals:
            m.get_base_layer().weight.data = w
            m.merged_adapters.clear()
