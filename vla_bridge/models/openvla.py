"""Loading OpenVLA-7B (bf16, 4-bit or fp32), its dataset statistics, and the LoRA configuration.

OpenVLA ships its model classes as Hugging Face *remote code* (``trust_remote_code=True``): ``AutoProcessor`` and
``AutoModelForVision2Seq`` fetch ``configuration_prismatic.py`` / ``modeling_prismatic.py`` /
``processing_prismatic.py`` from the checkpoint (hub id or local directory) and import them from a copy under
``$HF_HOME/modules``. Nothing of that code lives in this repository; this module only calls it through the Auto
classes, so the same functions also serve any checkpoint that follows the same interface (the tiny VLA included).

What the rest of the notebook relies on, and where it comes from:

* ``load_openvla`` - processor + model, with the precision and attention implementation printed with the reason.
  bf16 is upstream's fine-tuning dtype; "4bit" is QLoRA-style NF4 with bf16 compute (bitsandbytes, CUDA only);
  fp32 is for CPU checks. Attention is FlashAttention-2 when ``flash_attn`` imports and CUDA is there, else
  PyTorch SDPA. Not "eager": OpenVLA's ``predict_action`` appends the "▁" token (id 29871) to ``input_ids`` but not
  to ``attention_mask``, which the eager path then rejects (SDPA drops an all-ones mask, so it never notices).
  ``action_inputs`` below appends both, which is safe under every implementation.
* ``check_unnorm_key`` / ``register_dataset_statistics`` - OpenVLA
  de-normalizes predicted actions with ``norm_stats[unnorm_key]["action"]`` (q01/q99/mask). After fine-tuning on
  our data that entry must hold *our* statistics (the ones training normalized with), so they are registered in the
  model's config under the training key, and training writes them as ``dataset_statistics.json`` next to every
  adapter (``data.stats.save_dataset_statistics``, the file's one writer).
* ``lora_config`` - upstream's LoRA recipe (gaussian init, no dropout) with an explicit target list: PEFT 0.13.2's
  ``"all-linear"`` also puts an adapter on ``language_model.lm_head`` (it only excludes a *top-level* output head)
  and then stores the whole 32064 x 4096 head in every adapter file. ``vla_bridge.models.lora.lora_target_modules``
  gives the same module names "all-linear" would, minus ``lm_head``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import huggingface_hub
import numpy as np
import timm
import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForVision2Seq, AutoProcessor, BitsAndBytesConfig

from ..data.stats import validated_entry
from ..preflight import OPENVLA_TIMM_VERSIONS
from ..tokenization import ActionTokenizer, build_prompt, space_token_id, to_pil_image
from . import tiny_vla  # noqa: F401  (registers the tiny VLA with transformers' Auto classes)
from .lora import base_model, linear_module_names, lora_target_modules, trainable_parameters, trainable_summary

PRECISIONS = ("bf16", "4bit", "fp32")

PathLike = Union[str, os.PathLike]


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as asked; the message is one line and says what to do."""


@dataclasses.dataclass
class LoadInfo:
    """What `load_openvla` did, kept on the model as ``model.vla_bridge_load_info`` and printed."""

    model_id: str
    source: str                   # "local directory" | "hub" | "hub cache (offline)"
    precision: str
    torch_dtype: str
    device: str
    attn_implementation: str
    attn_reason: str
    seconds: float

    def summary(self) -> str:
        return (f"loaded {self.model_id} ({self.source}) in {self.seconds:.1f} s: precision={self.precision} "
                f"(torch_dtype={self.torch_dtype}), device={self.device}, attention={self.attn_implementation} "
                f"- {self.attn_reason}")


# ------------------------------------------------------------------------------------------------------------------
# Small helpers shared with the tiny VLA path
# ------------------------------------------------------------------------------------------------------------------
def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype pixel_values must have: that of the vision backbone's first floating-point parameter."""
    base = base_model(model)
    part = getattr(base, "vision_backbone", base)
    for p in part.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for p in base_model(model).parameters():
        return p.device
    return torch.device("cpu")


