"""Notebook parameters → one resolved, printable run configuration.

The notebook's ``parameters`` cell holds plain values (``"auto"`` where the hardware should decide); papermill
overrides them; ``resolve_run_config`` turns them into a :class:`RunConfig` with every ``auto`` replaced and the
reason for each decision kept, so the notebook prints what it will do and why before it does anything heavy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from . import hardware as hwmod
from . import preflight
from .hardware import Decision, HardwareInfo, PreflightError


# The parameter names the notebook's parameters cell defines, with their defaults. ``"auto"`` means "decide from
# the hardware / policy" (see ``_auto_training``). Tests and the CLI use this table, so it is the single list.
DEFAULT_PARAMS: dict[str, Any] = {
    "POLICY": "auto",            # auto | openvla | openvla-4bit | octo | tiny   (env FORCE_PATH wins)
    "MODEL_ID": "auto",          # hub id or local directory
    "DATASET": "auto",           # auto | embedded | hub id | local LeRobot v3.0 root
    "UNNORM_KEY": "auto",        # key in norm_stats; auto → bridge_orig on Bridge, demo_world on the embedded world
    "RUN_NAME": "auto",          # auto → <policy>-<dataset>
    "SEED": 0,
    "MAX_STEPS": "auto",         # optimizer steps; auto → 1000 on GPU, a demo budget that learns on CPU
    "BATCH_SIZE": "auto",        # auto → 4 on GPU (OpenVLA), 16 on CPU (tiny)
    "GRAD_ACCUM": "auto",        # auto → 2 on GPU, 1 on CPU
    "LEARNING_RATE": 5e-4,
    "WARMUP_STEPS": 50,
    "PRETRAIN_STEPS": "auto",    # tiny path only: action-stage steps of the base's pretraining (auto → 600: shipped)
    "LORA_RANK": 32,
    "LORA_ALPHA": 16,
    "LOG_EVERY": 10,
    "SAVE_EVERY": 500,
    "IMAGE_AUG": True,
    "EVAL_EPISODES": "auto",     # per task; auto → 10 on GPU, 4 on CPU (the closed loop dominates the budget)
    "ABLATION_RANKS": "auto",    # auto → [8, 16, 32, 64] on the tiny path, [] (opt-in) for OpenVLA-7B
    "USE_WANDB": False,
    "RESUME": False,
    "HUB_TIMEOUT_S": 3.0,
    "OUTPUTS_DIR": "outputs",
    "DATA_DIR": "data",
    "DEMO_EPISODES": "auto",     # embedded dataset size: auto → the tiny VLA's default; a total N, or "split=n,..."
    "STREAM_BATCHES": "auto",    # batches the data section streams to show the loader holds up; auto → 10 s of them
    "EXPORT": "auto",            # merge the adapter into a standalone checkpoint; auto → on for tiny, opt-in for 7B
    "NUM_PROCESSES": 1,          # data-parallel training processes (section 7); auto → the visible GPUs on OpenVLA
}

# What a parameter whose default is "auto" takes besides "auto" (text, unless listed). Every other parameter takes
# its default's type; a float parameter also takes an integer, an integer parameter a whole float (1e3).
AUTO_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "MAX_STEPS": (int,), "BATCH_SIZE": (int,), "GRAD_ACCUM": (int,), "PRETRAIN_STEPS": (int,), "EVAL_EPISODES": (int,),
    "STREAM_BATCHES": (int,), "ABLATION_RANKS": (list, str), "DEMO_EPISODES": (int, str, dict),
    "EXPORT": (bool,),
}
# Parameters with a concrete default that also take "auto".
ALSO_AUTO = {"NUM_PROCESSES"}
# The smallest value of each integer parameter (PRETRAIN_STEPS: 1 on the tiny path, which pretrains with it).
INT_MINIMUMS = {"SEED": 0, "MAX_STEPS": 1, "BATCH_SIZE": 1, "GRAD_ACCUM": 1, "WARMUP_STEPS": 0, "PRETRAIN_STEPS": 0,
                "LORA_RANK": 1, "LORA_ALPHA": 1, "LOG_EVERY": 1, "SAVE_EVERY": 1, "EVAL_EPISODES": 1,
                "STREAM_BATCHES": 1, "DEMO_EPISODES": 1, "NUM_PROCESSES": 1}
_TYPE_WORDS = {bool: "True or False", int: "an integer", float: "a number", str: "text", list: "a list",
               dict: "a mapping"}
_WORDS = {"true": True, "false": False, "none": None, "null": None}

EMBEDDED_UNNORM_KEY = "demo_world"
BRIDGE_UNNORM_KEY = "bridge_orig"


@dataclasses.dataclass
class RunConfig:
    policy: str
    policy_reason: str
    dataset: str
    dataset_reason: str
    model_id: str
    unnorm_key: str
    run_name: str
    seed: int
    max_steps: int
    batch_size: int
    grad_accum: int
    learning_rate: float
    warmup_steps: int
    pretrain_steps: int
    lora_rank: int
    lora_alpha: int
    log_every: int
    save_every: int
    image_aug: bool
    eval_episodes: int
    ablation_ranks: list[int]
    use_wandb: bool
    resume: bool
    device: str
    precision: str
    hub: str
    hub_reason: str
    data_dir: str
    outputs_dir: str
    export: bool = False          # EXPORT resolved: section 13 merges and saves outputs/export/<run>/
    num_processes: int = 1        # NUM_PROCESSES resolved: data-parallel training processes

    # ----- stable output locations (docs/ARCHITECTURE.md "Layouts")
    def path(self, kind: str) -> Path:
        """outputs/<kind>/<run> for kind in checkpoints, logs, eval, figures, videos."""
        return Path(self.outputs_dir) / kind / self.run_name

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def summary(self) -> str:
        rows = [
            ("policy", f"{self.policy}  ← {self.policy_reason}"),
            ("model", self.model_id),
            ("dataset", f"{self.dataset}  ← {self.dataset_reason}"),
            ("unnorm_key", self.unnorm_key),
            ("device / precision", f"{self.device} / {self.precision}"),
            ("run", self.run_name),
            ("steps", f"{self.max_steps} × batch {self.batch_size} × accum {self.grad_accum}"
                      + (f" × {self.num_processes} processes = global batch "
                         f"{self.batch_size * self.grad_accum * self.num_processes}" if self.num_processes > 1 else "")
                      + f", lr {self.learning_rate:g}"),
            ("LoRA", f"r={self.lora_rank}, alpha={self.lora_alpha}"),
            ("eval", f"{self.eval_episodes} episodes/task; ablation ranks {self.ablation_ranks or 'off'}"),
        ]
        return "\n".join(f"{k:>19}: {v}" for k, v in rows)


def param_types(name: str) -> tuple[type, ...]:
    """The types parameter ``name`` takes (besides "auto" where that is its default)."""
    default = DEFAULT_PARAMS[name]
    return AUTO_PARAM_TYPES.get(name, (str,)) if default == "auto" else (type(default),)


def check_param(name: str, value: Any) -> Any:
    """``value`` if its type fits parameter ``name`` (an int for a float parameter, a whole float for an integer
    one, converted), else a one-line :class:`PreflightError`."""
    auto = DEFAULT_PARAMS[name] == "auto" or name in ALSO_AUTO
    if auto and value == "auto":
        return value
    types = param_types(name)
    if isinstance(value, bool) == (bool in types):
        if float in types and isinstance(value, int):
            return float(value)
        if int in types and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, types):
            return value
    wanted = " or ".join(_TYPE_WORDS[t] for t in types) + (" or 'auto'" if auto else "")
    raise PreflightError(f"{name}={value!r} must be {wanted}, not {type(value).__name__}")


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`check_param` on each known parameter (unknown names are the caller's to report)."""
    return {k: check_param(k, v) if k in DEFAULT_PARAMS else v for k, v in params.items()}


