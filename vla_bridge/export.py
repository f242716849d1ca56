"""Export the fine-tuned policy: merge the LoRA adapter into its base once, save a standalone checkpoint, reload it
through the Auto classes and check that it acts like the adapter.

Training only ever writes adapters (``outputs/checkpoints/<run>/step_XXXXXX/``); a robot-side consumer wants one
directory that ``AutoModelForVision2Seq.from_pretrained`` opens without PEFT, with the statistics to de-normalize
its actions inside. :func:`export_policy` does that, on demand and once (upstream's finetune.py merges at every save,
reloading a second bf16 copy of the base each time, which is where its users' out-of-memory reports come from):

1. checks the adapter directory (adapter weights, ``adapter_config.json``, ``dataset_statistics.json``) and picks
   the unnorm key (the run's ``UNNORM_KEY`` from ``checkpoint.json``, else the statistics' only key);
2. counts the base's parameters without loading it (meta device) and prints what the merge needs — parameters ×
   dtype bytes, plus the adapter — next to what is free on the device and on the disk; refuses in one line when
   it clearly does not fit;
3. loads the base the way the notebook does (:func:`vla_bridge.models.openvla.load_openvla`), the adapter with
   ``PeftModel.from_pretrained``, registers the fine-tuned statistics under the key, and records the adapter's
   ``predict_action`` on a few frames;
4. ``merge_and_unload()``; ``save_pretrained`` of the merged model and the processor (the remote-code files of an
   OpenVLA checkpoint travel with it), ``dataset_statistics.json`` with the fine-tuned statistics (the file
   upstream's deploy code reads), and ``export.json`` (provenance, the memory figures, the check);
5. frees the merged model, reloads the directory with ``AutoModelForVision2Seq`` / ``AutoProcessor``
   (``trust_remote_code`` when the config has an ``auto_map``), and compares its ``predict_action(...,
   unnorm_key=...)`` with the adapter's: in fp32 the maximum absolute difference must be ~0 (≤ 1e-5); in bf16
   rounding the merged weights may move a greedy token to its neighbour, so one action bin per dimension is allowed.

The directory is written under a temporary name and renamed into place only after the check passes.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from transformers import AutoConfig, AutoModelForVision2Seq, AutoProcessor

from .data.schema import MAIN_CAMERA
from .data.stats import load_dataset_statistics, save_dataset_statistics
from .data.world import TabletopEnv, task_catalog
from .models import tiny_vla  # noqa: F401  (registers the tiny VLA with the Auto classes)
from .models.openvla import (_read_json, _resolve_source, action_inputs, load_openvla, missing_checkpoint_files,
                             model_image_size, register_dataset_statistics)
from .paths import STATS_FILENAME

PathLike = Union[str, os.PathLike]
EXPORT_FILE = "export.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_TOLERANCE = 1e-5
GIB = 1024 ** 3


class ExportError(RuntimeError):
    """The export cannot go ahead as asked; the message is one line and says what to do."""


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------
def check_adapter_dir(adapter_dir: PathLike) -> Path:
    """The adapter directory, or a one-line :class:`ExportError` naming what is missing."""
    d = Path(adapter_dir).expanduser()
    if not d.is_dir():
        hint = (" (train first: notebook section 7 writes outputs/checkpoints/<RUN_NAME>/latest/)"
                if not d.exists() else "")
        raise ExportError(f"adapter directory {str(d)!r} does not exist{hint}")
    missing = [f for f in ("adapter_config.json", STATS_FILENAME) if not (d / f).is_file()]
    if not any((d / w).is_file() for w in ADAPTER_WEIGHTS):
        missing.insert(0, "adapter_model.safetensors")
    if missing:
        what = "a full-model checkpoint, not a LoRA adapter" if (d / "model.safetensors").is_file() else \
            "not a complete LoRA checkpoint"
        raise ExportError(f"{str(d)!r} is {what}; missing: {', '.join(missing)} (point it at "
                          f"outputs/checkpoints/<RUN_NAME>/latest or a step_XXXXXX/ directory)")
    return d


def adapter_base(adapter_dir: Path, base: Optional[str] = None) -> str:
    """The base model the adapter was trained on: ``base`` if given, else adapter_config.json's record."""
    if base:
        return str(base)
    recorded = (_read_json(adapter_dir / "adapter_config.json") or {}).get("base_model_name_or_path")
    if not recorded:
        raise ExportError(f"{adapter_dir}/adapter_config.json does not say which base the adapter belongs to; pass it "
                          f"(--base MODEL_ID, the MODEL_ID the run trained)")
    return str(recorded)