def model_image_size(processor: Any) -> int:
    """Square input resolution the processor resizes to (OpenVLA-7B: 224; tiny VLA: its ``image_size``)."""
    ip = getattr(processor, "image_processor", processor)
    sizes = getattr(ip, "input_sizes", None)          # OpenVLA: [(3, 224, 224), (3, 224, 224)]
    if sizes:
        return int(sizes[0][-1])
    for attr in ("image_size", "size"):
        value = getattr(ip, attr, None)
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, Mapping) and value:
            return int(value.get("height") or value.get("shortest_edge") or next(iter(value.values())))
    raise AttributeError(f"cannot tell the input image size of {type(ip).__name__}")


def action_inputs(processor: Any, instruction: str, image: Any, model: Optional[nn.Module] = None,
                  device: Optional[Union[str, torch.device]] = None,
                  dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """``processor(build_prompt(instruction), image)`` ready for ``model.predict_action(**inputs, unnorm_key=...)``.

    The "▁" token that training sequences carry after "Out:" is appended here to ``input_ids`` *and*
    ``attention_mask`` (predict_action then leaves both alone), so inference works with any attention
    implementation. pixel_values are moved to the model's device and cast to its dtype (bf16 for OpenVLA-7B).
    """
    inputs = processor(build_prompt(instruction), to_pil_image(image))
    input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    space_id = space_token_id(processor.tokenizer)
    if not bool(torch.all(input_ids[:, -1] == space_id)):
        input_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], space_id)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    if model is not None:
        device = device if device is not None else model_device(model)
        dtype = dtype if dtype is not None else model_dtype(model)
    pixel_values = inputs["pixel_values"]
    out = dict(input_ids=input_ids, attention_mask=attention_mask,
               pixel_values=pixel_values.to(dtype) if dtype is not None else pixel_values)
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------
def choose_attention(precision: str, requested: Optional[str] = None,
                     cuda: Optional[bool] = None) -> Tuple[str, str]:
    """(attn_implementation, reason). FlashAttention-2 needs CUDA, the flash_attn package and half precision."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested is not None:
        if requested == "eager":
            return "eager", ("requested; note: OpenVLA's predict_action then needs the '▁' token appended to "
                             "input_ids AND attention_mask (use vla_bridge.models.openvla.action_inputs)")
        return requested, "requested"
    if not cuda:
        return "sdpa", "no CUDA device, so no FlashAttention-2; PyTorch SDPA is the best available"
    try:
        fa2 = importlib.util.find_spec("flash_attn") is not None and transformers.utils.is_flash_attn_2_available()
    except Exception:  # pragma: no cover - broken flash_attn builds raise all sorts of errors
        fa2 = False
    if not fa2:
        return "sdpa", "flash_attn is not installed (optional, see README), so PyTorch SDPA"
    if precision == "fp32":
        return "sdpa", "FlashAttention-2 needs bf16/fp16 weights and precision is fp32, so PyTorch SDPA"
    return "flash_attention_2", "flash_attn imports and a CUDA GPU is present"


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def missing_checkpoint_files(path: PathLike) -> List[str]:
    """What a local OpenVLA-style checkpoint directory lacks (empty list: looks complete)."""
    d = Path(path)
    config = _read_json(d / "config.json")
    missing = [f for f in ("config.json", "tokenizer_config.json") if not (d / f).is_file()]
    # Remote-code checkpoints (OpenVLA) build their image processor from preprocessor_config.json; the tiny VLA
    # keeps its processor settings in processor_config.json.
    if (config or {}).get("auto_map") or not (d / "processor_config.json").is_file():
        if not (d / "preprocessor_config.json").is_file():
            missing.append("preprocessor_config.json")
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json or tokenizer.model")
    weights = [f for f in _WEIGHT_FILES if (d / f).is_file()]
    if not weights:
        missing.append("weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")
    for index in (w for w in weights if w.endswith(".index.json")):
        try:
            shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            missing.append(f"a readable {index}")
            continue
        missing += [s for s in shards if not (d / s).is_file()]
    # Remote-code modules the config's auto_map points at ("modeling_prismatic.OpenVLAForActionPrediction").
    if (d / "config.json").is_file() and config is None:
        missing.append("a valid config.json")
    if config:
        for ref in (config.get("auto_map") or {}).values():
            for r in ref if isinstance(ref, (list, tuple)) else [ref]:
                if isinstance(r, str) and "--" not in r:  # "repo--module.Class" lives elsewhere
                    module_file = r.rsplit(".", 1)[0] + ".py"
                    if not (d / module_file).is_file() and module_file not in missing:
                        missing.append(module_file)
    return missing


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_local_checkpoint(path: PathLike) -> Path:
    """Raise a one-line FileNotFoundError naming what a local checkpoint directory is missing."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {str(d)!r} does not exist")
    missing = missing_checkpoint_files(d)
    if missing:
        raise FileNotFoundError(f"model directory {str(d)!r} is not a complete OpenVLA-style checkpoint; missing: "
                                f"{', '.join(missing)} (copy the whole hub snapshot, e.g. `huggingface-cli download "
                                f"openvla/openvla-7b --local-dir {d}`)")
    return d


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1