def parse_param(name: str, text: str) -> Any:
    """A ``-p NAME=VALUE`` value as a person writes it: True/true, False/false, None/null, numbers (1e-4, nan), JSON
    lists ([8, 16]); it stays text where the parameter takes text (RUN_NAME=123). A value of the wrong type is a
    one-line :class:`PreflightError`."""
    value = _WORDS.get(text.strip().lower(), text)
    if value is text:
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                pass
    if name not in DEFAULT_PARAMS:
        return value
    try:
        return check_param(name, value)
    except PreflightError:
        if str in param_types(name):
            return text
        raise


def _as_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise PreflightError(f"{name}={value!r} must be an integer or 'auto'")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise PreflightError(f"{name}={value!r} must be an integer or 'auto'") from None
    if out < minimum:
        raise PreflightError(f"{name}={out} must be ≥ {minimum}")
    return out


def _as_positive_float(name: str, value: Any) -> float:
    out = float(value)
    if not math.isfinite(out) or out <= 0:
        raise PreflightError(f"{name}={value!r} must be a finite number > 0")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.rstrip("/").split("/")[-1]) or "run"


def _auto_training(policy: str) -> dict[str, Any]:
    if policy == "tiny":
        return {"MAX_STEPS": 300, "BATCH_SIZE": 16, "GRAD_ACCUM": 1, "EVAL_EPISODES": 4, "ABLATION_RANKS": [8, 16, 32, 64],
                "PRETRAIN_STEPS": 600}
    if policy == "octo":
        return {"MAX_STEPS": 1000, "BATCH_SIZE": 32, "GRAD_ACCUM": 1, "EVAL_EPISODES": 10, "ABLATION_RANKS": [],
                "PRETRAIN_STEPS": 0}
    return {"MAX_STEPS": 1000, "BATCH_SIZE": 4, "GRAD_ACCUM": 2, "EVAL_EPISODES": 10, "ABLATION_RANKS": [],
            "PRETRAIN_STEPS": 0}