def choose_unnorm_key(adapter_dir: Path, stats: Mapping[str, Any], unnorm_key: Optional[str] = None) -> str:
    """``unnorm_key`` if given, else the run's ``UNNORM_KEY`` (checkpoint.json), else the statistics' only key."""
    keys = sorted(stats)
    if unnorm_key is None:
        unnorm_key = ((_read_json(adapter_dir / "checkpoint.json") or {}).get("run") or {}).get("UNNORM_KEY")
    if unnorm_key is None and len(keys) == 1:
        unnorm_key = keys[0]
    if unnorm_key not in stats:
        raise ExportError(f"UNNORM_KEY {unnorm_key!r} has no statistics in {adapter_dir}/{STATS_FILENAME}; "
                          f"available: [{', '.join(keys)}]")
    return str(unnorm_key)


# ------------------------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryPlan:
    """What the merge needs on ``device`` and what is free there and on the output's disk."""

    n_parameters: int
    dtype: str
    bytes_per_parameter: int
    adapter_bytes: int
    device: str
    free_bytes: int
    disk_free_bytes: int

    @property
    def model_bytes(self) -> int:
        return self.n_parameters * self.bytes_per_parameter

    @property
    def need_bytes(self) -> int:
        return self.model_bytes + self.adapter_bytes

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.free_bytes and self.model_bytes <= self.disk_free_bytes

    def line(self) -> str:
        return (f"merge needs ≈ {self.need_bytes / GIB:.2f} GiB on {self.device} ({self.n_parameters:,} parameters × "
                f"{self.bytes_per_parameter} bytes ({self.dtype}) = {self.model_bytes / GIB:.2f} GiB + adapter "
                f"{self.adapter_bytes / GIB:.3f} GiB); free: {self.free_bytes / GIB:.2f} GiB on {self.device}, "
                f"{self.disk_free_bytes / GIB:.1f} GiB on disk for the {self.model_bytes / GIB:.2f} GiB checkpoint")

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_bytes": self.model_bytes, "need_bytes": self.need_bytes}


def check_memory(plan: MemoryPlan) -> None:
    """Refuse, in one line, an export that clearly does not fit."""
    if plan.need_bytes > plan.free_bytes:
        other = "--device cpu" if plan.device.startswith("cuda") else "a machine with more RAM"
        raise ExportError(f"not enough memory to merge: {plan.need_bytes / GIB:.2f} GiB needed on {plan.device}, "
                          f"{plan.free_bytes / GIB:.2f} GiB free; free memory (restart the kernel and run only the "
                          f"export), use {other}, or --dtype bf16 if you asked for fp32")
    if plan.model_bytes > plan.disk_free_bytes:
        raise ExportError(f"not enough disk for the merged checkpoint: {plan.model_bytes / GIB:.2f} GiB needed, "
                          f"{plan.disk_free_bytes / GIB:.2f} GiB free; pass --out on a larger disk")


def count_parameters(source: str) -> int:
    """The base's parameter count, from its config on the meta device (nothing is loaded or allocated)."""
    from accelerate import init_empty_weights   # lazy: accelerate is only needed for this count

    remote = bool((_read_json(Path(source) / "config.json") or {}).get("auto_map")) if os.path.isdir(source) else True
    config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
    with init_empty_weights():
        model = AutoModelForVision2Seq.from_config(config, trust_remote_code=remote)
    return sum(p.numel() for p in model.parameters())