def _resolve_source(model_id: str) -> Tuple[str, str]:
    """(what to pass to from_pretrained, source description); one-line errors for the common mistakes."""
    expanded = os.path.expanduser(str(model_id))
    if os.path.isdir(expanded):
        d = check_local_checkpoint(expanded)
        return str(d), "local directory"
    if _looks_like_path(str(model_id)) or os.path.exists(expanded):
        raise FileNotFoundError(f"MODEL_ID {model_id!r} looks like a path but is not a directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        cached = huggingface_hub.try_to_load_from_cache(str(model_id), "config.json")
        if not isinstance(cached, str):
            raise ModelLoadError(f"HF_HUB_OFFLINE is set and {model_id!r} is neither a local directory nor in the "
                                 f"Hugging Face cache; download it first or point MODEL_ID at a local copy")
        return str(model_id), "hub cache (offline)"
    return str(model_id), "hub"


def _check_environment(source: str) -> None:
    """Pin checks that OpenVLA's remote code would otherwise report late or obscurely (skipped for local
    checkpoints without remote code, such as the tiny VLA)."""
    if os.path.isdir(source) and not (_read_json(Path(source) / "config.json") or {}).get("auto_map"):
        return
    if timm.__version__ not in OPENVLA_TIMM_VERSIONS:
        raise ModelLoadError(f"OpenVLA's remote code refuses timm {timm.__version__}; install timm==0.9.10 "
                             f"(requirements.txt)")
    if transformers.__version__ != "4.40.1":
        warnings.warn(f"OpenVLA was released against transformers==4.40.1 (found {transformers.__version__}); "
                      f"predict_action may differ", stacklevel=3)
    try:
        os.makedirs(transformers.utils.HF_MODULES_CACHE, exist_ok=True)
        writable = os.access(transformers.utils.HF_MODULES_CACHE, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise ModelLoadError(f"trust_remote_code copies OpenVLA's model code to {transformers.utils.HF_MODULES_CACHE}, "
                             f"which is not writable; set HF_HOME to a writable directory")


def load_openvla(model_id: str, precision: str = "bf16", device: Optional[Union[str, torch.device]] = None,
                 attn_implementation: Optional[str] = None, verbose: bool = True) -> Tuple[Any, nn.Module]:
    """Processor and model from a hub id or a local checkpoint directory, as OpenVLA's finetune.py loads them.

    precision: "bf16" (upstream's dtype), "4bit" (NF4 weights, bf16 compute, then
    ``peft.prepare_model_for_kbit_training``; CUDA only) or "fp32" (CPU checks).
    device: where the model goes (default: "cuda" when available, else "cpu"); a 4-bit model is placed by
    bitsandbytes on the current CUDA device.
    attn_implementation: None picks FlashAttention-2 when possible, else SDPA (see `choose_attention`).

    Returns ``(processor, model)``; the decisions are printed and kept as ``model.vla_bridge_load_info``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cuda = torch.cuda.is_available()
    if precision == "4bit" and not cuda:
        raise ModelLoadError("POLICY=openvla-4bit (precision='4bit') needs a CUDA GPU (bitsandbytes NF4 kernels); "
                             "on this machine use POLICY=tiny, octo or openvla (fp32)")
    if precision == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("precision='4bit' needs bitsandbytes (pip install 'bitsandbytes>=0.43,<0.49')")
    device = torch.device(device if device is not None else ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and not cuda:
        raise ModelLoadError(f"device {str(device)!r} requested but torch sees no CUDA device")

    source, source_kind = _resolve_source(model_id)
    _check_environment(source)
    attn, attn_reason = choose_attention(precision, attn_implementation, cuda=device.type == "cuda")
    torch_dtype = torch.float32 if precision == "fp32" else torch.bfloat16

    kwargs: Dict[str, Any] = dict(torch_dtype=torch_dtype, low_cpu_mem_usage=True, trust_remote_code=True,
                                  attn_implementation=attn)
    if precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                                           bnb_4bit_quant_type="nf4")
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}

    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForVision2Seq.from_pretrained(source, **kwargs)
    if precision == "4bit":
        from peft import prepare_model_for_kbit_training   # lazy: peft is only needed once LoRA/4-bit is used

        model = prepare_model_for_kbit_training(model)
    else:
        model = model.to(device)
    seconds = time.perf_counter() - t0

    chosen = getattr(getattr(model, "config", None), "_attn_implementation", attn) or attn
    info = LoadInfo(model_id=str(model_id), source=source_kind, precision=precision,
                    torch_dtype=str(torch_dtype).replace("torch.", ""), device=str(model_device(model)),
                    attn_implementation=str(chosen), attn_reason=attn_reason, seconds=seconds)
    model.vla_bridge_load_info = info
    if verbose:
        print(info.summary())
    return processor, model


# ------------------------------------------------------------------------------------------------------------------
# The silent-vision guard
# ------------------------------------------------------------------------------------------------------------------
VISION_CHECK_MIN_TV = 1e-6   # total variation between the two first-action-token distributions below this: blind
PINNED_TRANSFORMERS = "4.40.1"


class SilentVisionError(ModelLoadError):
    """The loaded policy's actions do not depend on its image (e.g. OpenVLA on transformers >= 4.50, issue #346)."""


def _probe_images(size: int) -> List[np.ndarray]:
    """Two images as different as images get: black, and seeded bright noise."""
    noise = np.random.default_rng(346).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [np.zeros((size, size, 3), dtype=np.uint8), noise]


@torch.no_grad()
def first_action_token_probs(model: nn.Module, processor: Any, image: Any,
                             instruction: str = "put the block on the plate") -> torch.Tensor:
    """The distribution of the first action token (softmax over the 256 action-token logits, float64) for one
    (image, instruction), through the model's own ``generate()`` - the route ``predict_action`` takes, where
    transformers >= 4.50 drops OpenVLA's image (an empty cache on the first step makes it skip the vision path)."""
    vla = base_model(model)
    inputs = action_inputs(processor, instruction, image, model=vla)
    was_training = vla.training
    vla.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config chatter
            out = vla.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=1, output_logits=True,
                               return_dict_in_generate=True)
    finally:
        vla.train(was_training)
    ids = ActionTokenizer(processor.tokenizer).action_token_ids
    return torch.softmax(out.logits[0][0, ids.start:ids.stop].double(), dim=-1).cpu()


def check_reads_image(model: nn.Module, processor: Any, model_id: str = "the model") -> float:
    """Pre-flight right after loading (two one-token generate() calls): the first action token's distribution must
    differ between a black and a noise image. Returns their total variation; raises a one-line
    :class:`SilentVisionError` naming the transformers version and the pin when the image makes no difference."""
    black, noise = (first_action_token_probs(model, processor, im) for im in _probe_images(model_image_size(processor)))
    tv = 0.5 * float((black - noise).abs().sum())
    if not tv >= VISION_CHECK_MIN_TV:
        version = transformers.__version__
        why = (f"this environment has transformers {version}, the pin is transformers=={PINNED_TRANSFORMERS}: pip "
               f"install transformers=={PINNED_TRANSFORMERS} (requirements.txt)" if version != PINNED_TRANSFORMERS else
               f"this environment has the pinned transformers {version}, so the checkpoint itself does not use its "
               f"image (a zeroed or missing projector / vision backbone?)")
        raise SilentVisionError(
            f"vision check failed: {model_id} gives the same first-action-token distribution for a black and a noise "
            f"image (total variation {tv:.1e}), so it ignores its image - OpenVLA does this on transformers >= 4.50 "
            f"(openvla issue #346); {why}")
    return tv


# ------------------------------------------------------------------------------------------------------------------
# Dataset statistics
# ------------------------------------------------------------------------------------------------------------------
def available_unnorm_keys(model: nn.Module) -> List[str]:
    stats = getattr(getattr(base_model(model), "config", None), "norm_stats", None)
    return sorted(stats or {})


def check_unnorm_key(model: nn.Module, unnorm_key: Optional[str]) -> str:
    """Return `unnorm_key` if the model has statistics for it, else raise a one-line ValueError with the keys."""
    keys = available_unnorm_keys(model)
    if unnorm_key is None and len(keys) == 1:
        return keys[0]
    if not keys:
        raise ValueError(f"UNNORM_KEY {unnorm_key!r}: the model has no norm_stats at all; register the fine-tuning "
                         f"dataset's statistics first (register_dataset_statistics)")
    if unnorm_key not in keys:
        shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
        raise ValueError(f"UNNORM_KEY {unnorm_key!r} is not in model.config.norm_stats; available keys: [{shown}]")
    return unnorm_key


def register_dataset_statistics(model: nn.Module, unnorm_key: str, stats_entry: Mapping[str, Any]) -> Dict[str, Any]:
    """Put the fine-tuning dataset's statistics into ``model.config.norm_stats[unnorm_key]``.

    predict_action(unnorm_key=...) then de-normalizes with exactly the statistics training normalized with.
    OpenVLA's model also keeps ``model.norm_stats`` (the same dict object as its config's, read by predict_action);
    it is pointed at the config's dict when it is a plain attribute. Works through PEFT/DDP wrappers. Returns the
    stored entry (JSON types).
    """
    if not unnorm_key or not isinstance(unnorm_key, str):
        raise ValueError(f"unnorm_key must be a non-empty string, got {unnorm_key!r}")
    entry = validated_entry(stats_entry)
    base = base_model(model)
    config = base.config
    if getattr(config, "norm_stats", None) is None:
        config.norm_stats = {}
    config.norm_stats[unnorm_key] = entry
    if not isinstance(getattr(type(base), "norm_stats", None), property):
        base.norm_stats = config.norm_stats              # OpenVLA: a plain attribute, read by predict_action
    return entry


# ------------------------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------------------------
def lora_config(rank: int, alpha: float, dropout: float = 0.0, model: Optional[nn.Module] = None,
                target_modules: Optional[Sequence[str]] = None):
    """Upstream's LoRA recipe with an explicit target list (all linear layers except ``lm_head``).

    ``LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=..., init_lora_weights="gaussian")``
    where target_modules = ``lora_target_modules(model)`` (the names PEFT's "all-linear" expands to, without
    "lm_head"). Pass `model` (the VLA, PEFT-wrapped or not) or an explicit `target_modules`.
    """
    from peft import LoraConfig   # lazy: peft is only needed once LoRA is attached

    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha or alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if target_modules is None:
        if model is None:
            raise ValueError("lora_config needs the model (to list its linear layers) or explicit target_modules")
        target_modules = lora_target_modules(model)
    target_modules = sorted(set(target_modules))
    if not target_modules:
        raise ValueError("the model has no linear layers to adapt")
    if "lm_head" in target_modules:
        warnings.warn("target_modules includes lm_head: PEFT will then save the full output head in every adapter",
                      stacklevel=2)
    return LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=target_modules,
                      init_lora_weights="gaussian")


def attach_lora(model: nn.Module, rank: int, alpha: float, seed: int, dropout: float = 0.0):
    """Wrap ``model`` with upstream's LoRA (:func:`lora_config`), torch seeded with ``seed`` first.

    The adapters' Gaussian init draws from torch's global RNG, so without the seed two runs with the same SEED start
    from different adapters (and end 0.2 apart in max |ΔW| on the tiny VLA). Every place that attaches LoRA (the
    notebook, the ablations, bench-train) goes through here.
    """
    from peft import get_peft_model   # lazy: peft is only needed once LoRA is attached

    config = lora_config(rank, alpha, dropout, model=model)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


__all__ = [
    "PRECISIONS", "ModelLoadError", "LoadInfo", "base_model", "model_dtype",
    "model_device", "model_image_size", "action_inputs", "choose_attention", "missing_checkpoint_files",
    "check_local_checkpoint", "load_openvla", "available_unnorm_keys", "check_unnorm_key",
    "register_dataset_statistics", "lora_config",
    "attach_lora", "SilentVisionError", "first_action_token_probs", "check_reads_image",
    "lora_target_modules", "linear_module_names", "trainable_parameters", "trainable_summary",
]