def resolve_run_config(
    params: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    hw: HardwareInfo | None = None,
    hub: Decision | None = None,
    bnb_available: bool | None = None,
) -> RunConfig:
    """Resolve every ``auto``; hardware / hub probes can be injected (tests pass fakes)."""
    env = os.environ if env is None else env
    p = dict(DEFAULT_PARAMS)
    unknown = set(params or {}) - set(DEFAULT_PARAMS)
    if unknown:
        raise PreflightError(f"unknown parameter(s) {sorted(unknown)}; known: {', '.join(DEFAULT_PARAMS)}")
    p.update(check_params(params or {}))
    # every number is checked here, before the hardware probe and long before any data or model is loaded
    learning_rate = _as_positive_float("LEARNING_RATE", p["LEARNING_RATE"])
    hub_timeout = _as_positive_float("HUB_TIMEOUT_S", p["HUB_TIMEOUT_S"])
    for name, minimum in INT_MINIMUMS.items():
        if isinstance(p[name], int):
            _as_int(name, p[name], minimum)
    for rank in p["ABLATION_RANKS"] if isinstance(p["ABLATION_RANKS"], list) else []:
        _as_int("ABLATION_RANKS entry", rank, 1)

    hw = hwmod.detect_hardware() if hw is None else hw
    hub = hwmod.check_hub(hub_timeout, env=dict(env)) if hub is None else hub
    hub_ok = hub.value == "yes"
    model_req = str(p["MODEL_ID"])
    pol = hwmod.choose_policy(hw, hub_ok, str(p["POLICY"]), env.get("FORCE_PATH"), bnb_available, model_req)
    ds = hwmod.choose_dataset(str(p["DATASET"]), pol.value, hub_ok)

    model_id = hwmod.DEFAULT_MODEL_IDS[pol.value] if model_req == "auto" else model_req
    if pol.value == "tiny" and model_req == "auto":
        model_id = str(Path(p["DATA_DIR"]) / "tiny_vla_base")
    unnorm = str(p["UNNORM_KEY"])
    if unnorm == "auto":
        unnorm = EMBEDDED_UNNORM_KEY if hwmod.is_embedded(ds.value) else BRIDGE_UNNORM_KEY
    elif hwmod.is_embedded(ds.value) and unnorm != EMBEDDED_UNNORM_KEY:
        raise PreflightError(f"UNNORM_KEY={unnorm!r}: the embedded demo world's action statistics are named "
                             f"{EMBEDDED_UNNORM_KEY!r} — set UNNORM_KEY='auto' (or {EMBEDDED_UNNORM_KEY!r})")
    elif not unnorm.strip():
        raise PreflightError("UNNORM_KEY='' must name the dataset's statistics (e.g. 'bridge_orig'), or be 'auto'")
    else:  # a typo of one of the model's keys, caught here when its config.json is at hand (else after loading)
        preflight.check_unnorm_key_name(unnorm, preflight.model_norm_stats_keys(model_id))

    auto = _auto_training(pol.value)
    resolved = {k: (auto[k] if p[k] == "auto" else p[k]) for k in auto}
    ranks = resolved["ABLATION_RANKS"]
    if isinstance(ranks, str):
        ranks = [int(r) for r in ranks.replace(",", " ").split()]
    ranks = [_as_int("ABLATION_RANKS entry", r, 1) for r in ranks]

    run_name = str(p["RUN_NAME"])
    if run_name == "auto":
        run_name = f"{pol.value}-{_slug(ds.value)}"
    if pol.value == "octo" and bool(p["RESUME"]):
        raise PreflightError(f"RESUME=True is not supported on POLICY=octo (its checkpoints hold parameters only, so "
                             f"training would restart and overwrite outputs/checkpoints/{_slug(run_name)}/latest/): set "
                             "RESUME=False, with a new RUN_NAME to keep that run's checkpoints")

    processes = p["NUM_PROCESSES"]
    if processes == "auto":
        processes = hw.gpu_count if pol.value in ("openvla", "openvla-4bit") and hw.cuda_available else 1
    processes = _as_int("NUM_PROCESSES", processes, 1)
    if processes > 1 and pol.value == "octo":
        raise PreflightError(f"NUM_PROCESSES={processes}: POLICY=octo trains in one JAX worker process; set "
                             "NUM_PROCESSES=1")
    if processes > 1 and hw.cuda_available and processes > hw.gpu_count:
        raise PreflightError(f"NUM_PROCESSES={processes} but this machine shows {hw.gpu_count} GPU(s) "
                             f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): one process per GPU, "
                             f"so set NUM_PROCESSES={hw.gpu_count} or 'auto'")

    device = "cuda" if hw.cuda_available else "cpu"
    if device == "cpu":
        precision = "fp32"
    elif pol.value == "openvla-4bit":
        precision = "nf4 weights, bf16 compute"
    else:
        precision = "bf16" if hw.bf16_supported else "fp16"

    return RunConfig(
        policy=pol.value,
        policy_reason=pol.reason,
        dataset=ds.value,
        dataset_reason=ds.reason,
        model_id=model_id,
        unnorm_key=unnorm,
        run_name=_slug(run_name),
        seed=_as_int("SEED", p["SEED"], INT_MINIMUMS["SEED"]),
        max_steps=_as_int("MAX_STEPS", resolved["MAX_STEPS"], INT_MINIMUMS["MAX_STEPS"]),
        batch_size=_as_int("BATCH_SIZE", resolved["BATCH_SIZE"], INT_MINIMUMS["BATCH_SIZE"]),
        grad_accum=_as_int("GRAD_ACCUM", resolved["GRAD_ACCUM"], INT_MINIMUMS["GRAD_ACCUM"]),
        learning_rate=learning_rate,
        warmup_steps=_as_int("WARMUP_STEPS", p["WARMUP_STEPS"], INT_MINIMUMS["WARMUP_STEPS"]),
        pretrain_steps=_as_int("PRETRAIN_STEPS", resolved["PRETRAIN_STEPS"], 1 if pol.value == "tiny" else 0),
        lora_rank=_as_int("LORA_RANK", p["LORA_RANK"], INT_MINIMUMS["LORA_RANK"]),
        lora_alpha=_as_int("LORA_ALPHA", p["LORA_ALPHA"], INT_MINIMUMS["LORA_ALPHA"]),
        log_every=_as_int("LOG_EVERY", p["LOG_EVERY"], INT_MINIMUMS["LOG_EVERY"]),
        save_every=_as_int("SAVE_EVERY", p["SAVE_EVERY"], INT_MINIMUMS["SAVE_EVERY"]),
        image_aug=p["IMAGE_AUG"],
        eval_episodes=_as_int("EVAL_EPISODES", resolved["EVAL_EPISODES"], INT_MINIMUMS["EVAL_EPISODES"]),
        ablation_ranks=ranks,
        use_wandb=p["USE_WANDB"],
        resume=p["RESUME"],
        device=device,
        precision=precision,
        hub=hub.value,
        hub_reason=hub.reason,
        data_dir=str(p["DATA_DIR"]),
        outputs_dir=str(p["OUTPUTS_DIR"]),
        export=(pol.value == "tiny") if p["EXPORT"] == "auto" else bool(p["EXPORT"]),
        num_processes=processes,
    )


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write JSON atomically (temp file + rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path