def free_memory_bytes(device: str) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the kernel's MemAvailable for the CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _disk_free(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def plan_memory(n_parameters: int, dtype: str, adapter_bytes: int, device: str, out_dir: Path,
                free_bytes: Optional[int] = None) -> MemoryPlan:
    return MemoryPlan(n_parameters=int(n_parameters), dtype=dtype,
                      bytes_per_parameter=torch.tensor([], dtype=DTYPES[dtype]).element_size(),
                      adapter_bytes=int(adapter_bytes), device=device,
                      free_bytes=free_memory_bytes(device) if free_bytes is None else int(free_bytes),
                      disk_free_bytes=_disk_free(out_dir))


# ------------------------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------------------------
def default_frames(image_size: int, n: int = 4, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``n`` (image, instruction) pairs rendered by the embedded world (fine-tuning tasks, seeded scenes)."""
    env, tasks = TabletopEnv(image_size=image_size), task_catalog(seed).finetune
    return [(env.reset(tasks[i % len(tasks)], seed=seed + i)[MAIN_CAMERA], tasks[i % len(tasks)])
            for i in range(n)]


def predict_actions(model, processor, frames: Sequence[tuple[Any, str]], unnorm_key: str) -> np.ndarray:
    """Greedy ``predict_action`` on each (image, instruction): shape (n_frames, action_dim)."""
    model.eval()
    with torch.no_grad():
        return np.stack([np.asarray(model.predict_action(**action_inputs(processor, text, image, model=model),
                                                         unnorm_key=unnorm_key, do_sample=False), np.float64)
                         for image, text in frames])


def action_tolerance(stats_entry: Mapping[str, Any], dtype: str, n_bins: int = 256) -> np.ndarray:
    """Per-dimension tolerance: ~0 in fp32; one bin of the de-normalized action in bf16."""
    action = stats_entry["action"]
    q01, q99 = np.asarray(action["q01"], np.float64), np.asarray(action["q99"], np.float64)
    if dtype == "fp32":
        return np.full_like(q01, FP32_TOLERANCE)
    mask = np.asarray(action.get("mask", [True] * len(q01)), bool)
    step = 2.0 / (n_bins - 1)                       # bin-center spacing in [-1, 1]
    return np.where(mask, 0.5 * step * (q99 - q01), step) * 1.001 + 1e-7


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    adapter_dir: Path
    base: str
    unnorm_key: str
    dtype: str
    memory: MemoryPlan
    actions_adapter: np.ndarray
    actions_export: np.ndarray
    tolerance: np.ndarray
    seconds: dict[str, float]
    files: list[str]

    @property
    def max_abs_diff(self) -> float:
        return float(np.max(np.abs(self.actions_adapter - self.actions_export)))

    def summary(self) -> str:
        t = self.seconds
        return "\n".join([
            f"exported {self.out_dir}  ({self.base} + {self.adapter_dir}, merged in {self.dtype})",
            f"  statistics under unnorm_key {self.unnorm_key!r} (config.json norm_stats and {STATS_FILENAME})",
            f"  reload check on {len(self.actions_adapter)} frames: max |adapter − exported| = {self.max_abs_diff:.3g} "
            f"(allowed {'≤ %.0e' % FP32_TOLERANCE if self.dtype == 'fp32' else 'one action bin per dimension'})",
            f"  time: load {t['load']:.1f} s, merge {t['merge']:.1f} s, save {t['save']:.1f} s, "
            f"reload {t['reload']:.1f} s",
            f"  files: {', '.join(self.files)}",
            f"  load it: AutoModelForVision2Seq.from_pretrained({str(self.out_dir)!r}"
            f"{', trust_remote_code=True' if self.remote_code else ''})",
        ])

    @property
    def remote_code(self) -> bool:
        return bool((_read_json(self.out_dir / "config.json") or {}).get("auto_map"))


# ------------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------------
def default_out_dir(adapter_dir: Path, outputs_dir: PathLike = "outputs") -> Path:
    """``outputs/export/<run>/`` for ``.../checkpoints/<run>/<latest|step_XXXXXX>``, else ``…/export/<dir name>``."""
    resolved = adapter_dir.absolute()
    run = resolved.parent.name if resolved.parent.parent.name == "checkpoints" else resolved.name
    return Path(outputs_dir) / "export" / run


def _copy_remote_code(source: str, dest: Path) -> None:
    """Copy the ``auto_map`` modules (OpenVLA's ``*_prismatic.py``) that save_pretrained did not write: transformers
    copies them only for models loaded from a local directory, not from a hub id (then they come from the cache)."""
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        for ref in ((_read_json(dest / name) or {}).get("auto_map") or {}).values():
            for r in ref if isinstance(ref, (list, tuple)) else [ref]:
                module = r.rsplit(".", 1)[0] + ".py" if isinstance(r, str) and "--" not in r else None
                if module is None or (dest / module).is_file():
                    continue
                if os.path.isdir(source):
                    found = Path(source) / module
                else:
                    try:
                        found = Path(hf_hub_download(source, module))
                    except Exception:  # noqa: BLE001  (reported by missing_checkpoint_files below)
                        continue
                if found.is_file():
                    shutil.copy(found, dest / module)


def _publish(tmp: Path, out: Path) -> None:
    old = out.parent / f"{out.name}_old_{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_policy(adapter_dir: PathLike, out_dir: Optional[PathLike] = None, base: Optional[str] = None,
                  unnorm_key: Optional[str] = None, dtype: str = "auto", device: str = "auto",
                  frames: Optional[Sequence[tuple[Any, str]]] = None, n_frames: int = 4,
                  outputs_dir: PathLike = "outputs", verbose: bool = True) -> ExportResult:
    """Merge, save, reload and check (module docstring). ``frames``: (image uint8 HxWx3, instruction) pairs for the
    check (default: ``n_frames`` rendered by the embedded world). ``dtype``: auto (fp32 for the tiny VLA, bf16
    otherwise, as upstream saves OpenVLA) | fp32 | bf16. ``device``: auto (CUDA when the merge fits there) | cpu |
    cuda[:i]."""
    from peft import PeftModel   # lazy: peft is only needed once an adapter is merged

    say = print if verbose else (lambda *a, **k: None)
    adapter_dir = check_adapter_dir(adapter_dir)
    stats = load_dataset_statistics(adapter_dir)
    key = choose_unnorm_key(adapter_dir, stats, unnorm_key)
    try:
        source = _resolve_source(adapter_base(adapter_dir, base))[0]
    except (FileNotFoundError, RuntimeError) as e:
        raise ExportError(f"base model of {adapter_dir}: {e}") from None
    tiny = (_read_json(Path(source) / "config.json") or {}).get("model_type") == "tiny_vla"
    dtype = ("fp32" if tiny else "bf16") if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} must be auto, fp32 or bf16")
    out = Path(out_dir) if out_dir is not None else default_out_dir(adapter_dir, outputs_dir)

    n_params = count_parameters(source)
    adapter_bytes = sum((adapter_dir / w).stat().st_size for w in ADAPTER_WEIGHTS if (adapter_dir / w).is_file())
    if device == "auto":
        device = "cpu"
        if torch.cuda.is_available():
            cuda_plan = plan_memory(n_params, dtype, adapter_bytes, "cuda:0", out)
            device = "cuda:0" if cuda_plan.need_bytes <= cuda_plan.free_bytes else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"device {device!r} asked for but torch sees no CUDA GPU; use --device cpu")
    plan = plan_memory(n_params, dtype, adapter_bytes, device, out)
    say(f"export: {plan.line()}")
    check_memory(plan)

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    processor, model = load_openvla(source, precision=dtype, device=device, verbose=verbose)
    attn = getattr(model.config, "_attn_implementation", None)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    for k, entry in stats.items():
        register_dataset_statistics(model, k, entry)
    seconds["load"] = time.perf_counter() - t
    if frames is None:
        frames = default_frames(model_image_size(processor), n_frames)
    if not frames:
        raise ExportError("the reload check needs at least one (image, instruction) frame")
    actions_adapter = predict_actions(model, processor, frames, key)

    t = time.perf_counter()
    merged = model.merge_and_unload()
    seconds["merge"] = time.perf_counter() - t
    leftover = [n for n, _ in merged.named_parameters() if "lora_" in n]
    if leftover:
        raise ExportError(f"merge_and_unload left LoRA parameters in the model ({leftover[0]}, …)")

    t = time.perf_counter()
    tmp = out.parent / f"{out.name}_incomplete_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))
    _copy_remote_code(source, tmp)
    save_dataset_statistics(tmp, stats)
    missing = missing_checkpoint_files(tmp)
    if missing:
        raise ExportError(f"the saved checkpoint {tmp} lacks {', '.join(missing)}; it was not published")
    seconds["save"] = time.perf_counter() - t
    del model, merged
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    t = time.perf_counter()
    remote = bool((_read_json(tmp / "config.json") or {}).get("auto_map"))
    processor2 = AutoProcessor.from_pretrained(str(tmp), trust_remote_code=remote)
    reloaded = AutoModelForVision2Seq.from_pretrained(str(tmp), torch_dtype=DTYPES[dtype], trust_remote_code=remote,
                                                      low_cpu_mem_usage=True,
                                                      **({"attn_implementation": attn} if attn else {})).to(device)
    seconds["reload"] = time.perf_counter() - t
    saved_stats = (reloaded.config.norm_stats or {}).get(key)
    if saved_stats != json.loads(json.dumps(stats[key])):
        raise ExportError(f"the reloaded config's norm_stats[{key!r}] are not the fine-tuned statistics")
    actions_export = predict_actions(reloaded, processor2, frames, key)
    tolerance = action_tolerance(stats[key], dtype)
    del reloaded

    result = ExportResult(out_dir=out, adapter_dir=adapter_dir, base=str(source), unnorm_key=key, dtype=dtype,
                          memory=plan, actions_adapter=actions_adapter, actions_export=actions_export,
                          tolerance=tolerance, seconds=seconds, files=[])
    bad = np.abs(actions_adapter - actions_export) > tolerance
    if bad.any():
        raise ExportError(f"the reloaded export does not act like the adapter: max |Δaction| "
                          f"{result.max_abs_diff:.3g} on {int(bad.any(axis=1).sum())}/{len(frames)} frames (left "
                          f"unpublished in {tmp})")
    meta = {"adapter": str(adapter_dir), "adapter_resolved": str(adapter_dir.resolve()), "base": str(source),
            "unnorm_key": key, "dtype": dtype, "device": device, "memory": plan.as_dict(),
            "step": (_read_json(adapter_dir / "checkpoint.json") or {}).get("step"),
            "check": {"frames": [text for _, text in frames], "max_abs_diff": result.max_abs_diff,
                      "tolerance": tolerance.tolist(), "actions_adapter": actions_adapter.tolist(),
                      "actions_export": actions_export.tolist()},
            "seconds": seconds, "created_at": time.time()}
    (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
    _publish(tmp, out)
    result.files = sorted(p.name for p in out.iterdir())
    return result


__all__ = ["ExportError", "ExportResult", "MemoryPlan", "check_adapter_dir", "adapter_base", "choose_unnorm_key",
           "check_memory", "count_parameters", "free_memory_bytes", "plan_memory", "default_frames",
           "predict_actions", "action_tolerance", "default_out_dir", "export_policy", "EXPORT_FILE"]
